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

Ops
    Each op is registered with ``torch.library`` (``fastrlhf::native_*``, with fake impls and
    autograd) so ``torch.compile`` traces it; :mod:`fastrlhf.ops` calls the functions at the end of
    this module after validating the arguments.  Semantics, shapes and dtypes are those of the
    public ops (float32 results for fp16 / bf16 / fp32 inputs, float64 for float64).

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
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["available", "load", "build_error", "source_dir", "token_logprobs", "token_entropy",
           "gae", "ppo_policy_loss", "ppo_value_loss", "fused_ppo_loss_op"]

_log = logging.getLogger("fastrlhf")
_LOCK = threading.Lock()
_STATE = {"tried": False, "module": None, "error": None}

AGG_MODE_IDS = {"token-mean": 0, "token-sum": 1, "seq-mean-token-sum": 2,
                "seq-mean-token-mean": 3, "seq-mean-token-sum-norm": 4}


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


def _build_extension():
    """Compile (or load the cached build of) the extension; raises on any failure."""
    src = source_dir()
    if src is None:
        raise RuntimeError("the C++ sources (csrc/*.cpp) were not found next to the package")
    cxx = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension will run
    if shutil.which(cxx.split()[0] if cxx.split() else "c++") is None:
        raise RuntimeError(f"no C++ compiler found ({cxx!r} is not on PATH; install g++ or "
                           "clang++, or set CXX)")
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join(src, "*.cpp")))
    headers = sorted(glob.glob(os.path.join(src, "*.h")))
    cflags = _cflags()
    h = hashlib.sha1()
    for path in sources + headers:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    h.update(" ".join(cflags).encode() + torch.__version__.encode())
    name = f"fastrlhf_native_{h.hexdigest()[:12]}"
    verbose = os.environ.get("FASTRLHF_NATIVE_VERBOSE", "0") not in ("", "0")
    _log.info("fastrlhf: loading the native CPU extension %s (compiled on first use)", name)
    return cpp_extension.load(name=name, sources=sources, extra_include_paths=[src],
                              extra_cflags=cflags, extra_ldflags=["-fopenmp"], verbose=verbose)


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


