"""Render benchmark result files as Markdown tables, and optionally update the README.

One section per machine (the device of the run that measured each benchmark: results merged
from different runs or machines never share a heading), then one line per run (versions, commit,
date, copy bandwidth, file) above the tables it measured.  Only measured rows appear, each with
its median and interquartile range ("not measured" where an older run kept no spread); rows
whose spread is too wide are marked noisy; rows timed round-robin with eager also show the
median and quartiles of their per-round speedups; skipped rows are listed with their reason.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"
COLS = [("op", "op"), ("mode", "mode"), ("shape", "shape"), ("dtype", "dtype"), ("impl", "impl"),
        ("condition", "condition"), ("backend", "backend"), ("threads", "threads"),
        ("ms", "median ms"), ("iqr_ms", "IQR ms"),
        ("min_ms", "min ms"), ("max_ms", "max ms"), ("tflops", "TFLOP/s"), ("gbps", "GB/s"),
        ("pct_copy_bw", "% copy BW"), ("pct_read_bw", "% read BW"),
        ("x_floor", "x floor"), ("speedup_vs_eager", "vs eager"),
        ("paired_vs_eager", "paired vs eager (q1-q3)"), ("peak_mb", "peak MB"),
        ("run_peak_mb", "run peak MB")]
NOT_MEASURED = "n/m"


def _common():
    """bench/common.py (the result-file schema and its migration); imported on use, since it
    imports torch and argument errors must not wait for that."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import common
    return common


def _cell(row: dict, key: str) -> str:
    if key == "iqr_ms":
        if row.get("iqr_ms") is None:
            return NOT_MEASURED
        return f"{row['iqr_ms']}" + (" noisy" if row.get("noisy") else "")
    if key == "paired_vs_eager" and row.get(key) is not None:
        q1, q3 = row["paired_q"]
        return f"{row[key]} ({q1}-{q3})"
    return "" if row.get(key) is None else str(row[key])


def _skip_text(why: str) -> str:
    # results recorded before common.skip_reason existed: the same condition, said plainly
    return "needs a GPU" if _common()._needs_gpu(why) else why


def _run_line(env: dict, copy_gbps, files) -> str:
    bw = "not recorded" if copy_gbps is None else f"{copy_gbps} GB/s"
    return (f"torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}, "
            f"{env.get('date')}; measured copy bandwidth {bw}. "
            + ", ".join(f"`{f}`" for f in files))


def render(results_dir: str = os.path.join(HERE, "results")) -> str:
    files = sorted(glob.glob(os.path.join(results_dir, "*.json")))
    if not files:
        return "_No benchmark results committed yet._\n"
    common = _common()
    root = os.path.dirname(HERE)
    # machine -> run -> [(bench name, bench, file)]
    machines: dict = {}
    for path in files:
        data = common.load_results(path)
        rel = os.path.relpath(path, root) if path.startswith(root) else os.path.basename(path)
        for name, bench in data.get("benchmarks", {}).items():
            env = bench.get("env") or {}
            run = tuple(env.get(k) for k in ("torch", "triton", "commit", "date")) + (
                bench.get("copy_gbps"),)
            machines.setdefault(env.get("device", "unknown device"), {}).setdefault(
                run, []).append((name, bench, rel))
    out = []
    noisy_or_nm = paired = False
    for device in sorted(machines):
        out.append(f"#### {device}\n")
        for run, benches in sorted(machines[device].items(), key=lambda kv: str(kv[0][3])):
            env = dict(zip(("torch", "triton", "commit", "date"), run))
            out.append(_run_line(env, run[4], sorted({f for _, _, f in benches})) + "\n")
            for name, bench, _ in sorted(benches, key=lambda b: b[0]):
                rows = bench["rows"]
                timed = [r for r in rows if not r.get("skipped")]
                cols = [(k, h) for k, h in COLS
                        if k == "iqr_ms" and timed or any(r.get(k) is not None for r in timed)]
                out.append(f"\n**{name}**\n")
                if timed:
                    out.append("| " + " | ".join(h for _, h in cols) + " |")
                    out.append("|" + "---|" * len(cols))
                    for r in timed:
                        noisy_or_nm |= r.get("iqr_ms") is None or bool(r.get("noisy"))
                        paired |= r.get("paired_vs_eager") is not None
                        out.append("| " + " | ".join(_cell(r, k) for k, _ in cols) + " |")
                skipped = sorted({f"{r['impl']}: {_skip_text(r['skipped'])}"
                                  for r in rows if r.get("skipped")})
                if skipped:
                    out.append("\nNot measured: " + "; ".join(skipped))
            out.append("")
    if noisy_or_nm:
        out.append(f"IQR ms: interquartile range of the repeats; `{NOT_MEASURED}`: not measured "
                   "(the run kept only the median); `noisy`: the range exceeds "
                   f"{common.NOISY_IQR:.0%} of the median.\n")
    if paired:
        out.append("paired vs eager (q1-q3): the median over the rounds of the round-robin of "
                   "eager's time in a round over the row's time in the same round, and the "
                   "quartiles of those ratios (the spread of the speedup itself; `vs eager` is "
                   "the ratio of the two medians).\n")
    return "\n".join(out) + "\n"


def update_readme(text: str, readme: str = README) -> None:
    with open(readme) as f:
        doc = f.read()
    if START not in doc or END not in doc:
        raise SystemExit(f"{readme} has no {START} ... {END} block")
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(head + START + "\n" + text + END + tail)


def main(argv=None, prog: str | None = None, formatter_class=argparse.HelpFormatter) -> int:
    ap = argparse.ArgumentParser(
        prog=prog, formatter_class=formatter_class, description="Render the benchmark result files (bench/results/*.json by "
        "default) as Markdown tables, one section per machine.")
    ap.add_argument("--readme", action="store_true",
                    help="rewrite the results block of README.md instead of printing")
    ap.add_argument("--results", metavar="DIR", default=os.path.join(HERE, "results"),
                    help="directory of result files (default: bench/results, the committed ones)")
    args = ap.parse_args(argv)
    text = render(args.results)
    if args.readme:
        update_readme(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
