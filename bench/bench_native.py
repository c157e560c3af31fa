"""Benchmark: the native CPU backend (csrc/) against eager PyTorch on the same CPU.

CPU only (``run`` returns no rows on CUDA).  Three ops, each side by side with its eager baseline
in the same run, fp32:

* ``token_logprobs`` at N = 4096, V = 32000: log-prob of the sampled token + entropy, forward and
  forward + backward (``loss = sum(w1 logp + w2 H)``, ``torch.autograd.grad(loss, logits)``).
  eager: ``log_softmax(logits)`` + gather + ``-(exp(logsm) logsm).sum(-1)`` (what trainers write);
  native: ``fastrlhf.token_logprobs(..., backend="native")``, "+inplace" with
  ``inplace_backward=True``.
* ``gae`` at B = 256, T = 1024, multi-turn mask: verl's reverse Python loop
  (``bench_gae.verl_loop``) vs ``fastrlhf.gae(..., backend="native")``.
* ``fused_ppo_loss`` at B = 8, T = 512, V = 32000 (N = 4096 rows): GRPO-style clipped loss with a
  k3 KL and an entropy bonus, forward + ``torch.autograd.grad(loss, logits)``; eager: the
  composition log_softmax -> gather -> ratio -> clip -> KL -> masked mean; native:
  ``fastrlhf.fused_ppo_loss(..., backend="native")`` (+inplace).

``nv_buffers`` counts the tensors of at least N x V elements that the op creates (every aten op's
outputs, seen through a TorchDispatchMode in one extra untimed run): the eager path's
[N, V] temporaries; for native only the gradient itself (0 with ``inplace``).  The CPU allocator
keeps no peak statistics, so this count stands in for peak memory.

``run(device, quick)`` returns the rows for bench/common.py (``fastrlhf bench --only native``);
``python bench/bench_native.py [--quick] [--write]`` prints the table (and merges it into
``bench/results/cpu.json`` with ``--write``).  Set the thread count with OMP_NUM_THREADS /
``torch.set_num_threads`` before running; it is recorded in every row.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

LOGPROBS_SHAPE = (4096, 32000)
GAE_SHAPE = (256, 1024)
FUSED_SHAPE = (8, 512, 32000)
QUICK = {"logprobs": (256, 2000), "gae": (32, 128), "fused": (2, 64, 2000)}
CLIP, BETA, ENT = 0.2, 0.04, 0.01


class _CountBig(TorchDispatchMode):
    """Counts fresh op outputs (not views, not an input returned) with at least ``n`` elements."""

    def __init__(self, n):
        super().__init__()
        self.n, self.count = n, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {id(a) for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.numel() >= self.n and not t._is_view()
                    and id(t) not in ins):
                self.count += 1
        return out


def _count_big(fn, n):
    mode = _CountBig(n)
    with mode:
        fn()
    return mode.count


def _native_ready():
    from fastrlhf import native
    if not native.available():
        return f"native extension unavailable: {native.build_error()}"
    return None


# ---------------------------------------------------------------------------------------------
# token log-probs + entropy
# ---------------------------------------------------------------------------------------------

def _eager_logprobs(logits, tokens):
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    return logp, ent


def _native_logprobs(inplace):
    import fastrlhf as fr

    def f(logits, tokens):
        return fr.token_logprobs(logits, tokens, return_entropy=True, inplace_backward=inplace,
                                 backend="native")
    return f


def _bench_logprobs(N, V, rows, reps):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(N, V, generator=g) * 2
    tokens = torch.randint(0, V, (N,), generator=g)
    w_lp, w_h = torch.randn(N, generator=g), torch.randn(N, generator=g)
    with torch.no_grad():
        ref_lp, ref_h = _eager_logprobs(data[:64].double(), tokens[:64])
    impls = {"eager": _eager_logprobs, "native": _native_logprobs(False),
             "native+inplace": _native_logprobs(True)}
    problem = _native_ready()
    for name, fn in impls.items():
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd" and name.endswith("+inplace"):
                continue  # the same forward as "native"
            row = dict(op="token_logprobs", impl=name, mode=mode, shape=f"{N}x{V}", dtype="fp32",
                       threads=torch.get_num_threads(),
                       bytes=(1 if mode == "fwd" else 3) * N * V * 4)
            if name != "eager" and problem:
                row.pop("bytes")
                row["skipped"] = problem
                rows.append(row)
                continue
            with torch.no_grad():
                lp, h = fn(data[:64], tokens[:64])
            row["max_err"] = float(max((lp.double() - ref_lp).abs().max(),
                                       (h.double() - ref_h).abs().max()))
            if mode == "fwd":
                def step():
                    with torch.no_grad():
                        return fn(data, tokens)
            else:
                # One leaf reused (the in-place variant overwrites it with its gradient: values
                # stay finite, the work is the same); the gradient is the one handed to the
                # lm_head's backward (torch.autograd.grad: no accumulation into .grad, which
                # would copy an in-place gradient).
                leaf = data.clone().requires_grad_(True)

                def step():
                    lp, h = fn(leaf, tokens)
                    loss = (lp * w_lp).sum() + (h * w_h).sum()
                    return torch.autograd.grad(loss, leaf)[0]
            row.update(common.time_stats(step, "cpu", warmup=1, rep=reps, max_seconds=60))
            row["nv_buffers"] = _count_big(step, N * V)
            rows.append(row)


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------

def _bench_gae(B, T, rows, reps):
    import fastrlhf as fr
    from bench_gae import LAM, GAMMA, make_inputs, verl_loop
    r, v, m = make_inputs(B, T, "cpu")
    nbytes = B * T * (4 + 4 + 1 + 4 + 4)
    ref_adv = verl_loop(r, v, m)[0]
    problem = _native_ready()
    impls = {"eager": lambda: verl_loop(r, v, m),
             "native": lambda: fr.gae(r, v, m, gamma=GAMMA, lam=LAM, backend="native")}
    for name, fn in impls.items():
        row = dict(op="gae", impl=name, mode="fwd", shape=f"{B}x{T}", dtype="fp32",
                   threads=torch.get_num_threads(), bytes=nbytes)
        if name != "eager" and problem:
            row.pop("bytes")
            row["skipped"] = problem
            rows.append(row)
            continue
        adv = fn()[0]
        # fastrlhf writes 0 at masked positions, verl the carried advantage: compare where valid
        row["max_err"] = float((adv - ref_adv)[m].abs().max()) if m.any() else 0.0
        slow = name == "eager"
        row.update(common.time_stats(fn, "cpu", warmup=1 if slow else 5,
                                        rep=max(3, reps) if slow else 50, max_seconds=60))
        rows.append(row)


# ---------------------------------------------------------------------------------------------
# fused PPO loss
# ---------------------------------------------------------------------------------------------

def _eager_fused(logits, tokens, old, adv, mask, ref):
    """The composition as trainers write it (verl style), fp32."""
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    m = mask.float()
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    a = adv.unsqueeze(-1)
    pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - CLIP, 1 + CLIP))
    k = torch.clamp(ref - logp, -20.0, 20.0)
    kl = torch.clamp(torch.exp(k) - k - 1, -10.0, 10.0)
    per_token = pg + BETA * kl - ENT * ent
    return (per_token * m).sum() / m.sum()


def _native_fused(inplace):
    def f(logits, tokens, old, adv, mask, ref):
        from fastrlhf.ops.fused_loss import fused_ppo_loss
        loss, _ = fused_ppo_loss(logits, tokens, old, adv, mask, ref_logp=ref, kl_coef=BETA,
                                    kl_kind="k3", entropy_coef=ENT, clip_low=CLIP,
                                    inplace_backward=inplace, backend="native")
        return loss
    return f


def _bench_fused(B, T, V, rows, reps):
    g = torch.Generator().manual_seed(1)
    data = torch.randn(B, T, V, generator=g) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(data, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    old = lp + 0.1 * torch.randn(B, T, generator=g)
    ref = lp + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.1
    args = (tokens, old, adv, mask, ref)
    expect = float(_eager_fused(data.double(), tokens, old.double(), adv.double(), mask,
                                ref.double()))
    problem = _native_ready()
    if problem is None:
        try:
            from fastrlhf.ops.fused_loss import fused_ppo_loss
            fused_ppo_loss(data[:1, :2], tokens[:1, :2], old[:1, :2], adv[:1], mask[:1, :2],
                           backend="native")
        except (ImportError, ValueError) as e:  # the op has no native dispatch yet
            problem = common.skip_reason(e, "cpu")
    impls = {"eager": _eager_fused, "native": _native_fused(False),
             "native+inplace": _native_fused(True)}
    N = B * T
    for name, fn in impls.items():
        row = dict(op="fused_ppo_loss", impl=name, mode="fwd+bwd", shape=f"{B}x{T}x{V}",
                   dtype="fp32", threads=torch.get_num_threads(), bytes=2 * N * V * 4)
        if name != "eager" and problem:
            row.pop("bytes")
            row["skipped"] = problem
            rows.append(row)
            continue
        x = data.clone().requires_grad_(True)
        row["max_err"] = abs(float(fn(x, *args).detach()) - expect)
        # One leaf reused; the in-place variant overwrites it with its gradient (values stay
        # finite, the work is the same).  The gradient is the one handed to the lm_head's
        # backward: torch.autograd.grad, no accumulation.
        leaf = data.clone().requires_grad_(True)

        def step():
            loss = fn(leaf, *args)
            (gr,) = torch.autograd.grad(loss, leaf)
            return gr

        row.update(common.time_stats(step, "cpu", warmup=1, rep=reps, max_seconds=60))
        row["nv_buffers"] = _count_big(step, N * V)
        rows.append(row)


def run(device: str, quick: bool = False) -> list[dict]:
    if device.startswith("cuda"):
        return []  # the native backend is the CPU path; on CUDA the Triton kernels run
    rows: list[dict] = []
    reps = 3 if quick else 5
    _bench_logprobs(*(QUICK["logprobs"] if quick else LOGPROBS_SHAPE), rows, reps)
    _bench_gae(*(QUICK["gae"] if quick else GAE_SHAPE), rows, reps)
    _bench_fused(*(QUICK["fused"] if quick else FUSED_SHAPE), rows, reps)
    common.add_speedups(rows)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true", help="merge into bench/results/cpu.json")
    args = ap.parse_args(argv)
    rows = run("cpu", args.quick)
    copy_gbps = common.copy_bandwidth_gbps("cpu")
    rows = [common.finish_row(r, copy_gbps) for r in rows]
    print(f"{common.device_name('cpu')}: {torch.get_num_threads()} threads, copy bandwidth "
          f"{copy_gbps:.1f} GB/s")
    print(common.format_table(rows))
    print("[N, V]-sized tensors created per step: " + ", ".join(
        f"{r['op']} {r['impl']} {r['mode']}: {r['nv_buffers']}" for r in rows if "nv_buffers" in r))
    if args.write:
        path = os.path.join(common.RESULTS_DIR, "cpu.json")
        common.write_results(path, common.environment("cpu"), copy_gbps, {"native": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
