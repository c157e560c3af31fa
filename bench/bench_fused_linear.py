"""Benchmark: log-probs / entropy and the PPO loss straight from hidden states (lm_head fused).

Inputs: hidden ``[N, H]`` and lm_head weight ``[V, H]`` in bf16 (weight scaled by H^-1/2 so
logits are O(1)), int64 tokens; GPU: N = 16384, H = 4096, V in {128256, 151936}.

op ``linear_token_logprobs`` (logp + entropy of every row; fwd+bwd: gradients for hidden and
weight of ``sum(logp * a + entropy * b)``):

* ``eager``: ``hidden @ weight.T`` (bf16 logits) + ``log_softmax(.float())`` + gather + entropy,
  the way trainers write it; ``compile``: that function under ``torch.compile``;
* ``fastrlhf``: :func:`fastrlhf.ops.fused_linear.linear_token_logprobs` (backend auto);
* ``trl``: TRL's ``ChunkedLogProbFunction`` (cuBLAS tiles + a Triton fold), when installed;
* ``gemms``: not an implementation but a floor: only the matmuls, with the same BLAS and inputs
  -- forward ``hidden @ weight.T``; forward + backward also ``G @ weight`` and ``G.T @ hidden``
  for a ``[N, V]`` ``G`` (the logits themselves) -- the least time any implementation that forms
  the logits and both gradients by matmul can take (6NHV flops; fastrlhf's recomputing backward
  does 8NHV, see ARCHITECTURE.md).

op ``fused_linear_ppo_loss`` ([16, 1024] tokens, per-sequence advantages, clip 0.2, token-mean;
fwd+bwd only):

* ``eager``: bf16 logits + the reference PPO loss (``fastrlhf.reference.fused_ppo_loss``);
* ``fastrlhf-logits``: bf16 logits (cuBLAS) + ``fastrlhf.fused_ppo_loss``, when available;
* ``fastrlhf``: :func:`fastrlhf.ops.fused_linear.fused_linear_ppo_loss`;
* ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (beta 0, same clip and aggregation),
  when installed;
* ``gemms``: the floor of the three matmuls, as above.

Every implementation is checked against eager on the same inputs before it is timed (rows that
disagree are recorded as skipped, with the discrepancy); the implementations of one op / mode /
shape are then timed round-robin on CPU (``common.time_group``), so that their ratios compare
the same stretch of a shared machine's time (on GPU one after the other, one set of leaves and
gradients at a time).  ``flops`` counts the useful matmul work,
2NHV forward and 6NHV forward + backward (the backward's logits recompute, another 2NHV, is not
counted), from which ``finish_row`` derives ``tflops``.  ``peak_mb`` is the peak memory allocated
by one call beyond what was live before it (gradients included; on CPU the sampled resident set
size, see ``common.peak_extra_bytes``).  On CPU ``auto`` is the native (C++) backend
(``csrc/fused_linear.cpp``); ``--cpu-shapes 2048x1024x32000`` runs the shapes of issue 19
(``--dtype float32`` for fp32 inputs).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GPU_SHAPES = [(16384, 4096, 128256), (16384, 4096, 151936)]
CPU_SHAPES = [(256, 128, 2048)]
CPU_QUICK_SHAPES = [(64, 32, 500)]
PPO_KW = dict(clip_low=0.2, agg="token-mean")
_DTYPE = {"name": "bf16", "dtype": torch.bfloat16}  # --dtype float32 switches both


# ---------------------------------------------------------------------------------------------
# implementations: f(hidden, weight, tokens) -> (logp, entropy)
# ---------------------------------------------------------------------------------------------

def _eager(hidden, weight, tokens):
    logits = hidden @ weight.T
    logsm = torch.log_softmax(logits.float(), dim=-1)
    logp = logsm.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    return logp, ent


def _fastrlhf(hidden, weight, tokens):
    from fastrlhf.ops.fused_linear import linear_token_logprobs
    return linear_token_logprobs(hidden, weight, tokens, return_entropy=True)


def _trl():
    from trl.kernels import ChunkedLogProbFunction

    def f(hidden, weight, tokens):
        out = ChunkedLogProbFunction.apply(hidden, weight, None, tokens, 1.0, 32768, None, 1.0,
                                           ("entropy",))
        return out[0], out[1]
    return f


def _gemms(hidden, weight, tokens):
    """The floor row: the logits matmul alone (the caller adds the two gradient matmuls)."""
    return hidden @ weight.T


def _gemm_grads(logits, hidden, weight):
    """The two gradient matmuls of the floor row, with the logits standing in for d loss /
    d logits (same shape and dtype): ``dhidden = G @ W``, ``dweight = G.T @ hidden``."""
    return logits @ weight, logits.T @ hidden


def _logprob_impls(with_compile):
    impls = {"eager": lambda: _eager}
    if with_compile:
        impls["compile"] = lambda: torch.compile(_eager, dynamic=False)
    impls["fastrlhf"] = lambda: _fastrlhf
    impls["trl"] = _trl
    impls["gemms"] = lambda: _gemms
    return impls


# ---------------------------------------------------------------------------------------------
# implementations: f(hidden [B, T, H], weight, tokens, old, adv [B], mask) -> loss
# ---------------------------------------------------------------------------------------------

def _ppo_eager(h, w, tok, old, adv, mask):
    from fastrlhf import reference
    return reference.fused_ppo_loss(h @ w.T, tok, old, adv, mask, **PPO_KW)[0]


def _ppo_fastrlhf_logits():
    import fastrlhf as fr
    fused = getattr(fr, "fused_ppo_loss", None)
    if fused is None:
        from fastrlhf.ops.fused_loss import fused_ppo_loss as fused

    def f(h, w, tok, old, adv, mask):
        return fused(h @ w.T, tok, old, adv, mask, inplace_backward=True, **PPO_KW)[0]
    return f


def _ppo_fastrlhf(h, w, tok, old, adv, mask):
    from fastrlhf.ops.fused_linear import fused_linear_ppo_loss
    return fused_linear_ppo_loss(h, w, tok, old, adv, mask, **PPO_KW)[0]


def _ppo_liger():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    mod = LigerFusedLinearGRPOLoss(beta=0.0, epsilon_low=0.2, epsilon_high=0.2, temperature=1.0,
                                   use_ref_model=False)

    def f(h, w, tok, old, adv, mask):
        return mod(h, w, tok, mask.float(), adv, None, None, old)[0]
    return f


def _ppo_impls():
    return {"eager": lambda: _ppo_eager, "fastrlhf-logits": _ppo_fastrlhf_logits,
            "fastrlhf": lambda: _ppo_fastrlhf, "liger": _ppo_liger}


# ---------------------------------------------------------------------------------------------

def _agree(a, b, atol):
    a, b = a.detach().float(), b.detach().float()
    err = float((a - b).abs().max()) if a.numel() else 0.0
    return None if err <= atol else f"differs from eager by {err:.3g} (> {atol:g})"


def _skip_rows(rows, op, name, modes, shape, why):
    for mode in modes:
        rows.append(dict(op=op, impl=name, mode=mode, shape=shape, dtype=_DTYPE["name"], skipped=why))


def _group(entries, on_gpu):
    """Time the implementations of one op / mode / shape round-robin (common.time_group)."""
    common.time_group(entries, "cuda" if on_gpu else "cpu", warmup=2 if on_gpu else 1,
                      rep=10 if on_gpu else 5, max_seconds=60 if on_gpu else 120)


def _bench_logprobs(rows, device, N, H, V, hidden, weight, tokens, with_compile, backend):
    on_gpu = device.startswith("cuda")
    shape = f"{N}x{H}x{V}"
    op = "linear_token_logprobs"
    g = torch.Generator(device=device).manual_seed(1)
    w_lp = torch.randn(N, device=device, generator=g)
    w_h = torch.randn(N, device=device, generator=g)
    with torch.no_grad():
        e_lp, e_h = _eager(hidden[:256], weight, tokens[:256])
    fns = {}
    for name, make in _logprob_impls(with_compile).items():
        try:
            fn = make()
            if name not in ("eager", "gemms"):
                with torch.no_grad():
                    lp, h = fn(hidden[:256], weight, tokens[:256])
                why = _agree(lp, e_lp, 5e-2) or _agree(h, e_h, 5e-2)
                if why:
                    _skip_rows(rows, op, name, ("fwd", "fwd+bwd"), shape, why)
                    continue
        except Exception as e:  # peer not installed, ...
            _skip_rows(rows, op, name, ("fwd", "fwd+bwd"), shape, common.skip_reason(e, device))
            continue
        fns[name] = fn
    for mode in ("fwd", "fwd+bwd"):
        entries = []
        for name, fn in fns.items():
            row = dict(op=op, impl=name, mode=mode, shape=shape, dtype=_DTYPE["name"],
                       flops=(2 if mode == "fwd" else 6) * N * H * V)
            if name == "fastrlhf":
                row["backend"] = backend
            if mode == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        return fn(hidden, weight, tokens)
                entries.append((row, step))
            elif name == "gemms":
                entries.append((row, _gemm_floor_step(hidden, weight)))
            else:
                hl = hidden.detach().clone().requires_grad_(True)
                wl = weight.detach().clone().requires_grad_(True)

                def step(fn=fn, hl=hl, wl=wl):
                    hl.grad = wl.grad = None
                    lp, h = fn(hl, wl, tokens)
                    ((lp * w_lp).sum() + (h * w_h).sum()).backward()

                def drop(hl=hl, wl=wl):  # so that the peak counts the new gradients
                    hl.grad = wl.grad = None
                entries.append((row, step, drop))
            rows.append(row)
            if on_gpu:  # one set of leaves and gradients at a time (GPU timings are steady)
                _group(entries, on_gpu)
                entries = []
                torch.cuda.empty_cache()
        _group(entries, on_gpu)
        del entries


def _gemm_floor_step(hidden, weight):
    """The three matmuls of a forward + backward (no grad mode: nothing else is computed)."""
    def step():
        with torch.no_grad():
            logits = _gemms(hidden, weight, None)
            return _gemm_grads(logits, hidden, weight)
    return step


def _bench_ppo(rows, device, N, H, V, hidden, weight, tokens, backend):
    on_gpu = device.startswith("cuda")
    B = 16 if N >= 16 * 64 else 4
    T = N // B
    shape = f"{B}x{T}x{H}x{V}"
    op = "fused_linear_ppo_loss"
    h3, tok = hidden[: B * T].view(B, T, H), tokens[: B * T].view(B, T)
    g = torch.Generator(device=device).manual_seed(2)
    with torch.no_grad():
        lp, _ = _eager(h3[:1].reshape(-1, H), weight, tok[:1].reshape(-1))
        old = lp.mean() + 0.1 * torch.randn(B, T, device=device, generator=g)
    adv = torch.randn(B, device=device, generator=g)
    mask = torch.rand(B, T, device=device, generator=g) > 0.1
    ref = None
    entries = []
    for name, make in _ppo_impls().items():
        try:
            fn = make()
            hl = h3.detach().clone().requires_grad_(True)
            wl = weight.detach().clone().requires_grad_(True)
            loss = fn(hl, wl, tok, old, adv, mask)
            loss.backward()
            out = (loss.detach().float(), hl.grad[:2].float())
            if ref is None:
                ref = out
            else:
                # eager rounds the logits to bf16, the fused ops keep them in fp32
                why = _agree(out[0], ref[0], 1e-2) or _agree(out[1], ref[1], 3e-2 * float(
                    ref[1].abs().max()) + 1e-6)
                if why:
                    _skip_rows(rows, op, name, ("fwd+bwd",), shape, why)
                    continue
        except Exception as e:
            _skip_rows(rows, op, name, ("fwd+bwd",), shape, common.skip_reason(e, device))
            continue
        row = dict(op=op, impl=name, mode="fwd+bwd", shape=shape, dtype=_DTYPE["name"],
                   flops=6 * B * T * H * V)
        if name.startswith("fastrlhf"):
            row["backend"] = backend

        def step(fn=fn, hl=hl, wl=wl):
            hl.grad = wl.grad = None
            fn(hl, wl, tok, old, adv, mask).backward()

        def drop(hl=hl, wl=wl):
            hl.grad = wl.grad = None
        entries.append((row, step, drop))
        rows.append(row)
        if on_gpu:
            _group(entries, on_gpu)
            entries = []
            del hl, wl, step, drop
            torch.cuda.empty_cache()
    row = dict(op=op, impl="gemms", mode="fwd+bwd", shape=shape, dtype=_DTYPE["name"],
               flops=6 * B * T * H * V)
    entries.append((row, _gemm_floor_step(h3.reshape(B * T, H), weight)))
    rows.append(row)
    _group(entries, on_gpu)


def run(device: str, quick: bool = False, with_compile: bool = True, cpu_shapes=None,
        dtype: str = "bf16") -> list[dict]:
    on_gpu = device.startswith("cuda")
    shapes = GPU_SHAPES if on_gpu else (CPU_QUICK_SHAPES if quick else CPU_SHAPES)
    if cpu_shapes and not on_gpu:
        shapes = cpu_shapes
    _DTYPE.update(name=dtype, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    if quick and on_gpu:
        shapes = shapes[:1]
    backend = common.fastrlhf_backend(device)  # CPU: native (csrc/fused_linear.cpp)
    rows: list[dict] = []
    for N, H, V in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(N, H, device=device, generator=g).to(_DTYPE["dtype"])
        weight = (torch.randn(V, H, device=device, generator=g) * H ** -0.5).to(_DTYPE["dtype"])
        tokens = torch.randint(0, V, (N,), device=device, generator=g)
        _bench_logprobs(rows, device, N, H, V, hidden, weight, tokens, with_compile, backend)
        _bench_ppo(rows, device, N, H, V, hidden, weight, tokens, backend)
        del hidden, weight, tokens
        if on_gpu:
            torch.cuda.empty_cache()
    common.add_speedups(rows)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--write", action="store_true", help="merge into bench/results/<device>.json")
    ap.add_argument("--cpu-shapes", default="", help="CPU shapes NxHxV[,NxHxV...]")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--out", default="", help="write the rows to this JSON file")
    ap.add_argument("--note", default="", help="a note stored with the rows (e.g. shared machine)")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.cpu_shapes.split(",") if s]
    rows = run(args.device, args.quick, with_compile=not args.no_compile, cpu_shapes=shapes,
               dtype=args.dtype)
    copy_gbps = common.copy_bandwidth_gbps(args.device)
    rows = [common.finish_row(r, copy_gbps) for r in rows]
    print(f"{common.device_name(args.device)}")
    print(common.format_table(rows))
    for r in rows:
        if r.get("tflops"):
            print(f"{r['op']} {r['impl']} {r['mode']} {r['shape']}: {r['tflops']} TFLOP/s")
    if args.write or args.out:
        path = args.out or os.path.join(common.RESULTS_DIR,
                                        f"{common.device_slug(args.device)}.json")
        env = common.environment(args.device)
        env["threads"] = torch.get_num_threads()
        if args.note:
            env["note"] = args.note
        common.write_results(path, env, copy_gbps, {"fused_linear": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
