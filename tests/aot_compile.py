"""Compile every Triton kernel of fastrlhf.kernels ahead of time for real GPUs (no GPU needed).

Run as a script *without* TRITON_INTERPRET (the test does that in a subprocess).  For each spec a
kernel module exposes through ``AOT_SPECS()`` and each target in ``--arch`` (default 90 80), it
compiles with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, then reads
the cubin with the ``cuobjdump`` that Triton ships: registers, stack, local memory, and the widths
of the global loads / stores in the SASS.  Prints one JSON list on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile


def _cuobjdump():
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise SystemExit(f"cuobjdump not found at {path}")
    return path


def all_specs():
    try:
        import fastrlhf.kernels as pkg
    except ImportError:
        # e.g. a throwaway venv with another Triton (3.6) and no fastrlhf install: load kernels/
        # straight from this checkout (it imports nothing from fastrlhf)
        return _sass_tools().kernel_specs()
    specs = []
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("_") or mod.name == "utils":  # (utils: the shared helpers)
            continue
        m = importlib.import_module(f"fastrlhf.kernels.{mod.name}")
        fn = getattr(m, "AOT_SPECS", None)
        if fn is not None:
            for spec in fn():
                specs.append((mod.name, spec))
    return specs


_SASS_TOOLS = []


def _sass_tools():
    """bench/sass_report.py's SASS parsing (innermost loops, per-loop counts, occupancy)."""
    if _SASS_TOOLS:
        return _SASS_TOOLS[0]
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                        "sass_report.py")
    spec = importlib.util.spec_from_file_location("_sass_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _SASS_TOOLS.append(mod)
    return mod


def compile_one(spec, arch, cuobjdump, workdir):
    # one compile path for the tests and bench/sass_report.py
    cubin, _, ptx = _sass_tools().compile_spec(spec, arch)
    path = os.path.join(workdir, "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    # one cuobjdump run prints both the resource usage and the SASS (a run costs ~0.3 s; there
    # are ~270 of them in the test's fixture)
    sass = subprocess.run([cuobjdump, "-res-usage", "-sass", path], capture_output=True,
                          text=True, check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", sass)}
    ops = re.findall(r"\b((?:LDGSTS|LDG|STG)\.E[\w.]*|H?GMMA[\w.]*|HMMA[\w.]*)", sass)
    loops = []
    if spec.get("stream_dtype"):
        sr = _sass_tools()
        instrs = sr.parse_sass(sass)
        threads = sr.resident_threads(usage.get("REG", 0), usage.get("SHARED", 0),
                                      spec.get("num_warps", 4), arch)
        eb = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}.get(spec["stream_dtype"], 4)
        passes = spec.get("passes", ())
        for i, (lo, hi) in enumerate(x for x in sr.innermost_loops(instrs)
                                     if sr.loop_stats(instrs, *x)["ldg"]):
            st = sr.loop_stats(instrs, lo, hi)
            elems = st["ld_bytes"] / (eb * spec.get("streams", 1))
            loops.append({"pass": passes[i] if i < len(passes) else "?",
                          "instr_per_elem": st["instr"] / elems, "ld_bits": st["ld_bits"],
                          "mufu_per_elem": st["mufu"] / elems,
                          "inflight_kib": st["ld_bytes"] * threads / 1024})
    return {"regs": usage.get("REG"), "stack": usage.get("STACK"), "local": usage.get("LOCAL"),
            "shared": usage.get("SHARED"), "mem_ops": sorted(set(ops)),
            "ptx_has_local": ".local" in ptx, "loops": loops,
            "streams": spec.get("streams", 1), "fma_f32_param": fma_on_f32_params(ptx)}


def fma_on_f32_params(ptx: str) -> int:
    """How many ``fma.rn.f32`` of the PTX multiply by a float32 kernel argument (the kernels'
    only such argument is the logits' scale 1 / T): an FMA there means the compiler fused
    ``x * (1 / T) - M`` and skipped the product's rounding."""
    names = re.findall(r"\.param \.f32 (\w+)", ptx)
    regs = {r for n in names for r in re.findall(r"ld\.param\.b32\s+(%r\d+), \[" + n + r"\]",
                                                   ptx)}
    if not regs:
        return 0
    fma = re.findall(r"fma\.rn\.f32\s+%r\d+, (%r\d+), (%r\d+),", ptx)
    return sum(1 for a, b in fma if a in regs or b in regs)


def _job(args):
    index, arch = args
    module, spec = all_specs()[index]
    row = {"module": module, "name": spec["name"], "arch": arch,
           "stream_dtype": spec.get("stream_dtype"), "dot_operands": spec.get("dot_operands")}
    try:
        with tempfile.TemporaryDirectory() as d:
            row.update(compile_one(spec, arch, _cuobjdump(), d))
    except Exception as e:  # reported, and failed, by the test
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", default="", help="compile only specs whose name contains this")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the interpreter cannot compile kernels")
    _cuobjdump()
    jobs = [(i, arch) for i, (_, spec) in enumerate(all_specs()) if args.only in spec["name"]
            for arch in args.arch]
    if args.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            out = pool.map(_job, jobs, chunksize=1)
    else:
        out = [_job(j) for j in jobs]
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
