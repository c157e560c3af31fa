"""Benchmark (CPU): the native logits streams against this machine's read bandwidth, bf16 against
fp32 per element, and eager / TRL beside them (issue 19, items 2 and 4).

Bandwidth (item 4), on one 512 MiB fp32 buffer, with the current thread count:

* ``read``: ``buf.sum()``, a read-only reduction (bytes read / time);
* ``copy``: ``dst.copy_(src)`` (bytes read + bytes written / time, as ``common.copy_bandwidth_gbps``).

Streaming ops at ``N x V`` logits (default 4096 x 32000), fp32 and bf16, with
``backend="native"``:

* ``token_logprobs`` forward (logp + entropy; reads the logits once: ``bytes = N V esize``),
  forward + backward (``inplace_backward=False``: the backward reads the logits again and writes
  the gradient: ``bytes = 3 N V esize`` of traffic for the pair);
* ``fused_ppo_loss`` forward + backward (GRPO-style clip, entropy bonus; one call reads the
  logits, re-reads each row from L2 and writes the gradient: ``bytes = 2 N V esize``).

Each row: median / min / max over the repeats (``ms``, ``min_ms``, ``max_ms``), ``gbps`` and
``pct_read_bw`` (of the read bandwidth measured in the same run).  The fp32 and bf16 calls of an
op are interleaved (fp32, bf16, fp32, ...) so that a load change on a shared machine hits both,
and ``bf16_over_fp32`` is the median of the per-pair time ratios (per element: same N x V).
Baselines in the same run: ``eager`` (log_softmax of ``.float()`` + gather + entropy, autograd;
``reference.fused_ppo_loss`` for the loss) and TRL's ``selective_log_softmax_and_entropy``
(``trl.trainer.utils``; log-probs + entropy, its eager CPU path) where TRL is installed, its
rows with ``max_abs_dlogp_vs_eager`` (its largest log-prob error on the first 64 rows: on bf16
it computes in bf16, so ``bench_logprobs.py``'s accuracy gate leaves it out there).

``python bench/bench_cpu_stream.py [--shape 4096x32000] [--reps 5] [--out FILE] [--note TEXT]``
(``--out``: a schema-2 results file, benchmark ``cpu_stream``; the read bandwidth is in its
``env``, the copy bandwidth in ``copy_gbps``).
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


def _stats(ts):
    sp = common.spread(ts)
    return {"ms": sp["ms"], "iqr_ms": sp["iqr_ms"], "min_ms": min(ts), "max_ms": max(ts),
            "repeats": len(ts)}


def bandwidth(reps: int, nbytes: int = 512 << 20) -> dict:
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    src.sum()
    dst.copy_(src)
    rd, cp = [], []
    for _ in range(reps):  # interleaved, so both see the same load
        t0 = time.perf_counter()
        src.sum()
        rd.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        dst.copy_(src)
        cp.append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts, traffic in (("read", rd, nbytes), ("copy", cp, 2 * nbytes)):
        s = _stats(ts)
        out[name] = {"gbps": traffic / (s["ms"] * 1e-3) / 1e9,
                     "gbps_best": traffic / (s["min_ms"] * 1e-3) / 1e9,
                     "gbps_worst": traffic / (s["max_ms"] * 1e-3) / 1e9, **s}
    return out


def _eager_lp(x, tok):
    lsm = torch.log_softmax(x.float(), -1)
    return lsm.gather(-1, tok.unsqueeze(-1)).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


def _steps(N, V, x, tok):
    """name -> (step, traffic bytes or None) for one dtype's logits ``x``."""
    import fastrlhf as fr
    esz = x.element_size()
    B, T = 8, N // 8
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(B, T, generator=g) - 0.5
    adv = torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)

    def lp_fwd():
        with torch.no_grad():
            fr.token_logprobs(x, tok, return_entropy=True, backend="native")

    def lp_fb():
        xl = x.detach().requires_grad_()
        lp, e = fr.token_logprobs(xl, tok, return_entropy=True, backend="native")
        torch.autograd.grad(lp.sum() + e.sum(), xl)

    def fused_fb():
        xl = x.detach().view(B, T, V).requires_grad_()
        loss, _ = fr.fused_ppo_loss(xl, tok.view(B, T), old, adv, mask, entropy_coef=0.01,
                                    backend="native")
        torch.autograd.grad(loss, xl)

    def eager_fwd():
        with torch.no_grad():
            _eager_lp(x, tok)

    def eager_fb():
        xl = x.detach().requires_grad_()
        lp, e = _eager_lp(xl, tok)
        torch.autograd.grad(lp.sum() + e.sum(), xl)

    def eager_fused_fb():
        xl = x.detach().view(B, T, V).requires_grad_()
        from fastrlhf import reference
        loss, _ = reference.fused_ppo_loss(xl, tok.view(B, T), old, adv, mask, entropy_coef=0.01)
        torch.autograd.grad(loss, xl)

    steps = {
        ("token_logprobs", "fwd", "native"): (lp_fwd, N * V * esz),
        ("token_logprobs", "fwd+bwd", "native"): (lp_fb, 3 * N * V * esz),
        ("fused_ppo_loss", "fwd+bwd", "native"): (fused_fb, 2 * N * V * esz),
        ("token_logprobs", "fwd", "eager"): (eager_fwd, None),
        ("token_logprobs", "fwd+bwd", "eager"): (eager_fb, None),
        ("fused_ppo_loss", "fwd+bwd", "eager"): (eager_fused_fb, None),
    }
    try:
        from trl.trainer.utils import selective_log_softmax_and_entropy as trl_fn

        def trl_fwd():
            with torch.no_grad():
                trl_fn(x, tok)

        def trl_fb():
            xl = x.detach().requires_grad_()
            lp, e = trl_fn(xl, tok)
            torch.autograd.grad(lp.sum() + e.sum(), xl)
        steps[("token_logprobs", "fwd", "trl")] = (trl_fwd, None)
        steps[("token_logprobs", "fwd+bwd", "trl")] = (trl_fb, None)
    except Exception:  # TRL not installed
        pass
    return steps


