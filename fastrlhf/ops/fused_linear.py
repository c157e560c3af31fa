"""linear_token_logprobs: token log-probs and entropy straight from hidden states.

``logits = hidden @ weight.T + bias`` (the lm_head) is folded into the kernels chunk by chunk,
so neither the logits nor anything else of size [N, V] is ever allocated: the forward keeps only
per-row partials, the backward recomputes the logits tiles from the saved logsumexp, one vocab
chunk at a time (:func:`fused_linear_ppo_loss` on the native backend instead produces its
gradients in the forward, see there).  Two backends implement the launchers: the Triton kernels
(:mod:`fastrlhf.kernels.fused_linear`, CUDA) and the C++ one (``csrc/fused_linear.cpp`` through
:mod:`fastrlhf.native`, CPU tensors: ATen matmul per vocab chunk + an online logsumexp).

The public entry checks its arguments, picks a backend and calls either the eager reference or the
registered ``torch.library`` op ``fastrlhf::linear_token_logprobs`` (autograd formula: the
backend's backward launcher), so ``torch.compile(fullgraph=True)`` traces it without graph
breaks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import config, reference
from ..backend import resolve as resolve_backend
from ..tables import FLOAT_DTYPES, FUSED_AUX, INT_DTYPES, KL_CODES, acc_dtype
from .common import (with_contract, check_bool, check_fused_loss_args, check_int, check_positive_float,
                     fused_stats,
                     check_same_device, check_shape, check_tensor, check_token_range,
                     checked_tokens, rows_layout)
from .logprobs import vocab_parallel_token_logprobs
from .losses import compose_ppo_loss
from .parallel import (NO_IGNORE, check_full_vocab, check_group, combine_softmax_stats,
                       copy_to_group, slice_start, split_tokens, zero_rows_where)
from .registry import LAUNCH_BACKENDS, Op, launchers

__all__ = ["linear_token_logprobs", "fused_linear_ppo_loss"]


def _weight_view(weight: Tensor) -> Tensor:
    return weight if (weight.shape[1] <= 1 or weight.stride(1) == 1) else weight.contiguous()


# ---------------------------------------------------------------------------------------------
# launch (kernels.fused_linear on "triton", fastrlhf.native on "native": same names / results)
# ---------------------------------------------------------------------------------------------

def linear_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                 temperature: float, ignore_index: int, backend: str):
    """``(logp, entropy, lse [..., 2])`` of the logits ``hidden @ weight.T + bias`` (no check)."""
    h, dims, strides = rows_layout(hidden)
    tok = tokens.reshape(-1).contiguous()
    b = None if bias is None else bias.contiguous()
    logp, ent, lse = launchers(backend, "fused_linear").linear_logprobs_fwd(
        h, dims, strides, _weight_view(weight), b, tok, 1.0 / temperature, ignore_index)
    lead = hidden.shape[:-1]
    return logp.view(lead), ent.view(lead), lse.view(*lead, 2)


# ---------------------------------------------------------------------------------------------
# custom ops: forward, backward, autograd formula
# ---------------------------------------------------------------------------------------------

def _lin_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
              temperature: float, ignore_index: int, backend: str
              ) -> Tuple[Tensor, Tensor, Tensor]:
    check_token_range("linear_token_logprobs", tokens, weight.shape[0], ignore_index)
    return linear_stats(hidden, weight, bias, tokens, temperature, ignore_index, backend)


def _lin_fake(hidden, weight, bias, tokens, temperature, ignore_index, backend):
    acc = acc_dtype(hidden)
    lead = hidden.shape[:-1]
    return (hidden.new_empty(lead, dtype=acc), hidden.new_empty(lead, dtype=acc),
            hidden.new_empty((*lead, 2), dtype=acc))


def _lin_bwd_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                  dlogp: Optional[Tensor], dent: Optional[Tensor], lse: Tensor, ent: Tensor,
                  temperature: float, ignore_index: int, need_dh: bool, need_dw: bool,
                  need_db: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dhidden, dweight, dbias); a gradient that is not needed comes back with 0 elements."""
    h, dims, strides = rows_layout(hidden)
    flat = lambda t: None if t is None else t.reshape(-1).contiguous()  # noqa: E731
    need_db = need_db and bias is not None
    dh, dw, db = launchers(backend, "fused_linear").linear_logprobs_bwd(
        h, dims, strides, _weight_view(weight), None if bias is None else bias.contiguous(),
        flat(tokens), flat(dlogp), flat(dent), lse.reshape(-1, 2).contiguous(), flat(ent),
        1.0 / temperature, ignore_index, need_dh, need_dw, need_db)
    return (dh.view(hidden.shape) if dh is not None else hidden.new_zeros(0),
            dw if dw is not None else weight.new_zeros(0),
            db if db is not None else (weight if bias is None else bias).new_zeros(0))


