"""Compiled-code analysis of the streaming kernels (no GPU needed; NOT a timing).

    python bench/sass_report.py                 # sm_90 + sm_80, writes bench/results/sass-sm90.json
    python bench/sass_report.py --arch 90 --only logprobs fused_loss kl --no-write

Every kernel module of ``kernels/`` exposes ``AOT_SPECS()``; each spec is compiled ahead of time
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` (the production
specialization: 16-byte aligned rows, bf16 / fp32 logits) and its cubin disassembled with the
``cuobjdump`` that Triton ships.  In the SASS every backward branch closes a loop; the innermost
loops that issue global loads are the streaming loops.  Per loop:

* ``instr/elem``  instructions of one iteration / logits elements one thread handles in it
  (for two-tensor loops -- full KL -- per vocab position);
* ``mufu/elem``   MUFU (ex2, lg2, rcp) instructions per element;
* ``ld_bits``     widest global load in the loop; ``ld_B/thr`` bytes one thread loads per iteration;
* ``inflight_KiB`` bytes in flight per SM: ``ld_B/thr`` x resident threads per SM (registers,
  warps and shared memory of the compiled kernel decide the occupancy);
* registers, spills (stack / local bytes).

The bandwidth model: an SM issues at most 4 warp-instructions per clock, so a loop of ``k``
instructions per element streams at most ``SMs x 4 x 32 x clock / k`` elements per second; with
the bytes each element moves (``2`` for a bf16 read, ``4`` for read + write) that is compared to
the HBM bandwidth.  ``% HBM`` = min(100, that / HBM).  H100 SXM: 132 SMs, 1.98 GHz, 3.35 TB/s;
H200: 132 SMs, 1.98 GHz, 4.8 TB/s.  This is a model from compiled code, not a measurement.

Liger-Kernel's GRPO and cross-entropy kernels are compiled the same way (bf16, V = 151936) when
``liger_kernel`` is importable.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT_JSON = os.path.join(HERE, "results", "sass-sm90.json")

GPUS = {"H100": dict(sms=132, clock_ghz=1.98, hbm_tbs=3.35),
        "H200": dict(sms=132, clock_ghz=1.98, hbm_tbs=4.8)}

# Which kernels are which passes over the logits (per logits element: DRAM bytes one streaming
# loop of the kernel moves for bf16 logits).  Loop order is the order in the SASS.
PASSES = {
    "logprobs_fwd": ("fwd read",),
    "logprobs_bwd": ("bwd read+write",),
    "fused_ppo_loss": ("fwd read (stats)", "fwd read+write (grad)"),
    "full_kl_fwd": ("fwd read x2",),
    "full_kl_bwd": ("bwd read x2 + write",),
    "fused_ppo_loss_scale": ("bwd read+write",),
    "fused_ppo_loss_grad": ("bwd read+write (grad)",),
}


KERNELS_DIR = None  # --kernels: analyse another checkout's kernels/ (e.g. the previous commit)


# Kernels that stream two logits tensors (counted per vocab position) when a spec does not say.
STREAMS = {"full_kl_fwd": 2, "full_kl_bwd": 2}


def load_kernels():
    """Import kernels/ as a package without importing fastrlhf (works with any torch+triton).

    The kernels import one fastrlhf module, the leaf ``fastrlhf.tables`` (torch only), as
    ``..tables``: it is loaded beside them under a synthetic parent package ``_frk``."""
    if "_frk.kernels" in sys.modules:
        return sys.modules["_frk.kernels"]
    import types
    parent = types.ModuleType("_frk")
    parent.__path__ = []
    sys.modules["_frk"] = parent
    tspec = importlib.util.spec_from_file_location(
        "_frk.tables", os.path.join(ROOT, "fastrlhf", "tables.py"))
    tables = importlib.util.module_from_spec(tspec)
    sys.modules["_frk.tables"] = tables
    tspec.loader.exec_module(tables)
    kdir = KERNELS_DIR or os.path.join(ROOT, "kernels")
    spec = importlib.util.spec_from_file_location(
        "_frk.kernels", os.path.join(kdir, "__init__.py"), submodule_search_locations=[kdir])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_frk.kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


def kernel_specs(only=None):
    import pkgutil
    pkg = load_kernels()
    out = []
    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name.startswith("_") or m.name == "utils" or (only and m.name not in only):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{m.name}")
        for spec in getattr(mod, "AOT_SPECS", lambda: [])():
            out.append((m.name, spec))
    return out


def cuobjdump_path():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_spec(spec, arch):
    """(cubin bytes, ttir text) of one spec for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = dict(spec["signature"])
    names = list(sig)
    constexprs = {(names.index(k),): v for k, v in spec.get("constexprs", {}).items()}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.get("aligned", [])}
    src = ASTSource(fn=spec["fn"], signature=sig, constexprs=constexprs, attrs=attrs)
    opts = {"num_warps": spec.get("num_warps", 4)}
    if "num_stages" in spec:
        opts["num_stages"] = spec["num_stages"]
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    return c.asm["cubin"], c.asm.get("ttir", ""), c.asm.get("ptx", "")


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text):
    """[(address, instruction text)] of the first kernel in a cuobjdump -sass listing."""
    return [(int(a, 16), ins.strip()) for a, ins in _LINE.findall(text)]


