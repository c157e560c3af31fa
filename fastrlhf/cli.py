"""The ``fastrlhf`` command.

    fastrlhf bench [--quick] [--only NAME ...] [--device cuda|cpu] [--no-compile] [--out FILE]
    fastrlhf train ...        (the compact PPO trainer; see ``fastrlhf train --help``)
    fastrlhf report           (render bench/results/*.json as the README table)

``bench`` runs every ``bench/bench_*.py`` of a source checkout on the present device (CUDA if
available, else CPU with small shapes), prints a table and merges the measured rows into
``bench/results/<device>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def _bench_dir() -> str:
    cands = [os.environ.get("FASTRLHF_BENCH_DIR"),
             os.path.join(os.getcwd(), "bench"),
             os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")]
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "common.py")):
            return c
    raise SystemExit("fastrlhf bench: cannot find the bench/ directory of a fastrlhf source "
                     "checkout; run from the repository root or set FASTRLHF_BENCH_DIR")


def _bench_modules(bench_dir: str):
    return sorted(f[len("bench_"):-3] for f in os.listdir(bench_dir)
                  if f.startswith("bench_") and f.endswith(".py"))


def cmd_bench(argv) -> int:
    import torch
    ap = argparse.ArgumentParser(prog="fastrlhf bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--quick", action="store_true", help="smallest shapes only (harness check)")
    ap.add_argument("--only", nargs="+", default=None, help="benchmark names (e.g. logprobs gae)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/<device>.json)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("fastrlhf bench: --device cuda but no CUDA device is available")
    bdir = _bench_dir()
    sys.path.insert(0, bdir)
    common = importlib.import_module("common")
    names = _bench_modules(bdir)
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise SystemExit(f"fastrlhf bench: unknown benchmark(s) {unknown}; have {names}")
        names = [n for n in names if n in args.only]
    env = common.environment(device)
    print(f"# device: {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"commit {env['commit']}", flush=True)
    copy_gbps = common.copy_bandwidth_gbps(device)
    print(f"# measured copy bandwidth: {copy_gbps:.1f} GB/s (read + write)", flush=True)
    results = {}
    for name in names:
        mod = importlib.import_module(f"bench_{name}")
        kwargs = {}
        if "with_compile" in mod.run.__code__.co_varnames:
            kwargs["with_compile"] = not args.no_compile
        rows = [common.finish_row(r, copy_gbps) for r in mod.run(device, args.quick, **kwargs)]
        results[name] = rows
        print(f"\n## {name}\n{common.format_table(rows)}", flush=True)
    out = args.out or os.path.join(common.RESULTS_DIR, f"{common.device_slug(device)}.json")
    common.write_results(out, env, copy_gbps, results)
    print(f"\nwrote {out}")
    return 0


def cmd_report(argv) -> int:
    bdir = _bench_dir()
    sys.path.insert(0, bdir)
    report = importlib.import_module("report")
    return report.main(argv)


def cmd_train(argv) -> int:
    try:
        from .trainer.cli import main as train_main  # lazy: keep `fastrlhf --help` fast
    except ImportError as e:
        raise SystemExit(f"fastrlhf train is unavailable: {e}")
    return train_main(argv)


COMMANDS = {"bench": cmd_bench, "train": cmd_train, "report": cmd_report}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd = argv.pop(0)
    if cmd not in COMMANDS:
        print(f"fastrlhf: unknown command {cmd!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[cmd](argv) or 0


if __name__ == "__main__":
    sys.exit(main())