def _lin_bwd_fake(hidden, weight, bias, tokens, dlogp, dent, lse, ent, temperature, ignore_index,
                  need_dh, need_dw, need_db, backend):
    need_db = need_db and bias is not None
    return (hidden.new_empty(hidden.shape if need_dh else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,)),
            (bias if need_db else weight).new_empty(bias.shape if need_db else (0,)))


_lin_bwd = Op("linear_token_logprobs_bwd", _lin_bwd_impl, _lin_bwd_fake, fast_eager=True)


def _lin_setup(ctx, inputs, output):
    hidden, weight, bias, tokens, temperature, ignore_index, backend = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, tokens, lse, ent)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)
    # An output nobody differentiates (often the entropy, logged only) then arrives as None and
    # its term is left out of the backward kernel instead of being multiplied by zeros.
    ctx.set_materialize_grads(False)


def _lin_backward(ctx, dlogp, dent, dlse):
    hidden, weight, bias, tokens, lse, ent = ctx.saved_tensors
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and bias is not None
    if (dlogp is None and dent is None) or not (need_dh or need_dw or need_db):
        return None, None, None, None, None, None, None
    dh, dw, db = _lin_bwd(hidden, weight, bias, tokens, dlogp, dent, lse, ent, ctx.temperature,
                          ctx.ignore_index, need_dh, need_dw, need_db, ctx.backend)
    return (dh if need_dh else None, dw if need_dw else None, db if need_db else None,
            None, None, None, None)


_linear_token_logprobs = Op("linear_token_logprobs", _lin_impl, _lin_fake, setup=_lin_setup,
                            backward=_lin_backward, fast_eager=True)


# ---------------------------------------------------------------------------------------------
# the loss with its gradients produced in the forward (native backend, token-level ratio)
# ---------------------------------------------------------------------------------------------
#
# fused_linear_ppo_loss returns a scalar and, with a token-level ratio, d loss / d logits of a
# row depends on that row alone (the aggregation weights come from the mask), so the C++ loop
# forms dhidden / dweight / dbias while it has the logits of a row block at hand: three GEMMs
# (6NHV flops) where linear_token_logprobs' forward + recomputing backward take four (8NHV).
# The backward only scales the stored gradients by the upstream gradient.  (GSPO's sequence
# ratio, vocab parallelism and packed sequences keep the composition below.)

_LOSSGRAD_INPUTS = 21


def _lossgrad_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                   old_logp: Tensor, advantages: Tensor, mask: Tensor, ref_logp: Optional[Tensor],
                   coef: Tensor, kl_coef: float, kl_kind: str, entropy_coef: float, lo: float,
                   hi: float, dual_clip: Optional[float], temperature: float, ignore_index: int,
                   need_dh: bool, need_dw: bool, need_db: bool, backend: str
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, _ = hidden.shape
    check_token_range("fused_linear_ppo_loss", tokens, weight.shape[0], ignore_index)
    acc = coef.dtype
    h, dims, strides = rows_layout(hidden)
    flat = lambda t: t.to(acc).reshape(-1).contiguous()  # noqa: E731  (O(B T) copies at most)
    kl_val = KL_CODES[kl_kind.rstrip("+")]
    need_db = need_db and bias is not None
    loss, stats, aux, dh, dw, db = launchers(backend, "fused_linear").fused_linear_loss_fwd(
        h, dims, strides, _weight_view(weight), None if bias is None else bias.contiguous(), B, T,
        tokens.reshape(-1).contiguous(), flat(old_logp), flat(advantages),
        None if ref_logp is None else flat(ref_logp), flat(mask), coef.to(acc).contiguous(),
        inv_temp=1.0 / temperature, ignore_index=ignore_index, lo=lo, hi=hi, dual=dual_clip,
        kl_coef=kl_coef, kl_val=kl_val,
        kl_grad=KL_CODES["k2"] if kl_kind.endswith("+") else kl_val, ent_coef=entropy_coef,
        need_dh=need_dh, need_dw=need_dw, need_db=need_db)
    lp = FUSED_AUX["logp"]  # logp, entropy, kl: three consecutive rows
    return (loss, stats, aux.view(aux.shape[0], B, T)[lp:lp + 3].clone(),  # B may be 0
            dh.view(hidden.shape) if dh is not None else hidden.new_zeros(0),
            dw if dw is not None else weight.new_zeros(0),
            db if db is not None else (weight if bias is None else bias).new_zeros(0))