def innermost_loops(instrs):
    """Backward branches ``[target, branch]`` that contain no other backward branch."""
    loops = []
    for addr, ins in instrs:
        m = re.search(r"\bBRA(?:\.\w+)*\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    inner = [lp for lp in loops
             if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    return sorted(set(inner))


def _width(op):
    m = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
    if not m:
        return 32
    return {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}[m.group(1)]


def loop_stats(instrs, lo, hi):
    body = [ins for a, ins in instrs if lo <= a <= hi]
    body = [i for i in body if not i.startswith("NOP")]
    ops = [re.sub(r"^@!?U?P\w+\s+", "", i).split()[0] for i in body]
    ldg = [o for o in ops if o.startswith("LDG")]
    stg = [o for o in ops if o.startswith("STG")]
    return {"instr": len(body), "mufu": sum(o.startswith("MUFU") for o in ops),
            "mufu_ex2": sum(o.startswith("MUFU.EX2") for o in ops),
            "ldg": len(ldg), "stg": len(stg),
            "ld_bits": max((_width(o) for o in ldg), default=0),
            "st_bits": max((_width(o) for o in stg), default=0),
            "ld_bytes": sum(_width(o) for o in ldg) // 8,
            "st_bytes": sum(_width(o) for o in stg) // 8}


def resident_threads(regs, shared, num_warps, arch):
    """Threads resident per SM from registers (256-register warp granules), warps, smem."""
    max_warps = 64 if arch >= 80 else 32
    per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    by_regs = 65536 // (per_warp * num_warps)
    smem = (228 if arch >= 90 else 164) * 1024
    by_smem = smem // max(shared + 1024, 1) if shared else 32
    ctas = max(0, min(by_regs, max_warps // num_warps, by_smem, 32))
    return ctas * num_warps * 32


def analyze(spec, arch, elem_bytes=None):
    cubin, ttir, ptx = compile_spec(spec, arch)
    cob = cuobjdump_path()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([cob, "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([cob, "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    instrs = parse_sass(sass)
    nw = spec.get("num_warps", 4)
    threads = resident_threads(usage.get("REG", 0), usage.get("SHARED", 0), nw, arch)
    dt = spec.get("stream_dtype")
    eb = elem_bytes or {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}.get(dt, 4)
    streams = spec.get("streams", STREAMS.get(_family(spec["name"]), 1))
    loops = []
    for lo, hi in innermost_loops(instrs):
        st = loop_stats(instrs, lo, hi)
        if not st["ldg"]:
            continue
        elems = st["ld_bytes"] / (eb * streams) if st["ld_bytes"] else 0
        st["elems_per_thread"] = elems
        st["instr_per_elem"] = round(st["instr"] / elems, 2) if elems else None
        st["per"] = "vocab position" if streams > 1 else "element"
        st["mufu_per_elem"] = round(st["mufu"] / elems, 2) if elems else None
        st["inflight_kib"] = round(st["ld_bytes"] * threads / 1024, 1)
        loops.append(st)
    return {"regs": usage.get("REG"), "stack": usage.get("STACK"), "local": usage.get("LOCAL"),
            "shared": usage.get("SHARED"), "resident_threads": threads,
            "ptx_has_local": ".local" in ptx, "loops": loops,
            "ttir_barriers": ttir.count("gpu.barrier")}, sass, ttir


def model_pct(instr_per_elem, bytes_per_elem, gpu):
    g = GPUS[gpu]
    if not instr_per_elem:
        return None
    elems_per_s = g["sms"] * 4 * 32 * g["clock_ghz"] * 1e9 / instr_per_elem
    return round(min(100.0, 100.0 * elems_per_s * bytes_per_elem / (g["hbm_tbs"] * 1e12)), 1)


def _family(name):
    return name.split("[")[0]


def _loop_bytes(passes, idx, eb):
    """(DRAM bytes per element of the loop, its pass label).  Per vocab position for two-tensor
    loops ("x2")."""
    kind = passes[idx] if idx < len(passes) else "read"
    reads = 2 if "read x2" in kind else 1
    writes = (2 if "write x2" in kind else 1) if "write" in kind else 0
    return eb * (reads + writes), kind


def liger_specs():
    """Liger-Kernel 0.8.5's GRPO (token level, loss_type "grpo", beta 0.04) and cross-entropy
    kernels, bf16, V = 151936, with the launch options its launchers use; [] if not installed."""
    try:
        from liger_kernel.ops import cross_entropy as ce
        from liger_kernel.ops import grpo_loss as gl
    except Exception:
        return []
    V, L = 151936, 1024
    specs = []
    ce_sig = {"X_ptr": "*bf16", "X_stride": "i64", "Y_ptr": "*i64", "Y_stride": "i64",
              "weight_ptr": "*fp32", "loss_ptr": "*fp32", "z_loss_ptr": "*fp32",
              "loss_stride": "i64", "token_accuracy_ptr": "*fp32",
              "token_accuracy_stride": "i64", "predicted_tokens_ptr": "*i64",
              "predicted_tokens_stride": "i64", "n_cols": "i32", "n_non_ignore": "fp32",
              "sum_non_ignore_weight": "fp32", "weight_sum": "fp32", "ignore_index": "i32",
              "lse_square_scale": "constexpr", "label_smoothing": "constexpr",
              "reduction": "constexpr", "softcap": "fp32", "RETURN_Z_LOSS": "constexpr",
              "RETURN_TOKEN_ACCURACY": "constexpr", "RETURN_PREDICTED_TOKENS": "constexpr",
              "BLOCK_SIZE": "constexpr", "HAS_WEIGHT": "constexpr", "HAS_SOFTCAPPING": "constexpr",
              "HAS_GRADIENTS": "constexpr"}
    ce_cx = {"lse_square_scale": 0.0, "label_smoothing": 0.0, "reduction": "mean",
             "RETURN_Z_LOSS": False, "RETURN_TOKEN_ACCURACY": False,
             "RETURN_PREDICTED_TOKENS": False, "BLOCK_SIZE": 32768, "HAS_WEIGHT": False,
             "HAS_SOFTCAPPING": False, "HAS_GRADIENTS": True}
    specs.append(dict(name="liger cross_entropy", fn=ce.liger_cross_entropy_kernel,
                      signature=ce_sig, constexprs=ce_cx, num_warps=32, stream_dtype="bf16",
                      aligned=["X_ptr", "X_stride", "n_cols"], family="liger_ce",
                      passes=("pass 1: read (lse)", "pass 2: read+write (grad, in place)")))
    common = {"TEMPERATURE": 1.0, "BETA": 0.04, "EPS_LOW": 0.2, "EPS_HIGH": 0.2,
              "LOSS_TYPE": 0, "SAPO_TEMP_POS": 1.0, "SAPO_TEMP_NEG": 1.05, "DELTA": 0.0,
              "USE_BIAS_CORRECTION_KL": False, "L": L, "N": V}
    fwd_sig = {"LOGITS": "*bf16", "OLD_LOGP": "*fp32", "REF_LOGP": "*fp32",
               "INPUT_IDS": "*i64", "COMPLETION_MASK": "*i32", "ADVANTAGES": "*fp32",
               "VLLM_IS_RATIO": "constexpr", "VLLM_IS_RATIO_STRIDE": "i32",
               "PHI_SEQ": "constexpr", "LOSS": "*fp32", "LSE": "*fp32", "KL": "*fp32",
               "IS_CLIPPED": "*fp32", **{k: "constexpr" for k in common}, "BLOCK_N": "constexpr"}
    specs.append(dict(name="liger grpo_fwd", fn=gl._grpo_loss_fwd_kernel, signature=fwd_sig,
                      constexprs={**common, "VLLM_IS_RATIO": None, "PHI_SEQ": None,
                                  "BLOCK_N": 2048},
                      num_warps=1, num_stages=2, stream_dtype="bf16", family="liger_grpo_fwd",
                      aligned=["LOGITS"], passes=("fwd read",)))
    bwd_sig = {"DLOSS": "*fp32", "DLOGITS": "*bf16", "LOGITS": "*bf16", "OLD_LOGP": "*fp32",
               "REF_LOGP": "*fp32", "INPUT_IDS": "*i64", "ADVANTAGES": "*fp32",
               "COMPLETION_MASK": "*i32", "LSE": "*fp32", "VLLM_IS_RATIO": "constexpr",
               "VLLM_IS_RATIO_STRIDE": "i32", "PHI_SEQ": "constexpr",
               **{k: "constexpr" for k in common if k not in ("L", "N")},
               "loss_stride0": "i32", "loss_stride1": "i32", "L": "constexpr",
               "N": "constexpr", "BLOCK_N": "constexpr"}
    specs.append(dict(name="liger grpo_bwd", fn=gl._grpo_loss_bwd_kernel, signature=bwd_sig,
                      constexprs={**common, "VLLM_IS_RATIO": None, "PHI_SEQ": None,
                                  "BLOCK_N": 4096},
                      num_warps=16, num_stages=1, stream_dtype="bf16", family="liger_grpo_bwd",
                      aligned=["LOGITS", "DLOGITS"], passes=("bwd read+write",)))
    return specs


def run(archs=(90, 80), only=None, liger=True):
    import triton
    rows = []
    specs = kernel_specs(only)
    specs = [(m, s) for m, s in specs if s.get("stream_dtype")]
    if liger:
        specs += [("liger", s) for s in liger_specs()]
    for module, spec in specs:
        for arch in archs:
            row = {"module": module, "name": spec["name"], "arch": arch,
                   "family": spec.get("family", _family(spec["name"])),
                   "stream_dtype": spec.get("stream_dtype")}
            if "error" in spec:
                row["error"] = spec["error"]
                rows.append(row)
                continue
            try:
                info, _, _ = analyze(spec, arch)
                row.update(info)
                eb = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}.get(spec.get("stream_dtype"), 4)
                passes = spec.get("passes") or PASSES.get(row["family"], ())
                row["streams"] = spec.get("streams", STREAMS.get(row["family"], 1))
                for i, lp in enumerate(row["loops"]):
                    nbytes, kind = _loop_bytes(passes, i, eb)
                    lp["pass"] = kind
                    lp["model_pct_hbm"] = {g: model_pct(lp["instr_per_elem"], nbytes, g)
                                           for g in GPUS}
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            rows.append(row)
    return {"what": "compiled-code analysis (SASS of the AOT compile), not timing",
            "triton": triton.__version__, "date": _dt.date.today().isoformat(),
            "command": "python bench/sass_report.py", "gpus_model": GPUS, "rows": rows}


def table(result, arch=90, dtype="bf16"):
    lines = ["| kernel | loop (pass) | instr/elem | MUFU/elem | regs | spill B | load bits | "
             "loads in flight / SM | model % HBM H100 / H200 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["arch"] != arch or r.get("stream_dtype") != dtype:
            continue
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:60]} | | | | | | | |")
            continue
        for lp in r["loops"]:
            pct = lp.get("model_pct_hbm", {})
            lines.append(
                f"| {r['name']} | {lp.get('pass', '')} | {lp['instr_per_elem']} | "
                f"{lp['mufu_per_elem']} | {r['regs']} | {r['stack'] + r['local']} | "
                f"{lp['ld_bits']} | {lp['inflight_kib']} KiB | "
                f"{pct.get('H100')} / {pct.get('H200')} |")
    return "\n".join(lines)


def _loops_of(row):
    """Hot loops of a row (rare paths dropped), instr counted per the row's unit."""
    fam = row.get("family", _family(row["name"]))
    streams = row.get("streams", STREAMS.get(fam, 1))
    out = []
    for lp in row.get("loops", []):
        if str(lp.get("pass", "")).startswith("rare"):
            continue
        scale = streams if "streams" not in row else 1   # old JSON: per element of both rows
        if lp.get("per") == "vocab position" or "streams" in row:
            scale = 1
        out.append(dict(lp, ipe=round(lp["instr_per_elem"] * scale, 2)))
    return out


def compare(files, arch=90, dtype="bf16"):
    """Markdown: instr / elem per kernel loop, one column per results file (e.g. before/after,
    Triton 3.6 / 3.9)."""
    data = []
    for f in files:
        with open(f) as fh:
            data.append(json.load(fh))
    keys = []
    cells = {}
    for i, d in enumerate(data):
        for r in d["rows"]:
            if r["arch"] != arch or r.get("stream_dtype") != dtype or "error" in r:
                continue
            for j, lp in enumerate(_loops_of(r)):
                k = (r["name"], j)
                if k not in keys:
                    keys.append(k)
                cells[(k, i)] = lp["ipe"]
    head = "| kernel | loop | " + " | ".join(
        f"{os.path.basename(f)} (triton {d['triton']})" for f, d in zip(files, data)) + " |"
    lines = [head, "|---|---|" + "---|" * len(files)]
    for k in keys:
        lines.append(f"| {k[0]} | {k[1]} | " + " | ".join(
            str(cells.get((k, i), "")) for i in range(len(files))) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--only", nargs="+", default=None, help="kernel modules (e.g. logprobs kl)")
    ap.add_argument("--no-liger", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", default=OUT_JSON)
    ap.add_argument("--kernels", default=None, help="a kernels/ directory (default: this tree's)")
    ap.add_argument("--compare", nargs="+", default=None,
                    help="results JSON files: print instr/elem side by side and exit")
    args = ap.parse_args(argv)
    if args.compare:
        print(compare(args.compare, arch=args.arch[0]))
        return 0
    global KERNELS_DIR
    KERNELS_DIR = args.kernels
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = run(args.arch, args.only, not args.no_liger)
    print(f"compiled-code analysis, not timing (triton {res['triton']})")
    print(table(res, arch=args.arch[0]))
    if not args.no_write:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
