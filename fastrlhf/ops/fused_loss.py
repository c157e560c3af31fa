"""fused_ppo_loss: the per-token PPO / GRPO / GSPO policy loss (+ KL penalty, - entropy bonus)
straight from the logits, with the gradient w.r.t. the logits produced in the same launch.

The public entry point checks its arguments, computes the aggregation weights from the mask
(:func:`fastrlhf.reference.agg_row_weights`: the aggregated loss is ``sum_bt c_b m_bt L_bt``), and
calls one of two registered ``torch.library`` ops:

* ``fastrlhf::fused_ppo_loss`` -- stores the gradient in one fresh ``[B, T, V]`` buffer (an output
  of the op, saved for backward);
* ``fastrlhf::fused_ppo_loss_ib`` -- stores it over the logits themselves (``inplace_backward``):
  no ``[B, T, V]`` allocation at all.  The op overwrites its ``logits`` argument but is registered
  as functional (autograd cannot be registered for a mutating op), and bumps the autograd version
  counter of ``logits`` so that eager autograd still raises if anything else saved the logits for
  its backward (e.g. a ``tanh`` soft-cap); under ``torch.compile`` nothing can check that.

Their backward multiplies the stored gradient by the upstream gradient in place
(``fastrlhf::fused_ppo_loss_scale_``, a no-op on the device when it is exactly 1) and returns the
buffer itself as the gradient.  A repeated backward (``retain_graph=True``) rescales the same
buffer by ``g_new / g_old``, so a gradient returned by an earlier backward (e.g. by
``torch.autograd.grad``) changes with it; after a backward with upstream gradient 0 the buffer
holds zeros and a later backward gives NaN.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import config, reference
from ._common import (FLOAT_DTYPES, INT_DTYPES, check_finite_float, check_int,
                      check_positive_float, check_same_device,
                      check_shape, check_tensor, contiguous_row_strides, rows_layout)
from .kl import _canonical_kind
from .logprobs import _check_token_range as _logprobs_check_token_range
from .losses import (RATIO_LEVELS, _check_advantages, _check_agg, _check_bt, _check_clips,
                     _check_packed, _resolve)
from .masked import check_mask

__all__ = ["fused_ppo_loss", "FUSED_STATS"]

OP = "fused_ppo_loss"
# Keys of the stats dict: per-token [B, T] tensors, then 0-dim scalars.
FUSED_STATS = ("logp", "entropy", "kl", "clipfrac", "clipfrac_lower", "approx_kl", "entropy_mean",
               "kl_mean")
_EPS = reference.MASKED_EPS


def _kernels():
    from ..kernels import fused_loss as k  # lazy: TRITON_INTERPRET may be set after import
    return k


def _check_token_range(tokens: Tensor, V: int, ignore_index: int) -> None:
    _logprobs_check_token_range(tokens, V, ignore_index, OP)


# ---------------------------------------------------------------------------------------------
# the forward (shared by both ops)
# ---------------------------------------------------------------------------------------------

def _forward(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
             ref_logp: Optional[Tensor], coef: Tensor, kl_coef: float, kl_kind: str,
             entropy_coef: float, lo: float, hi: float, dual_clip: Optional[float],
             temperature: float, seq: bool, ignore_index: int, write_grad: bool, inplace: bool,
             cu_seqlens: Optional[Tensor] = None):
    """Returns (loss [], stats [5], per_token [3, B, T], dlogits or None).

    Packed layout (``cu_seqlens``, ``B = 1``): ``coef`` is per segment ``[S]``; the per-token
    weights, per-sequence advantages and GSPO ratios are gathered to ``[total]`` vectors through
    the tokens' segment ids (O(total); the logits are read in place as always)."""
    k = _kernels()
    B, T, V = logits.shape
    acc = coef.dtype
    _check_token_range(tokens, V, ignore_index)
    lg, dims, strides = rows_layout(logits)
    if inplace and write_grad and lg.data_ptr() != logits.data_ptr():
        raise RuntimeError(f"{OP}: in-place gradient needs logits with unit stride on the vocab")
    m = mask.to(acc)
    flat = lambda t: t.to(acc).reshape(-1).contiguous()  # noqa: E731  (O(B T) copies at most)
    seg = None if cu_seqlens is None else reference.segment_ids(cu_seqlens, T)

    def row_sums(x):  # [B, T] -> per row [B], or per segment [S] (packed)
        if seg is None:
            return x.sum(-1)
        return x.new_zeros(coef.shape[0]).index_add_(0, seg, x.reshape(-1))

    def per_token(x):  # [B] / [S] -> [B * T]
        return (x.unsqueeze(-1).expand(B, T) if seg is None else x[seg]).reshape(-1).contiguous()

    w = per_token(coef) * m.reshape(-1)
    tok = tokens.reshape(-1).contiguous()
    old = flat(old_logp)
    adv_row = advantages.dim() == 1 and seg is None
    adv = flat(advantages) if advantages.dim() == 2 or adv_row else per_token(advantages.to(acc))
    ref = None if ref_logp is None else flat(ref_logp)
    inv_temp = 1.0 / temperature
    # the kernel finds the row of token n as n // k_rows; packed: every [N] vector is per token
    k_rows = T if seg is None else 1
    seq_lr = lse = lp_in = ent_in = None
    if seq:
        # GSPO pass 1: logp / entropy / logsumexp of every token, then the rows' mean log-ratio
        # (verl: sum_t m (logp - old) / max(sum_t m, 1), NaN outside the mask ignored).
        from ..kernels import logprobs as klp
        lp_in, ent_in, lse = klp.logprobs_fwd(lg, dims, strides, V, tok, inv_temp, ignore_index,
                                              True)
        d = lp_in.view(B, T) - old.view(B, T)
        seq_lr = (row_sums(torch.where(m != 0, d, torch.zeros_like(d)) * m)
                  / row_sums(m).clamp(min=1)).contiguous()
        if seg is not None:
            seq_lr = per_token(seq_lr)
    dl, ostrides = None, strides
    if write_grad:
        if inplace:
            dl = lg
        else:
            dl = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            ostrides = contiguous_row_strides(dims, V)
    codes = k.KL_KINDS
    base_kind = kl_kind.rstrip("+")
    kl_val = codes[base_kind]
    kl_grad = codes["k2"] if kl_kind.endswith("+") else kl_val
    aux = k.fused_loss_fwd(
        lg, dl, dims, strides, ostrides, V, k_rows, tok, old, adv, ref, w, seq_lr, lse, lp_in,
        ent_in, inv_temp=inv_temp, ignore_index=ignore_index, lo=lo, hi=hi, dual=dual_clip,
        kl_coef=kl_coef, kl_val=kl_val, kl_grad=kl_grad, ent_coef=entropy_coef,
        write_grad=write_grad, adv_row=adv_row)
    if inplace and write_grad:
        torch.autograd.graph.increment_version(logits)
    aux = aux.view(k.N_AUX, B, T)
    valid = m != 0

    def terms(x):  # where(m != 0, x, 0) * m: NaN outside the mask never leaks in
        return torch.where(valid, x, torch.zeros_like(x)) * m

    L, lp, ent, kl, clipped, lower, akl = aux.unbind(0)
    sums = row_sums(terms(L))
    loss = torch.where(coef != 0, coef * sums, torch.zeros_like(sums)).sum()
    den = m.sum() + _EPS
    stats = torch.stack([terms(x).sum() for x in (clipped, lower, akl, ent, kl)]) / den
    per_token = aux[1:4].clone()
    return loss, stats, per_token, dl


