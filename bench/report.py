"""Render bench/results/*.json as Markdown tables, and optionally update the README.

    python bench/report.py              # print the tables
    python bench/report.py --readme     # rewrite the block between the results markers in README.md

Only rows that were measured appear; skipped rows are listed with their reason.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"
COLS = [("op", "op"), ("mode", "mode"), ("shape", "shape"), ("dtype", "dtype"), ("impl", "impl"),
        ("backend", "backend"), ("threads", "threads"), ("ms", "median ms"), ("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("pct_copy_bw", "% copy BW"),
        ("x_floor", "x floor"), ("speedup_vs_eager", "vs eager"), ("peak_mb", "peak MB"),
        ("run_peak_mb", "run peak MB")]


def render(results_dir: str = os.path.join(HERE, "results")) -> str:
    files = sorted(glob.glob(os.path.join(results_dir, "*.json")))
    if not files:
        return "_No benchmark results committed yet._\n"
    out = []
    for path in files:
        with open(path) as f:
            data = json.load(f)
        out.append(f"#### {data.get('device', os.path.basename(path))}\n")
        out.append(f"torch {data.get('torch')}, triton {data.get('triton')}, commit "
                   f"{data.get('commit')}, {data.get('date')}; measured copy bandwidth "
                   f"{data.get('copy_gbps')} GB/s. `{os.path.relpath(path, os.path.dirname(HERE))}`\n")
        for name, bench in sorted(data.get("benchmarks", {}).items()):
            rows = bench["rows"]
            timed = [r for r in rows if not r.get("skipped")]
            cols = [(k, h) for k, h in COLS if any(r.get(k) is not None for r in timed)]
            out.append(f"\n**{name}**\n")
            if timed:
                out.append("| " + " | ".join(h for _, h in cols) + " |")
                out.append("|" + "---|" * len(cols))
                for r in timed:
                    out.append("| " + " | ".join("" if r.get(k) is None else str(r[k])
                                                 for k, _ in cols) + " |")
            skipped = sorted({f"{r['impl']}: {r['skipped']}" for r in rows if r.get("skipped")})
            if skipped:
                out.append("\nNot measured: " + "; ".join(skipped))
        out.append("")
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--readme", action="store_true", help="update README.md in place")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    text = render(args.results)
    if args.readme:
        update_readme(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
