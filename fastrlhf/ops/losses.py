"""Loss aggregation and the clipped PPO policy / value losses (verl 0.9 semantics).

* :func:`agg_loss` -- verl's ``agg_loss`` (five modes, ``dp_size`` / ``batch_num_tokens`` /
  ``global_batch_size`` / ``loss_scale_factor``), plain PyTorch.
* :func:`ppo_policy_loss` -- verl ``compute_policy_loss_vanilla`` (token ratio, clip-higher, dual
  clip) and ``compute_policy_loss_gspo`` (``ratio_level="sequence"``).
* :func:`ppo_value_loss` -- verl ``compute_value_loss``.

The Triton backend runs one fused kernel per loss (per-token terms, the masked row sums the
aggregation needs and the statistics in a single pass, rows in parallel), a one-program finalize
kernel that combines the ``[B]`` partials in a fixed order (deterministic, no atomics), and a
backward kernel writing the input-sized gradient.  They are registered as ``torch.library`` ops
(``fastrlhf::ppo_policy_loss`` & co.) so ``torch.compile`` traces them without graph breaks; in
eager mode the same launchers run behind a plain ``autograd.Function`` (less dispatch overhead).

The aggregation is linear in the per-token loss with weights that depend on the mask only:
``agg_loss(L, m) = sum_b c_b sum_t where(m != 0, L, 0) m`` (:func:`agg_row_weights`), so
``d loss / d x = c_b m_bt dL_bt/dx``; :func:`policy_loss_per_token` gives ``L`` and ``dL/dlogp``
in closed form for ops that fuse the policy loss into something larger (``fused_ppo_loss``).

Packed sequences: every op here takes ``cu_seqlens`` (int32 / int64 ``[S+1]``: 0 = cu[0] <= ...
<= cu[S] = total) for inputs packed as one ``[1, total]`` row; the segments ``cu[s]:cu[s+1]`` then
play the part of the rows (per-sequence advantages ``[S]``, GSPO ratios, seq-mode aggregation),
and every result equals that of the padded ``[S, Tmax]`` layout of the same data.  The Triton
kernels run one program per segment straight on the packed row (nothing is padded); the native
backend has no packed path (``backend="auto"`` then uses the Triton / reference path, an explicit
``backend="native"`` raises ValueError).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend, reference
from ._common import (FLOAT_DTYPES, check_cu_seqlens, check_positive_float, check_same_device,
                      check_tensor)
from .masked import check_backend_name, check_mask

__all__ = ["agg_loss", "ppo_policy_loss", "ppo_value_loss", "policy_loss_per_token",
           "agg_row_weights", "AGG_MODES", "RATIO_LEVELS"]

AGG_MODES = reference.AGG_MODES
RATIO_LEVELS = ("token", "sequence")
AGG_KWARGS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


def _kernels():
    from ..kernels import losses as k  # lazy: TRITON_INTERPRET may be set after fastrlhf import
    return k


def _acc(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------

def _check_mode(op: str, mode) -> str:
    if not isinstance(mode, str) or mode not in AGG_MODES:
        raise ValueError(f"{op}: unknown aggregation mode {mode!r}; expected one of "
                         f"{', '.join(AGG_MODES)}")
    return mode


def _check_count(op: str, name: str, v):
    """None, a number >= 0, or a one-element numeric tensor (used as is, no host sync)."""
    if v is None:
        return None
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"{op}: {name} must be a scalar, got a tensor of shape "
                             f"{tuple(v.shape)}")
        if v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{op}: {name} must be a number, got a {v.dtype} tensor")
        return v.reshape(())
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number or a scalar tensor, got "
                        f"{type(v).__name__}")
    v = float(v)
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{op}: {name} must be a finite number >= 0, got {v}")
    return v


def _check_agg(op: str, mode, T: int, kwargs: dict) -> dict:
    """Validate ``mode`` and verl's global-batch arguments; returns the normalized kwargs."""
    mode = _check_mode(op, mode)
    unknown = sorted(set(kwargs) - set(AGG_KWARGS))
    if unknown:
        raise TypeError(f"{op}: unexpected keyword argument(s) {', '.join(unknown)}; the "
                        f"aggregation accepts {', '.join(AGG_KWARGS)}")
    dp = kwargs.get("dp_size", 1)
    if isinstance(dp, bool) or not isinstance(dp, numbers.Integral):
        raise TypeError(f"{op}: dp_size must be an int, got {type(dp).__name__}")
    if dp < 1:
        raise ValueError(f"{op}: dp_size must be >= 1, got {dp}")
    bnt = _check_count(op, "batch_num_tokens", kwargs.get("batch_num_tokens"))
    gbs = _check_count(op, "global_batch_size", kwargs.get("global_batch_size"))
    lsf = kwargs.get("loss_scale_factor")
    if lsf is not None:
        lsf = check_positive_float(op, "loss_scale_factor", lsf)
    if dp > 1 and mode == "token-mean" and bnt is None:
        raise ValueError(f"{op}: (global) batch_num_tokens is required when dp_size > 1 "
                         f"(dp_size={dp}, mode={mode!r})")
    if dp > 1 and mode.startswith("seq-") and gbs is None:
        raise ValueError(f"{op}: global_batch_size is required when dp_size > 1 "
                         f"(dp_size={dp}, mode={mode!r})")
    return {"dp_size": int(dp), "batch_num_tokens": bnt, "global_batch_size": gbs,
            "loss_scale_factor": lsf}


