"""Shared benchmark harness: timing, copy bandwidth, peak memory, result files.

Every benchmark module in bench/ exposes ``run(device: str, quick: bool) -> list[dict]``; each row
has at least ``op, impl, mode, shape, dtype, ms`` and, where the op moves a known number of bytes,
``bytes`` (the minimum DRAM traffic of the op: every input read once, every output written once),
from which ``gbps`` and ``pct_copy_bw`` are derived.  ``ms`` is the median over the repeats and
``iqr_ms`` their interquartile range (``repeats`` of them); a row whose IQR exceeds
``NOISY_IQR`` of its median is marked ``"noisy": true``.

``fastrlhf bench`` runs them and writes a new file under ``bench/runs/`` (or ``--out FILE``); only
``--write`` merges the rows into the committed ``bench/results/<device>.json``.  ``bench/report.py``
(``fastrlhf report``) renders the README table.

Result files (schema 2): ``{"schema": 2, "benchmarks": {name: {"env": {...}, "copy_gbps": x,
"rows": [...]}}}``: each benchmark carries the machine, versions, commit and copy bandwidth of the
run that measured it, so benches merged from different runs or machines never share a heading.
Files of schema 1 (one top-level environment, rows without a spread) are read through
:func:`migrate`, which keeps every measured value and marks what was not recorded as absent.

Only measured numbers are written: a row whose implementation is unavailable (peer not
installed, compile failed, needs a GPU) is recorded with ``"skipped": "<why>"`` and no timing.
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
RESULTS_DIR = os.path.join(BENCH_DIR, "results")   # committed results (updated with --write only)
RUNS_DIR = os.path.join(BENCH_DIR, "runs")         # every other run's results (git-ignored)
SCHEMA = 2
NOISY_IQR = 0.25  # a row whose interquartile range exceeds this fraction of its median is noisy


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_stats(fn: Callable[[], object], device: str, *, warmup: int = 3, rep: int = 20,
               max_seconds: float = 10.0) -> dict:
    """Time ``fn()`` ``rep`` times (fewer, but at least 3, once ``max_seconds`` have passed) in
    milliseconds (CUDA events on GPU, perf_counter on CPU): ``{"ms": median, "iqr_ms":
    interquartile range, "repeats": n}``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(rep):
        times.append(_once_ms(fn, device))
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    return spread(times)


def _once_ms(fn: Callable[[], object], device: str) -> float:
    """One call of ``fn()`` in milliseconds (CUDA events on GPU, perf_counter on CPU)."""
    if device.startswith("cuda"):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_group(entries: list, device: str, *, warmup: int = 3, rep: int = 20,
               max_seconds: float = 30.0, peak: bool = True) -> None:
    """Time implementations of the same step against each other, round-robin.

    ``entries``: ``(row, step)`` or ``(row, step, pre)`` tuples.  Every step is warmed up
    ``warmup`` times, then round r runs each step once (the order rotated by one per round, so no
    step always follows the same one), for ``rep`` rounds (fewer, but at least 3, once
    ``max_seconds`` have passed).  Each row gets :func:`time_stats`' fields (``ms`` median,
    ``iqr_ms``, ``repeats``), ``"interleaved": true`` when two or more steps shared the rounds,
    and with ``peak`` then ``peak_mb`` from :func:`peak_extra_bytes` (``pre()`` first, when
    given: e.g. dropping the last step's gradients).  A step that raises gets ``skipped`` with the reason and leaves the others timed.

    Interleaved rows also keep their per-round times, in round order (``round_ms``): round r
    of every row ran within the same few steps, so :func:`add_speedups` can pair them.

    Why round-robin: on a shared machine (a VM whose speed moves by tens of percent within
    minutes) implementations timed one after the other are compared across different machine
    states; interleaved, each implementation's repeats are spread over the same stretch of time,
    so the ratios of their medians are comparable."""
    live = []
    for entry in entries:
        row, step = entry[0], entry[1]
        try:
            for _ in range(warmup):
                step()
            sync(device)
            live.append(entry)
        except Exception as e:  # out of memory, compile failure, ...
            _mark_skipped(row, e, device)
    times = {id(e[0]): [] for e in live}
    interleaved = len(live) > 1
    deadline = time.perf_counter() + max_seconds
    for r in range(rep):
        if not live:
            break
        k = r % len(live)
        for entry in live[k:] + live[:k]:
            try:
                times[id(entry[0])].append(_once_ms(entry[1], device))
            except Exception as e:
                _mark_skipped(entry[0], e, device)
        live = [e for e in live if not e[0].get("skipped")]
        if time.perf_counter() > deadline and r >= 2:
            break
    for entry in live:
        row = entry[0]
        row.update(spread(times[id(row)]))
        if interleaved:
            row["interleaved"] = True
            row["round_ms"] = [_sig(t, 5) for t in times[id(row)]]
        if not peak:
            continue
        try:
            if len(entry) > 2 and entry[2] is not None:
                entry[2]()
            p = peak_extra_bytes(entry[1], device)
            row["peak_mb"] = None if p is None else round(p / 2 ** 20, 1)
        except Exception as e:
            _mark_skipped(row, e, device)


