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

Both ops have a ``backend`` argument: ``"triton"`` runs :mod:`fastrlhf.kernels.fused_loss` (and
the log-prob pass of :mod:`fastrlhf.kernels.logprobs` for GSPO), ``"native"`` the C++ loop of
``csrc/fused_loss.cpp`` through :mod:`fastrlhf.native`; the op, its checks and its autograd formula
are the same.  The vocab-parallel mode is the composition of the vocab-parallel
:func:`fastrlhf.ops.logprobs.token_logprobs` with :func:`fastrlhf.ops.losses.compose_ppo_loss`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ..backend import resolve as resolve_backend
from ..tables import FUSED_STATS, KL_CODES, MASKED_EPS, acc_dtype
from .common import (check_fused_loss_args, check_logits, check_positive_float, check_int,
                     check_token_range, checked_tokens, contiguous_row_strides, rows_layout)
from .logprobs import inplace_ok, logprobs_stats, vocab_parallel_token_logprobs
from .losses import compose_ppo_loss
from .registry import Op, launchers

__all__ = ["fused_ppo_loss", "FUSED_STATS"]

OP = "fused_ppo_loss"


# ---------------------------------------------------------------------------------------------
# the forward (one implementation, both backends underneath)
# ---------------------------------------------------------------------------------------------

def _forward(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
             ref_logp: Optional[Tensor], coef: Tensor, kl_coef: float, kl_kind: str,
             entropy_coef: float, lo: float, hi: float, dual_clip: Optional[float],
             temperature: float, seq: bool, ignore_index: int, write_grad: bool, inplace: bool,
             cu_seqlens: Optional[Tensor], backend: str):
    """Returns (loss [], stats [5], per_token [3, B, T], dlogits or None).

    Packed layout (``cu_seqlens``, ``B = 1``, Triton only): ``coef`` is per segment ``[S]``; the
    per-token weights, per-sequence advantages and GSPO ratios are gathered to ``[total]``
    vectors through the tokens' segment ids (O(total); the logits are read in place as
    always)."""
    B, T, V = logits.shape
    acc = coef.dtype
    check_token_range(OP, tokens, V, ignore_index)
    lg, dims, strides = rows_layout(logits)
    dl, ostrides = None, strides
    if write_grad:
        if inplace:
            dl = lg
        else:
            dl = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            ostrides = contiguous_row_strides(dims, V)
    flat = lambda t: t.to(acc).reshape(-1).contiguous()  # noqa: E731  (O(B T) copies at most)
    m = mask.to(acc)
    base_kind = kl_kind.rstrip("+")
    kl_val = KL_CODES[base_kind]
    kl_grad = KL_CODES["k2"] if kl_kind.endswith("+") else kl_val
    tok = tokens.reshape(-1).contiguous()
    old = flat(old_logp)
    ref = None if ref_logp is None else flat(ref_logp)
    inv_temp = 1.0 / temperature
    scalars = dict(inv_temp=inv_temp, ignore_index=ignore_index, lo=lo, hi=hi, dual=dual_clip,
                   kl_coef=kl_coef, kl_val=kl_val, kl_grad=kl_grad, ent_coef=entropy_coef,
                   write_grad=write_grad)
    if backend == "native":  # the C++ loop does the rows' sums and statistics itself
        adv = advantages.to(acc).reshape(-1).contiguous()
        loss, stats, aux = launchers(backend, "fused_loss").fused_loss_fwd(
            lg, dl, dims, strides, ostrides, V, B, T, tok, old, adv, ref, flat(m),
            coef.to(acc).contiguous(), seq=seq, **scalars)
        if inplace and write_grad:
            torch.autograd.graph.increment_version(logits)
        return loss, stats, aux.view(7, B, T)[1:4].clone(), dl

    k = launchers(backend, "fused_loss")
    seg = None if cu_seqlens is None else reference.segment_ids(cu_seqlens, T)

    def row_sums(x):  # [B, T] -> per row [B], or per segment [S] (packed; deterministic)
        if seg is None:
            return x.sum(-1)
        return reference.segment_sum(x.reshape(-1), cu_seqlens)

    def per_token(x):  # [B] / [S] -> [B * T]
        return (x.unsqueeze(-1).expand(B, T) if seg is None else x[seg]).reshape(-1).contiguous()

    w = per_token(coef) * m.reshape(-1)
    adv_row = advantages.dim() == 1 and seg is None
    adv = flat(advantages) if advantages.dim() == 2 or adv_row else per_token(advantages.to(acc))
    # the kernel finds the row of token n as n // k_rows; packed: every [N] vector is per token
    k_rows = T if seg is None else 1
    seq_lr = lse = lp_in = ent_in = None
    if seq:
        # GSPO pass 1: logp / entropy / logsumexp of every token, then the rows' mean log-ratio
        # (verl: sum_t m (logp - old) / max(sum_t m, 1), NaN outside the mask ignored).
        lp_in, ent_in, lse = logprobs_stats(logits, tokens, temperature, ignore_index, backend)
        lp_in, ent_in, lse = lp_in.reshape(-1), ent_in.reshape(-1), lse.reshape(-1, 2)
        d = lp_in.view(B, T) - old.view(B, T)
        seq_lr = (row_sums(torch.where(m != 0, d, torch.zeros_like(d)) * m)
                  / row_sums(m).clamp(min=1)).contiguous()
        if seg is not None:
            seq_lr = per_token(seq_lr)
    aux = k.fused_loss_fwd(lg, dl, dims, strides, ostrides, V, k_rows, tok, old, adv, ref, w,
                           seq_lr, lse, lp_in, ent_in, adv_row=adv_row, **scalars)
    if inplace and write_grad:
        torch.autograd.graph.increment_version(logits)
    aux = aux.view(k.N_AUX, B, T)
    valid = m != 0

    def terms(x):  # where(m != 0, x, 0) * m: NaN outside the mask never leaks in
        return torch.where(valid, x, torch.zeros_like(x)) * m

    L, lp, ent, kl, clipped, lower, akl = aux.unbind(0)
    sums = row_sums(terms(L))
    loss = torch.where(coef != 0, coef * sums, torch.zeros_like(sums)).sum()
    den = m.sum() + MASKED_EPS
    stats = torch.stack([terms(x).sum() for x in (clipped, lower, akl, ent, kl)]) / den
    return loss, stats, aux[1:4].clone(), dl


