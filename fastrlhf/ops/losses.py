"""Loss aggregation and the clipped PPO policy / value losses (verl 0.9 semantics).

* :func:`agg_loss` -- verl's ``agg_loss`` (five modes, ``dp_size`` / ``batch_num_tokens`` /
  ``global_batch_size`` / ``loss_scale_factor``), plain PyTorch.
* :func:`ppo_policy_loss` -- verl ``compute_policy_loss_vanilla`` (token ratio, clip-higher, dual
  clip) and ``compute_policy_loss_gspo`` (``ratio_level="sequence"``).
* :func:`ppo_value_loss` -- verl ``compute_value_loss``.

Each loss is one custom op (``fastrlhf::ppo_policy_loss``, ``fastrlhf::ppo_value_loss``, with
their backward ops) with one autograd formula; underneath, the Triton launchers
(:mod:`fastrlhf.kernels.losses`: one fused kernel per loss -- per-token terms, the masked row sums
the aggregation needs and the statistics in a single pass, rows in parallel -- a one-program
finalize kernel that combines the ``[B]`` partials in a fixed order, deterministic, no atomics,
and a backward kernel) or the native ones (:mod:`fastrlhf.native`, ``csrc/losses.cpp``).  In eager
mode the same implementation and formula run behind a plain ``autograd.Function`` (less dispatch
overhead, see :class:`fastrlhf.ops.registry.Op`); ``torch.compile`` traces the registered ops.
The reference is :func:`fastrlhf.reference.ppo_policy_loss` / ``ppo_value_loss`` /
``agg_loss``.  :func:`compose_ppo_loss` is the fused loss's definition on per-token log-probs.

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

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ..backend import resolve as resolve_backend
from ..tables import AGG_MODES, RATIO_LEVELS, acc_dtype
from .common import (with_contract, check_advantages, check_agg, check_backend_name, check_bt, check_clips,
                     check_mask, check_packed, check_positive_float, check_ratio_level,
                     check_same_device, check_tensor, denominator, row_view)
from .kl import kl_penalty
from .registry import Op, launchers

__all__ = ["agg_loss", "ppo_policy_loss", "ppo_value_loss", "policy_loss_per_token",
           "agg_row_weights", "compose_ppo_loss", "AGG_MODES", "RATIO_LEVELS"]


def _resolve(op: str, backend, device, packed: bool) -> str:
    """:func:`fastrlhf.backend.resolve`; the native backend has no packed (``cu_seqlens``)
    path: ``auto`` (and ``FASTRLHF_BACKEND=native``) then picks triton / reference, ``"native"``
    raises."""
    if packed and backend == "native":
        raise ValueError(f"{op}: cu_seqlens (packed sequences) is not supported by the native "
                         "backend; use backend='auto', 'triton' or 'reference'")
    return resolve_backend(backend, device, op=op, native_ok=not packed)


def _n_rows(x: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


# ---------------------------------------------------------------------------------------------
# custom ops (Triton and native launchers underneath): the policy loss
# ---------------------------------------------------------------------------------------------

def _policy_impl(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, lo: float,
                 hi: float, dual_clip: Optional[float], seq: bool, mode: str, dp_size: int,
                 denom: Optional[float], denom_t: Optional[Tensor], loss_scale_factor: float,
                 cu_seqlens: Optional[Tensor], backend: str
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = acc_dtype(logp, old_logp, advantages)
    return launchers(backend, "losses").policy_fwd(
        logp, old_logp, advantages, mask, lo, hi, dual_clip, seq, mode, dp_size, denom, denom_t,
        loss_scale_factor, acc, cu_seqlens)


def _policy_fake(logp, old_logp, advantages, mask, lo, hi, dual_clip, seq, mode, dp_size, denom,
                 denom_t, loss_scale_factor, cu_seqlens, backend):
    acc = acc_dtype(logp, old_logp, advantages)
    B = _n_rows(logp, cu_seqlens)
    return (logp.new_empty((), dtype=acc), logp.new_empty((3,), dtype=acc),
            logp.new_empty((B,), dtype=acc), logp.new_empty((B,), dtype=acc))


def _policy_bwd_impl(grad: Tensor, logp: Tensor, old_logp: Tensor, advantages: Tensor,
                     mask: Tensor, coef: Tensor, seq_log_ratio: Tensor, lo: float, hi: float,
                     dual_clip: Optional[float], seq: bool, cu_seqlens: Optional[Tensor],
                     backend: str) -> Tensor:
    return launchers(backend, "losses").policy_bwd(
        grad.to(coef.dtype).reshape(()), logp, old_logp, advantages, mask, coef, seq_log_ratio,
        lo, hi, dual_clip, seq, cu_seqlens)


def _policy_bwd_fake(grad, logp, old_logp, advantages, mask, coef, seq_log_ratio, lo, hi,
                     dual_clip, seq, cu_seqlens, backend):
    return logp.new_empty(logp.shape)


_policy_bwd = Op("ppo_policy_loss_bwd", _policy_bwd_impl, _policy_bwd_fake, fast_eager=True)


def _policy_setup(ctx, inputs, output):
    logp, old_logp, adv, mask, lo, hi, dual_clip, seq = inputs[:8]
    cu, backend = inputs[13], inputs[14]
    _, stats, coef, seqlr = output
    ctx.save_for_backward(logp, old_logp, adv, mask, coef, seqlr, cu)
    ctx.params = (lo, hi, dual_clip, seq)
    ctx.backend = backend
    ctx.mark_non_differentiable(stats, coef, seqlr)


def _policy_backward(ctx, gloss, gstats, gcoef, gseq):
    logp, old_logp, adv, mask, coef, seqlr, cu = ctx.saved_tensors
    dlogp = None
    if gloss is not None and ctx.needs_input_grad[0]:
        dlogp = _policy_bwd(gloss, logp, old_logp, adv, mask, coef, seqlr, *ctx.params, cu,
                            ctx.backend)
    return (dlogp,) + (None,) * 14


_policy = Op("ppo_policy_loss", _policy_impl, _policy_fake, setup=_policy_setup,
             backward=_policy_backward, fast_eager=True)


# ---------------------------------------------------------------------------------------------
# custom ops: the value loss
# ---------------------------------------------------------------------------------------------

def _value_impl(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                clip: Optional[float], mode: str, dp_size: int, denom: Optional[float],
                denom_t: Optional[Tensor], loss_scale_factor: float,
                cu_seqlens: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(values, old_values, returns)
    return launchers(backend, "losses").value_fwd(
        values, old_values, returns, mask, clip, mode, dp_size, denom, denom_t, loss_scale_factor,
        acc, cu_seqlens)


def _value_fake(values, old_values, returns, mask, clip, mode, dp_size, denom, denom_t,
                loss_scale_factor, cu_seqlens, backend):
    acc = acc_dtype(values, old_values, returns)
    return (values.new_empty((), dtype=acc), values.new_empty((1,), dtype=acc),
            values.new_empty((_n_rows(values, cu_seqlens),), dtype=acc))


def _value_bwd_impl(grad: Tensor, values: Tensor, old_values: Tensor, returns: Tensor,
                    mask: Tensor, coef: Tensor, clip: Optional[float],
                    cu_seqlens: Optional[Tensor], backend: str) -> Tensor:
    return launchers(backend, "losses").value_bwd(
        grad.to(coef.dtype).reshape(()), values, old_values, returns, mask, coef, clip,
        cu_seqlens)


def _value_bwd_fake(grad, values, old_values, returns, mask, coef, clip, cu_seqlens, backend):
    return values.new_empty(values.shape)


_value_bwd = Op("ppo_value_loss_bwd", _value_bwd_impl, _value_bwd_fake, fast_eager=True)


def _value_setup(ctx, inputs, output):
    values, old_values, returns, mask, clip = inputs[:5]
    cu, backend = inputs[10], inputs[11]
    _, stats, coef = output
    ctx.save_for_backward(values, old_values, returns, mask, coef, cu)
    ctx.clip = clip
    ctx.backend = backend
    ctx.mark_non_differentiable(stats, coef)


def _value_backward(ctx, gloss, gstats, gcoef):
    values, old_values, returns, mask, coef, cu = ctx.saved_tensors
    dv = None
    if gloss is not None and ctx.needs_input_grad[0]:
        dv = _value_bwd(gloss, values, old_values, returns, mask, coef, ctx.clip, cu,
                        ctx.backend)
    return (dv,) + (None,) * 11


_value = Op("ppo_value_loss", _value_impl, _value_fake, setup=_value_setup,
            backward=_value_backward, fast_eager=True)


# ---------------------------------------------------------------------------------------------
# public: aggregation
# ---------------------------------------------------------------------------------------------

@with_contract(reference.agg_loss)
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
    check_bt(op, "per_token", per_token)
    mask = check_mask(op, mask, per_token.shape, "the shape of per_token")
    check_same_device(op, "per_token", per_token, mask=mask)
    check_backend_name(op, backend)
    check_packed(op, cu_seqlens, "per_token", per_token)
    kw = check_agg(op, mode, {
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
    mask = check_mask(op, mask, mask.shape)
    check_packed(op, cu_seqlens, "mask", mask)
    kw = check_agg(op, mode, agg_kwargs)
    return reference.agg_row_weights(mask, mode, dtype=dtype, cu_seqlens=cu_seqlens, **kw)


# ---------------------------------------------------------------------------------------------
# public: losses
# ---------------------------------------------------------------------------------------------

@with_contract(reference.ppo_policy_loss)
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
        backend: ``"auto" | "triton" | "native" | "reference"`` (see :mod:`fastrlhf.backend`).

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
    check_bt(op, "logp", logp)
    check_bt(op, "old_logp", old_logp, logp.shape)
    n_seqs, norm_len = check_packed(op, cu_seqlens, "logp", logp)
    check_advantages(op, advantages, logp.shape, n_seqs)
    mask = check_mask(op, mask, logp.shape, "the shape of logp")
    check_same_device(op, "logp", logp, old_logp=old_logp, advantages=advantages, mask=mask)
    clip_low, clip_high, dual_clip = check_clips(op, clip_low, clip_high, dual_clip)
    check_ratio_level(op, ratio_level)
    kw = check_agg(op, agg, agg_kwargs)
    which = _resolve(op, backend, logp.device, cu_seqlens is not None)
    if which == "reference":
        return reference.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high,
                                         dual_clip, agg, ratio_level, **kw,
                                         cu_seqlens=cu_seqlens)
    acc = acc_dtype(logp, old_logp, advantages)
    denom, denom_t = denominator(agg, kw, acc, logp.device)
    lsf = kw["loss_scale_factor"] if kw["loss_scale_factor"] is not None else float(norm_len)
    loss, stats, _, _ = _policy(
        row_view(logp), row_view(old_logp.detach()), row_view(advantages.detach()),
        row_view(mask), 1.0 - clip_low, 1.0 + clip_high, dual_clip, ratio_level == "sequence",
        agg, kw["dp_size"], denom, denom_t, lsf, _cu_arg(cu_seqlens), which)
    return loss, {"clipfrac": stats[0], "clipfrac_lower": stats[1], "approx_kl": stats[2]}


@with_contract(reference.ppo_value_loss)
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
    check_bt(op, "values", values)
    check_bt(op, "old_values", old_values, values.shape)
    check_bt(op, "returns", returns, values.shape)
    mask = check_mask(op, mask, values.shape, "the shape of values")
    check_same_device(op, "values", values, old_values=old_values, returns=returns, mask=mask)
    _, norm_len = check_packed(op, cu_seqlens, "values", values)
    if clip is not None:
        clip = check_positive_float(op, "clip", clip)
    kw = check_agg(op, agg, agg_kwargs)
    which = _resolve(op, backend, values.device, cu_seqlens is not None)
    if which == "reference":
        return reference.ppo_value_loss(values, old_values, returns, mask, clip, agg, **kw,
                                        cu_seqlens=cu_seqlens)
    acc = acc_dtype(values, old_values, returns)
    denom, denom_t = denominator(agg, kw, acc, values.device)
    lsf = kw["loss_scale_factor"] if kw["loss_scale_factor"] is not None else float(norm_len)
    loss, stats, _ = _value(
        row_view(values), row_view(old_values.detach()), row_view(returns.detach()),
        row_view(mask), clip, agg, kw["dp_size"], denom, denom_t, lsf, _cu_arg(cu_seqlens),
        which)
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
    check_bt(op, "logp", logp)
    check_bt(op, "old_logp", old_logp, logp.shape)
    n_seqs, _ = check_packed(op, cu_seqlens, "logp", logp)
    check_advantages(op, advantages, logp.shape, n_seqs)
    check_ratio_level(op, ratio_level)
    if mask is not None:
        mask = check_mask(op, mask, logp.shape, "the shape of logp")
    elif ratio_level == "sequence":
        raise ValueError(f"{op}: ratio_level='sequence' needs the mask (the sequence ratio is "
                         "a masked mean over the row)")
    clip_low, clip_high, dual_clip = check_clips(op, clip_low, clip_high, dual_clip)
    return reference.policy_loss_per_token(logp.detach(), old_logp.detach(), advantages.detach(),
                                           mask, clip_low, clip_high, dual_clip, ratio_level,
                                           cu_seqlens)


def _cu_arg(cu: Optional[Tensor]) -> Optional[Tensor]:
    return None if cu is None else cu.detach().contiguous()


def compose_ppo_loss(logp, ent, old_logp, advantages, mask, ref_logp, kl_coef, kl_kind,
                     entropy_coef, clip_low, clip_high, dual_clip, agg, ratio_level, backend,
                     kw):
    """``fused_ppo_loss``'s definition on per-token ``logp`` / ``ent`` (O(B T) work), for the
    paths that produce the log-probs separately (vocab parallelism, ``fused_linear_ppo_loss``):
    returns ``(loss, stats)`` with the keys of :data:`fastrlhf.tables.FUSED_STATS`.  ``kw``: the
    normalized aggregation kwargs (and ``cu_seqlens`` when packed)."""
    acc = logp.dtype
    old, adv = old_logp.detach().to(acc), advantages.detach().to(acc)
    loss, pg = ppo_policy_loss(logp, old, adv, mask, clip_low=clip_low, clip_high=clip_high,
                               dual_clip=dual_clip, agg=agg, ratio_level=ratio_level,
                               backend=backend, **kw)
    if ref_logp is not None:  # kl_penalty has no native backend: reference on CPU
        kl = kl_penalty(logp, ref_logp.detach().to(acc), kl_kind,
                        backend="triton" if backend == "triton" else "reference")
        loss = loss + kl_coef * agg_loss(kl, mask, agg, **kw)
    else:
        kl = torch.zeros_like(logp)
    loss = loss - entropy_coef * agg_loss(ent, mask, agg, **kw)
    ent_d, kl_d = ent.detach(), kl.detach()
    stats = {"logp": logp.detach(), "entropy": ent_d, "kl": kl_d, **pg,
             "entropy_mean": reference.masked_mean(ent_d, mask),
             "kl_mean": reference.masked_mean(kl_d, mask)}
    return loss, stats