def time_layers(layers: dict, before: Callable[[], object], rounds: int,
                after: str = "after") -> dict:
    """CPU timings (ms) of each ``name -> fn`` of ``layers`` in two conditions: ``"warm"`` (the
    call right after a first one) and ``after`` (the call right after ``before()``, e.g. the
    steps the benchmarks' round-robin runs before it).  Each is called 3 times first; then the
    layers take turns, ``rounds`` times.  Returns ``{(name, condition): [ms, ...]}``."""
    for fn in list(layers.values()) + [before]:
        for _ in range(3):
            fn()
    times = {(name, cond): [] for name in layers for cond in ("warm", after)}
    for _ in range(rounds):
        for name, fn in layers.items():
            fn()
            t0 = time.perf_counter()
            fn()
            times[(name, "warm")].append((time.perf_counter() - t0) * 1e3)
            before()
            t0 = time.perf_counter()
            fn()
            times[(name, after)].append((time.perf_counter() - t0) * 1e3)
    return times


def report_layers(rows: list[dict], after: str, bench: str, out: str = "") -> list[dict]:
    """Print :func:`print_layers`' table and, with ``out``, write the rows as bench ``bench`` of
    a CPU result file; returns the rows (the ``main`` of the layer benchmarks)."""
    print_layers(rows, after)
    if out:
        write_results(out, environment("cpu"), None, {bench: rows})
        print(f"wrote {out}")
    return rows


def print_layers(rows: list[dict], after: str) -> None:
    """The rows of :func:`time_layers`' timings (``op``, ``impl`` = the layer, ``condition``,
    ``ms`` / ``iqr_ms``) as a table in microseconds, warm beside ``after``."""
    print(f"{'op':<16}{'layer':<15}{'warm us':>10}{'iqr':>8}{after + ' us':>18}{'iqr':>8}")
    by = {(r["op"], r["impl"], r["condition"]): r for r in rows}
    for w in rows:
        if w["condition"] == "warm":
            c = by[(w["op"], w["impl"], after)]
            print(f"{w['op']:<16}{w['impl']:<15}{w['ms'] * 1e3:>10.1f}{w['iqr_ms'] * 1e3:>8.1f}"
                  f"{c['ms'] * 1e3:>18.1f}{c['iqr_ms'] * 1e3:>8.1f}")


def _mark_skipped(row: dict, e: BaseException, device: str) -> None:
    for k in ("ms", "iqr_ms", "repeats", "peak_mb", "interleaved", "bytes", "flops", "max_err"):
        row.pop(k, None)
    row["skipped"] = skip_reason(e, device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def spread(times_ms: list) -> dict:
    """Median, interquartile range and count of repeated timings (ms); the IQR needs 2 or more."""
    n = len(times_ms)
    iqr = None
    if n >= 2:
        q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
        iqr = q3 - q1
    return {"ms": statistics.median(times_ms), "iqr_ms": iqr, "repeats": n}


def time_ms(fn: Callable[[], object], device: str, **kw) -> float:
    """Median wall time of ``fn()`` in milliseconds (see :func:`time_stats`)."""
    return time_stats(fn, device, **kw)["ms"]


def skip_reason(e: BaseException, device) -> str:
    """Why an implementation could not run, for a ``skipped`` row.  A Triton-only peer called on
    CPU tensors (Triton finds no GPU driver: "0 active drivers") is reported as "needs a GPU"."""
    text = f"{type(e).__name__}: {e}"
    if str(device).startswith("cpu") and _needs_gpu(text):
        return "needs a GPU"
    return text[:160]


def _needs_gpu(text: str) -> bool:
    return "active drivers" in text or "Found no NVIDIA driver" in text


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_peak_extra_bytes(fn: Callable[[], object]):
    """CPU: the process's resident set size sampled every ~0.5 ms by a thread while ``fn()`` runs
    (torch ops and the native kernels release the GIL), minus the RSS before it; freed heap
    memory is handed back first (``malloc_trim``) so that cached blocks do not hide the growth.
    None where /proc is not available."""
    import ctypes
    import threading
    if not os.path.exists("/proc/self/statm"):
        return None
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _rss_bytes()) - base