def _acc(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ---------------------------------------------------------------------------------------------
# token log-probs / entropy
# ---------------------------------------------------------------------------------------------

def _layout(logits: Tensor):
    from .ops._common import rows_layout
    return rows_layout(logits)


def _flat_tokens(tokens: Optional[Tensor]) -> Optional[Tensor]:
    if tokens is None:
        return None
    return tokens.reshape(-1).to(torch.int64).contiguous()


def _tl_fwd_impl(logits: Tensor, tokens: Optional[Tensor], temperature: float, ignore_index: int):
    V = logits.shape[-1]
    if tokens is not None:  # inside the op: a data-dependent check torch.compile cannot trace
        from .ops.logprobs import _check_token_range
        _check_token_range(tokens, V, ignore_index)
    lg, dims, strides = _layout(logits)
    n = dims[0] * dims[1] * dims[2]
    acc = _acc(logits)
    lead = logits.shape[:-1]
    lse = torch.empty(n, 2, dtype=acc)
    ent = torch.empty(n, dtype=acc)
    logp = torch.empty(n, dtype=acc) if tokens is not None else None
    _ext().logprobs_fwd(lg, list(dims), list(strides), V, _flat_tokens(tokens), 1.0 / temperature,
                        ignore_index, logp, ent, lse)
    return (None if logp is None else logp.view(lead)), ent.view(lead), lse.view(*lead, 2)


def _fwd_fake(logits, tokens, temperature, ignore_index):
    acc = _acc(logits)
    lead = logits.shape[:-1]
    return (logits.new_empty(lead, dtype=acc), logits.new_empty(lead, dtype=acc),
            logits.new_empty((*lead, 2), dtype=acc))


@torch.library.custom_op("fastrlhf::native_token_logprobs", mutates_args=(), device_types="cpu")
def _tl_fwd(logits: Tensor, tokens: Tensor, temperature: float, ignore_index: int
            ) -> Tuple[Tensor, Tensor, Tensor]:
    return _tl_fwd_impl(logits, tokens, temperature, ignore_index)


_tl_fwd.register_fake(_fwd_fake)


# Same forward; its backward writes the gradient into the logits buffer (a separate op so that
# the registered schema states the mutation honestly, as fastrlhf::token_logprobs_ib).
@torch.library.custom_op("fastrlhf::native_token_logprobs_ib", mutates_args=(), device_types="cpu")
def _tl_fwd_ib(logits: Tensor, tokens: Tensor, temperature: float, ignore_index: int
               ) -> Tuple[Tensor, Tensor, Tensor]:
    return _tl_fwd_impl(logits, tokens, temperature, ignore_index)


_tl_fwd_ib.register_fake(_fwd_fake)


@torch.library.custom_op("fastrlhf::native_token_entropy", mutates_args=(), device_types="cpu")
def _te_fwd(logits: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    _, ent, lse = _tl_fwd_impl(logits, None, temperature, -100)
    return ent, lse


@_te_fwd.register_fake
def _(logits, temperature):
    acc = _acc(logits)
    lead = logits.shape[:-1]
    return logits.new_empty(lead, dtype=acc), logits.new_empty((*lead, 2), dtype=acc)


def _launch_bwd(logits, out, tokens, dlogp, dent, lse, ent, temperature, ignore_index):
    from .ops._common import contiguous_row_strides
    V = logits.shape[-1]
    lg, dims, strides = _layout(logits)
    if out is None:
        ob = torch.empty(logits.shape, dtype=logits.dtype)
        ostrides = contiguous_row_strides(dims, V)
    else:  # in place: the logits buffer itself (rows_layout made no copy, checked by the caller)
        ob, ostrides = out, strides
    flat = lambda t: None if t is None else t.reshape(-1).contiguous()  # noqa: E731
    _ext().logprobs_bwd(lg, ob, list(dims), list(strides), list(ostrides), V, _flat_tokens(tokens),
                        flat(dlogp), flat(dent), flat(lse), flat(ent), 1.0 / temperature,
                        ignore_index)
    return ob


@torch.library.custom_op("fastrlhf::native_token_logprobs_bwd", mutates_args=(), device_types="cpu")
def _tl_bwd(logits: Tensor, tokens: Optional[Tensor], dlogp: Optional[Tensor],
            dent: Optional[Tensor], lse: Tensor, ent: Tensor, temperature: float,
            ignore_index: int) -> Tensor:
    return _launch_bwd(logits, None, tokens, dlogp, dent, lse, ent, temperature, ignore_index)


@_tl_bwd.register_fake
def _(logits, tokens, dlogp, dent, lse, ent, temperature, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("fastrlhf::native_token_logprobs_bwd_", mutates_args=("logits",),
                         device_types="cpu")
def _tl_bwd_inplace(logits: Tensor, tokens: Optional[Tensor], dlogp: Optional[Tensor],
                    dent: Optional[Tensor], lse: Tensor, ent: Tensor, temperature: float,
                    ignore_index: int) -> None:
    _launch_bwd(logits, logits, tokens, dlogp, dent, lse, ent, temperature, ignore_index)


@_tl_bwd_inplace.register_fake
def _(logits, tokens, dlogp, dent, lse, ent, temperature, ignore_index):
    return None


def _inplace_ok(logits: Tensor) -> bool:
    """The in-place backward needs the rows to be addressable in place (no layout copy)."""
    lg, _, _ = _layout(logits)
    return lg.data_ptr() == logits.data_ptr() and lg.stride() == logits.stride()


def _backward_common(ctx, logits, tokens, dlogp, dent, lse, ent):
    if dlogp is None and dent is None:
        return None
    if ctx.inplace and _inplace_ok(logits):
        _tl_bwd_inplace(logits, tokens, dlogp, dent, lse, ent, ctx.temperature, ctx.ignore_index)
        return logits
    return _tl_bwd(logits, tokens, dlogp, dent, lse, ent, ctx.temperature, ctx.ignore_index)


def _tl_setup(ctx, inputs, output):
    logits, tokens, temperature, ignore_index = inputs
    ctx.set_materialize_grads(False)  # an unused entropy gets None: no [N] zeros, no H term
    _, ent, lse = output
    ctx.save_for_backward(logits, tokens, lse, ent)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.inplace = False
    ctx.mark_non_differentiable(lse)


def _tl_setup_ib(ctx, inputs, output):
    _tl_setup(ctx, inputs, output)
    ctx.inplace = True


def _tl_backward(ctx, dlogp, dent, dlse):
    logits, tokens, lse, ent = ctx.saved_tensors
    return _backward_common(ctx, logits, tokens, dlogp, dent, lse, ent), None, None, None


_tl_fwd.register_autograd(_tl_backward, setup_context=_tl_setup)
_tl_fwd_ib.register_autograd(_tl_backward, setup_context=_tl_setup_ib)


def _te_setup(ctx, inputs, output):
    logits, temperature = inputs
    ctx.set_materialize_grads(False)
    ent, lse = output
    ctx.save_for_backward(logits, lse, ent)
    ctx.temperature = temperature
    ctx.ignore_index = -100
    ctx.inplace = False
    ctx.mark_non_differentiable(lse)


def _te_backward(ctx, dent, dlse):
    logits, lse, ent = ctx.saved_tensors
    return _backward_common(ctx, logits, None, None, dent, lse, ent), None


_te_fwd.register_autograd(_te_backward, setup_context=_te_setup)


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float, ignore_index: int,
                   inplace_backward: bool = False) -> Tuple[Tensor, Tensor]:
    """``(logp, entropy)`` of :func:`fastrlhf.token_logprobs` (arguments already validated)."""
    fn = _tl_fwd_ib if inplace_backward else _tl_fwd
    logp, ent, _ = fn(logits, tokens, temperature, ignore_index)
    return logp, ent


def token_entropy(logits: Tensor, temperature: float) -> Tensor:
    ent, _ = _te_fwd(logits, temperature)
    return ent


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("fastrlhf::native_gae", mutates_args=(), device_types="cpu")
def _gae_op(rewards: Tensor, values: Tensor, mask: Tensor, cu_seqlens: Optional[Tensor],
            gamma: float, lam: float, f64: bool) -> Tuple[Tensor, Tensor]:
    acc = torch.float64 if f64 else torch.float32
    adv = torch.empty(rewards.shape, dtype=acc)
    ret = torch.empty(rewards.shape, dtype=acc)
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()
    _ext().gae(rewards, values, mask, cu, gamma, lam, adv, ret)
    return adv, ret


@_gae_op.register_fake
def _(rewards, values, mask, cu_seqlens, gamma, lam, f64):
    acc = torch.float64 if f64 else torch.float32
    return rewards.new_empty(rewards.shape, dtype=acc), rewards.new_empty(rewards.shape, dtype=acc)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, cu_seqlens: Optional[Tensor], gamma: float,
        lam: float, compute_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``(advantages, returns)`` of :func:`fastrlhf.gae` (arguments already validated)."""
    return _gae_op(rewards.detach(), values.detach(), mask.detach(),
                   None if cu_seqlens is None else cu_seqlens.detach(), float(gamma), float(lam),
                   compute_dtype == torch.float64)


# ---------------------------------------------------------------------------------------------
# PPO policy / value losses
# ---------------------------------------------------------------------------------------------

def _denom_value(denom: Optional[float], denom_t: Optional[Tensor]) -> Optional[float]:
    if denom_t is not None:
        return float(denom_t.reshape(()).item())
    return None if denom is None else float(denom)


def _policy_fwd_impl(logp, old_logp, advantages, mask, lo, hi, dual_clip, seq, mode, dp_size,
                     denom, denom_t, loss_scale_factor):
    acc = _acc(logp, old_logp, advantages)
    B = logp.shape[0]
    loss = torch.empty((), dtype=acc)
    stats = torch.empty(3, dtype=acc)
    coef = torch.empty(B, dtype=acc)
    seqlr = torch.empty(B, dtype=acc)
    _ext().policy_fwd(logp, old_logp, advantages, mask, lo, hi, dual_clip, seq,
                      AGG_MODE_IDS[mode], float(dp_size), _denom_value(denom, denom_t),
                      float(loss_scale_factor), loss, stats, coef, seqlr)
    return loss, stats, coef, seqlr


def _policy_bwd_impl(grad, logp, old_logp, advantages, mask, coef, seq_log_ratio, lo, hi,
                     dual_clip, seq):
    out = torch.empty(logp.shape, dtype=logp.dtype)
    _ext().policy_bwd(float(grad.reshape(()).item()), logp, old_logp, advantages, mask, lo, hi,
                      dual_clip, seq, coef, seq_log_ratio, out)
    return out


@torch.library.custom_op("fastrlhf::native_ppo_policy_loss", mutates_args=(), device_types="cpu")
def _policy_fwd(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, lo: float,
                hi: float, dual_clip: Optional[float], seq: bool, mode: str, dp_size: int,
                denom: Optional[float], denom_t: Optional[Tensor], loss_scale_factor: float
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _policy_fwd_impl(logp, old_logp, advantages, mask, lo, hi, dual_clip, seq, mode,
                            dp_size, denom, denom_t, loss_scale_factor)


@_policy_fwd.register_fake
def _(logp, old_logp, advantages, mask, lo, hi, dual_clip, seq, mode, dp_size, denom, denom_t,
      loss_scale_factor):
    acc = _acc(logp, old_logp, advantages)
    B = logp.shape[0]
    return (logp.new_empty((), dtype=acc), logp.new_empty((3,), dtype=acc),
            logp.new_empty((B,), dtype=acc), logp.new_empty((B,), dtype=acc))


@torch.library.custom_op("fastrlhf::native_ppo_policy_loss_bwd", mutates_args=(),
                         device_types="cpu")
def _policy_bwd(grad: Tensor, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                coef: Tensor, seq_log_ratio: Tensor, lo: float, hi: float,
                dual_clip: Optional[float], seq: bool) -> Tensor:
    return _policy_bwd_impl(grad, logp, old_logp, advantages, mask, coef, seq_log_ratio, lo, hi,
                            dual_clip, seq)


@_policy_bwd.register_fake
def _(grad, logp, old_logp, advantages, mask, coef, seq_log_ratio, lo, hi, dual_clip, seq):
    return logp.new_empty(logp.shape)


def _policy_setup(ctx, inputs, output):
    logp, old_logp, adv, mask, lo, hi, dual_clip, seq = inputs[:8]
    _, stats, coef, seqlr = output
    ctx.save_for_backward(logp, old_logp, adv, mask, coef, seqlr)
    ctx.params = (lo, hi, dual_clip, seq)
    ctx.mark_non_differentiable(stats, coef, seqlr)


def _policy_backward(ctx, gloss, gstats, gcoef, gseq):
    logp, old_logp, adv, mask, coef, seqlr = ctx.saved_tensors
    dlogp = None
    if gloss is not None and ctx.needs_input_grad[0]:
        dlogp = _policy_bwd(gloss, logp, old_logp, adv, mask, coef, seqlr, *ctx.params)
    return (dlogp,) + (None,) * 12


_policy_fwd.register_autograd(_policy_backward, setup_context=_policy_setup)


def _value_fwd_impl(values, old_values, returns, mask, clip, mode, dp_size, denom, denom_t,
                    loss_scale_factor):
    acc = _acc(values, old_values, returns)
    loss = torch.empty((), dtype=acc)
    stats = torch.empty(1, dtype=acc)
    coef = torch.empty(values.shape[0], dtype=acc)
    _ext().value_fwd(values, old_values, returns, mask, clip, AGG_MODE_IDS[mode], float(dp_size),
                     _denom_value(denom, denom_t), float(loss_scale_factor), loss, stats, coef)
    return loss, stats, coef


def _value_bwd_impl(grad, values, old_values, returns, mask, coef, clip):
    out = torch.empty(values.shape, dtype=values.dtype)
    _ext().value_bwd(float(grad.reshape(()).item()), values, old_values, returns, mask, clip,
                     coef, out)
    return out


@torch.library.custom_op("fastrlhf::native_ppo_value_loss", mutates_args=(), device_types="cpu")
def _value_fwd(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip: Optional[float], mode: str, dp_size: int, denom: Optional[float],
               denom_t: Optional[Tensor], loss_scale_factor: float
               ) -> Tuple[Tensor, Tensor, Tensor]:
    return _value_fwd_impl(values, old_values, returns, mask, clip, mode, dp_size, denom,
                           denom_t, loss_scale_factor)


@_value_fwd.register_fake
def _(values, old_values, returns, mask, clip, mode, dp_size, denom, denom_t, loss_scale_factor):
    acc = _acc(values, old_values, returns)
    return (values.new_empty((), dtype=acc), values.new_empty((1,), dtype=acc),
            values.new_empty((values.shape[0],), dtype=acc))


@torch.library.custom_op("fastrlhf::native_ppo_value_loss_bwd", mutates_args=(),
                         device_types="cpu")
def _value_bwd(grad: Tensor, values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               coef: Tensor, clip: Optional[float]) -> Tensor:
    return _value_bwd_impl(grad, values, old_values, returns, mask, coef, clip)


@_value_bwd.register_fake
def _(grad, values, old_values, returns, mask, coef, clip):
    return values.new_empty(values.shape)


def _value_setup(ctx, inputs, output):
    values, old_values, returns, mask, clip = inputs[:5]
    _, stats, coef = output
    ctx.save_for_backward(values, old_values, returns, mask, coef)
    ctx.clip = clip
    ctx.mark_non_differentiable(stats, coef)


def _value_backward(ctx, gloss, gstats, gcoef):
    values, old_values, returns, mask, coef = ctx.saved_tensors
    dv = None
    if gloss is not None and ctx.needs_input_grad[0]:
        dv = _value_bwd(gloss, values, old_values, returns, mask, coef, ctx.clip)
    return (dv,) + (None,) * 9


_value_fwd.register_autograd(_value_backward, setup_context=_value_setup)


# Eager fast path (as fastrlhf.ops.losses): the same C++ calls behind a plain autograd.Function,
# which skips the custom op's Python dispatch (tens of microseconds, comparable to the kernels
# at training sizes); under torch.compile the registered ops above are traced instead.

class _PolicyLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, lo, hi, dual_clip, seq, mode, dp_size,
                denom, denom_t, loss_scale_factor):
        loss, stats, coef, seqlr = _policy_fwd_impl(
            logp, old_logp, advantages, mask, lo, hi, dual_clip, seq, mode, dp_size, denom,
            denom_t, loss_scale_factor)
        ctx.save_for_backward(logp, old_logp, advantages, mask, coef, seqlr)
        ctx.params = (lo, hi, dual_clip, seq)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, gloss, gstats):
        logp, old_logp, adv, mask, coef, seqlr = ctx.saved_tensors
        dlogp = None
        if gloss is not None and ctx.needs_input_grad[0]:
            dlogp = _policy_bwd_impl(gloss, logp, old_logp, adv, mask, coef, seqlr, *ctx.params)
        return (dlogp,) + (None,) * 12


class _ValueLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, mask, clip, mode, dp_size, denom, denom_t,
                loss_scale_factor):
        loss, stats, coef = _value_fwd_impl(values, old_values, returns, mask, clip, mode,
                                            dp_size, denom, denom_t, loss_scale_factor)
        ctx.save_for_backward(values, old_values, returns, mask, coef)
        ctx.clip = clip
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, gloss, gstats):
        values, old_values, returns, mask, coef = ctx.saved_tensors
        dv = None
        if gloss is not None and ctx.needs_input_grad[0]:
            dv = _value_bwd_impl(gloss, values, old_values, returns, mask, coef, ctx.clip)
        return (dv,) + (None,) * 9


# ---------------------------------------------------------------------------------------------
# fused PPO loss from the logits (same ops and autograd scheme as fastrlhf.ops.fused_loss)
# ---------------------------------------------------------------------------------------------

KL_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}  # = fastrlhf.kernels.kl.KINDS (no triton here)
_FUSED_N_INPUTS = 17


def _fused_forward(logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind,
                   entropy_coef, lo, hi, dual_clip, temperature, seq, ignore_index, write_grad,
                   inplace):
    """Returns (loss [], stats [5], per_token [3, B, T], dlogits or None)."""
    from .ops._common import contiguous_row_strides
    from .ops.fused_loss import OP, _check_token_range
    B, T, V = logits.shape
    acc = coef.dtype
    _check_token_range(tokens, V, ignore_index)
    lg, dims, strides = _layout(logits)
    if inplace and write_grad and lg.data_ptr() != logits.data_ptr():
        raise RuntimeError(f"{OP}: in-place gradient needs logits with unit stride on the vocab")
    flat = lambda t: t.to(acc).reshape(-1).contiguous()  # noqa: E731  (O(B T) copies at most)
    dl, ostrides = None, strides
    if write_grad:
        if inplace:
            dl = lg
        else:
            dl = torch.empty(logits.shape, dtype=logits.dtype)
            ostrides = contiguous_row_strides(dims, V)
    aux = torch.empty(7, B * T, dtype=acc)
    loss = torch.empty((), dtype=acc)
    stats = torch.empty(5, dtype=acc)
    _ext().fused_loss_fwd(
        lg, dl, list(dims), list(strides), list(ostrides), V, B, T, _flat_tokens(tokens),
        flat(old_logp), flat(advantages), None if ref_logp is None else flat(ref_logp),
        flat(mask), coef.to(acc).contiguous(), 1.0 / temperature, ignore_index, lo, hi,
        dual_clip, seq, kl_coef, KL_CODES[kl_kind.rstrip("+")],
        KL_CODES["k2"] if kl_kind.endswith("+") else KL_CODES[kl_kind], entropy_coef,
        write_grad, aux, loss, stats)
    if inplace and write_grad:
        torch.autograd.graph.increment_version(logits)
    per_token = aux.view(7, B, T)[1:4].clone()
    return loss, stats, per_token, dl


def _fused_fake_outputs(logits, coef):
    B, T, _ = logits.shape
    acc = coef.dtype
    return (logits.new_empty((), dtype=acc), logits.new_empty((5,), dtype=acc),
            logits.new_empty((3, B, T), dtype=acc))


@torch.library.custom_op("fastrlhf::native_fused_ppo_loss", mutates_args=(), device_types="cpu")
def _fused(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
           ref_logp: Optional[Tensor], coef: Tensor, kl_coef: float, kl_kind: str,
           entropy_coef: float, lo: float, hi: float, dual_clip: Optional[float],
           temperature: float, seq: bool, ignore_index: int, write_grad: bool
           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, stats, per_token, dl = _fused_forward(
        logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind,
        entropy_coef, lo, hi, dual_clip, temperature, seq, ignore_index, write_grad, False)
    if dl is None:
        dl = logits.new_empty((0,))
    return loss, stats, per_token, dl


@_fused.register_fake
def _(logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind, entropy_coef,
      lo, hi, dual_clip, temperature, seq, ignore_index, write_grad):
    dl = logits.new_empty(logits.shape if write_grad else (0,))
    return (*_fused_fake_outputs(logits, coef), dl)


@torch.library.custom_op("fastrlhf::native_fused_ppo_loss_ib", mutates_args=(),
                         device_types="cpu")
def _fused_ib(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
              ref_logp: Optional[Tensor], coef: Tensor, kl_coef: float, kl_kind: str,
              entropy_coef: float, lo: float, hi: float, dual_clip: Optional[float],
              temperature: float, seq: bool, ignore_index: int, write_grad: bool
              ) -> Tuple[Tensor, Tensor, Tensor]:
    # Writes d loss / d logits over ``logits`` when write_grad (as fastrlhf::fused_ppo_loss_ib).
    loss, stats, per_token, _ = _fused_forward(
        logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind,
        entropy_coef, lo, hi, dual_clip, temperature, seq, ignore_index, write_grad, True)
    return loss, stats, per_token


@_fused_ib.register_fake
def _(logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind, entropy_coef,
      lo, hi, dual_clip, temperature, seq, ignore_index, write_grad):
    return _fused_fake_outputs(logits, coef)


def _fused_rescale(grad: Tensor, applied: Tensor, g: Tensor) -> None:
    """``grad *= g / applied``; ``applied = g`` (nothing touched when the factor is exactly 1).
    Through ``.data``: no autograd version bump (a repeated backward can still unpack)."""
    factor = float(g.detach().to(applied.dtype).reshape(()) / applied)
    applied.data.copy_(g.detach().reshape(()))
    if factor != 1.0:
        grad.data.mul_(factor)


@torch.library.custom_op("fastrlhf::native_fused_ppo_loss_scale_", mutates_args=("grad", "applied"),
                         device_types="cpu")
def _fused_scale_(grad: Tensor, applied: Tensor, g: Tensor) -> None:
    _fused_rescale(grad, applied, g)


@_fused_scale_.register_fake
def _(grad, applied, g):
    return None


def _fused_save(ctx, write_grad, buf, coef):
    applied = torch.ones((), dtype=coef.dtype) if write_grad else None
    ctx.save_for_backward(buf if write_grad else None, applied)


def _fused_setup(ctx, inputs, output):
    # Without this autograd would hand the backward a zeros tensor for the gradient-buffer output
    # (an [B, T, V] allocation and fill per step).
    ctx.set_materialize_grads(False)
    _fused_save(ctx, inputs[-1], output[3], inputs[6])
    ctx.mark_non_differentiable(*output[1:])


def _fused_setup_ib(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    _fused_save(ctx, inputs[-1], inputs[0], inputs[6])
    ctx.mark_non_differentiable(*output[1:])


def _fused_backward(ctx, gloss, *_):
    buf, applied = ctx.saved_tensors
    if gloss is None or buf is None:
        return (None,) * _FUSED_N_INPUTS
    if type(buf) is Tensor and not torch.compiler.is_compiling():
        _fused_rescale(buf, applied, gloss)
    else:
        _fused_scale_(buf, applied, gloss)
    return (buf,) + (None,) * (_FUSED_N_INPUTS - 1)


_fused.register_autograd(_fused_backward, setup_context=_fused_setup)
_fused_ib.register_autograd(_fused_backward, setup_context=_fused_setup_ib)


def fused_ppo_loss_op(inplace: bool):
    """The registered op for :func:`fastrlhf.fused_ppo_loss` on the native backend: the same
    signature as ``fastrlhf::fused_ppo_loss`` / ``fastrlhf::fused_ppo_loss_ib``."""
    return _fused_ib if inplace else _fused


def ppo_policy_loss(logp, old_logp, advantages, mask, lo, hi, dual_clip, seq, mode, dp_size,
                    denom, denom_t, loss_scale_factor):
    """``(loss, stats)`` of :func:`fastrlhf.ppo_policy_loss` from its normalized arguments
    (``lo = 1 - clip_low``, ``hi = 1 + clip_high``; ``denom`` / ``denom_t`` as ops.losses)."""
    args = (logp, old_logp.detach(), advantages.detach(), mask, lo, hi, dual_clip, seq, mode,
            dp_size, denom, denom_t, loss_scale_factor)
    if torch.compiler.is_compiling():
        loss, stats, _, _ = _policy_fwd(*args)
    else:
        loss, stats = _PolicyLossFn.apply(*args)
    return loss, {"clipfrac": stats[0], "clipfrac_lower": stats[1], "approx_kl": stats[2]}


def ppo_value_loss(values, old_values, returns, mask, clip, mode, dp_size, denom, denom_t,
                   loss_scale_factor):
    """``(loss, stats)`` of :func:`fastrlhf.ppo_value_loss` from its normalized arguments."""
    args = (values, old_values.detach(), returns.detach(), mask, clip, mode, dp_size, denom,
            denom_t, loss_scale_factor)
    if torch.compiler.is_compiling():
        loss, stats, _ = _value_fwd(*args)
    else:
        loss, stats = _ValueLossFn.apply(*args)
    return loss, {"clipfrac": stats[0]}