def _lossgrad_fake(hidden, weight, bias, tokens, old_logp, advantages, mask, ref_logp, coef,
                   kl_coef, kl_kind, entropy_coef, lo, hi, dual_clip, temperature, ignore_index,
                   need_dh, need_dw, need_db, backend):
    B, T, _ = hidden.shape
    acc = coef.dtype
    need_db = need_db and bias is not None
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((5,), dtype=acc),
            hidden.new_empty((3, B, T), dtype=acc),
            hidden.new_empty(hidden.shape if need_dh else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,)),
            (bias if need_db else weight).new_empty(bias.shape if need_db else (0,)))


def _lossgrad_setup(ctx, inputs, output):
    # only the loss is differentiable; its gradients w.r.t. hidden / weight / bias are outputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[3:6])
    need_dh, need_dw, need_db = inputs[17:20]
    ctx.need = (need_dh, need_dw, need_db and inputs[2] is not None)  # as _lossgrad_impl
    ctx.mark_non_differentiable(*output[1:])


def _lossgrad_backward(ctx, gloss, *_):
    if gloss is None:
        return (None,) * _LOSSGRAD_INPUTS
    if torch.compiler.is_compiling():
        def scaled(buf):  # traced: one fused multiply, rounded once to the buffer's dtype
            return (buf.to(gloss.dtype) * gloss).to(buf.dtype)
    else:
        g = float(gloss)

        def scaled(buf):  # the stored gradient itself for upstream 1 (loss.backward())
            return buf if g == 1.0 else buf.mul(g)
    grads = [scaled(buf) if need else None for buf, need in zip(ctx.saved_tensors, ctx.need)]
    return (*grads, *(None,) * (_LOSSGRAD_INPUTS - 3))


_lossgrad = Op("fused_linear_ppo_loss_grads", _lossgrad_impl, _lossgrad_fake,
               setup=_lossgrad_setup, backward=_lossgrad_backward, fast_eager=True)


# ---------------------------------------------------------------------------------------------
# vocab parallelism: weight (and bias) hold this rank's rows [V_r, H] of the lm_head
# ---------------------------------------------------------------------------------------------
#
# The fused lm_head forward already merges per-vocab-split partials into (logp_r, H_r, M_r,
# log S_r) of its weight rows; those are combined across ranks as any sharded softmax
# (fastrlhf.ops.parallel.combine_softmax_stats).  The backward is local for dW / db of the
# slice; dhidden is a partial sum over the slice's vocab rows on every rank and is summed with
# one all-reduce of [N, H] (the usual tensor-parallel cost of a vocab-parallel lm_head:
# Megatron's copy_to_tensor_model_parallel_region does the same all-reduce).

