"""The ``fastrlhf`` command: ``train``, ``bench`` and ``report``.

Arguments are parsed before torch (or anything heavy) is imported, so ``--help``, ``--version``
and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

USAGE = """\
usage: fastrlhf [-h] [--version] COMMAND [ARGS ...]

Fused kernels for the RLHF / PPO hot path, and a compact PPO trainer built on them.

commands:
  train    RLHF with PPO end to end on the built-in task (or a local model): SFT warm start,
           reward model, PPO.  fastrlhf train --help lists every option.
  bench    time the ops against eager PyTorch, torch.compile and installed peers on this
           device; writes a new results file (the committed results change only with --write)
  report   render benchmark results as Markdown tables (--readme updates README.md)

options:
  -h, --help   show this message and exit
  --version    print fastrlhf's version and exit
"""

from .helptext import HelpFormatter


def version() -> str:
    from . import __version__  # lazy: the package's own attribute (no torch)
    return __version__


def _bench_dir() -> str:
    cands = [os.environ.get("FASTRLHF_BENCH_DIR"),
             os.path.join(os.getcwd(), "bench"),
             os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")]
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "common.py")):
            return c
    raise SystemExit("fastrlhf: cannot find the bench/ directory of a fastrlhf source "
                     "checkout; run from the repository root or set FASTRLHF_BENCH_DIR")


def _bench_modules(bench_dir: str):
    return sorted(f[len("bench_"):-3] for f in os.listdir(bench_dir)
                  if f.startswith("bench_") and f.endswith(".py"))


def _device(value: str) -> str:
    if value in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}")


def bench_parser(names) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fastrlhf bench", formatter_class=HelpFormatter,
        description="Run the benchmarks of a source checkout (bench/bench_*.py) on this device: "
                    "CUDA if available, else the CPU with small shapes.  Every figure is the "
                    "median over repeats with its interquartile range; a row whose range exceeds "
                    "25% of its median is marked noisy.  The results go to a new file "
                    "bench/runs/<device>-<time>.json (or --out FILE); the committed "
                    "bench/results/<device>.json changes only with --write.")
    ap.add_argument("--device", type=_device, default=None,
                    help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    ap.add_argument("--quick", action="store_true", help="smallest shapes only (harness check)")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME", choices=names,
                    help="run only these benchmarks: " + ", ".join(names))
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="FILE", default=None,
                       help="write the results to FILE (merged into it if it exists)")
    where.add_argument("--write", action="store_true",
                       help="merge the results into the committed bench/results/<device>.json")
    return ap


def cmd_bench(argv) -> int:
    bdir = _bench_dir()
    names = _bench_modules(bdir)
    args = bench_parser(names).parse_args(argv)
    import torch  # lazy: after parsing, argument errors must not wait for torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("fastrlhf bench: --device cuda but no CUDA device is available")
    sys.path.insert(0, bdir)
    common = importlib.import_module("common")
    if args.only:
        names = [n for n in names if n in args.only]
    out = common.results_path(device, write=args.write, out=args.out)
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
    common.write_results(out, env, copy_gbps, results)
    print(f"\nwrote {out}")
    noisy = sum(bool(r.get("noisy")) for rows in results.values() for r in rows)
    if noisy:
        print(f"{noisy} row(s) noisy (interquartile range > {common.NOISY_IQR:.0%} of the median): "
              "the machine was busy; repeat before trusting them")
    return 0


def cmd_report(argv) -> int:
    bdir = _bench_dir()
    sys.path.insert(0, bdir)
    report = importlib.import_module("report")
    return report.main(argv, prog="fastrlhf report", formatter_class=HelpFormatter)


def cmd_train(argv) -> int:
    try:
        from .trainer.cli import main as train_main  # lazy: keep `fastrlhf --help` fast
    except ImportError as e:
        raise SystemExit(f"fastrlhf train is unavailable: {e}")
    return train_main(argv)


COMMANDS = {"train": cmd_train, "bench": cmd_bench, "report": cmd_report}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    if argv[0] in ("--version", "-V"):
        print(f"fastrlhf {version()}")
        return 0
    cmd = argv.pop(0)
    if cmd not in COMMANDS:
        print(USAGE.splitlines()[0], file=sys.stderr)
        print(f"fastrlhf: error: unknown command {cmd!r} (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    return COMMANDS[cmd](argv) or 0


if __name__ == "__main__":
    sys.exit(main())
