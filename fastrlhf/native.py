"""The native CPU backend: C++ (ATen + OpenMP) kernels from ``csrc/``, built on first use.

Building
    The first call of :func:`available` (``backend="auto"`` on a CPU tensor, or
    ``backend="native"``) compiles ``csrc/*.cpp`` with ``torch.utils.cpp_extension.load`` and ninja
    into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later processes load
    the cached build.  The module name carries a hash of the sources, the compiler flags and the
    torch version, so an edited source or a new torch rebuilds instead of loading a stale binary.
    Sources are looked up in ``fastrlhf/csrc`` (an installed wheel / sdist) and then in the
    source tree's ``csrc/`` (an editable install).
    If the build fails (no C++ compiler, no ninja, a broken toolchain) one ``RuntimeWarning``
    says why and :func:`available` returns False: ``auto`` then uses the eager reference and
    ``backend="native"`` raises a RuntimeError naming the problem -- never a crash.

Environment
    ``FASTRLHF_NATIVE=0``           never build or use the native backend (no warning).
    ``FASTRLHF_NATIVE_VERBOSE=1``   show the compiler output.
    ``FASTRLHF_NATIVE_CFLAGS``      replace the ISA flags (default: from torch's CPU capability,
                                    e.g. ``-mavx2 -mfma -mf16c`` on an AVX2 machine).

Launchers
    This is a binding layer, not an op layer: each function below allocates its outputs and calls
    the extension, with the same name, arguments and results as the Triton launcher of the same
    op family in :mod:`fastrlhf.kernels` (``logprobs_fwd``, ``logprobs_bwd``, ``gae_fwd``,
    ``policy_fwd``, ...).  The ops in :mod:`fastrlhf.ops` validate, lay out the rows, and pick
    this module or the kernels module underneath their one custom op and autograd formula
    (:func:`fastrlhf.ops.registry.launchers`).  Nothing here imports :mod:`fastrlhf.ops`.
    Results follow the dtype rule of :func:`fastrlhf.tables.acc_dtype`.

Determinism: every row is computed by one thread in a fixed order and cross-row sums are taken
serially in row order, so results are bitwise identical for any ``torch.set_num_threads``.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

from .buffers import grad_empty
from .tables import AGG_MODE_IDS, FUSED_AUX, FUSED_AUX_ROWS, FUSED_TERM_ROWS, acc_dtype

__all__ = ["available", "load", "build_error", "source_dir", "logprobs_fwd", "logprobs_call",
           "logprobs_bwd",
           "gae_fwd", "policy_fwd", "policy_bwd", "value_fwd", "value_bwd", "fused_loss_call",
           "fused_loss_grad",
           "scale_rows", "linear_logprobs_fwd", "linear_logprobs_bwd", "fused_linear_loss_fwd"]

_log = logging.getLogger("fastrlhf")
_LOCK = threading.Lock()
_STATE = {"tried": False, "module": None, "error": None}


# ---------------------------------------------------------------------------------------------
# build / load
# ---------------------------------------------------------------------------------------------

def source_dir() -> Optional[str]:
    """The directory holding the C++ sources, or None if they were not shipped."""
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(d, "bindings.cpp")):
            return d
    return None


def _isa_flags() -> list:
    env = os.environ.get("FASTRLHF_NATIVE_CFLAGS")
    if env is not None:
        return env.split()
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    if cap == "AVX512":
        # 512-bit vectors: the softmax exp loop measured ~1.4x faster than with AVX2 here.
        return avx2 + ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq",
                       "-mprefer-vector-width=512"]
    if cap == "AVX2":
        return avx2
    return []  # the compiler's baseline for the target (SSE2 on x86-64, NEON on aarch64)


def _cflags() -> list:
    # -fno-trapping-math lets gcc if-convert (and so vectorize) the branch-free select chains;
    # it changes no results.  No -ffast-math: NaN / inf semantics are part of the contract.
    return ["-O3", "-fopenmp", "-fno-trapping-math", "-Wno-psabi", *_isa_flags()]


def _compiler_id(cxx: str) -> str:
    """The compiler's path and ``--version`` banner (part of the cache key)."""
    import subprocess
    exe = shutil.which(cxx.split()[0]) or cxx
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return exe + "\0" + out.splitlines()[0] if out else exe