class _VocabParallelLinear(torch.autograd.Function):
    """Triton / native path: the fused lm_head launchers on the slice, partials combined across
    ranks."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, ignore_index, start, group,
                backend):
        V_r = weight.shape[0]
        ignored, in_slice, tokens_local = split_tokens(tokens, ignore_index, start, V_r)
        lp_r, H_r, lse = linear_stats(hidden, weight, bias, tokens_local, temperature, -1,
                                      backend)
        logp, H, M, logS = combine_softmax_stats(lp_r, H_r, lse[..., 0], lse[..., 1], in_slice,
                                                 ignored, group)
        ctx.save_for_backward(hidden, weight, bias, tokens_local, ignored, M, logS, H)
        ctx.temperature = temperature
        ctx.group = group
        ctx.backend = backend
        ctx.mark_non_differentiable(M)
        ctx.set_materialize_grads(False)
        return logp, H

    @staticmethod
    def backward(ctx, dlogp, dent):
        hidden, weight, bias, onehot, ignored, M, logS, H = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        if dlogp is None and dent is None:
            return (None,) * 9
        dlogp = zero_rows_where(dlogp, ignored)
        lse = torch.stack([M, logS], dim=-1)
        # onehot is -1 off the slice (matches no column); no id equals NO_IGNORE, and dlogp is
        # already zero where the token was ignored.
        dh, dw, db = _lin_bwd(hidden, weight, bias, onehot, dlogp, dent, lse, H,
                              ctx.temperature, NO_IGNORE, need_dh, need_dw, need_db, ctx.backend)
        if need_dh:
            # dhidden: this slice's partial sum over its vocab rows; the full gradient is the sum
            # over the ranks (one all-reduce of [N, H], in hidden's dtype).
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=ctx.group)
        return (dh if need_dh else None, dw if need_dw else None, db if need_db else None,
                None, None, None, None, None, None)


def vocab_parallel_linear_token_logprobs(hidden, weight, tokens, bias, temperature, ignore_index,
                                         process_group, vocab_start_index, backend,
                                         op="linear_token_logprobs"):
    """(logp, entropy) over the full vocab; ``weight`` / ``bias`` hold this rank's rows."""
    group = check_group(op, process_group)
    V_r = weight.shape[0]
    start = slice_start(op, group, V_r, vocab_start_index)
    if config.check_tokens_enabled():
        check_full_vocab(op, group, V_r, tokens, ignore_index)
    if backend in LAUNCH_BACKENDS:  # triton / native
        return _VocabParallelLinear.apply(hidden, weight, bias, tokens, temperature,
                                          ignore_index, start, group, backend)
    # reference: the slice's logits in plain torch (autograd gives the local dlogits,
    # dW, db; the all-reduce of dhidden is copy_to_group's backward).
    h = copy_to_group(hidden, group) if hidden.requires_grad else hidden
    logits = reference.linear_logits(h, weight, bias)
    with config.check_tokens(False):  # checked above against the full vocab
        return vocab_parallel_token_logprobs(logits, tokens, temperature, ignore_index, group,
                                             start, "reference", False, op=op)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def check_linear_args(op: str, hidden, weight, tokens, bias, temperature, ignore_index):
    """Validate the (hidden, weight, tokens, bias, temperature, ignore_index) group; returns
    ``(temperature, ignore_index)`` normalized.  Shared with :func:`fused_linear_ppo_loss`."""
    check_tensor(op, "hidden", hidden, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    V, H = weight.shape
    if V == 0:
        raise ValueError(f"{op}: weight must have a non-empty vocab (first) dim, got shape "
                         f"{tuple(weight.shape)}")
    if hidden.shape[-1] != H:
        raise ValueError(f"{op}: hidden's last dim ({hidden.shape[-1]}) must equal weight's "
                         f"second dim H = {H} (weight is [V, H] = {tuple(weight.shape)})")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight dtype {str(weight.dtype).replace('torch.', '')} must match "
                        f"hidden dtype {str(hidden.dtype).replace('torch.', '')}")
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES)
        check_shape(op, "bias", bias, (V,), "[V], one per weight row")
    check_tensor(op, "tokens", tokens, dtypes=INT_DTYPES)
    check_shape(op, "tokens", tokens, hidden.shape[:-1], "the leading shape of hidden")
    check_same_device(op, "hidden", hidden, weight=weight, bias=bias, tokens=tokens)
    temperature = check_positive_float(op, "temperature", temperature)
    ignore_index = check_int(op, "ignore_index", ignore_index)
    return temperature, ignore_index