def _check_bt(op: str, name: str, t, shape=None) -> Tensor:
    check_tensor(op, name, t, dtypes=FLOAT_DTYPES)
    if shape is None:
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D [B, T], got shape {tuple(t.shape)}")
    elif tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} (the shape of the first "
                         f"argument), got {tuple(t.shape)}")
    return t


def _check_advantages(op: str, adv, shape, n_seqs: Optional[int] = None) -> Tensor:
    """``[B, T]`` per token or ``[B]`` per sequence; packed (``n_seqs = S``): ``[1, total]`` or
    ``[S]``."""
    check_tensor(op, "advantages", adv, dtypes=FLOAT_DTYPES)
    n = shape[0] if n_seqs is None else n_seqs
    if tuple(adv.shape) not in (tuple(shape), (n,)):
        raise ValueError(f"{op}: advantages must have shape {tuple(shape)} (per token) or "
                         f"({n},) (per sequence), got {tuple(adv.shape)}")
    return adv


def _check_packed(op: str, cu_seqlens, name: str, ref: Tensor):
    """``(n_seqs, norm_len)``: ``(None, T)`` without ``cu_seqlens``; else the validated packed
    layout's segment count ``S`` and longest segment ``Tmax`` (the default
    ``loss_scale_factor``)."""
    if cu_seqlens is None:
        return None, ref.shape[1]
    max_len = check_cu_seqlens(op, cu_seqlens, name, ref)
    return cu_seqlens.numel() - 1, max_len


def _resolve(op: str, backend, device, packed: bool, native_ok: bool = True) -> str:
    """``_backend.resolve``; the native backend has no packed (``cu_seqlens``) path: ``auto``
    (and ``FASTRLHF_BACKEND=native``) then picks triton / reference, ``"native"`` raises."""
    if packed and backend == "native":
        raise ValueError(f"{op}: cu_seqlens (packed sequences) is not supported by the native "
                         "backend; use backend='auto', 'triton' or 'reference'")
    return _backend.resolve(backend, device, op=op, native_ok=native_ok and not packed)


def _check_clips(op: str, clip_low, clip_high, dual_clip):
    clip_low = check_positive_float(op, "clip_low", clip_low)
    clip_high = clip_low if clip_high is None else check_positive_float(op, "clip_high",
                                                                        clip_high)
    if dual_clip is not None:
        if isinstance(dual_clip, bool) or not isinstance(dual_clip, numbers.Real):
            raise TypeError(f"{op}: dual_clip must be a float > 1 or None, got "
                            f"{type(dual_clip).__name__}")
        dual_clip = float(dual_clip)
        if not (dual_clip > 1 and math.isfinite(dual_clip)):
            raise ValueError(f"{op}: dual_clip must be a finite number > 1 (the lower bound of "
                             f"the ratio for dual-clip PPO), got {dual_clip}")
    return clip_low, clip_high, dual_clip


def _row_view(t: Tensor) -> Tensor:
    """Unit stride along T (what the kernels need); other strides are read in place."""
    if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        return t.contiguous()
    return t


def _cu_arg(cu: Optional[Tensor]) -> Optional[Tensor]:
    return None if cu is None else cu.detach().contiguous()