def cache_key(src: str, cxx: str, cflags: list) -> str:
    """Everything that changes the build: the sources' directory (``build.ninja`` records
    absolute paths, so two checkouts must not share a build directory), their names and
    contents, the compiler (path and version), the flags and the torch version."""
    h = hashlib.sha1()
    h.update(os.path.realpath(src).encode() + b"\0")
    for path in sorted(glob.glob(os.path.join(src, "*.cpp")) + glob.glob(os.path.join(src, "*.h"))):
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    h.update(_compiler_id(cxx).encode() + b"\0")
    h.update(" ".join(cflags).encode() + b"\0" + torch.__version__.encode())
    return h.hexdigest()[:12]


def _build_extension():
    """Compile (or load the cached build of) the extension; raises on any failure.

    A build that is not cached yet says so once on stderr, with the time it took."""
    src = source_dir()
    if src is None:
        raise RuntimeError("the C++ sources (csrc/*.cpp) were not found next to the package")
    cxx = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension will run
    if shutil.which(cxx.split()[0] if cxx.split() else "c++") is None:
        raise RuntimeError(f"no C++ compiler found ({cxx!r} is not on PATH; install g++ or "
                           "clang++, or set CXX)")
    import sys
    import time

    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join(src, "*.cpp")))
    cflags = _cflags()
    name = f"fastrlhf_native_{cache_key(src, cxx, cflags)}"
    verbose = os.environ.get("FASTRLHF_NATIVE_VERBOSE", "0") not in ("", "0")
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    cached = os.path.isfile(os.path.join(build_dir, name + ".so"))
    if not cached:
        print(f"fastrlhf: compiling the native CPU backend into {build_dir} (once per source "
              "tree, compiler and torch version; about a minute)...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    mod = cpp_extension.load(name=name, sources=sources, extra_include_paths=[src],
                             extra_cflags=cflags, extra_ldflags=["-fopenmp"], verbose=verbose)
    if not cached:
        print(f"fastrlhf: native CPU backend built in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    return mod


def _disabled() -> bool:
    return os.environ.get("FASTRLHF_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def load():
    """The compiled extension module, or None (after one warning) if it cannot be built."""
    if _STATE["tried"]:
        return _STATE["module"]
    with _LOCK:
        if _STATE["tried"]:
            return _STATE["module"]
        if _disabled():
            _STATE.update(tried=True, module=None, error="disabled by FASTRLHF_NATIVE=0")
            return None
        try:
            mod = _build_extension()
            _check_layout(mod)
            err = None
        except BaseException as e:  # noqa: BLE001 - any build failure must degrade, not crash
            if isinstance(e, KeyboardInterrupt):
                raise
            mod, err = None, f"{type(e).__name__}: {e}".strip()
            warnings.warn(
                "fastrlhf: the native CPU backend could not be built, so CPU tensors use the "
                f"eager reference implementation (slower, more memory). Cause: {err[:600]}",
                RuntimeWarning, stacklevel=3)
        _STATE.update(tried=True, module=mod, error=err)
        return mod


def _check_layout(mod) -> None:
    """Refuse a build whose fused-loss output rows are not those this module reads
    (``tables.FUSED_AUX_ROWS``, csrc/native.h ``FusedAux``)."""
    rows = tuple(mod.fused_aux_rows())
    if rows != FUSED_AUX_ROWS:
        raise RuntimeError(f"the extension's fused-loss aux rows {rows} are not "
                           f"fastrlhf.tables.FUSED_AUX_ROWS {FUSED_AUX_ROWS}")


def available() -> bool:
    """True when the native extension is built and loadable (builds it on the first call)."""
    return load() is not None


def build_error() -> Optional[str]:
    """Why the extension is unavailable (None if it loaded or was not tried yet)."""
    return _STATE["error"]


def _reset() -> None:
    """Forget the load attempt (tests use it to simulate a failed build)."""
    with _LOCK:
        _STATE.update(tried=False, module=None, error=None)


def _ext():
    mod = load()
    if mod is None:
        raise RuntimeError(f"fastrlhf: the native CPU backend is not available ({build_error()})")
    return mod


def _int64(tokens: Optional[Tensor]) -> Optional[Tensor]:
    return None if tokens is None else tokens.reshape(-1).to(torch.int64).contiguous()


def _no_packing(cu) -> None:
    if cu is not None:
        raise ValueError("fastrlhf native: packed sequences (cu_seqlens) are not implemented by "
                         "the native backend")


def _host_scalar(t) -> Optional[float]:
    """A device scalar (or a number, or None) as a Python float."""
    if t is None:
        return None
    return float(t.reshape(()).item()) if isinstance(t, Tensor) else float(t)


# ---------------------------------------------------------------------------------------------
# token log-probs / entropy (kernels.logprobs)
# ---------------------------------------------------------------------------------------------

def logprobs_fwd(logits: Tensor, dims, strides, V: int, tokens: Optional[Tensor], inv_temp: float,
                 ignore_index: int, want_entropy: bool = True):
    """``(logp or None, entropy, lse [N, 2])`` of the rows ``dims`` / ``strides`` of ``logits``
    (see :func:`fastrlhf.kernels.logprobs.logprobs_fwd`)."""
    n = dims[0] * dims[1] * dims[2]
    acc = acc_dtype(logits)
    lse = torch.empty(n, 2, dtype=acc)
    ent = torch.empty(n, dtype=acc)
    logp = torch.empty(n, dtype=acc) if tokens is not None else None
    _ext().logprobs_fwd(logits, list(dims), list(strides), V, _int64(tokens), inv_temp,
                        ignore_index, logp, ent, lse)
    return logp, ent, lse


def logprobs_call(logits: Tensor, dims, strides, V: int, tokens: Tensor, inv_temp: float,
                  ignore_index: int, check_tokens: bool, lead):
    """:func:`logprobs_fwd` with the op's own ``tokens`` (any integer dtype and shape, flattened
    and checked in C++ when ``check_tokens``): ``(logp [*lead], entropy [*lead], lse [*lead, 2],
    bad)``, ``bad`` the flat position of the first id outside ``[0, V)`` that is not
    ``ignore_index`` (nothing computed then), else -1.  ``lead``: the logits' leading shape
    (``N`` rows in all), the outputs' shape."""
    acc = acc_dtype(logits)
    lse = torch.empty((*lead, 2), dtype=acc)
    ent = torch.empty(lead, dtype=acc)
    logp = torch.empty(lead, dtype=acc)
    bad = _ext().logprobs_call(logits, list(dims), list(strides), V, tokens, inv_temp,
                               ignore_index, check_tokens, logp, ent, lse)
    return logp, ent, lse, bad


def logprobs_bwd(logits: Tensor, dlogits: Tensor, dims, strides, out_strides, V: int,
                 tokens: Optional[Tensor], dlogp: Optional[Tensor], dent: Optional[Tensor],
                 lse: Tensor, ent: Tensor, inv_temp: float, ignore_index: int) -> Tensor:
    """Write d loss / d logits of the rows into ``dlogits`` (rows at ``out_strides``; may be
    ``logits`` itself)."""
    _ext().logprobs_bwd(logits, dlogits, list(dims), list(strides), list(out_strides), V,
                        _int64(tokens), dlogp, dent, lse, ent, inv_temp, ignore_index)
    return dlogits


# ---------------------------------------------------------------------------------------------
# GAE (kernels.gae)
# ---------------------------------------------------------------------------------------------

def gae_fwd(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
            cu_seqlens: Optional[Tensor], max_len: int, acc: torch.dtype):
    """``(advantages, returns)``: fresh contiguous ``[B, T]`` tensors of ``acc``."""
    adv = torch.empty(rewards.shape, dtype=acc)
    ret = torch.empty(rewards.shape, dtype=acc)
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()
    _ext().gae(rewards, values, mask, cu, gamma, lam, adv, ret)
    return adv, ret


# ---------------------------------------------------------------------------------------------
# clipped policy / value losses (kernels.losses)
# ---------------------------------------------------------------------------------------------

def policy_fwd(logp, old_logp, adv, mask, lo, hi, dual, seq, mode, dp, denom_val, denom_t, lsf,
               acc, cu=None):
    """``(loss [], stats [3], coef [B], seq_log_ratio [B])`` (rows, not packed)."""
    _no_packing(cu)
    B = logp.shape[0]
    loss = torch.empty((), dtype=acc)
    stats = torch.empty(3, dtype=acc)
    coef = torch.empty(B, dtype=acc)
    seqlr = torch.empty(B, dtype=acc)
    denom = _host_scalar(denom_t) if denom_t is not None else _host_scalar(denom_val)
    _ext().policy_fwd(logp, old_logp, adv, mask, lo, hi, dual, seq, AGG_MODE_IDS[mode],
                      float(dp), denom, float(lsf), loss, stats, coef, seqlr)
    return loss, stats, coef, seqlr


def policy_bwd(grad_out, logp, old_logp, adv, mask, coef, seqlr, lo, hi, dual, seq, cu=None):
    """d loss / d logp into a fresh contiguous ``[B, T]`` buffer of logp's dtype."""
    _no_packing(cu)
    out = torch.empty(logp.shape, dtype=logp.dtype)
    _ext().policy_bwd(_host_scalar(grad_out), logp, old_logp, adv, mask, lo, hi, dual, seq, coef,
                      seqlr, out)
    return out


def value_fwd(values, old_values, returns, mask, clip, mode, dp, denom_val, denom_t, lsf, acc,
              cu=None):
    """``(loss [], stats [1], coef [B])`` (verl's factor 0.5 included)."""
    _no_packing(cu)
    loss = torch.empty((), dtype=acc)
    stats = torch.empty(1, dtype=acc)
    coef = torch.empty(values.shape[0], dtype=acc)
    denom = _host_scalar(denom_t) if denom_t is not None else _host_scalar(denom_val)
    _ext().value_fwd(values, old_values, returns, mask, clip, AGG_MODE_IDS[mode], float(dp),
                     denom, float(lsf), loss, stats, coef)
    return loss, stats, coef


def value_bwd(grad_out, values, old_values, returns, mask, coef, clip, cu=None):
    """d loss / d values into a fresh contiguous ``[B, T]`` buffer of values' dtype."""
    _no_packing(cu)
    out = torch.empty(values.shape, dtype=values.dtype)
    _ext().value_bwd(_host_scalar(grad_out), values, old_values, returns, mask, clip, coef, out)
    return out


# ---------------------------------------------------------------------------------------------
# fused PPO loss from the logits (the C++ counterpart of kernels.fused_loss)
# ---------------------------------------------------------------------------------------------

# aux rows (tables.FUSED_AUX_ROWS): the per-token terms; with defer also g_lp, g_h, M, log S
_AUX_G, _AUX_M = FUSED_AUX["g_lp"], FUSED_AUX["M"]
assert FUSED_AUX["g_h"] == _AUX_G + 1 and FUSED_AUX["logS"] == _AUX_M + 1


def fused_loss_call(logits, dlogits, dims, strides, out_strides, V, B, T, tokens, old_logp, adv,
                    ref_logp, mask, coef, *, inv_temp, ignore_index, lo, hi, dual, seq, kl_coef,
                    kl_val, kl_grad, ent_coef, write_grad, check_tokens, defer=False):
    """The whole fused loss of ``[B, T]`` rows in one extension call (the C++ counterpart of
    :func:`fastrlhf.kernels.fused_loss.fused_loss_fwd` with the row sums and statistics done
    inside): ``(loss [], stats [5], per_token [3, B, T], bad)`` and, when ``write_grad``,
    d loss / d logits (upstream gradient 1) in ``dlogits``.

    The per-token tensors come as the op has them (``[B, T]``, ``advantages`` also ``[B]``, any
    float / int dtype): C++ flattens them and converts them to the accumulation dtype, and checks
    the ids when ``check_tokens`` -- ``bad`` is then the flat position of the first id outside
    ``[0, V)`` that is not ``ignore_index`` (nothing computed), else -1.  ``coef``: the per-row
    aggregation weights ``[B]``; GSPO (``seq``) runs its log-prob pass inside.

    ``defer`` (grad_timing="backward"; ``write_grad`` False): also returns the inputs of a later
    :func:`fused_loss_grad` sweep, ``lse [N, 2]`` (row max, log sum exp) and ``coefs [2, N]``
    (d loss / d logp, d loss / d H per token; 0 for tokens that do not count), else two Nones."""
    acc = acc_dtype(logits)
    aux = torch.empty(len(FUSED_AUX_ROWS) if defer else FUSED_TERM_ROWS, B * T, dtype=acc)
    loss = torch.empty((), dtype=acc)
    stats = torch.empty(5, dtype=acc)
    per_token, bad = _ext().fused_loss_call(
        logits, dlogits, list(dims), list(strides), list(out_strides), V, B, T, tokens, old_logp,
        adv, ref_logp, mask, coef, inv_temp, ignore_index, lo, hi, dual, seq, kl_coef, kl_val,
        kl_grad, ent_coef, write_grad, check_tokens, aux, loss, stats, defer)
    if not defer:
        return loss, stats, per_token, bad, None, None
    return (loss, stats, per_token, bad, aux[_AUX_M:_AUX_M + 2].t().contiguous(),
            aux[_AUX_G:_AUX_G + 2])


def fused_loss_grad(logits, dlogits, dims, strides, out_strides, V, tokens, lse, ent, g_lp, g_h,
                    upstream, *, inv_temp, ignore_index, has_ent):
    """The deferred fused-loss gradient (the C++ counterpart of
    :func:`fastrlhf.kernels.fused_loss.fused_loss_grad`): ``upstream * (g_lp (onehot - p) -
    g_h p (log p + H)) / T`` into ``dlogits`` (may be ``logits``), one read and one write of
    each row, none of the read for rows with ``g_lp = g_h = 0``.  ``upstream`` is a one-element
    CPU tensor, read on the host.  Returns ``dlogits``."""
    _ext().fused_loss_grad(logits, dlogits, list(dims), list(strides), list(out_strides), V,
                           _int64(tokens), lse, ent if has_ent else None, g_lp,
                           g_h if has_ent else None, float(upstream), inv_temp, ignore_index)
    return dlogits


def scale_rows(x: Tensor, dims, strides, V: int, g: Tensor) -> Tensor:
    """``x *= g`` in place over rows ``dims`` / ``strides`` (unit stride over ``V``), in the
    accumulation dtype with one rounding (as ``x.mul_(float(g))``); ``g`` a one-element tensor,
    read on the host.  Nothing is touched when ``g == 1`` (the counterpart of
    :func:`fastrlhf.kernels.fused_loss.scale_rows`)."""
    _ext().scale_rows(x, list(dims), list(strides), V, float(g))
    return x


# ---------------------------------------------------------------------------------------------
# token log-probs / entropy from hidden states, the lm_head fused in (kernels.fused_linear)
# ---------------------------------------------------------------------------------------------

def _hidden_rows(hidden: Tensor, dims, strides, H: int) -> Tensor:
    """The ``[N, H]`` rows of ``hidden`` described by ``dims`` / ``strides`` (a view when the
    rows are evenly spaced, else a copy; O(N H) either way)."""
    D0, D1, D2 = dims
    if D0 * D1 * D2 == 0:
        return hidden.new_empty(0, H)
    rows = hidden.as_strided((D0, D1, D2, H), (*strides, 1 if H > 1 else hidden.stride(-1)),
                             hidden.storage_offset())
    return rows.reshape(D0 * D1 * D2, H)


def linear_logprobs_fwd(hidden: Tensor, dims, strides, weight: Tensor, bias: Optional[Tensor],
                        tokens: Tensor, inv_temp: float, ignore_index: int, chunk=None):
    """``(logp, entropy, lse [N, 2])`` of the logits ``(rows @ weight.T + bias) * inv_temp``
    (see :func:`fastrlhf.kernels.fused_linear.linear_logprobs_fwd`).  ``chunk`` overrides the
    vocab columns per step (tests)."""
    V, H = weight.shape
    h = _hidden_rows(hidden, dims, strides, H)
    n = h.shape[0]
    acc = acc_dtype(hidden)
    logp = torch.empty(n, dtype=acc)
    ent = torch.empty(n, dtype=acc)
    lse = torch.empty(n, 2, dtype=acc)
    _ext().linear_logprobs_fwd(h, weight, bias, _int64(tokens), inv_temp, ignore_index,
                               int(chunk or 0), logp, ent, lse)
    return logp, ent, lse


def linear_logprobs_bwd(hidden: Tensor, dims, strides, weight: Tensor, bias: Optional[Tensor],
                        tokens: Tensor, dlogp: Optional[Tensor], dent: Optional[Tensor],
                        lse: Tensor, ent: Tensor, inv_temp: float, ignore_index: int,
                        need_dh: bool, need_dw: bool, need_db: bool, chunk=None):
    """``(dhidden [N, H] or None, dweight [V, H] or None, dbias [V] or None)`` in the dtypes of
    hidden / weight / bias, recomputing the logits by vocab chunk (see csrc/fused_linear.cpp)."""
    V, H = weight.shape
    h = _hidden_rows(hidden, dims, strides, H)
    n = h.shape[0]
    dh = grad_empty((n, H), hidden.dtype, hidden.device) if need_dh else None
    dw = grad_empty((V, H), weight.dtype, weight.device) if need_dw else None
    db = torch.empty(V, dtype=bias.dtype) if need_db else None
    _ext().linear_logprobs_bwd(h, weight, bias, _int64(tokens), dlogp, dent, lse, ent, inv_temp,
                               ignore_index, int(chunk or 0), dh, dw, db)
    return dh, dw, db


def fused_linear_loss_fwd(hidden: Tensor, dims, strides, weight: Tensor, bias: Optional[Tensor],
                          B: int, T: int, tokens: Tensor, old_logp: Tensor, adv: Tensor,
                          ref_logp: Optional[Tensor], mask: Tensor, coef: Tensor, *,
                          inv_temp: float, ignore_index: int, lo: float, hi: float,
                          dual: Optional[float], kl_coef: float, kl_val: int, kl_grad: int,
                          ent_coef: float, need_dh: bool, need_dw: bool, need_db: bool,
                          block_rows=None):
    """The token-level fused PPO loss of the logits ``hidden @ weight.T + bias`` with its
    gradients produced in the same call: ``(loss [], stats [5], aux [7, N], dh, dw, db)`` (aux:
    the first seven rows of ``tables.FUSED_AUX_ROWS``), the
    gradients (upstream gradient 1; None where not asked for) in the dtypes of hidden / weight /
    bias.  Per-token inputs: contiguous ``[B T]`` in the accumulation dtype of ``coef`` (``adv``
    may be ``[B]``).  ``block_rows`` overrides the rows whose ``[R, V]`` logits are formed at
    once (tests).  See csrc/fused_linear.cpp."""
    V, H = weight.shape
    h = _hidden_rows(hidden, dims, strides, H)
    n = h.shape[0]
    acc = coef.dtype
    aux = torch.empty(FUSED_TERM_ROWS, n, dtype=acc)
    loss = torch.empty((), dtype=acc)
    stats = torch.empty(5, dtype=acc)
    dh = grad_empty((n, H), hidden.dtype, hidden.device) if need_dh else None
    dw = grad_empty((V, H), weight.dtype, weight.device) if need_dw else None
    db = torch.empty(V, dtype=bias.dtype) if need_db else None
    _ext().fused_linear_loss_fwd(
        h, weight, bias, _int64(tokens), B, T, old_logp, adv, ref_logp, mask, coef, inv_temp,
        ignore_index, lo, hi, dual, kl_coef, kl_val, kl_grad, ent_coef,
        need_dh or need_dw or need_db, int(block_rows or 0), aux, loss, stats, dh, dw, db)
    return loss, stats, aux, dh, dw, db
