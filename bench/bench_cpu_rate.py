"""Benchmark (CPU): the native row loops' compute rate, with the memory system out of the way.

The streaming ops of ``bench_cpu_stream.py`` are bounded by two things: the machine's read
bandwidth and the number of vector operations their loops spend per element.  This measures the
second alone: ``rows x vocab`` logits small enough to stay in L2 (default 64 x 8192: 2 MiB fp32),
one thread by default, the native launchers called directly (no autograd, no checks), repeated
until each timing covers ~50 ms.  Reported per (loop, dtype, temperature): the median over
``--reps`` timings in giga-elements per second and ns per element.

* ``fwd``: ``logprobs_fwd`` (the online logsumexp + entropy sums of every row, and logp);
* ``grad``: ``logprobs_bwd`` into a separate buffer (p = exp(z) per element, the gradient
  written back as the logits' dtype);
* ``fused`` / ``fused+H``: ``fused_loss_call``, the token-level fused PPO loss writing its
  gradient into a separate buffer (statistics sweep, per-token terms, gradient sweep from the
  kept exp terms), without / with an entropy bonus (``+H``: log p is formed again per
  element).

Temperature 1 and 0.7 are both measured: 1 runs loops without the ``* (1 / T)`` multiply.

``python bench/bench_cpu_rate.py [--rows 64] [--vocab 8192] [--threads 1] [--reps 7]
[--out FILE]``; compare two builds by running it on each (the figures move by several percent
between runs on a shared machine: compare medians of interleaved runs, not single numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _time(fn, reps: int) -> list:
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-6)
    inner = max(1, int(0.05 / one))
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t) / inner)
    return out


def _fused(native, x, out, tok, inv_temp, ent_coef):
    """One call of the token-level fused PPO loss over all rows (one sequence of ``rows``
    tokens, every token in the mask), the gradient written to ``out``."""
    from fastrlhf.ops.common import contiguous_row_strides, rows_layout
    from fastrlhf.ops.fused_loss import KL_CODES
    rows, vocab = x.shape
    lg, dims, strides = rows_layout(x.view(1, rows, vocab))
    ostrides = contiguous_row_strides(dims, vocab)
    g = torch.Generator().manual_seed(1)
    old = torch.randn(1, rows, generator=g) - 9.0
    adv = torch.randn(1, generator=g)
    mask = torch.ones(1, rows, dtype=torch.bool)
    coef = torch.full((1,), 1.0 / rows)
    tokens = tok.view(1, rows)

    def f():
        return native.fused_loss_call(
            lg, out.view(1, rows, vocab), dims, strides, ostrides, vocab, 1, rows, tokens, old,
            adv, None, mask, coef, inv_temp=inv_temp, ignore_index=-100, lo=0.8, hi=1.2,
            dual=None, seq=False, kl_coef=0.0, kl_val=KL_CODES["k3"], kl_grad=KL_CODES["k3"],
            ent_coef=ent_coef, write_grad=True, check_tokens=False)
    return f


def run(rows: int, vocab: int, reps: int) -> list:
    from fastrlhf import native
    if not native.available():
        raise SystemExit(f"the native backend is not available: {native.build_error()}")
    g = torch.Generator().manual_seed(0)
    res = []
    for name, dt in DTYPES.items():
        x = torch.randn(rows, vocab, generator=g).to(dt)
        tok = torch.randint(0, vocab, (rows,), generator=g)
        dims, strides = (1, 1, rows), (0, 0, vocab)
        for temp in (1.0, 0.7):
            inv = 1.0 / temp
            logp, ent, lse = native.logprobs_fwd(x, dims, strides, vocab, tok, inv, -100)
            out = torch.empty_like(x)
            dlogp = torch.ones(rows, dtype=logp.dtype)
            loops = {
                "fwd": lambda: native.logprobs_fwd(x, dims, strides, vocab, tok, inv, -100),
                "grad": lambda: native.logprobs_bwd(x, out, dims, strides, strides, vocab, tok,
                                                    dlogp, None, lse, ent, inv, -100),
                "fused": _fused(native, x, out, tok, inv, 0.0),
                "fused+H": _fused(native, x, out, tok, inv, 0.01),
            }
            for loop, fn in loops.items():
                ts = _time(fn, reps)
                med = statistics.median(ts)
                res.append({"loop": loop, "dtype": name, "temperature": temp,
                            "rows": rows, "vocab": vocab, "ms": round(med * 1e3, 5),
                            "min_ms": round(min(ts) * 1e3, 5), "max_ms": round(max(ts) * 1e3, 5),
                            "gelem_s": round(rows * vocab / med / 1e9, 3),
                            "ns_per_elem": round(med * 1e9 / (rows * vocab), 4),
                            "repeats": len(ts)})
    return res


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.rows, args.vocab, args.reps)
    dev = common.device_name("cpu")
    print(f"{dev} threads={args.threads} rows={args.rows} vocab={args.vocab}")
    for r in rows:
        print(f"{r['loop']:4s} {r['dtype']} T={r['temperature']}: {r['gelem_s']:.2f} G elem/s "
              f"({r['ns_per_elem']:.3f} ns/elem; {r['min_ms']:.3f} .. {r['max_ms']:.3f} ms)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": common.environment("cpu"), "threads": args.threads,
                       "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
