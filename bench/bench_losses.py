"""Benchmark: clipped PPO policy + value losses, forward + backward, against eager PyTorch.

Implementations (same inputs: logp / values fp32 or bf16, fp32 old log-probs / advantages /
old values / returns, bool multi-turn mask; policy: clip 0.2 / 0.28 + dual clip 3, token-mean):

* ``eager``: ``fastrlhf.reference`` (verl 0.9's formulas, op for op) + ``torch.autograd.grad``.
* ``compile``: the same function under ``torch.compile`` (forward and backward fused by
  inductor).
* ``fastrlhf``: ``fastrlhf.ppo_policy_loss`` / ``ppo_value_loss`` with ``backend="auto"`` (the
  fused Triton kernels on CUDA, the native C++ loops of ``csrc/losses.cpp`` on CPU).

Each timed call is one forward + backward (gradient w.r.t. logp / values); the implementations
of one op / shape / dtype are timed round-robin (``common.time_group``), so that on a shared
machine their ratios compare the same stretch of time.  GB/s counts the
minimum traffic of that pair: the four inputs read once and the gradient written once
(B * T * (3 * 4 + 1 + 4) bytes for fp32).  ``run(device, quick)`` returns the rows for
``bench/common.py``; ``python bench/bench_losses.py [--device cuda] [--quick] [--write]`` prints
the table (and merges it into ``bench/results/<device>.json`` with ``--write``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GPU_SHAPES = [(256, 8192)]
CPU_SHAPES = [(8, 64), (32, 256)]
POLICY_KW = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg="token-mean")
VALUE_KW = dict(clip=0.5, agg="token-mean")


def make_inputs(B, T, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + torch.randn(B, T, generator=g) * 0.2
    adv = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    old_values = values + torch.randn(B, T, generator=g) * 0.5
    returns = values + torch.randn(B, T, generator=g)
    # multi-turn: a 64-token observation every 512 tokens, right padding on a quarter of the rows
    t = torch.arange(T)
    mask = ((t % 512) < 448).expand(B, T).clone()
    lens = torch.randint(T // 2, T + 1, (B,), generator=g)
    lens[: 3 * B // 4] = T
    mask &= t[None, :] < lens[:, None]
    to = lambda x, dt=torch.float32: x.to(device=device, dtype=dt)  # noqa: E731
    return {"policy": (to(logp, dtype), to(old), to(adv), mask.to(device)),
            "value": (to(values, dtype), to(old_values), to(returns), mask.to(device))}


def _fwd_bwd(loss_fn, x, *rest, **kw):
    x = x.detach().requires_grad_()
    loss = loss_fn(x, *rest, **kw)
    loss = loss[0] if isinstance(loss, tuple) else loss
    return loss, torch.autograd.grad(loss, x)[0]


def run(device: str, quick: bool = False, with_compile: bool = True) -> list[dict]:
    import fastrlhf.ops.losses as L
    from fastrlhf import reference

    cuda = device.startswith("cuda")
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    dtypes = [torch.float32, torch.bfloat16] if cuda else [torch.float32]
    if quick:
        shapes, dtypes = shapes[:1], dtypes[:1]
    ops = {
        "ppo_policy_loss": (reference.ppo_policy_loss, L.ppo_policy_loss, POLICY_KW),
        "ppo_value_loss": (reference.ppo_value_loss, L.ppo_value_loss, VALUE_KW),
    }
    backend = common.fastrlhf_backend(device)
    rows = []
    for B, T in shapes:
        for dtype in dtypes:
            inputs = make_inputs(B, T, device, dtype)
            for op, (ref_fn, fr_fn, kw) in ops.items():
                x, a, b, m = inputs["policy" if op == "ppo_policy_loss" else "value"]
                nbytes = B * T * (x.element_size() + a.element_size() + b.element_size()
                                  + m.element_size() + x.element_size())
                ref_kw = dict(kw)
                args = (a, b, m)
                eager = lambda: _fwd_bwd(ref_fn, x, *args, **ref_kw)  # noqa: E731
                impls = {"eager": eager}
                if with_compile:
                    compiled_fn = torch.compile(ref_fn, dynamic=False)
                    impls["compile"] = lambda: _fwd_bwd(compiled_fn, x, *args, **ref_kw)
                impls["fastrlhf"] = lambda: _fwd_bwd(fr_fn, x, *args, **kw)
                e_loss, e_grad = eager()
                entries = []
                for name, fn in impls.items():
                    row = {"op": op, "impl": name, "mode": "fwd+bwd", "shape": f"{B}x{T}",
                           "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes}
                    if name == "fastrlhf":
                        row["backend"] = backend
                    rows.append(row)
                    try:
                        loss, grad = fn()
                        row["max_err"] = float(max((loss - e_loss).detach().abs(),
                                                   (grad.float() - e_grad.float()).abs().max()))
                    except Exception as e:  # e.g. no C++ compiler for torch.compile on CPU
                        row.pop("bytes", None)
                        row["skipped"] = common.skip_reason(e, device)
                        continue
                    entries.append((row, fn))
                # round-robin (common.time_group): the steps are well under a millisecond on
                # CPU, where a shared machine's speed drifts between implementations timed one
                # after the other
                common.time_group(entries, device, warmup=3, rep=50 if cuda else 100,
                                  max_seconds=20, peak=cuda)
            del inputs
            if cuda:
                torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--write", action="store_true", help="merge into bench/results/<device>.json")
    args = ap.parse_args(argv)
    rows = run(args.device, args.quick, with_compile=not args.no_compile)
    copy_gbps = common.copy_bandwidth_gbps(args.device)
    rows = [common.finish_row(r, copy_gbps) for r in rows]
    common.add_speedups(rows)
    print(f"{common.device_name(args.device)}: copy bandwidth {copy_gbps:.0f} GB/s")
    print(common.format_table(rows))
    if args.write:
        path = os.path.join(common.RESULTS_DIR, f"{common.device_slug(args.device)}.json")
        common.write_results(path, common.environment(args.device), copy_gbps, {"losses": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
