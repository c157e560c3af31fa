"""Shared benchmark harness: timing, copy bandwidth, peak memory, result files.

Every benchmark module in bench/ exposes ``run(device: str, quick: bool) -> list[dict]``; each row
has at least ``op, impl, mode, shape, dtype, ms`` and, where the op moves a known number of bytes,
``bytes`` (the minimum DRAM traffic of the op: every input read once, every output written once),
from which ``gbps`` and ``pct_copy_bw`` are derived.  ``fastrlhf bench`` runs them and merges the
rows into ``bench/results/<device>.json``; ``bench/report.py`` renders the README table.

Only measured numbers are written: a row whose implementation is unavailable (peer not
installed, compile failed) is recorded with ``"skipped": "<why>"`` and no timing.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, *, warmup: int = 3, rep: int = 20,
            max_seconds: float = 10.0) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(rep):
        if device.startswith("cuda"):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device: str):
    """Peak memory allocated by ``fn()`` beyond what was live before it (CUDA only; None on CPU:
    the CPU allocator keeps no peak statistics)."""
    if not device.startswith("cuda"):
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


def copy_bandwidth_gbps(device: str, nbytes: int | None = None) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus bytes written."""
    if nbytes is None:
        nbytes = (1 << 30) if device.startswith("cuda") else (64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, rep=20)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            if m:
                name = m.group(1).strip()
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def device_slug(device: str) -> str:
    if device.startswith("cuda"):
        return re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()
    return "cpu"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=BENCH_DIR, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def environment(device: str) -> dict:
    import triton
    return {
        "device": device_name(device),
        "device_type": "cuda" if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _sig(x: float, digits: int = 4) -> float:
    """Round to significant digits (a slow CPU's 0.004 GB/s must not print as 0.0)."""
    return float(f"{x:.{digits}g}")


def finish_row(row: dict, copy_gbps: float) -> dict:
    """Add gbps / pct_copy_bw / floor ratio to a timed row that declares ``bytes``."""
    if row.get("ms") and row.get("bytes"):
        gbps = row["bytes"] / (row["ms"] * 1e-3) / 1e9
        row["gbps"] = _sig(gbps)
        row["pct_copy_bw"] = _sig(100.0 * gbps / copy_gbps)
        row["x_floor"] = _sig(copy_gbps / gbps)  # time / (bytes / copy bandwidth)
    if row.get("ms") and row.get("flops"):  # compute-bound ops declare their useful flops
        row["tflops"] = _sig(row["flops"] / (row["ms"] * 1e-3) / 1e12)
    if row.get("ms") is not None:
        row["ms"] = _sig(row["ms"], 5)
    return row


def write_results(path: str, env: dict, copy_gbps: float, bench_rows: dict) -> dict:
    """Merge ``{bench_name: rows}`` into the JSON file at ``path`` (other benches are kept)."""
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.update(env)
    data["copy_gbps"] = round(copy_gbps, 1)
    benches = data.setdefault("benchmarks", {})
    for name, rows in bench_rows.items():
        benches[name] = {"env": env, "rows": rows}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return data


def fastrlhf_backend(device: str, native_ok: bool = True) -> str:
    """The backend ``backend="auto"`` picks on this device (recorded with every fastrlhf row);
    ``native_ok=False`` for ops without a native (C++) implementation."""
    from fastrlhf import backend
    return backend.resolve("auto", torch.device(device), op="bench", native_ok=native_ok)


def format_table(rows: list[dict]) -> str:
    cols = ["op", "mode", "shape", "dtype", "impl", "backend", "ms", "gbps", "pct_copy_bw", "x_floor",
            "speedup_vs_eager", "peak_mb"]
    present = [c for c in cols if any(c in r for r in rows)]
    lines = [" | ".join(present)]
    for r in rows:
        if r.get("skipped"):
            lines.append(" | ".join(str(r.get(c, "")) for c in present[:5]) + f" | skipped: {r['skipped']}")
            continue
        lines.append(" | ".join("" if r.get(c) is None else str(r.get(c)) for c in present))
    return "\n".join(lines)


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_eager for each timed row, against the eager row of the same op/mode/shape."""
    eager = {(r["op"], r["mode"], r["shape"], r["dtype"]): r["ms"] for r in rows
             if r["impl"] == "eager" and r.get("ms")}
    for r in rows:
        e = eager.get((r["op"], r["mode"], r["shape"], r["dtype"]))
        if e and r.get("ms"):
            r["speedup_vs_eager"] = round(e / r["ms"], 2)
