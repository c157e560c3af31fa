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

With ``grad_timing="backward"`` (Triton and native) two more ops take their place:
``fastrlhf::fused_ppo_loss_deferred`` / ``fused_ppo_loss_deferred_ib`` read the logits once in the
forward (the log-prob kernel's statistics, then the per-token loss terms and the coefficients
``d loss / d logp``, ``d loss / d H`` of every token: O(B T) saved) and their backward,
``fastrlhf::fused_ppo_loss_grad`` (fresh buffer) / ``fused_ppo_loss_grad_`` (over the logits),
sweeps the logits once with the upstream gradient folded into those coefficients.

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

from .. import config, reference
from ..backend import resolve as resolve_backend
from ..tables import FUSED_AUX, FUSED_STATS, FUSED_TERM_ROWS, KL_CODES, MASKED_EPS, acc_dtype
from .common import (with_contract, check_fused_loss_args, check_logits, check_positive_float,
                     check_int, fused_stats, check_token_range, checked_tokens,
                     contiguous_row_strides, raise_bad_token, grad_empty, grad_rows, mul_unrounded_,
                     rows_layout)
from .logprobs import inplace_ok, logprobs_stats, vocab_parallel_token_logprobs
from .losses import compose_ppo_loss
from .registry import Op, launchers

__all__ = ["fused_ppo_loss", "FUSED_STATS", "GRAD_TIMINGS"]

OP = "fused_ppo_loss"
# When the Triton / native backend writes d loss / d logits: see fused_ppo_loss(grad_timing=...).
GRAD_TIMINGS = ("forward", "backward")


# ---------------------------------------------------------------------------------------------
# the forward (one implementation, both backends underneath)
# ---------------------------------------------------------------------------------------------

def _forward(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
             ref_logp: Optional[Tensor], coef: Tensor, kl_coef: float, kl_kind: str,
             entropy_coef: float, lo: float, hi: float, dual_clip: Optional[float],
             temperature: float, seq: bool, ignore_index: int, write_grad: bool, inplace: bool,
             cu_seqlens: Optional[Tensor], backend: str, defer: bool = False):
    """Returns (loss [], stats [5], per_token [3, B, T], dlogits or None, lse, coefs).

    ``defer`` (``write_grad`` False): the statistics come from the log-prob pass and the kernel
    only forms the per-token terms (native: one call does both); ``lse`` ``[N, 2]`` and
    ``coefs`` ``[2, N]`` (d loss / d logp, d loss / d H) are returned for the deferred backward
    (else None).

    Packed layout (``cu_seqlens``, ``B = 1``, Triton only): ``coef`` is per segment ``[S]``; the
    per-token weights, per-sequence advantages and GSPO ratios are gathered to ``[total]``
    vectors through the tokens' segment ids (O(total); the logits are read in place as
    always)."""
    B, T, V = logits.shape
    acc = coef.dtype
    if backend != "native":  # the native call checks the ids itself
        check_token_range(OP, tokens, V, ignore_index)
    lg, dims, strides = rows_layout(logits)
    dl, ostrides = None, strides
    if write_grad:
        if inplace:
            dl = lg
        else:
            dl = grad_empty(logits.shape, logits.dtype, logits.device)
            ostrides = contiguous_row_strides(dims, V)
    base_kind = kl_kind.rstrip("+")
    kl_val = KL_CODES[base_kind]
    kl_grad = KL_CODES["k2"] if kl_kind.endswith("+") else kl_val
    inv_temp = 1.0 / temperature
    scalars = dict(inv_temp=inv_temp, ignore_index=ignore_index, lo=lo, hi=hi, dual=dual_clip,
                   kl_coef=kl_coef, kl_val=kl_val, kl_grad=kl_grad, ent_coef=entropy_coef,
                   write_grad=write_grad)
    if backend == "native":
        # One extension call: the C++ side flattens / converts the per-token inputs, checks the
        # ids and does the rows' sums and statistics (a few microseconds of Python per call
        # where the same steps as tensor ops here cost ~5 us each on a small CPU).
        loss, stats, per_token, bad, lse, coefs = launchers(backend, "fused_loss").fused_loss_call(
            lg, dl, dims, strides, ostrides, V, B, T, tokens, old_logp, advantages, ref_logp,
            mask, coef, seq=seq, check_tokens=config.check_tokens_enabled(), defer=defer,
            **scalars)
        if bad >= 0:
            raise_bad_token(OP, tokens, V, ignore_index)
        if inplace and write_grad:
            torch.autograd.graph.increment_version(logits)
        return loss, stats, per_token, dl, lse, coefs

    flat = lambda t: t.to(acc).reshape(-1).contiguous()  # noqa: E731  (O(B T) copies at most)
    m = mask.to(acc)
    tok = tokens.reshape(-1).contiguous()
    old = flat(old_logp)
    ref = None if ref_logp is None else flat(ref_logp)

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
    if seq or defer:
        # The log-prob pass: logp / entropy / logsumexp of every token.  GSPO needs the rows'
        # mean log-ratio before any token's loss (verl: sum_t m (logp - old) / max(sum_t m, 1),
        # NaN outside the mask ignored); a deferred gradient needs the row statistics later.
        lp_in, ent_in, lse = logprobs_stats(logits, tokens, temperature, ignore_index, backend)
        lp_in, ent_in, lse = lp_in.reshape(-1), ent_in.reshape(-1), lse.reshape(-1, 2)
    if seq:
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

    L, lp, ent, kl, clipped, lower, akl = aux[:FUSED_TERM_ROWS].unbind(0)
    sums = row_sums(terms(L))
    loss = torch.where(coef != 0, coef * sums, torch.zeros_like(sums)).sum()
    den = m.sum() + MASKED_EPS
    stats = torch.stack([terms(x).sum() for x in (clipped, lower, akl, ent, kl)]) / den
    g, lp = FUSED_AUX["g_lp"], FUSED_AUX["logp"]  # (g_lp, g_h), (logp, entropy, kl)
    coefs = aux[g:g + 2].reshape(2, -1) if defer else None
    return loss, stats, aux[lp:lp + 3].clone(), dl, lse, coefs


