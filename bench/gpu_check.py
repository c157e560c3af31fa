"""One-call GPU check: the test suite on CUDA, every benchmark, an in-place stress, one JSON.

    bash bench/gpu_check.sh                  # on one H100 / H200 (about 8 minutes)
    python bench/gpu_check.py --dry-run      # CPU: small shapes, interpreter; says DRY RUN

On a GPU it runs, each step in a subprocess with its own time budget (a step that runs out is
recorded as "timeout", never as passed):

1. ``pytest tests`` on CUDA (the CUDA-only cases included);
2. every ``bench/bench_*.py`` through ``fastrlhf bench`` (GPU shapes: N = 16384 rows x
   V in {128256, 151936} bf16 against eager, torch.compile, Liger and TRL where installed);
3. a bitwise stress of ``fused_ppo_loss(inplace_backward=True)`` against a fresh-buffer
   gradient over many seeds (bf16, V = 151936; entropy and KL terms on, masked tokens, a strided
   view), which would expose a missing barrier between the target-logit read and the in-place
   gradient stores.

It writes ``bench/results/<gpu>.json`` (the measured rows of step 2 under ``"bench"``, the test
and stress outcomes beside them) and prints a one-screen summary.  ``--dry-run`` (no GPU needed:
the Triton interpreter, tiny shapes, the test step reduced to one file, ``--quick`` benchmarks
for ``--dry-benches``) exercises the same code paths and marks its output ``"dry_run": true``;
it never writes into bench/results unless ``--out`` says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _run(cmd, timeout, env=None):
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env=env)
        return p.returncode, p.stdout, p.stderr, time.time() - t0
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out, "timeout", time.time() - t0


def step_tests(args):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]
    cmd += args.test_paths
    rc, out, err, dt = _run(cmd, args.test_timeout)
    tail = (out + err).strip().splitlines()[-1:] or [""]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)",
                                                tail[0])}
    status = "timeout" if rc is None else ("ok" if rc == 0 else "failed")
    return {"status": status, "rc": rc, "seconds": round(dt, 1), "summary": tail[0],
            "counts": counts, "paths": args.test_paths,
            "failures": [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))][:20]}


def step_bench(args, device):
    out = os.path.join(tempfile.mkdtemp(prefix="gpu_check_"), "bench.json")
    cmd = [sys.executable, "-m", "fastrlhf.cli", "bench", "--device", device, "--out", out]
    if args.dry_run:
        cmd += ["--quick", "--no-compile", "--only"] + args.dry_benches
    elif args.only:
        cmd += ["--only"] + args.only
    rc, so, se, dt = _run(cmd, args.bench_timeout)
    res = {"status": "timeout" if rc is None else ("ok" if rc == 0 else "failed"), "rc": rc,
           "seconds": round(dt, 1)}
    if rc == 0 and os.path.exists(out):
        with open(out) as f:
            res["results"] = json.load(f)
    else:
        res["stderr_tail"] = (se or "")[-2000:]
    return res


def stress_inplace(device, seeds, B, T, V, dtype_name):
    """fused_ppo_loss: in-place gradient == fresh-buffer gradient, bitwise, over seeds."""
    import torch
    import fastrlhf as fr
    dtype = getattr(torch, dtype_name)
    mismatches = []
    t0 = time.time()
    for seed in range(seeds):
        g = torch.Generator(device="cpu").manual_seed(seed)
        base = (torch.randn(B, T + 1, V, generator=g) * 2).to(device=device, dtype=dtype)
        tokens = torch.randint(0, V, (B, T), generator=g).to(device)
        old = (torch.randn(B, T, generator=g) * 0.1 - 3).to(device)
        adv = torch.randn(B, T, generator=g).to(device)
        ref = (torch.randn(B, T, generator=g) * 0.1 - 3).to(device)
        mask = (torch.rand(B, T, generator=g) > 0.1).float().to(device)
        grads = []
        for inplace in (False, True):
            x = base.clone().requires_grad_(True)
            view = (x * 1)[:, :-1] if inplace else x[:, :-1]   # strided view of the logits
            loss, _ = fr.fused_ppo_loss(view, tokens, old, adv, mask, ref_logp=ref,
                                        kl_coef=0.05, entropy_coef=0.01,
                                        inplace_backward=inplace)
            loss.backward()
            grads.append(x.grad)
        if not torch.equal(grads[0], grads[1]):
            diff = (grads[0].float() - grads[1].float()).abs()
            mismatches.append({"seed": seed, "max_abs_diff": float(diff.max()),
                               "n_diff": int((diff != 0).sum())})
    return {"status": "ok" if not mismatches else "failed", "seeds": seeds,
            "shape": [B, T, V], "dtype": dtype_name, "mismatches": mismatches[:10],
            "seconds": round(time.time() - t0, 1)}


def summary(res):
    dry = " -- DRY RUN (CPU, interpreter, tiny shapes; no timing)" if res["dry_run"] else ""
    lines = [f"fastrlhf GPU check{dry}",
             f"device: {res['env'].get('device')}  torch {res['env'].get('torch')}  "
             f"triton {res['env'].get('triton')}  commit {res['env'].get('commit')}"]
    t = res.get("tests")
    if t:
        lines.append(f"tests: {t['status']} ({t['summary']}) in {t['seconds']} s")
        lines += [f"  {f}" for f in t["failures"][:8]]
    b = res.get("bench")
    if b:
        lines.append(f"benchmarks: {b['status']} in {b['seconds']} s")
        rows = []
        for name, rs in (b.get("results", {}).get("benchmarks", {}) or {}).items():
            for r in rs:
                if "ms" in r and r.get("ms") is not None:
                    rows.append(f"  {name:14s} {str(r.get('impl')):14s} {str(r.get('mode')):8s} "
                                f"{str(r.get('shape')):26s} {r['ms']:9.3f} ms "
                                f"{(r.get('pct_copy_bw') or 0):5.1f}% copy BW")
        lines += rows[:24]
        if len(rows) > 24:
            lines.append(f"  ... {len(rows) - 24} more rows in the JSON")
    s = res.get("stress")
    if s:
        lines.append(f"in-place stress: {s['status']} ({s['seeds']} seeds, {s['shape']} "
                     f"{s['dtype']}, {len(s['mismatches'])} mismatching) in {s['seconds']} s")
    lines.append(f"wrote {res.get('out')}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: interpreter, tiny shapes")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--only", nargs="+", default=None, help="benchmarks to run (default: all)")
    ap.add_argument("--test-paths", nargs="+", default=None)
    ap.add_argument("--test-timeout", type=int, default=240)
    ap.add_argument("--bench-timeout", type=int, default=270)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--dry-benches", nargs="+", default=["losses"])
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch
    sys.path.insert(0, HERE)
    import common
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry-run on a CPU machine)")
    device = "cpu" if args.dry_run else "cuda"
    if args.test_paths is None:
        args.test_paths = ["tests/test_gpu_ready.py"] if args.dry_run else ["tests"]
    res = {"dry_run": bool(args.dry_run), "env": common.environment(device)}
    t0 = time.time()
    if not args.skip_tests:
        res["tests"] = step_tests(args)
    if not args.skip_bench:
        res["bench"] = step_bench(args, device)
    if args.dry_run:
        res["stress"] = stress_inplace(device, args.seeds or 2, 1, 3, 50, "float32")
    else:
        res["stress"] = stress_inplace(device, args.seeds or 40, 2, 256, 151936, "bfloat16")
    res["seconds"] = round(time.time() - t0, 1)
    out = args.out
    if out is None:
        out = (os.path.join(tempfile.gettempdir(), "gpu_check_dry_run.json") if args.dry_run
               else os.path.join(common.RESULTS_DIR, f"{common.device_slug(device)}.json"))
    res["out"] = out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(summary(res))
    ok = all(res[k]["status"] == "ok" for k in ("tests", "bench", "stress") if k in res)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