def _denominator(mode: str, kw: dict, acc: torch.dtype, device):
    """(denom as float or None, denom as a device tensor or None) for the finalize kernel."""
    v = kw["batch_num_tokens"] if mode == "token-mean" else (
        kw["global_batch_size"] if mode.startswith("seq-") else None)
    if isinstance(v, Tensor):
        return None, v.to(device=device, dtype=acc).reshape(1)
    return v, None


# ---------------------------------------------------------------------------------------------
# public: aggregation
# ---------------------------------------------------------------------------------------------

def agg_loss(per_token: Tensor, mask: Tensor, mode: str = "token-mean", *, dp_size: int = 1,
             batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None,
             cu_seqlens: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Aggregate a per-token loss ``[B, T]`` into a scalar, exactly as verl 0.9 ``agg_loss``.

    Args:
        per_token: ``[B, T]`` float16 / bfloat16 / float32 / float64.
        mask: ``[B, T]`` bool / integer / floating (a float mask weights each token).
        mode: one of ``AGG_MODES``.  With ``S_b = sum_t where(m != 0, L, 0) * m``,
            ``n_b = sum_t m``:

            * ``"token-mean"``: ``dp_size * sum_b S_b / N`` with ``N = batch_num_tokens`` (the
              global batch's token count) or, when None, ``sum_b n_b``.
            * ``"token-sum"``: ``dp_size * sum_b S_b``.
            * ``"seq-mean-token-sum"``: ``dp_size * sum_{b: n_b > 0} S_b / G`` with
              ``G = global_batch_size`` or, when None, the number of rows with ``n_b > 0``.
            * ``"seq-mean-token-mean"``: ``dp_size * sum_{b: n_b > 0} (S_b / (n_b + 1e-8)) / G``.
            * ``"seq-mean-token-sum-norm"``: ``seq-mean-token-sum / loss_scale_factor``
              (default ``T``; for packed input ``Tmax``, the longest segment).
        dp_size: data-parallel size (>= 1); with ``dp_size > 1`` verl requires
            ``batch_num_tokens`` (token-mean) or ``global_batch_size`` (seq modes).
        batch_num_tokens, global_batch_size: numbers >= 0 or one-element tensors.
        loss_scale_factor: > 0.
        cu_seqlens: optional int32 / int64 ``[S+1]`` (0 = ``cu[0] <= ... <= cu[S]`` = total) for
            ``per_token`` / ``mask`` packed as ``[1, total]``: the segments ``cu[s]:cu[s+1]`` are
            the rows ``b`` above, so the result equals the padded ``[S, Tmax]`` layout (token
            modes are unaffected by the segmentation).  Checked on the host (one sync).
        backend: accepted for uniformity (name checked); this is plain PyTorch everywhere.

    Returns a 0-dim float32 tensor (float64 for float64 ``per_token``), differentiable w.r.t.
    ``per_token``.  Differences from verl: NaN outside the mask never leaks in (verl's seq modes
    multiply it by 0), and a zero denominator (fully masked batch) gives 0 instead of NaN.
    """
    op = "agg_loss"
    _check_bt(op, "per_token", per_token)
    check_mask(op, mask, per_token.shape, "the shape of per_token")
    check_same_device(op, "per_token", per_token, mask=mask)
    check_backend_name(op, backend)
    _check_packed(op, cu_seqlens, "per_token", per_token)
    kw = _check_agg(op, mode, per_token.shape[1], {
        "dp_size": dp_size, "batch_num_tokens": batch_num_tokens,
        "global_batch_size": global_batch_size, "loss_scale_factor": loss_scale_factor})
    return reference.agg_loss(per_token, mask, mode, **kw, cu_seqlens=cu_seqlens)


def agg_row_weights(mask: Tensor, mode: str = "token-mean", *, dtype: torch.dtype = torch.float32,
                    cu_seqlens: Optional[Tensor] = None, **agg_kwargs) -> Tensor:
    """Per-row aggregation coefficients ``c`` ``[B]``: ``agg_loss(L, mask, mode, **agg_kwargs)
    == sum_b c_b * sum_t where(m != 0, L, 0) * m`` for every per-token loss ``L``.

    So the gradient of the aggregated loss w.r.t. ``L`` is ``c_b * m`` -- what a fused op needs to
    write gradients in the same pass that computes the per-token loss.  ``mask`` ``[B, T]``;
    ``agg_kwargs`` as :func:`agg_loss`.  See :func:`fastrlhf.reference.agg_row_weights`.
    With ``cu_seqlens`` (``mask`` packed as ``[1, total]``) one coefficient per segment, ``[S]``:
    the weight of token ``t`` is ``c[seg(t)] * m_t``.
    """
    op = "agg_row_weights"
    check_tensor(op, "mask", mask)
    if mask.dim() != 2:
        raise ValueError(f"{op}: mask must be 2-D [B, T], got shape {tuple(mask.shape)}")
    check_mask(op, mask, mask.shape)
    _check_packed(op, cu_seqlens, "mask", mask)
    kw = _check_agg(op, mode, mask.shape[1], agg_kwargs)
    return reference.agg_row_weights(mask, mode, dtype=dtype, cu_seqlens=cu_seqlens, **kw)


# ---------------------------------------------------------------------------------------------
# torch.library ops (Triton backend): policy loss
# ---------------------------------------------------------------------------------------------

def _policy_fwd_impl(logp, old_logp, advantages, mask, lo, hi, dual_clip, seq, mode, dp_size,
                     denom, denom_t, loss_scale_factor, cu_seqlens):
    acc = _acc(logp, old_logp, advantages)
    return _kernels().policy_fwd(logp, old_logp, advantages, mask, lo, hi, dual_clip, seq, mode,
                                 dp_size, denom, denom_t, loss_scale_factor, acc, cu_seqlens)


def _n_rows(x: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@torch.library.custom_op("fastrlhf::ppo_policy_loss", mutates_args=())
def _policy_fwd(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, lo: float,
                hi: float, dual_clip: Optional[float], seq: bool, mode: str, dp_size: int,
                denom: Optional[float], denom_t: Optional[Tensor], loss_scale_factor: float,
                cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _policy_fwd_impl(logp, old_logp, advantages, mask, lo, hi, dual_clip, seq, mode,
                            dp_size, denom, denom_t, loss_scale_factor, cu_seqlens)


@_policy_fwd.register_fake
def _(logp, old_logp, advantages, mask, lo, hi, dual_clip, seq, mode, dp_size, denom, denom_t,
      loss_scale_factor, cu_seqlens=None):
    acc = _acc(logp, old_logp, advantages)
    B = _n_rows(logp, cu_seqlens)
    return (logp.new_empty((), dtype=acc), logp.new_empty((3,), dtype=acc),
            logp.new_empty((B,), dtype=acc), logp.new_empty((B,), dtype=acc))


@torch.library.custom_op("fastrlhf::ppo_policy_loss_bwd", mutates_args=())
def _policy_bwd(grad: Tensor, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                coef: Tensor, seq_log_ratio: Tensor, lo: float, hi: float,
                dual_clip: Optional[float], seq: bool, cu_seqlens: Optional[Tensor] = None
                ) -> Tensor:
    return _kernels().policy_bwd(grad.to(coef.dtype).reshape(()), logp, old_logp, advantages,
                                 mask, coef, seq_log_ratio, lo, hi, dual_clip, seq, cu_seqlens)


@_policy_bwd.register_fake
def _(grad, logp, old_logp, advantages, mask, coef, seq_log_ratio, lo, hi, dual_clip, seq,
      cu_seqlens=None):
    return logp.new_empty(logp.shape)


def _policy_setup(ctx, inputs, output):
    logp, old_logp, adv, mask, lo, hi, dual_clip, seq = inputs[:8]
    cu = inputs[13] if len(inputs) > 13 else None
    _, stats, coef, seqlr = output
    ctx.save_for_backward(logp, old_logp, adv, mask, coef, seqlr, cu)
    ctx.params = (lo, hi, dual_clip, seq)
    ctx.mark_non_differentiable(stats, coef, seqlr)


def _policy_backward(ctx, gloss, gstats, gcoef, gseq):
    logp, old_logp, adv, mask, coef, seqlr, cu = ctx.saved_tensors
    dlogp = None
    if gloss is not None and ctx.needs_input_grad[0]:
        dlogp = _policy_bwd(gloss, logp, old_logp, adv, mask, coef, seqlr, *ctx.params, cu)
    return (dlogp,) + (None,) * 13


_policy_fwd.register_autograd(_policy_backward, setup_context=_policy_setup)


# ---------------------------------------------------------------------------------------------
# torch.library ops (Triton backend): value loss
# ---------------------------------------------------------------------------------------------

def _value_fwd_impl(values, old_values, returns, mask, clip, mode, dp_size, denom, denom_t,
                    loss_scale_factor, cu_seqlens):
    acc = _acc(values, old_values, returns)
    return _kernels().value_fwd(values, old_values, returns, mask, clip, mode, dp_size, denom,
                                denom_t, loss_scale_factor, acc, cu_seqlens)


@torch.library.custom_op("fastrlhf::ppo_value_loss", mutates_args=())
def _value_fwd(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip: Optional[float], mode: str, dp_size: int, denom: Optional[float],
               denom_t: Optional[Tensor], loss_scale_factor: float,
               cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    return _value_fwd_impl(values, old_values, returns, mask, clip, mode, dp_size, denom,
                           denom_t, loss_scale_factor, cu_seqlens)


@_value_fwd.register_fake
def _(values, old_values, returns, mask, clip, mode, dp_size, denom, denom_t, loss_scale_factor,
      cu_seqlens=None):
    acc = _acc(values, old_values, returns)
    return (values.new_empty((), dtype=acc), values.new_empty((1,), dtype=acc),
            values.new_empty((_n_rows(values, cu_seqlens),), dtype=acc))


@torch.library.custom_op("fastrlhf::ppo_value_loss_bwd", mutates_args=())
def _value_bwd(grad: Tensor, values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               coef: Tensor, clip: Optional[float], cu_seqlens: Optional[Tensor] = None
               ) -> Tensor:
    return _kernels().value_bwd(grad.to(coef.dtype).reshape(()), values, old_values, returns,
                                mask, coef, clip, cu_seqlens)


@_value_bwd.register_fake
def _(grad, values, old_values, returns, mask, coef, clip, cu_seqlens=None):
    return values.new_empty(values.shape)


def _value_setup(ctx, inputs, output):
    values, old_values, returns, mask, clip = inputs[:5]
    _, stats, coef = output
    cu = inputs[10] if len(inputs) > 10 else None
    ctx.save_for_backward(values, old_values, returns, mask, coef, cu)
    ctx.clip = clip
    ctx.mark_non_differentiable(stats, coef)


def _value_backward(ctx, gloss, gstats, gcoef):
    values, old_values, returns, mask, coef, cu = ctx.saved_tensors
    dv = None
    if gloss is not None and ctx.needs_input_grad[0]:
        dv = _value_bwd(gloss, values, old_values, returns, mask, coef, ctx.clip, cu)
    return (dv,) + (None,) * 10


_value_fwd.register_autograd(_value_backward, setup_context=_value_setup)


# Eager fast path: the same launchers behind a plain autograd.Function.  A custom op costs a few
# tens of microseconds of Python dispatch per forward + backward, comparable to the kernels
# themselves at training sizes; under torch.compile the registered ops above are used instead.

class _PolicyLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, lo, hi, dual_clip, seq, mode, dp_size,
                denom, denom_t, loss_scale_factor, cu_seqlens):
        loss, stats, coef, seqlr = _policy_fwd_impl(
            logp, old_logp, advantages, mask, lo, hi, dual_clip, seq, mode, dp_size, denom,
            denom_t, loss_scale_factor, cu_seqlens)
        ctx.save_for_backward(logp, old_logp, advantages, mask, coef, seqlr, cu_seqlens)
        ctx.params = (lo, hi, dual_clip, seq)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, gloss, gstats):
        logp, old_logp, adv, mask, coef, seqlr, cu = ctx.saved_tensors
        dlogp = None
        if gloss is not None and ctx.needs_input_grad[0]:
            dlogp = _kernels().policy_bwd(gloss.to(coef.dtype).reshape(()), logp, old_logp, adv,
                                          mask, coef, seqlr, *ctx.params, cu)
        return (dlogp,) + (None,) * 13


class _ValueLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, mask, clip, mode, dp_size, denom, denom_t,
                loss_scale_factor, cu_seqlens):
        loss, stats, coef = _value_fwd_impl(values, old_values, returns, mask, clip, mode,
                                            dp_size, denom, denom_t, loss_scale_factor,
                                            cu_seqlens)
        ctx.save_for_backward(values, old_values, returns, mask, coef, cu_seqlens)
        ctx.clip = clip
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, gloss, gstats):
        values, old_values, returns, mask, coef, cu = ctx.saved_tensors
        dv = None
        if gloss is not None and ctx.needs_input_grad[0]:
            dv = _kernels().value_bwd(gloss.to(coef.dtype).reshape(()), values, old_values,
                                      returns, mask, coef, ctx.clip, cu)
        return (dv,) + (None,) * 10


def _run_policy(*args):
    if torch.compiler.is_compiling():
        loss, stats, _, _ = _policy_fwd(*args)
        return loss, stats
    return _PolicyLossFn.apply(*args)


def _run_value(*args):
    if torch.compiler.is_compiling():
        loss, stats, _ = _value_fwd(*args)
        return loss, stats
    return _ValueLossFn.apply(*args)


# ---------------------------------------------------------------------------------------------
# public: losses
# ---------------------------------------------------------------------------------------------

def ppo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                    clip_low: float = 0.2, clip_high: Optional[float] = None,
                    dual_clip: Optional[float] = None, agg: str = "token-mean",
                    ratio_level: str = "token", cu_seqlens: Optional[Tensor] = None,
                    backend: str = "auto", **agg_kwargs):
    """Clipped PPO policy loss (verl 0.9 ``compute_policy_loss_vanilla``; GSPO with
    ``ratio_level="sequence"``, verl ``compute_policy_loss_gspo``).

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (float16 /
            bfloat16 / float32 / float64; unit stride along T is read in place, e.g.
            ``x[:, :-1]``).  The only differentiable input.
        old_logp: ``[B, T]`` log-probs under the rollout (old) policy; treated as a constant.
        advantages: ``[B, T]`` per token, or ``[B]`` per sequence (broadcast over T); constant.
        mask: ``[B, T]`` bool / integer / floating response mask (a float mask weights tokens).
        clip_low, clip_high: ratio clip ``[1 - clip_low, 1 + clip_high]``, both > 0
            (``clip_high=None``: ``clip_low``; clip-higher / DAPO: ``clip_high > clip_low``).
        dual_clip: ``c > 1`` enables dual-clip PPO (verl ``clip_ratio_c``, whose default is 3.0
            in verl's vanilla loss); None disables it.
        agg: aggregation mode, see :func:`agg_loss`; ``**agg_kwargs`` are its ``dp_size``,
            ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``.  (verl's GSPO
            always aggregates with ``"seq-mean-token-mean"``: pass that to reproduce it.)
        ratio_level: ``"token"`` or ``"sequence"`` (GSPO).
        cu_seqlens: optional int32 / int64 ``[S+1]`` for the packed layout: ``logp``,
            ``old_logp``, ``mask`` ``[1, total]``, ``advantages`` ``[1, total]`` or ``[S]``
            (per sequence); the segments ``cu[s]:cu[s+1]`` are the sequences (GSPO ratio and
            seq-mode aggregation per segment; ``loss_scale_factor`` defaults to the longest
            segment).  Loss, stats and gradient equal the padded ``[S, Tmax]`` layout.
            Validated on the host (one sync).  Not supported by the native backend (``"auto"``
            then uses the Triton / reference path; ``backend="native"`` raises ValueError).
        backend: ``"auto" | "triton" | "native" | "reference"`` (see :mod:`fastrlhf._backend`).

    Formula, per token (``A`` the advantage, ``m`` the mask):

    * token: ``r = exp(clamp(logp - old_logp, -20, 20))``;
    * sequence: ``s_b = sum_t m (logp - old_logp) / max(sum_t m, 1)`` and, in verl's
      stop-gradient form, ``r = exp(min(logp - sg(logp) + sg(s_b), 10))`` (value ``exp(min(s_b,
      10))``, gradient ``r`` w.r.t. each token's logp);
    * ``l1 = -A r``, ``l2 = -A clamp(r, 1 - clip_low, 1 + clip_high)``, ``L = max(l1, l2)``;
      with ``dual_clip = c``: ``L = min(L, -A c)`` where ``A < 0``;
    * ``loss = agg_loss(L, mask, agg, **agg_kwargs)``.

    Returns:
        ``(loss, stats)``: ``loss`` a 0-dim float32 tensor (float64 if an input is float64);
        ``stats`` a dict of detached 0-dim tensors, each ``masked_mean(., mask)`` as verl:
        ``"clipfrac"`` = ``[l2 > l1]`` (verl pg_clipfrac), ``"clipfrac_lower"`` =
        ``[A < 0 and max(l1, l2) > -A c]`` (verl pg_clipfrac_lower; 0 without dual clip),
        ``"approx_kl"`` = ``old_logp - logp`` (verl ppo_kl; clamped to [-20, 20] at token level,
        raw at sequence level).

    Masking: tokens with ``mask == 0`` contribute nothing (NaN there is ignored) and get a zero
    gradient; fully masked rows / batches give 0, never NaN.  Gradients follow torch's
    subgradient conventions of the eager formula (ties split 50/50, clamps pass the gradient at
    their bounds).  Differences from verl: NaN at masked positions never leaks into the GSPO
    sequence ratio, and an empty batch gives 0 instead of NaN.
    """
    op = "ppo_policy_loss"
    _check_bt(op, "logp", logp)
    _check_bt(op, "old_logp", old_logp, logp.shape)
    n_seqs, norm_len = _check_packed(op, cu_seqlens, "logp", logp)
    _check_advantages(op, advantages, logp.shape, n_seqs)
    check_mask(op, mask, logp.shape, "the shape of logp")
    check_same_device(op, "logp", logp, old_logp=old_logp, advantages=advantages, mask=mask)
    clip_low, clip_high, dual_clip = _check_clips(op, clip_low, clip_high, dual_clip)
    if not isinstance(ratio_level, str) or ratio_level not in RATIO_LEVELS:
        raise ValueError(f"{op}: ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    kw = _check_agg(op, agg, logp.shape[1], agg_kwargs)
    which = _resolve(op, backend, logp.device, cu_seqlens is not None)
    if which == "reference":
        return reference.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high,
                                         dual_clip, agg, ratio_level, **kw,
                                         cu_seqlens=cu_seqlens)
    acc = _acc(logp, old_logp, advantages)
    denom, denom_t = _denominator(agg, kw, acc, logp.device)
    lsf = kw["loss_scale_factor"] if kw["loss_scale_factor"] is not None else float(norm_len)
    if which == "native":  # C++ CPU backend (fastrlhf/_native.py, csrc/losses.cpp)
        from .. import _native
        return _native.ppo_policy_loss(logp, old_logp, advantages, mask, 1.0 - clip_low,
                                       1.0 + clip_high, dual_clip, ratio_level == "sequence",
                                       agg, kw["dp_size"], denom, denom_t, lsf)
    loss, stats = _run_policy(
        _row_view(logp), _row_view(old_logp.detach()), _row_view(advantages.detach()),
        _row_view(mask), 1.0 - clip_low, 1.0 + clip_high, dual_clip, ratio_level == "sequence",
        agg, kw["dp_size"], denom, denom_t, lsf, _cu_arg(cu_seqlens))
    return loss, {"clipfrac": stats[0], "clipfrac_lower": stats[1], "approx_kl": stats[2]}


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
                   clip: Optional[float] = 0.5, agg: str = "token-mean",
                   cu_seqlens: Optional[Tensor] = None, backend: str = "auto", **agg_kwargs):
    """Clipped PPO value loss (verl 0.9 ``compute_value_loss``).

    Args:
        values: ``[B, T]`` current value predictions (float16 / bfloat16 / float32 / float64);
            the only differentiable input.
        old_values: ``[B, T]`` values at rollout time (constant).
        returns: ``[B, T]`` return targets (constant).
        mask: ``[B, T]`` bool / integer / floating response mask.
        clip: > 0, verl's ``cliprange_value``; None disables clipping (plain MSE).
        agg, **agg_kwargs: as :func:`agg_loss`.
        cu_seqlens: optional ``[S+1]``: all inputs packed as ``[1, total]``, segments are the
            sequences (as :func:`ppo_policy_loss`; equal to the padded ``[S, Tmax]`` layout).
        backend: ``"auto" | "triton" | "native" | "reference"``.

    Formula: ``vc = max(min(v, old + clip), old - clip)``, per token
    ``L = max((v - R)^2, (vc - R)^2)`` (``(v - R)^2`` without clip),
    ``loss = 0.5 * agg_loss(L, mask, agg, **agg_kwargs)``.

    Returns ``(loss, {"clipfrac": masked_mean([(vc - R)^2 > (v - R)^2], mask)})`` (verl
    vf_clipfrac; 0 without clip): 0-dim float32 tensors (float64 if an input is float64), the
    stats detached.  Masking as :func:`ppo_policy_loss`.
    """
    op = "ppo_value_loss"
    _check_bt(op, "values", values)
    _check_bt(op, "old_values", old_values, values.shape)
    _check_bt(op, "returns", returns, values.shape)
    check_mask(op, mask, values.shape, "the shape of values")
    check_same_device(op, "values", values, old_values=old_values, returns=returns, mask=mask)
    _, norm_len = _check_packed(op, cu_seqlens, "values", values)
    if clip is not None:
        clip = check_positive_float(op, "clip", clip)
    kw = _check_agg(op, agg, values.shape[1], agg_kwargs)
    which = _resolve(op, backend, values.device, cu_seqlens is not None)
    if which == "reference":
        return reference.ppo_value_loss(values, old_values, returns, mask, clip, agg, **kw,
                                        cu_seqlens=cu_seqlens)
    acc = _acc(values, old_values, returns)
    denom, denom_t = _denominator(agg, kw, acc, values.device)
    lsf = kw["loss_scale_factor"] if kw["loss_scale_factor"] is not None else float(norm_len)
    if which == "native":  # C++ CPU backend (fastrlhf/_native.py, csrc/losses.cpp)
        from .. import _native
        return _native.ppo_value_loss(values, old_values, returns, mask, clip, agg,
                                      kw["dp_size"], denom, denom_t, lsf)
    loss, stats = _run_value(
        _row_view(values), _row_view(old_values.detach()), _row_view(returns.detach()),
        _row_view(mask), clip, agg, kw["dp_size"], denom, denom_t, lsf, _cu_arg(cu_seqlens))
    return loss, {"clipfrac": stats[0]}


def policy_loss_per_token(logp: Tensor, old_logp: Tensor, advantages: Tensor,
                          mask: Optional[Tensor] = None, *, clip_low: float = 0.2,
                          clip_high: Optional[float] = None, dual_clip: Optional[float] = None,
                          ratio_level: str = "token", cu_seqlens: Optional[Tensor] = None):
    """Per-token policy loss and its derivative w.r.t. ``logp``, in closed form (eager).

    For ops that fuse the policy loss into a larger kernel (``fused_ppo_loss`` from the logits):
    with ``c = agg_row_weights(mask, agg, ...)`` the aggregated loss is
    ``sum_b c_b sum_t m L_bt`` and ``d loss / d logp_bt = c_b m_bt * dloss_dlogp_bt``.
    The same formulas exist as a ``@triton.jit`` helper, ``fastrlhf.kernels.losses.
    policy_token_terms``.

    Shapes and arguments as :func:`ppo_policy_loss` (``mask`` is needed for
    ``ratio_level="sequence"`` only; ``cu_seqlens`` for the packed ``[1, total]`` layout).
    Returns a :class:`fastrlhf.reference.PolicyTokenTerms` ``(loss, dloss_dlogp, clipped,
    clipped_lower, approx_kl)``, all ``[B, T]`` (float32, float64 for float64 inputs;
    ``clipped*`` bool); see :func:`fastrlhf.reference.policy_loss_per_token`.
    """
    op = "policy_loss_per_token"
    _check_bt(op, "logp", logp)
    _check_bt(op, "old_logp", old_logp, logp.shape)
    n_seqs, _ = _check_packed(op, cu_seqlens, "logp", logp)
    _check_advantages(op, advantages, logp.shape, n_seqs)
    if not isinstance(ratio_level, str) or ratio_level not in RATIO_LEVELS:
        raise ValueError(f"{op}: ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if mask is not None:
        check_mask(op, mask, logp.shape, "the shape of logp")
    elif ratio_level == "sequence":
        raise ValueError(f"{op}: ratio_level='sequence' needs the mask (the sequence ratio is "
                         "a masked mean over the row)")
    clip_low, clip_high, dual_clip = _check_clips(op, clip_low, clip_high, dual_clip)
    return reference.policy_loss_per_token(logp.detach(), old_logp.detach(), advantages.detach(),
                                           mask, clip_low, clip_high, dual_clip, ratio_level,
                                           cu_seqlens)