def peak_extra_bytes(fn: Callable[[], object], device: str):
    """Peak memory allocated by ``fn()`` beyond what was live before it: CUDA allocator
    statistics on GPU; on CPU the sampled resident set size (:func:`_cpu_peak_extra_bytes`)."""
    if not device.startswith("cuda"):
        return _cpu_peak_extra_bytes(fn)
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
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": device_name(device),
        "device_type": "cuda" if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _sig(x: float, digits: int = 4) -> float:
    """Round to significant digits (a slow CPU's 0.004 GB/s must not print as 0.0)."""
    return float(f"{x:.{digits}g}")


def finish_row(row: dict, copy_gbps: float) -> dict:
    """Add gbps / pct_copy_bw / floor ratio to a timed row that declares ``bytes``; round the
    timing and mark the row ``noisy`` when its IQR exceeds ``NOISY_IQR`` of the median."""
    if row.get("ms") and row.get("bytes"):
        gbps = row["bytes"] / (row["ms"] * 1e-3) / 1e9
        row["gbps"] = _sig(gbps)
        row["pct_copy_bw"] = _sig(100.0 * gbps / copy_gbps)
        row["x_floor"] = _sig(copy_gbps / gbps)  # time / (bytes / copy bandwidth)
    if row.get("ms") and row.get("flops"):  # compute-bound ops declare their useful flops
        row["tflops"] = _sig(row["flops"] / (row["ms"] * 1e-3) / 1e12)
    if row.get("ms") and row.get("iqr_ms") is not None:
        row["noisy"] = row["iqr_ms"] > NOISY_IQR * row["ms"]
        row["iqr_ms"] = _sig(row["iqr_ms"], 3)
    if row.get("ms") is not None:
        row["ms"] = _sig(row["ms"], 5)
    return row


def results_path(device: str, *, write: bool = False, out: str | None = None) -> str:
    """Where a run's results go: ``out`` if given; with ``write`` the committed
    ``bench/results/<device>.json``; else a new ``bench/runs/<device>-<UTC time>.json``."""
    if out:
        return out
    if write:
        return os.path.join(RESULTS_DIR, f"{device_slug(device)}.json")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(RUNS_DIR, f"{device_slug(device)}-{stamp}.json")
    k = 1
    while os.path.exists(path):
        k += 1
        path = os.path.join(RUNS_DIR, f"{device_slug(device)}-{stamp}-{k}.json")
    return path


_ENV_KEYS = ("device", "device_type", "torch", "triton", "commit", "date")


def migrate(data: dict) -> dict:
    """A results dict in the current schema.  Schema 1 (no ``schema`` key) kept one environment
    and one copy bandwidth at the top, overwritten by each merge, and no spread.  Each benchmark
    already carried its own ``env``; the top-level copy bandwidth belongs to a benchmark only if
    that benchmark is the run that wrote it (same date and commit), else it is recovered from the
    rows' own ``gbps`` and ``pct_copy_bw`` where they determine it, else ``None`` (not
    recorded).  Rows get ``"iqr_ms": None`` (spread not measured); every measured
    value is kept as it was."""
    if data.get("schema", 1) >= SCHEMA:
        return data
    top_env = {k: data.get(k) for k in _ENV_KEYS}
    benches = {}
    for name, bench in data.get("benchmarks", {}).items():
        env = dict(bench.get("env") or top_env)
        same_run = env.get("date") == top_env["date"] and env.get("commit") == top_env["commit"]
        rows = []
        for r in bench.get("rows", []):
            r = dict(r)
            if not r.get("skipped") and "iqr_ms" not in r:
                r["iqr_ms"] = None
            rows.append(r)
        copy = data.get("copy_gbps") if same_run else _copy_gbps_of(rows)
        benches[name] = {"env": env, "copy_gbps": copy, "rows": rows}
    # benchmarks of one run share its copy bandwidth (a bench timed in TFLOP/s alone cannot
    # recover it from its own rows)
    runs: dict = {}
    for bench in benches.values():
        if bench["copy_gbps"] is not None:
            runs.setdefault((bench["env"].get("date"), bench["env"].get("commit")),
                            set()).add(bench["copy_gbps"])
    for bench in benches.values():
        known = runs.get((bench["env"].get("date"), bench["env"].get("commit")), set())
        if bench["copy_gbps"] is None and len(known) == 1:
            bench["copy_gbps"] = next(iter(known))
    return {"schema": SCHEMA, "benchmarks": benches}