def _fake_outputs(logits, tokens, coef):
    B, T, _ = logits.shape
    acc = coef.dtype
    return (logits.new_empty((), dtype=acc), logits.new_empty((5,), dtype=acc),
            logits.new_empty((3, B, T), dtype=acc))


# ---------------------------------------------------------------------------------------------
# torch.library ops (Triton backend)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("fastrlhf::fused_ppo_loss", mutates_args=())
def _fused(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
           ref_logp: Optional[Tensor], coef: Tensor, kl_coef: float, kl_kind: str,
           entropy_coef: float, lo: float, hi: float, dual_clip: Optional[float],
           temperature: float, seq: bool, ignore_index: int, write_grad: bool,
           cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, stats, per_token, dl = _forward(
        logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind,
        entropy_coef, lo, hi, dual_clip, temperature, seq, ignore_index, write_grad, False,
        cu_seqlens)
    if dl is None:
        dl = logits.new_empty((0,))
    return loss, stats, per_token, dl


@_fused.register_fake
def _(logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind, entropy_coef,
      lo, hi, dual_clip, temperature, seq, ignore_index, write_grad, cu_seqlens=None):
    dl = logits.new_empty(logits.shape if write_grad else (0,))
    return (*_fake_outputs(logits, tokens, coef), dl)


@torch.library.custom_op("fastrlhf::fused_ppo_loss_ib", mutates_args=())
def _fused_ib(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
              ref_logp: Optional[Tensor], coef: Tensor, kl_coef: float, kl_kind: str,
              entropy_coef: float, lo: float, hi: float, dual_clip: Optional[float],
              temperature: float, seq: bool, ignore_index: int, write_grad: bool,
              cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    # Writes d loss / d logits over ``logits`` when write_grad (see the module docstring).
    loss, stats, per_token, _ = _forward(
        logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind,
        entropy_coef, lo, hi, dual_clip, temperature, seq, ignore_index, write_grad, True,
        cu_seqlens)
    return loss, stats, per_token


@_fused_ib.register_fake
def _(logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind, entropy_coef,
      lo, hi, dual_clip, temperature, seq, ignore_index, write_grad, cu_seqlens=None):
    return _fake_outputs(logits, tokens, coef)


def _rescale(grad: Tensor, applied: Tensor, g: Tensor) -> None:
    """Make ``grad`` hold the gradient for upstream gradient ``g``: ``grad *= g / applied`` and
    ``applied = g`` (so a repeated backward rescales correctly); nothing of ``grad`` is touched
    when the factor is exactly 1 (checked on the device).  Writes through ``.data``: no autograd
    version bump of its own."""
    factor = g.detach().to(applied.dtype).reshape(()) / applied
    applied.data.copy_(g.detach().reshape(()))
    lg, dims, strides = rows_layout(grad)
    if lg.data_ptr() != grad.data_ptr() or lg.stride() != grad.stride():
        grad.data.mul_(factor.to(grad.dtype))
        return
    _kernels().scale_rows(lg, dims, strides, grad.shape[-1], factor)


@torch.library.custom_op("fastrlhf::fused_ppo_loss_scale_", mutates_args=("grad", "applied"))
def _scale_(grad: Tensor, applied: Tensor, g: Tensor) -> None:
    """The traceable form of :func:`_rescale` (used under torch.compile)."""
    _rescale(grad, applied, g)


@_scale_.register_fake
def _(grad, applied, g):
    return None


_N_INPUTS = 18
_WRITE_GRAD = 16  # index of write_grad among the op's inputs


def _save(ctx, write_grad, buf, coef):
    # Only the loss is differentiable; without this autograd would hand backward a zero-filled
    # tensor for every other output -- one of them is the [.., V]-sized gradient buffer.
    ctx.set_materialize_grads(False)
    ctx.write_grad = write_grad
    # the upstream-gradient factor currently applied to ``buf`` (1: as the forward stored it)
    applied = torch.ones((), dtype=coef.dtype, device=coef.device) if write_grad else None
    ctx.save_for_backward(buf if write_grad else None, applied)


def _setup(ctx, inputs, output):
    _save(ctx, inputs[_WRITE_GRAD], output[3], inputs[6])
    ctx.mark_non_differentiable(*output[1:])


def _setup_ib(ctx, inputs, output):
    _save(ctx, inputs[_WRITE_GRAD], inputs[0], inputs[6])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, gloss, *_):
    buf, applied = ctx.saved_tensors
    if gloss is None or buf is None:
        return (None,) * _N_INPUTS
    if type(buf) is Tensor and not torch.compiler.is_compiling():
        # Eager: scale without bumping the version counters of the saved tensors, so that a
        # repeated backward (retain_graph=True, gradcheck) can still unpack them.
        _rescale(buf, applied, gloss)
    else:
        _scale_(buf, applied, gloss)
    return (buf,) + (None,) * (_N_INPUTS - 1)


_fused.register_autograd(_backward, setup_context=_setup)
_fused_ib.register_autograd(_backward, setup_context=_setup_ib)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def _native_op():
    """``fastrlhf._native.fused_ppo_loss_op`` when the native module provides it, else None."""
    try:
        from .. import _native
    except ImportError:
        return None
    return getattr(_native, "fused_ppo_loss_op", None)


def _check_coef(name: str, v) -> float:
    return check_finite_float(OP, name, v)


def fused_ppo_loss(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                   mask: Tensor, *, ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0,
                   kl_kind: str = "k3", entropy_coef: float = 0.0, clip_low: float = 0.2,
                   clip_high: Optional[float] = None, dual_clip: Optional[float] = None,
                   temperature: float = 1.0, agg: str = "token-mean", ratio_level: str = "token",
                   inplace_backward: bool = False, ignore_index: int = -100,
                   backend: str = "auto", process_group=None,
                   vocab_start_index: Optional[int] = None, cu_seqlens: Optional[Tensor] = None,
                   **agg_kwargs):
    """The whole PPO / GRPO / GSPO policy loss of a step from the logits, in one fused pass.

    Defined as the composition of the separate ops::

        logp, H = token_logprobs(logits, tokens, temperature=temperature, return_entropy=True)
        pg      = the per-token loss L of ppo_policy_loss(logp, old_logp, advantages, mask,
                  clip_low, clip_high, dual_clip, ratio_level)
        kl      = kl_penalty(logp, ref_logp, kl_kind)             (0 when ref_logp is None)
        loss    = agg_loss(pg + kl_coef * kl - entropy_coef * H, mask, agg, **agg_kwargs)

    and, since the aggregation is linear in the per-token loss, equal to
    ``ppo_policy_loss(..., agg)[0] + kl_coef * agg_loss(kl) - entropy_coef * agg_loss(H)``.

    Args:
        logits: ``[B, T, V]`` float16 / bfloat16 / float32 / float64, any strides on ``B, T``
            (``lm_logits[:, :-1]`` is read in place), unit stride on ``V`` preferred.
        tokens: ``[B, T]`` int32 / int64 ids in ``[0, V)`` or ``ignore_index`` (such positions
            get logp = 0 and no gradient through logp, as :func:`token_logprobs`).
        old_logp: ``[B, T]`` rollout log-probs (constant).
        advantages: ``[B, T]`` or ``[B]`` (per sequence, broadcast over T; constant).
        mask: ``[B, T]`` bool / integer / floating response mask (a float mask weights tokens).
        ref_logp: ``[B, T]`` reference-policy log-probs, or None (no KL term; ``kl_coef`` must
            then be 0).
        kl_coef, entropy_coef: finite floats.
        kl_kind: any :data:`fastrlhf.KL_KINDS` name (``"k1"``, ``"k2"``, ``"k3"``, ``"abs"``,
            aliases, and the straight-through ``"+"`` kinds).
        clip_low, clip_high, dual_clip, ratio_level: as :func:`ppo_policy_loss` (``clip_low``,
            ``clip_high`` > 0; ``dual_clip`` > 1 or None; ``"token"`` or ``"sequence"`` = GSPO).
        temperature: > 0; the policy is ``softmax(logits / temperature)``.
        agg, **agg_kwargs: as :func:`agg_loss` (``dp_size``, ``batch_num_tokens``,
            ``global_batch_size``, ``loss_scale_factor``).
        inplace_backward: write the gradient over ``logits`` in the forward (no ``[B, T, V]``
            allocation).  The caller promises not to read ``logits`` after this call (eager
            autograd raises if another op saved them for its backward).  Triton backend only;
            falls back to a fresh buffer when ``logits`` has a non-unit vocab stride.
        ignore_index: see ``tokens``.
        backend: ``"auto" | "triton" | "native" | "reference"`` (see :mod:`fastrlhf._backend`).
        process_group, vocab_start_index: vocab parallelism, as :func:`token_logprobs`:
            ``logits`` hold this rank's vocab slice, ``tokens`` are full-vocab ids; every rank
            returns the same loss and stats, and its slice's gradient.  This path is the
            composition (vocab-parallel ``token_logprobs`` with entropy, then the O(B T) loss
            terms): the slice is read in the forward, read again and the gradient written in
            the backward (``inplace_backward``: over ``logits``, Triton backend) -- not the
            single fused sweep, because the per-token loss derivatives need the global
            log-prob and entropy, known only after the all-reduce.  Communication: ``N`` + ``3N``
            floats.  See :mod:`fastrlhf.ops._vocab_parallel`.
        cu_seqlens: optional int32 / int64 ``[S+1]`` for packed sequences: ``logits``
            ``[1, total, V]``, the per-token inputs ``[1, total]``, ``advantages`` ``[1, total]``
            or ``[S]``; the segments ``cu[s]:cu[s+1]`` are the sequences (GSPO ratio, seq-mode
            aggregation; ``loss_scale_factor`` defaults to the longest segment), and loss,
            stats and gradient equal the padded ``[S, Tmax, V]`` layout.  The logits are never
            copied or padded: only ``[total]``-sized vectors are gathered by segment.  Not
            supported by the native backend (``"auto"`` then uses the Triton / reference path;
            ``backend="native"`` raises ValueError).  Validated on the host (one sync).

    Returns:
        ``(loss, stats)``: ``loss`` a 0-dim tensor, float32 (float64 for float64 logits; the
        per-token inputs are cast to that dtype), differentiable w.r.t. ``logits`` only.
        ``stats`` (detached): per-token ``[B, T]`` ``"logp"``, ``"entropy"``, ``"kl"`` (zeros
        without ``ref_logp``), and 0-dim, each ``masked_mean(x, mask) = sum(where(m != 0, x, 0)
        * m) / (sum(m) + 1e-8)`` exactly as the separate ops define them: ``"clipfrac"``,
        ``"clipfrac_lower"``, ``"approx_kl"`` (those of :func:`ppo_policy_loss`),
        ``"entropy_mean"`` = masked_mean(entropy), ``"kl_mean"`` = masked_mean(kl).

    Cost (Triton backend; N = B T rows of V logits):

    * ``ratio_level="token"``: one kernel launch, two sweeps per row: the first streams the row
      from DRAM (max, sum-exp, entropy sum), the second re-reads it from L2 and writes the
      gradient -- about one read and one write of the logits; masked tokens skip the second
      read.  Under ``torch.no_grad`` (or logits not requiring grad) only the first sweep runs.
    * ``ratio_level="sequence"`` (GSPO): the sequence ratio needs every logp of the row first:
      the ``token_logprobs`` forward kernel sweeps the logits, then this kernel only runs the
      gradient sweep: two reads and one write.
    * backward: the stored gradient times the upstream gradient, in place: no memory traffic
      when that is exactly 1 (``loss.backward()``), else one read and one write.
    * memory: one ``[B, T, V]`` gradient buffer of the logits' dtype, none with
      ``inplace_backward``; everything else is O(B T).
    * when ``logits`` is a ``[:, :-1]`` view of a model output, autograd itself then scatters the
      gradient into a zero-filled ``[B, T + 1, V]`` tensor (the slice's backward); slicing the
      hidden states before the lm_head avoids that copy (and the lm_head's extra row).

    The gradient buffer is scaled in place by the backward (see the module docstring).
    Masked tokens contribute nothing and get zero gradient (NaN there is ignored); fully masked
    rows and batches give 0, never NaN.  Registered with ``torch.library``: traceable by
    ``torch.compile(fullgraph=True)``.
    """
    check_tensor(OP, "logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() != 3:
        raise ValueError(f"{OP}: logits must be 3-D [B, T, V], got shape {tuple(logits.shape)}")
    B, T, V = logits.shape
    if V == 0:
        raise ValueError(f"{OP}: logits must have a non-empty vocab (last) dim, got shape "
                         f"{tuple(logits.shape)}")
    check_tensor(OP, "tokens", tokens, dtypes=INT_DTYPES)
    check_shape(OP, "tokens", tokens, (B, T), "the leading shape of logits")
    _check_bt(OP, "old_logp", old_logp, (B, T))
    n_seqs, _ = _check_packed(OP, cu_seqlens, "logits", logits)
    _check_advantages(OP, advantages, (B, T), n_seqs)
    check_mask(OP, mask, (B, T), "the leading shape of logits")
    if ref_logp is not None:
        _check_bt(OP, "ref_logp", ref_logp, (B, T))
    check_same_device(OP, "logits", logits, tokens=tokens, old_logp=old_logp,
                      advantages=advantages, mask=mask, ref_logp=ref_logp)
    kl_coef = _check_coef("kl_coef", kl_coef)
    entropy_coef = _check_coef("entropy_coef", entropy_coef)
    kl_kind = _canonical_kind(OP, kl_kind)
    if ref_logp is None and kl_coef != 0.0:
        raise ValueError(f"{OP}: kl_coef={kl_coef} needs ref_logp (the reference policy's "
                         "log-probs of the tokens)")
    clip_low, clip_high, dual_clip = _check_clips(OP, clip_low, clip_high, dual_clip)
    temperature = check_positive_float(OP, "temperature", temperature)
    if not isinstance(ratio_level, str) or ratio_level not in RATIO_LEVELS:
        raise ValueError(f"{OP}: ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"{OP}: inplace_backward must be a bool, got "
                        f"{type(inplace_backward).__name__}")
    ignore_index = check_int(OP, "ignore_index", ignore_index)
    kw = _check_agg(OP, agg, T, agg_kwargs)
    packed = cu_seqlens is not None
    # (Under torch.compile the native C++ path is never chosen: it is not traceable.)
    native_ok = not torch.compiler.is_compiling() and _native_op() is not None
    which = _resolve(OP, backend, logits.device, packed, native_ok=native_ok)
    acc = reference.acc_dtype(logits.dtype)
    old_logp, advantages = old_logp.detach(), advantages.detach()
    ref_logp = None if ref_logp is None else ref_logp.detach()
    if process_group is not None:
        from ._vocab_parallel import vocab_parallel_fused_ppo_loss
        return vocab_parallel_fused_ppo_loss(
            logits, tokens, old_logp, advantages, mask, ref_logp, kl_coef, kl_kind, entropy_coef,
            clip_low, clip_high, dual_clip, temperature, agg, ratio_level, ignore_index, which,
            inplace_backward, config.check_tokens_enabled(), process_group, vocab_start_index,
            {**kw, "cu_seqlens": cu_seqlens} if packed else kw)
    if vocab_start_index is not None:
        raise ValueError(f"{OP}: vocab_start_index is only meaningful with process_group")
    if which == "reference":
        _check_token_range(tokens, V, ignore_index)
        return reference.fused_ppo_loss(
            logits, tokens, old_logp, advantages, mask, ref_logp, kl_coef, kl_kind, entropy_coef,
            clip_low, clip_high, dual_clip, temperature, agg, ratio_level, ignore_index, **kw,
            cu_seqlens=cu_seqlens)
    coef = reference.agg_row_weights(mask, agg, dtype=acc, cu_seqlens=cu_seqlens, **kw)
    write_grad = torch.is_grad_enabled() and logits.requires_grad
    inplace = inplace_backward and (logits.stride(-1) == 1 or V == 1)
    if which == "native":  # the C++ CPU counterpart: same op signature (fastrlhf/_native.py)
        fn = _native_op()(inplace)
    else:
        fn = _fused_ib if inplace else _fused
    args = (logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind,
            entropy_coef, 1.0 - clip_low, 1.0 + clip_high, dual_clip, temperature,
            ratio_level == "sequence", ignore_index, write_grad)
    out = fn(*args, cu_seqlens.detach().contiguous()) if packed else fn(*args)
    loss, scal, per_token = out[0], out[1], out[2]
    stats = {"logp": per_token[0], "entropy": per_token[1], "kl": per_token[2],
             "clipfrac": scal[0], "clipfrac_lower": scal[1], "approx_kl": scal[2],
             "entropy_mean": scal[3], "kl_mean": scal[4]}
    return loss, stats