# ---------------------------------------------------------------------------------------------
# custom ops: the fused loss (gradient into a fresh buffer, or over the logits) and its backward
# ---------------------------------------------------------------------------------------------

def _fused_impl(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                mask: Tensor, ref_logp: Optional[Tensor], coef: Tensor, kl_coef: float,
                kl_kind: str, entropy_coef: float, lo: float, hi: float,
                dual_clip: Optional[float], temperature: float, seq: bool, ignore_index: int,
                write_grad: bool, cu_seqlens: Optional[Tensor], backend: str
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, stats, per_token, dl = _forward(
        logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind,
        entropy_coef, lo, hi, dual_clip, temperature, seq, ignore_index, write_grad, False,
        cu_seqlens, backend)
    if dl is None:
        dl = logits.new_empty((0,))
    return loss, stats, per_token, dl


def _fake_outputs(logits, coef):
    B, T, _ = logits.shape
    acc = coef.dtype
    return (logits.new_empty((), dtype=acc), logits.new_empty((5,), dtype=acc),
            logits.new_empty((3, B, T), dtype=acc))


def _fused_fake(logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind,
                entropy_coef, lo, hi, dual_clip, temperature, seq, ignore_index, write_grad,
                cu_seqlens, backend):
    dl = logits.new_empty(logits.shape if write_grad else (0,))
    return (*_fake_outputs(logits, coef), dl)


def _fused_ib_impl(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                   mask: Tensor, ref_logp: Optional[Tensor], coef: Tensor, kl_coef: float,
                   kl_kind: str, entropy_coef: float, lo: float, hi: float,
                   dual_clip: Optional[float], temperature: float, seq: bool, ignore_index: int,
                   write_grad: bool, cu_seqlens: Optional[Tensor], backend: str
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    # Writes d loss / d logits over ``logits`` when write_grad (see the module docstring).
    loss, stats, per_token, _ = _forward(
        logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind,
        entropy_coef, lo, hi, dual_clip, temperature, seq, ignore_index, write_grad, True,
        cu_seqlens, backend)
    return loss, stats, per_token


def _fused_ib_fake(logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind,
                   entropy_coef, lo, hi, dual_clip, temperature, seq, ignore_index, write_grad,
                   cu_seqlens, backend):
    return _fake_outputs(logits, coef)


def _rescale(grad: Tensor, applied: Tensor, g: Tensor, backend: str) -> None:
    """Make ``grad`` hold the gradient for upstream gradient ``g``: ``grad *= g / applied`` and
    ``applied = g`` (so a repeated backward rescales correctly); nothing of ``grad`` is touched
    when the factor is exactly 1 (checked on the device by the Triton launcher, on the host by
    the native path).  Writes through ``.data``: no autograd version bump of its own."""
    factor = g.detach().to(applied.dtype).reshape(()) / applied
    applied.data.copy_(g.detach().reshape(()))
    lg, dims, strides = rows_layout(grad)
    if backend == "native" or lg.data_ptr() != grad.data_ptr() or lg.stride() != grad.stride():
        if backend != "native" or float(factor) != 1.0:
            grad.data.mul_(factor.to(grad.dtype))
        return
    launchers(backend, "fused_loss").scale_rows(lg, dims, strides, grad.shape[-1], factor)


def _scale_impl(grad: Tensor, applied: Tensor, g: Tensor, backend: str) -> None:
    _rescale(grad, applied, g, backend)


def _scale_fake(grad, applied, g, backend):
    return None


# The traceable form of _rescale (under torch.compile).
_scale_ = Op("fused_ppo_loss_scale_", _scale_impl, _scale_fake, mutates_args=("grad", "applied"))

_N_INPUTS = 19
_WRITE_GRAD = 16  # index of write_grad among the op's inputs


def _save(ctx, inputs, buf):
    # Only the loss is differentiable; without this autograd would hand backward a zero-filled
    # tensor for every other output -- one of them is the [.., V]-sized gradient buffer.
    ctx.set_materialize_grads(False)
    write_grad, coef = inputs[_WRITE_GRAD], inputs[6]
    ctx.backend = inputs[-1]
    # the upstream-gradient factor currently applied to ``buf`` (1: as the forward stored it)
    applied = torch.ones((), dtype=coef.dtype, device=coef.device) if write_grad else None
    ctx.save_for_backward(buf if write_grad else None, applied)


def _setup(ctx, inputs, output):
    _save(ctx, inputs, output[3])
    ctx.mark_non_differentiable(*output[1:])


def _setup_ib(ctx, inputs, output):
    _save(ctx, inputs, inputs[0])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, gloss, *_):
    buf, applied = ctx.saved_tensors
    if gloss is None or buf is None:
        return (None,) * _N_INPUTS
    if type(buf) is Tensor and not torch.compiler.is_compiling():
        # Eager: scale without bumping the version counters of the saved tensors, so that a
        # repeated backward (retain_graph=True, gradcheck) can still unpack them.
        _rescale(buf, applied, gloss, ctx.backend)
    else:
        _scale_(buf, applied, gloss, ctx.backend)
    return (buf,) + (None,) * (_N_INPUTS - 1)


_fused = Op("fused_ppo_loss", _fused_impl, _fused_fake, setup=_setup, backward=_backward)
_fused_ib = Op("fused_ppo_loss_ib", _fused_ib_impl, _fused_ib_fake, setup=_setup_ib,
               backward=_backward)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

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
            autograd raises if another op saved them for its backward).  Triton and native
            backends; falls back to a fresh buffer when ``logits`` cannot take the gradient in
            place (a non-unit vocab stride, an expanded or self-overlapping view).
        ignore_index: see ``tokens``.
        backend: ``"auto" | "triton" | "native" | "reference"`` (see :mod:`fastrlhf.backend`).
        process_group, vocab_start_index: vocab parallelism, as :func:`token_logprobs`:
            ``logits`` hold this rank's vocab slice, ``tokens`` are full-vocab ids; every rank
            returns the same loss and stats, and its slice's gradient.  This path is the
            composition (vocab-parallel ``token_logprobs`` with entropy, then the O(B T) loss
            terms): the slice is read in the forward, read again and the gradient written in
            the backward (``inplace_backward``: over ``logits``, Triton backend) -- not the
            single fused sweep, because the per-token loss derivatives need the global
            log-prob and entropy, known only after the all-reduce.  Communication: ``N`` + ``3N``
            floats.  See :mod:`fastrlhf.ops.parallel`.
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
    check_logits(OP, logits, dim=3)
    B, T, V = logits.shape
    (kl_coef, entropy_coef, kl_kind, clip_low, clip_high, dual_clip, kw,
     mask) = check_fused_loss_args(
        OP, B, T, tokens, old_logp, advantages, mask, ref_logp, kl_coef, kl_kind, entropy_coef,
        clip_low, clip_high, dual_clip, ratio_level, inplace_backward, agg, agg_kwargs,
        cu_seqlens, "logits", logits, "the leading shape of logits")
    temperature = check_positive_float(OP, "temperature", temperature)
    ignore_index = check_int(OP, "ignore_index", ignore_index)
    packed = cu_seqlens is not None
    if packed and backend == "native":
        raise ValueError(f"{OP}: cu_seqlens (packed sequences) is not supported by the native "
                         "backend; use backend='auto', 'triton' or 'reference'")
    which = resolve_backend(backend, logits.device, op=OP, native_ok=not packed)
    acc = acc_dtype(logits)
    old_logp, advantages = old_logp.detach(), advantages.detach()
    ref_logp = None if ref_logp is None else ref_logp.detach()
    if packed:
        kw = {**kw, "cu_seqlens": cu_seqlens}
    if process_group is not None:
        logp, ent = vocab_parallel_token_logprobs(
            logits, tokens, temperature, ignore_index, process_group, vocab_start_index, which,
            inplace_backward and which == "triton", keep=mask != 0, op=OP)
        return compose_ppo_loss(logp, ent, old_logp, advantages, mask, ref_logp, kl_coef,
                                kl_kind, entropy_coef, clip_low, clip_high, dual_clip, agg,
                                ratio_level, which, kw)
    if vocab_start_index is not None:
        raise ValueError(f"{OP}: vocab_start_index is only meaningful with process_group")
    if which == "reference":
        tokens = checked_tokens(OP, tokens, V, ignore_index)
        return reference.fused_ppo_loss(
            logits, tokens, old_logp, advantages, mask, ref_logp, kl_coef, kl_kind, entropy_coef,
            clip_low, clip_high, dual_clip, temperature, agg, ratio_level, ignore_index, **kw)
    kw.pop("cu_seqlens", None)
    coef = reference.agg_row_weights(mask, agg, dtype=acc, cu_seqlens=cu_seqlens, **kw)
    write_grad = torch.is_grad_enabled() and logits.requires_grad
    fn = _fused_ib if inplace_backward and inplace_ok(logits) else _fused
    out = fn(logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind,
             entropy_coef, 1.0 - clip_low, 1.0 + clip_high, dual_clip, temperature,
             ratio_level == "sequence", ignore_index, write_grad,
             cu_seqlens.detach().contiguous() if packed else None, which)
    loss, scal, per_token = out[0], out[1], out[2]
    stats = {"logp": per_token[0], "entropy": per_token[1], "kl": per_token[2],
             "clipfrac": scal[0], "clipfrac_lower": scal[1], "approx_kl": scal[2],
             "entropy_mean": scal[3], "kl_mean": scal[4]}
    return loss, stats