def _copy_gbps_of(rows: list):
    """The copy bandwidth a run's rows were computed with (``pct_copy_bw = 100 * gbps / copy``),
    when all rows agree within 1%; None (not recorded) otherwise."""
    vals = [100.0 * r["gbps"] / r["pct_copy_bw"] for r in rows
            if r.get("gbps") and r.get("pct_copy_bw")]
    if not vals or max(vals) > 1.01 * min(vals):
        return None
    return round(statistics.median(vals), 1)


def load_results(path: str) -> dict:
    """Read a results file (any schema) in the current schema."""
    with open(path) as f:
        return migrate(json.load(f))


def write_results(path: str, env: dict, copy_gbps: float | None, bench_rows: dict) -> dict:
    """Merge ``{bench_name: rows}`` into the JSON file at ``path`` (other benches are kept, each
    with the environment and copy bandwidth of its own run)."""
    data = load_results(path) if os.path.exists(path) else {"schema": SCHEMA, "benchmarks": {}}
    benches = data.setdefault("benchmarks", {})
    for name, rows in bench_rows.items():
        benches[name] = {"env": env, "copy_gbps": None if copy_gbps is None else round(copy_gbps, 1),
                         "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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
    cols = ["op", "mode", "shape", "dtype", "impl", "backend", "ms", "iqr_ms", "repeats", "noisy",
            "gbps", "pct_copy_bw", "x_floor", "speedup_vs_eager", "paired_vs_eager", "peak_mb"]
    present = [c for c in cols if any(c in r for r in rows)]
    lines = [" | ".join(present)]
    for r in rows:
        if r.get("skipped"):
            lines.append(" | ".join(str(r.get(c, "")) for c in present[:5]) + f" | skipped: {r['skipped']}")
            continue
        lines.append(" | ".join(("noisy" if r.get(c) else "") if c == "noisy" else
                                "" if r.get(c) is None else str(r.get(c)) for c in present))
    return "\n".join(lines)


def paired_ratios(base_ms: list, row_ms: list) -> list:
    """``base / row`` round by round (the rounds both were timed in: :func:`time_group` drops a
    step that fails, so one list may stop early)."""
    return [b / t for b, t in zip(base_ms, row_ms) if t > 0]


def add_speedups(rows: list[dict]) -> None:
    """For each timed row, against the eager row of the same op / mode / shape / dtype:

    * ``speedup_vs_eager``: eager's median time over this row's;
    * ``paired_vs_eager`` (rows timed round-robin with eager, see :func:`time_group`): the median
      over rounds of eager's time in a round over this row's in the same round, and
      ``paired_q`` its quartiles ``[q1, q3]``.  The rounds pair measurements taken within a
      few steps of each other, so a drift of the machine's speed over the run moves both sides
      of each ratio together; the quartiles are the spread of the speedup itself."""
    eager = {(r["op"], r["mode"], r["shape"], r["dtype"]): r for r in rows
             if r["impl"] == "eager" and r.get("ms")}
    for r in rows:
        e = eager.get((r["op"], r["mode"], r["shape"], r["dtype"]))
        if not (e and r.get("ms")):
            continue
        r["speedup_vs_eager"] = round(e["ms"] / r["ms"], 2)
        if r is e or not (e.get("round_ms") and r.get("round_ms")):
            continue
        ratios = paired_ratios(e["round_ms"], r["round_ms"])
        if len(ratios) >= 2:
            q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
            r["paired_vs_eager"] = round(med, 2)
            r["paired_q"] = [round(q1, 2), round(q3, 2)]