@with_contract(reference.token_logprobs)
def linear_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, *,
                          bias: Optional[Tensor] = None, temperature: float = 1.0,
                          return_entropy: bool = False, ignore_index: int = -100,
                          backend: str = "auto", process_group=None,
                          vocab_start_index: Optional[int] = None):
    """Log-probability of ``tokens`` under ``softmax((hidden @ weight.T + bias) / temperature)``
    (and its entropy), without ever forming the logits.

    Args:
        hidden: ``[..., H]`` float16 / bfloat16 / float32 / float64 hidden states (the lm_head
            input); any strides on the leading dims (``hidden[:, :-1]`` is read in place), unit
            stride on H (else copied).
        weight: ``[V, H]`` lm_head weight (tied or not), the dtype of ``hidden``; unit stride
            on H (else copied).
        tokens: ``[...]`` int32 / int64, the leading shape of ``hidden``; ids in ``[0, V)`` or
            ``ignore_index`` (checked on the host unless disabled, see :mod:`fastrlhf.config`).
        bias: optional ``[V]`` lm_head bias (any float dtype).
        temperature: > 0.
        return_entropy: also return ``H = -sum_j p_j log p_j`` per position.
        ignore_index: positions with this token id give logp = 0 and no gradient through logp
            (their entropy is still computed).
        backend: ``"auto" | "triton" | "native" | "reference"`` (see :mod:`fastrlhf.backend`;
            ``auto`` picks ``native`` for CPU tensors when the C++ extension builds).
        process_group: vocab parallelism (tensor-parallel lm_head): ``weight`` (and ``bias``)
            hold only this rank's rows ``[vocab_start_index, vocab_start_index + V_local)`` of
            the vocab, ``hidden`` is the same on every rank and ``tokens`` are full-vocab ids.
            Forward: the per-row partials of the slice (max, log-sum-exp, entropy, the token's
            log-prob where it lies in the slice) are combined with two all-reduces of ``[N]``
            and ``[N, 3]`` floats; every rank returns the full-vocab logp / entropy.  Backward:
            ``dweight`` / ``dbias`` are local to the slice; ``dhidden`` is summed over the ranks
            with one all-reduce of ``[N, H]`` in ``hidden``'s dtype (the standard cost of a
            vocab-parallel lm_head; do not also wrap ``hidden`` in Megatron's
            ``copy_to_tensor_model_parallel_region``, which would sum it twice).  The reference
            backend forms the slice's ``[N, V_local]`` logits.  See
            :mod:`fastrlhf.ops.parallel`.
        vocab_start_index: first vocab id of this rank's rows (default ``rank * V_local``).

    Returns:
        ``logp`` ``[...]`` float32 (float64 for float64 inputs), or ``(logp, entropy)``.
        Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.

    Semantics: exactly ``token_logprobs(logits, tokens, ...)`` with
    ``logits = hidden @ weight.T + bias`` formed in float32 (float64) from the input values: the
    products accumulate in fp32 and the logits are not rounded to the input dtype (so bf16 inputs
    are *more* accurate than eager ``lm_head(hidden).float()``).  On the Triton backend fp32
    inputs multiply in tf32 unless ``torch.get_float32_matmul_precision() == "highest"`` (as torch
    matmuls); bf16 / fp16 use tensor cores with fp32 accumulation.

    Memory: O(N*H + V*H).  The forward stores ``(logp, entropy, logsumexp)`` per row; the
    backward recomputes the logits in vocab chunks of ``Vc`` columns with an ``[N, Vc]`` scratch
    buffer (``N * Vc <= max(2 N H, 2^25)`` elements, input dtype) plus an fp32 ``[N, H]`` dH
    accumulator when there is more than one chunk.  Cost: 2NHV flops forward, 6NHV backward
    (logits recompute, dH, dW).  The native (CPU) backend does the same with ATen matmuls per
    vocab chunk (fp32 copies of bf16 / fp16 operands, an fp32 ``[N, Vc]`` scratch, see
    ``csrc/fused_linear.cpp``).  Deterministic (no atomics): the same inputs give bitwise the same
    outputs and gradients on every run (native: also for any thread count).  No filtering of
    small softmax entries is done (no Cut-Cross-Entropy-style gradient sparsification): the
    gradient is exact up to rounding.
    """
    op = "linear_token_logprobs"
    temperature, ignore_index = check_linear_args(op, hidden, weight, tokens, bias, temperature,
                                                  ignore_index)
    check_bool(op, "return_entropy", return_entropy)
    which = resolve_backend(backend, hidden.device, op=op, native_ok=True)
    if process_group is not None:
        logp, ent = vocab_parallel_linear_token_logprobs(
            hidden, weight, tokens, bias, temperature, ignore_index, process_group,
            vocab_start_index, which, op=op)
        return (logp, ent) if return_entropy else logp
    if vocab_start_index is not None:
        raise ValueError(f"{op}: vocab_start_index is only meaningful with process_group")
    if which == "reference":
        tokens = checked_tokens(op, tokens, weight.shape[0], ignore_index)
        return reference.linear_token_logprobs(hidden, weight, tokens, bias, temperature,
                                               return_entropy, ignore_index)
    logp, ent, _ = _linear_token_logprobs(hidden, weight, bias, tokens, temperature, ignore_index,
                                          which)
    return (logp, ent) if return_entropy else logp