# ---------------------------------------------------------------------------------------------
# custom ops: the fused loss (gradient into a fresh buffer, or over the logits) and its backward
# ---------------------------------------------------------------------------------------------

def _fused_impl(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                mask: Tensor, ref_logp: Optional[Tensor], coef: Tensor, kl_coef: float,
                kl_kind: str, entropy_coef: float, lo: float, hi: float,
                dual_clip: Optional[float], temperature: float, seq: bool, ignore_index: int,
                write_grad: bool, cu_seqlens: Optional[Tensor], backend: str
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, stats, per_token, dl, _, _ = _forward(
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
    loss, stats, per_token, _, _, _ = _forward(
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
    ``applied = g`` (so a repeated backward rescales correctly).  Nothing is done when ``g``
    equals the factor already applied (1 for ``loss.backward()``): checked on the host for the
    native backend (CPU tensors: two reads, no tensor op), on the device by the Triton
    launcher.  Writes through ``.data``: no autograd version bump of its own."""
    if backend == "native" and float(g) == float(applied):
        return
    factor = g.detach().to(applied.dtype).reshape(()) / applied
    applied.data.copy_(g.detach().reshape(()))
    lg, dims, strides = rows_layout(grad)
    if lg.data_ptr() != grad.data_ptr() or lg.stride() != grad.stride():
        mul_unrounded_(grad.data, factor)  # rows that were copied: scale the tensor itself
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


_fused = Op("fused_ppo_loss", _fused_impl, _fused_fake, setup=_setup, backward=_backward,
            fast_eager=True)
_fused_ib = Op("fused_ppo_loss_ib", _fused_ib_impl, _fused_ib_fake, setup=_setup_ib,
               backward=_backward, fast_eager=True)


# ---------------------------------------------------------------------------------------------
# grad_timing="backward": the forward reads the logits once for the statistics; the backward
# sweeps them once with the upstream gradient folded into the per-token coefficients
# ---------------------------------------------------------------------------------------------

def _deferred_impl(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                   mask: Tensor, ref_logp: Optional[Tensor], coef: Tensor, kl_coef: float,
                   kl_kind: str, entropy_coef: float, lo: float, hi: float,
                   dual_clip: Optional[float], temperature: float, seq: bool, ignore_index: int,
                   cu_seqlens: Optional[Tensor], backend: str
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss, stats, per_token, _, lse, coefs = _forward(
        logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind,
        entropy_coef, lo, hi, dual_clip, temperature, seq, ignore_index, False, False,
        cu_seqlens, backend, defer=True)
    return loss, stats, per_token, lse, coefs.clone()  # its own storage (opcheck: no offset)


def _deferred_fake(logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind,
                   entropy_coef, lo, hi, dual_clip, temperature, seq, ignore_index, cu_seqlens,
                   backend):
    B, T, _ = logits.shape
    acc = coef.dtype
    return (*_fake_outputs(logits, coef), logits.new_empty((B * T, 2), dtype=acc),
            logits.new_empty((2, B * T), dtype=acc))


def _grad_into(logits: Tensor, out: Optional[Tensor], tokens: Tensor, lse: Tensor, ent: Tensor,
               coefs: Tensor, upstream: Tensor, temperature: float, ignore_index: int,
               has_ent: bool, backend: str) -> Tensor:
    """One sweep: ``upstream * (g_lp (onehot - p) - g_H p (log p + H)) / T`` into ``out``
    (``logits`` itself) or a fresh buffer (``out=None``)."""
    out, lg, dims, strides, ob, ostrides = grad_rows(logits, out)
    launchers(backend, "fused_loss").fused_loss_grad(
        lg, ob, dims, strides, ostrides, logits.shape[-1], tokens.reshape(-1).contiguous(), lse,
        ent.reshape(-1).contiguous(), coefs[0], coefs[1], upstream.detach(),
        inv_temp=1.0 / temperature, ignore_index=ignore_index, has_ent=has_ent)
    return out


def _dgrad_impl(logits: Tensor, tokens: Tensor, lse: Tensor, ent: Tensor, coefs: Tensor,
                upstream: Tensor, temperature: float, ignore_index: int, has_ent: bool,
                backend: str) -> Tensor:
    return _grad_into(logits, None, tokens, lse, ent, coefs, upstream, temperature, ignore_index,
                      has_ent, backend)


def _dgrad_fake(logits, tokens, lse, ent, coefs, upstream, temperature, ignore_index, has_ent,
                backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _dgrad_inplace_impl(logits: Tensor, tokens: Tensor, lse: Tensor, ent: Tensor, coefs: Tensor,
                        upstream: Tensor, temperature: float, ignore_index: int, has_ent: bool,
                        backend: str) -> None:
    _grad_into(logits, logits, tokens, lse, ent, coefs, upstream, temperature, ignore_index,
               has_ent, backend)


def _dgrad_inplace_fake(logits, tokens, lse, ent, coefs, upstream, temperature, ignore_index,
                        has_ent, backend):
    return None


_dgrad = Op("fused_ppo_loss_grad", _dgrad_impl, _dgrad_fake, fast_eager=True)
_dgrad_inplace = Op("fused_ppo_loss_grad_", _dgrad_inplace_impl, _dgrad_inplace_fake,
                    mutates_args=("logits",), fast_eager=True)

_N_DEFERRED_INPUTS = 18


def _setup_deferred(ctx, inputs, output, *, inplace: bool = False):
    ctx.set_materialize_grads(False)
    logits, tokens = inputs[0], inputs[1]
    ctx.save_for_backward(logits, tokens, output[3], output[2][1], output[4])
    ctx.temperature, ctx.ignore_index = inputs[13], inputs[15]
    ctx.has_ent = inputs[9] != 0.0
    ctx.backend = inputs[-1]
    ctx.inplace = inplace
    ctx.mark_non_differentiable(*output[1:])


def _setup_deferred_ib(ctx, inputs, output):
    _setup_deferred(ctx, inputs, output, inplace=True)


def _backward_deferred(ctx, gloss, *_):
    if gloss is None:
        return (None,) * _N_DEFERRED_INPUTS
    logits, tokens, lse, ent, coefs = ctx.saved_tensors
    args = (tokens, lse, ent, coefs, gloss.reshape(()).to(coefs.dtype), ctx.temperature,
            ctx.ignore_index, ctx.has_ent, ctx.backend)
    if ctx.inplace:
        _dgrad_inplace(logits, *args)
        grad = logits
    else:
        grad = _dgrad(logits, *args)
    return (grad,) + (None,) * (_N_DEFERRED_INPUTS - 1)


_deferred = Op("fused_ppo_loss_deferred", _deferred_impl, _deferred_fake, setup=_setup_deferred,
               backward=_backward_deferred, fast_eager=True)
# The same forward whose backward writes the gradient over the logits (inplace_backward).
_deferred_ib = Op("fused_ppo_loss_deferred_ib", _deferred_impl, _deferred_fake,
                  setup=_setup_deferred_ib, backward=_backward_deferred, fast_eager=True)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def _constant(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` without its autograd history (the loss treats it as a constant): detached only when
    it requires grad -- a detach is a tensor call, tens of microseconds right after other work
    has left the caches cold (bench/bench_cpu_layers.py), and these inputs rarely need one."""
    return t.detach() if t is not None and t.requires_grad else t


@with_contract(reference.fused_ppo_loss)
def fused_ppo_loss(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                   mask: Tensor, *, ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0,
                   kl_kind: str = "k3", entropy_coef: float = 0.0, clip_low: float = 0.2,
                   clip_high: Optional[float] = None, dual_clip: Optional[float] = None,
                   temperature: float = 1.0, agg: str = "token-mean", ratio_level: str = "token",
                   inplace_backward: bool = False, ignore_index: int = -100,
                   backend: str = "auto", process_group=None,
                   vocab_start_index: Optional[int] = None, cu_seqlens: Optional[Tensor] = None,
                   grad_timing: str = "forward", **agg_kwargs):
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
        grad_timing: when the Triton and native backends compute d loss / d logits (the values
            are the same; only the memory traffic differs, see Cost):

            * ``"forward"`` (default): in the forward launch, right after each row's statistics,
              while the row is still in L2; the backward multiplies the stored gradient by the
              upstream gradient -- free when that is exactly 1 (``loss.backward()``), one more
              read + write of the gradient otherwise.
            * ``"backward"``: the forward only reads the logits (statistics, O(B T) saved); the
              backward sweeps them once and writes the gradient with the upstream gradient
              folded into the per-token coefficients -- one read + one write for *any* upstream
              gradient, no extra pass and no launch that depends on its value.  Use it when
              the loss is scaled before ``backward()`` (gradient accumulation ``loss / k``,
              DeepSpeed / accelerate loss scaling, a sum of several losses).  The logits stay
              alive until the backward (with ``inplace_backward`` the gradient is written
              over them there).

            The native backend does the same with its own passes: ``"forward"`` keeps each row's
            exp terms from the statistics sweep for the gradient sweep right after it (on the
            CPU the upstream factor is checked on the host: no scaling pass when it is 1);
            ``"backward"`` reads the logits once in the forward and once in the backward, with
            the exp terms computed again (measured on a 2-core Xeon at 4 x 64 x 8192 bf16:
            upstream 0.25 1.43 -> 1.19 ms, upstream 1 0.98 -> 1.17 ms, forward + backward).
            The reference and the vocab-parallel path differentiate the composition, which is
            already a backward-time sweep.

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
    * backward (``grad_timing="forward"``): the stored gradient times the upstream gradient, in
      place: no memory traffic when that is exactly 1 (``loss.backward()``; one small launch of
      at most a few programs per SM checks it on the device), else one read and one write.
    * ``grad_timing="backward"``: forward one read (the log-prob kernel's statistics sweep);
      backward one read and one write, the upstream gradient folded in: for a scaled loss
      two reads and one write in all instead of two reads and two writes.
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
    if grad_timing not in GRAD_TIMINGS:
        raise ValueError(f"{OP}: grad_timing must be one of {GRAD_TIMINGS}, got {grad_timing!r}")
    packed = cu_seqlens is not None
    if packed and backend == "native":
        raise ValueError(f"{OP}: cu_seqlens (packed sequences) is not supported by the native "
                         "backend; use backend='auto', 'triton' or 'reference'")
    which = resolve_backend(backend, logits.device, op=OP, native_ok=not packed)
    acc = acc_dtype(logits)
    old_logp, advantages, ref_logp = _constant(old_logp), _constant(advantages), _constant(ref_logp)
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
    ib = inplace_backward and inplace_ok(logits)
    args = (logits, tokens, old_logp, advantages, mask, ref_logp, coef, kl_coef, kl_kind,
            entropy_coef, 1.0 - clip_low, 1.0 + clip_high, dual_clip, temperature,
            ratio_level == "sequence", ignore_index)
    cu = cu_seqlens.detach().contiguous() if packed else None
    if grad_timing == "backward" and write_grad and which in ("triton", "native"):
        out = (_deferred_ib if ib else _deferred)(*args, cu, which)
    else:
        out = (_fused_ib if ib else _fused)(*args, write_grad, cu, which)
    loss, scal, per_token = out[0], out[1], out[2]
    return loss, fused_stats(scal, per_token)