def trl_error(x, tok, rows: int = 64):
    """TRL's largest |log-prob - eager's| on the first ``rows`` rows, or None without TRL.
    ``bench_logprobs.py`` leaves out what differs from eager by more than 2e-2; here TRL is
    timed anyway and its rows carry this figure: on bf16 logits its log-softmax runs in bf16
    and is off by far more (so those rows are a speed comparison only)."""
    try:
        from trl.trainer.utils import selective_log_softmax_and_entropy as trl_fn
    except Exception:  # TRL not installed
        return None
    with torch.no_grad():
        lp, _ = trl_fn(x[:rows], tok[:rows])
        want, _ = _eager_lp(x[:rows], tok[:rows])
    return float((lp.float() - want).abs().max())


def run(N: int, V: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, V, generator=g) * 2
    tok = torch.randint(0, V, (N,), generator=g)
    xs = {name: base.to(dt) for name, dt in DTYPES.items()}
    del base
    steps = {name: _steps(N, V, x, tok) for name, x in xs.items()}
    trl_err = {name: trl_error(x, tok) for name, x in xs.items()}
    bw = bandwidth(reps)
    rows = []
    for key in steps["fp32"]:
        times = {d: [] for d in xs}
        for d in xs:
            steps[d][key][0]()  # warm-up
        for _ in range(reps):
            for d in xs:
                t0 = time.perf_counter()
                steps[d][key][0]()
                times[d].append((time.perf_counter() - t0) * 1e3)
        ratio = statistics.median(b / a for a, b in zip(times["fp32"], times["bf16"]))
        for d in xs:
            op, mode, impl = key
            row = dict(op=op, mode=mode, impl=impl, shape=f"{N}x{V}", dtype=d,
                       **{k: round(v, 3) if isinstance(v, float) else v
                          for k, v in _stats(times[d]).items()},
                       ns_per_elem=round(statistics.median(times[d]) * 1e6 / (N * V), 4),
                       bf16_over_fp32=round(ratio, 3))
            if impl == "trl" and trl_err[d] is not None:
                row["max_abs_dlogp_vs_eager"] = float(f"{trl_err[d]:.3g}")
            traffic = steps[d][key][1]
            if traffic:
                gbps = traffic / (row["ms"] * 1e-3) / 1e9
                row.update(bytes=traffic, gbps=round(gbps, 2),
                           pct_read_bw=round(100 * gbps / bw["read"]["gbps"], 1))
            rows.append(row)
    # speedups against eager in the same run (same op, mode, dtype)
    eager = {(r["op"], r["mode"], r["dtype"]): r["ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        e = eager.get((r["op"], r["mode"], r["dtype"]))
        if e:
            r["speedup_vs_eager"] = round(e / r["ms"], 2)
    return {"bandwidth": {k: {kk: round(vv, 3) if isinstance(vv, float) else vv
                              for kk, vv in v.items()} for k, v in bw.items()},
            "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x32000")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    N, V = (int(v) for v in args.shape.split("x"))
    res = run(N, V, args.reps)
    env = common.environment("cpu")
    env["threads"] = torch.get_num_threads()
    if args.note:
        env["note"] = args.note
    print(common.device_name("cpu"), f"threads={env['threads']}")
    for k, v in res["bandwidth"].items():
        print(f"{k} bandwidth: {v['gbps']:.2f} GB/s (median; {v['gbps_worst']:.2f} .. "
              f"{v['gbps_best']:.2f} over {v['repeats']})")
    for r in res["rows"]:
        extra = f" {r['gbps']} GB/s = {r['pct_read_bw']}% of read" if "gbps" in r else ""
        print(f"{r['op']} {r['mode']} {r['impl']} {r['dtype']}: {r['ms']:.1f} ms "
              f"[{r['min_ms']:.1f} .. {r['max_ms']:.1f}] {r['ns_per_elem']} ns/elem "
              f"x{r.get('speedup_vs_eager', '-')} eager, bf16/fp32 {r['bf16_over_fp32']}{extra}")
    if args.out:
        env["read_gbps"] = round(res["bandwidth"]["read"]["gbps"], 2)
        env["read_gbps_range"] = [round(res["bandwidth"]["read"]["gbps_worst"], 2),
                                  round(res["bandwidth"]["read"]["gbps_best"], 2)]
        common.write_results(args.out, env, res["bandwidth"]["copy"]["gbps"],
                             {"cpu_stream": res["rows"]})
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