# ---------------------------------------------------------------------------------------------
# the PPO / GRPO / GSPO policy loss straight from hidden states
# ---------------------------------------------------------------------------------------------


@with_contract(reference.fused_ppo_loss)
def fused_linear_ppo_loss(hidden: Tensor, weight: Tensor, tokens: Tensor, old_logp: Tensor,
                          advantages: Tensor, mask: Tensor, *, bias: Optional[Tensor] = None,
                          ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0,
                          kl_kind: str = "k3", entropy_coef: float = 0.0, clip_low: float = 0.2,
                          clip_high: Optional[float] = None, dual_clip: Optional[float] = None,
                          temperature: float = 1.0, agg: str = "token-mean",
                          ratio_level: str = "token", inplace_backward: bool = False,
                          ignore_index: int = -100, backend: str = "auto", process_group=None,
                          vocab_start_index: Optional[int] = None,
                          cu_seqlens: Optional[Tensor] = None, **agg_kwargs):
    """``fused_ppo_loss`` of the logits ``hidden @ weight.T + bias``, without forming them.

    Definition (the same as :func:`fastrlhf.fused_ppo_loss` with
    ``logits = hidden @ weight.T + bias`` formed in float32 / float64)::

        logp, H = linear_token_logprobs(hidden, weight, tokens, bias=bias,
                                        temperature=temperature, return_entropy=True)
        loss    = ppo_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high,
                                  dual_clip, agg, ratio_level, **agg_kwargs)[0]
                  + kl_coef * agg_loss(kl_penalty(logp, ref_logp, kl_kind), mask, agg)
                  - entropy_coef * agg_loss(H, mask, agg)

    Args:
        hidden: ``[B, T, H]`` hidden states (float16 / bfloat16 / float32 / float64; any strides
            on B, T, unit stride on H); weight ``[V, H]`` lm_head weight of the same dtype;
            bias ``[V]`` or None.  Differentiable w.r.t. all three.
        tokens, old_logp, advantages, mask, ref_logp, kl_coef, kl_kind, entropy_coef, clip_low,
            clip_high, dual_clip, temperature, agg, ratio_level, ignore_index, **agg_kwargs: as
            :func:`fastrlhf.fused_ppo_loss`.
        inplace_backward: accepted for signature parity with ``fused_ppo_loss``; there is no
            logits buffer to write into, so it changes nothing.
        backend: ``"auto" | "triton" | "native" | "reference"``.
        process_group, vocab_start_index: vocab parallelism, as
            :func:`linear_token_logprobs` (``weight`` / ``bias`` hold this rank's rows): the
            vocab-parallel log-probs and entropy, then the O(B T) loss terms below on every
            rank (the same loss everywhere); ``dhidden`` all-reduced, ``dweight`` local.

        cu_seqlens: packed sequences, as :func:`fastrlhf.fused_ppo_loss`: ``hidden`` is
            ``[1, total, H]``, ``[S+1]`` boundaries; advantages ``[1, total]`` or ``[S]``; equal
            to the padded layout on the same data.

    Returns ``(loss, stats)`` with the keys of ``fused_ppo_loss``: per-token ``[B, T]``
    ``"logp"``, ``"entropy"``, ``"kl"`` (zeros without ``ref_logp``) and the 0-dim
    ``"clipfrac"``, ``"clipfrac_lower"``, ``"approx_kl"``, ``"entropy_mean"``, ``"kl_mean"``
    (detached).  ``loss`` is float32 (float64 for float64 inputs).

    How: the Triton (CUDA) or native (CPU) forward of :func:`linear_token_logprobs` gives logp
    and H per token; the per-token loss terms are the O(B T) ops above, whose autograd yields
    ``dloss/dlogp`` and ``dloss/dH`` per token; the lm_head backward launchers take those as
    upstream gradients (recomputing the logits tiles, dH / dW / db in fp32).  With
    ``cu_seqlens`` on the native backend the O(B T) loss terms run in the reference (the native
    loss kernels have no packed path); the lm_head part stays native.  Memory O(B T H + V H);
    no [B, T, V] tensor.  The reference backend materializes the logits and calls
    :func:`fastrlhf.reference.fused_ppo_loss`.

    Native backend, token-level ratio, no ``cu_seqlens`` / ``process_group``, under autograd:
    the gradients are produced in the forward instead (``csrc/fused_linear.cpp``,
    ``fused_linear_loss_fwd``): rows in blocks whose ``[R, V]`` fp32 logits (64 MB, or 256
    rows) are formed with one GEMM, the loss terms and ``d loss / d logits`` computed over them
    in place, then ``dhidden`` / ``dweight`` / ``dbias`` of the block -- 6NHV flops where the
    forward + recomputing backward take 8NHV.  The backward scales the stored gradients by the
    upstream gradient (an extra rounding for bf16 / fp16 gradients when it is not 1).  Extra
    memory: the block, the gradients from forward to backward, and for bf16 / fp16 weights an
    fp32 ``dweight`` accumulator (their weight tiles are converted to fp32 GEMM by GEMM, not
    copied whole).
    """
    op = "fused_linear_ppo_loss"
    temperature, ignore_index = check_linear_args(op, hidden, weight, tokens, bias, temperature,
                                                  ignore_index)
    if hidden.dim() != 3:
        raise ValueError(f"{op}: hidden must be 3-D [B, T, H], got shape {tuple(hidden.shape)}")
    B, T, _ = hidden.shape
    (kl_coef, entropy_coef, kl_kind, clip_low, clip_high, dual_clip, kw,
     mask) = check_fused_loss_args(
        op, B, T, tokens, old_logp, advantages, mask, ref_logp, kl_coef, kl_kind, entropy_coef,
        clip_low, clip_high, dual_clip, ratio_level, inplace_backward, agg, agg_kwargs,
        cu_seqlens, "hidden", hidden, "the leading shape of hidden")
    if cu_seqlens is not None:
        kw = {**kw, "cu_seqlens": cu_seqlens}  # every loss op below aggregates per segment
    which = resolve_backend(backend, hidden.device, op=op, native_ok=True)
    acc = acc_dtype(hidden)
    old_logp, advantages = old_logp.detach().to(acc), advantages.detach().to(acc)
    ref_logp = None if ref_logp is None else ref_logp.detach().to(acc)
    if process_group is not None:
        logp, ent = vocab_parallel_linear_token_logprobs(
            hidden, weight, tokens, bias, temperature, ignore_index, process_group,
            vocab_start_index, which, op=op)
    elif vocab_start_index is not None:
        raise ValueError(f"{op}: vocab_start_index is only meaningful with process_group")
    elif which == "reference":
        tokens = checked_tokens(op, tokens, weight.shape[0], ignore_index)
        return reference.fused_linear_ppo_loss(
            hidden, weight, tokens, old_logp, advantages, mask, bias, ref_logp=ref_logp,
            kl_coef=kl_coef, kl_kind=kl_kind, entropy_coef=entropy_coef, clip_low=clip_low,
            clip_high=clip_high, dual_clip=dual_clip, temperature=temperature, agg=agg,
            ratio_level=ratio_level, ignore_index=ignore_index, **kw)
    elif which == "native" and cu_seqlens is None and ratio_level == "token":
        need = (hidden.requires_grad, weight.requires_grad,
                bias is not None and bias.requires_grad)
        if torch.is_grad_enabled() and any(need):
            coef = reference.agg_row_weights(mask, agg, dtype=acc, **kw)
            loss, scal, per_token, _, _, _ = _lossgrad(
                hidden, weight, bias, tokens, old_logp, advantages, mask, ref_logp, coef,
                kl_coef, kl_kind, entropy_coef, 1.0 - clip_low, 1.0 + clip_high, dual_clip,
                temperature, ignore_index, *need, which)
            return loss, fused_stats(scal, per_token)
        logp, ent, _ = _linear_token_logprobs(hidden, weight, bias, tokens, temperature,
                                              ignore_index, which)
    else:
        logp, ent, _ = _linear_token_logprobs(hidden, weight, bias, tokens, temperature,
                                              ignore_index, which)
    # the native loss kernels have no packed (cu_seqlens) path: the O(B T) terms in plain torch
    loss_backend = "reference" if which == "native" and cu_seqlens is not None else which
    return compose_ppo_loss(logp, ent, old_logp, advantages, mask, ref_logp, kl_coef, kl_kind,
                            entropy_coef, clip_low, clip_high, dual_clip, agg, ratio_level,
                            loss_backend, kw)
