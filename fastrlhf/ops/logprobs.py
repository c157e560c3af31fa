"""token_logprobs / token_entropy: log softmax + gather (+ entropy) without an [N, V] softmax.

The family in one place:

* the public functions (argument checks, backend choice, vocab-parallel mode);
* one custom op per function (``fastrlhf::token_logprobs``, its in-place-backward twin
  ``fastrlhf::token_logprobs_ib``, ``fastrlhf::token_entropy``) with one fake and one autograd
  formula, whose implementation calls the ``logprobs_fwd`` / ``logprobs_bwd`` launchers of the
  chosen backend (:mod:`fastrlhf.kernels.logprobs` or :mod:`fastrlhf.native`; see
  :mod:`fastrlhf.ops.registry`);
* the reference: :func:`fastrlhf.reference.token_logprobs` / ``token_entropy`` (and, for one
  vocab slice, :func:`fastrlhf.reference.softmax_stats` / ``token_logprobs_grad``).

Registration makes ``torch.compile(fullgraph=True)`` trace a model that calls these without graph
breaks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import config, reference
from ..backend import resolve as resolve_backend
from ..tables import INT_DTYPES, acc_dtype
from .common import (with_contract, check_bool, check_int, check_logits, check_positive_float,
                     check_same_device, check_shape, check_tensor, check_token_range,
                     checked_tokens, grad_rows, non_overlapping, raise_bad_token,
                     rows_layout)
from .parallel import (NO_IGNORE, check_full_vocab, check_group, combine_softmax_stats,
                       slice_start, split_tokens, zero_rows_where)
from .registry import Op, launchers

__all__ = ["token_logprobs", "token_entropy", "inplace_ok", "logprobs_stats", "logprobs_grad"]


# ---------------------------------------------------------------------------------------------
# launch (one backend underneath)
# ---------------------------------------------------------------------------------------------

def logprobs_stats(logits: Tensor, tokens: Optional[Tensor], temperature: float,
                   ignore_index: int, backend: str):
    """``(logp or None, entropy, lse [..., 2])`` of the rows of ``logits`` with the backend's
    single-pass forward (``lse`` = (row max, log sum exp(x - max))).  No token check."""
    V = logits.shape[-1]
    lg, dims, strides = rows_layout(logits)
    tok = None if tokens is None else tokens.reshape(-1).contiguous()
    logp, ent, lse = launchers(backend, "logprobs").logprobs_fwd(
        lg, dims, strides, V, tok, 1.0 / temperature, ignore_index, True)
    lead = logits.shape[:-1]
    return (None if logp is None else logp.view(lead)), ent.view(lead), lse.view(*lead, 2)


def inplace_ok(logits: Tensor) -> bool:
    """Whether d loss / d logits can be written over ``logits`` itself: its rows are addressed
    in place (no layout copy) and no two elements share memory (an expanded or overlapping view
    would have one gradient overwrite another)."""
    return rows_layout(logits)[0] is logits and non_overlapping(logits)  # metadata only


def logprobs_grad(logits: Tensor, out: Optional[Tensor], tokens, dlogp, dent, lse, ent,
                  temperature: float, ignore_index: int, backend: str) -> Tensor:
    """Write d loss / d logits into ``out`` (``logits`` itself, checked by :func:`inplace_ok`)
    or, with ``out=None``, into a fresh buffer of the logits' shape; returns it."""
    V = logits.shape[-1]
    out, lg, dims, strides, ob, ostrides = grad_rows(logits, out)
    # the launchers read these [N] rows through their pointers: any contiguous shape will do
    flat = lambda t: None if t is None else t.contiguous()  # noqa: E731
    launchers(backend, "logprobs").logprobs_bwd(
        lg, ob, dims, strides, ostrides, V, flat(tokens), flat(dlogp), flat(dent), flat(lse),
        flat(ent), 1.0 / temperature, ignore_index)
    return out


# ---------------------------------------------------------------------------------------------
# custom ops: forward, backward, autograd formula (each once)
# ---------------------------------------------------------------------------------------------

def _tl_impl(logits: Tensor, tokens: Tensor, temperature: float, ignore_index: int,
             backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    V = logits.shape[-1]
    if backend == "native":  # one extension call: ids flattened and checked in C++
        lg, dims, strides = rows_layout(logits)
        logp, ent, lse, bad = launchers(backend, "logprobs").logprobs_call(
            lg, dims, strides, V, tokens, 1.0 / temperature, ignore_index,
            config.check_tokens_enabled(), logits.shape[:-1])
        if bad >= 0:
            raise_bad_token("token_logprobs", tokens, V, ignore_index)
        return logp, ent, lse
    check_token_range("token_logprobs", tokens, V, ignore_index)
    return logprobs_stats(logits, tokens, temperature, ignore_index, backend)


def _tl_fake(logits, tokens, temperature, ignore_index, backend):
    acc = acc_dtype(logits)
    lead = logits.shape[:-1]
    return (logits.new_empty(lead, dtype=acc), logits.new_empty(lead, dtype=acc),
            logits.new_empty((*lead, 2), dtype=acc))


def _te_impl(logits: Tensor, temperature: float, backend: str) -> Tuple[Tensor, Tensor]:
    _, ent, lse = logprobs_stats(logits, None, temperature, -100, backend)
    return ent, lse


def _te_fake(logits, temperature, backend):
    acc = acc_dtype(logits)
    lead = logits.shape[:-1]
    return logits.new_empty(lead, dtype=acc), logits.new_empty((*lead, 2), dtype=acc)


def _bwd_impl(logits: Tensor, tokens: Optional[Tensor], dlogp: Optional[Tensor],
              dent: Optional[Tensor], lse: Tensor, ent: Tensor, temperature: float,
              ignore_index: int, backend: str) -> Tensor:
    return logprobs_grad(logits, None, tokens, dlogp, dent, lse, ent, temperature, ignore_index,
                         backend)


def _bwd_fake(logits, tokens, dlogp, dent, lse, ent, temperature, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _bwd_inplace_impl(logits: Tensor, tokens: Optional[Tensor], dlogp: Optional[Tensor],
                      dent: Optional[Tensor], lse: Tensor, ent: Tensor, temperature: float,
                      ignore_index: int, backend: str) -> None:
    logprobs_grad(logits, logits, tokens, dlogp, dent, lse, ent, temperature, ignore_index,
                  backend)


def _bwd_inplace_fake(logits, tokens, dlogp, dent, lse, ent, temperature, ignore_index, backend):
    return None


_bwd = Op("token_logprobs_bwd", _bwd_impl, _bwd_fake, fast_eager=True)
_bwd_inplace = Op("token_logprobs_bwd_", _bwd_inplace_impl, _bwd_inplace_fake,
                  mutates_args=("logits",), fast_eager=True)


def _setup(ctx, inputs, output, *, inplace: bool = False):
    """Shared by the three forward ops.  Outputs nobody differentiates arrive as None (not as
    materialized zeros), so e.g. an unused entropy costs nothing in the backward kernel."""
    ctx.set_materialize_grads(False)
    logits, tokens = inputs[0], (inputs[1] if len(inputs) == 5 else None)
    ent, lse = output[-2], output[-1]
    ctx.save_for_backward(logits, tokens, lse, ent)
    ctx.temperature = inputs[-3] if len(inputs) == 5 else inputs[1]
    ctx.ignore_index = inputs[3] if len(inputs) == 5 else -100
    ctx.backend = inputs[-1]
    ctx.inplace = inplace
    ctx.mark_non_differentiable(lse)


def _setup_ib(ctx, inputs, output):
    _setup(ctx, inputs, output, inplace=True)


def _grad(ctx, dlogp, dent):
    logits, tokens, lse, ent = ctx.saved_tensors
    if dlogp is None and dent is None:
        return None
    # The launchers read the one-hot term only with tokens (and then dlogp) present.
    args = (tokens if dlogp is not None else None, dlogp, dent, lse, ent, ctx.temperature, ctx.ignore_index, ctx.backend)
    if ctx.inplace and inplace_ok(logits):
        _bwd_inplace(logits, *args)
        return logits
    return _bwd(logits, *args)


def _tl_backward(ctx, dlogp, dent, dlse):
    return _grad(ctx, dlogp, dent), None, None, None, None


def _te_backward(ctx, dent, dlse):
    return _grad(ctx, None, dent), None, None


_token_logprobs = Op("token_logprobs", _tl_impl, _tl_fake, setup=_setup, backward=_tl_backward,
                     fast_eager=True)
# The same forward whose backward writes the gradient into the logits buffer: a separate op (not
# a flag) so that each registered schema states honestly what it does.
_token_logprobs_ib = Op("token_logprobs_ib", _tl_impl, _tl_fake, setup=_setup_ib,
                        backward=_tl_backward, fast_eager=True)
_token_entropy = Op("token_entropy", _te_impl, _te_fake, setup=_setup, backward=_te_backward,
                    fast_eager=True)


# ---------------------------------------------------------------------------------------------
# vocab parallelism: each rank holds one slice of the vocab (see fastrlhf.ops.parallel)
# ---------------------------------------------------------------------------------------------

def _slice_stats(logits, tokens_local, temperature, backend):
    """Per-row ``(logp_r, H_r, M_r, log S_r)`` of this rank's slice: the backend's single-pass
    forward (Triton / native: no [N, V_r] temporaries) or the reference."""
    with torch.no_grad():
        if backend in ("triton", "native"):
            lp, H, lse = logprobs_stats(logits, tokens_local, temperature, -1, backend)
            return lp, H, lse[..., 0], lse[..., 1]
        return reference.softmax_stats(logits, tokens_local, temperature, -1)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, ignore_index, start, group, backend, inplace,
                keep=None):
        V_r = logits.shape[-1]
        ignored, in_slice, tokens_local = split_tokens(tokens, ignore_index, start, V_r)
        lp_r, H_r, M_r, logS_r = _slice_stats(logits, tokens_local, temperature, backend)
        logp, H, M, logS = combine_softmax_stats(lp_r, H_r, M_r, logS_r, in_slice, ignored, group)
        # Backward: the local one-hot index (-1 where the token is elsewhere or ignored), dlogp
        # zeroed only at ignored positions (out-of-slice tokens still get the -p term); rows
        # outside ``keep`` (optional bool [...]) get exactly zero gradient.
        ctx.save_for_backward(logits, tokens_local, ignored, M, logS, H, keep)
        ctx.temperature = temperature
        ctx.backend = backend
        ctx.inplace = inplace
        ctx.mark_non_differentiable(M)
        return logp, H

    @staticmethod
    def backward(ctx, dlogp, dent):
        logits, onehot, ignored, M, logS, H, keep = ctx.saved_tensors
        dlogp = zero_rows_where(dlogp, ignored if keep is None else ignored | ~keep)
        dent = zero_rows_where(dent, None if keep is None else ~keep)
        if ctx.backend in ("triton", "native"):
            lse = torch.stack([M, logS], dim=-1)
            # -1 matches no column; NO_IGNORE is an ignore_index no local id takes (dlogp is
            # already zero where the token was ignored).
            out = logits if ctx.inplace and inplace_ok(logits) else None
            g = logprobs_grad(logits, out, onehot if dlogp is not None else None, dlogp, dent,
                              lse, H, ctx.temperature, NO_IGNORE, ctx.backend)
        else:
            g = reference.token_logprobs_grad(logits, onehot, dlogp, dent, M, logS, H,
                                              ctx.temperature)
        if keep is not None:
            # Rows outside ``keep`` whose statistics are not finite (NaN / inf logits there) get
            # an exactly zero gradient (their upstream gradients are zero; 0 * NaN is not).
            rows = ~keep & ~(torch.isfinite(M) & torch.isfinite(logS) & torch.isfinite(H))
            if bool(rows.any()):
                g[rows] = 0
        return g, None, None, None, None, None, None, None, None


def vocab_parallel_token_logprobs(logits, tokens, temperature, ignore_index, process_group,
                                  vocab_start_index, backend, inplace, *, keep=None,
                                  op="token_logprobs"):
    """``(logp, entropy)`` over the full vocab from this rank's slice of the logits (two
    all-reduces of ``[N]`` / ``[N, 3]``; the backward is local).  ``keep``: rows outside it get
    exactly zero gradient (the fused loss's masked tokens)."""
    group = check_group(op, process_group)
    V_r = logits.shape[-1]
    start = slice_start(op, group, V_r, vocab_start_index)
    if config.check_tokens_enabled():
        check_full_vocab(op, group, V_r, tokens, ignore_index)
    return _VocabParallelLogprobs.apply(logits, tokens, temperature, ignore_index, start, group,
                                        backend, inplace, keep)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

@with_contract(reference.token_logprobs)
def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, ignore_index: int = -100,
                   inplace_backward: bool = False, backend: str = "auto",
                   process_group=None, vocab_start_index: Optional[int] = None):
    """Log-probability of ``tokens`` under ``softmax(logits / temperature)`` (and its entropy).

    Args:
        logits: ``[..., V]`` float16 / bfloat16 / float32 / float64, any strides on the leading
            dims (``logits[:, :-1]`` is read in place, never copied).
        tokens: ``[...]`` int32 / int64, the leading shape of ``logits``.  Ids must lie in
            ``[0, V)`` or equal ``ignore_index`` (checked on the host, see
            :mod:`fastrlhf.config` to disable); ignored positions give logp 0 and no gradient
            through logp (their entropy is still computed).
        temperature: > 0; the distribution is ``softmax(logits / temperature)``.
        return_entropy: also return ``H = -sum_j p_j log p_j`` per position.
        inplace_backward: the backward writes d loss / d logits into the ``logits`` buffer itself
            and returns it as the gradient: no [N, V] allocation in training.  The caller promises
            not to read ``logits`` after backward.  Triton and native backends (the reference
            ignores it).  Where the gradient cannot be written in place -- the rows had to be
            copied (a non-unit vocab stride), or the logits are an expanded / self-overlapping
            view -- it goes to a fresh buffer instead, on every backend.
        backend: ``"auto" | "triton" | "native" | "reference"`` (see :mod:`fastrlhf.backend`).
        process_group: vocab parallelism (tensor-parallel lm_head): ``logits`` holds only this
            rank's vocab slice ``[vocab_start_index, vocab_start_index + V_local)`` and ``tokens``
            are full-vocab ids.  Ranks exchange per-row partials (two all-reduces of ``[N]`` and
            ``[N, 3]`` floats, never the logits) and every rank returns the full-vocab logp /
            entropy; the backward is local.  See :mod:`fastrlhf.ops.parallel`.
        vocab_start_index: first vocab id of this rank's slice (default ``rank * V_local``,
            i.e. equal shards).

    Returns:
        ``logp`` ``[...]`` (float32; float64 for float64 logits), or ``(logp, entropy)``.

    Formula: ``logp = x[token] - logsumexp(x)`` with ``x = logits / temperature``; backward
    ``dlogits = (dlogp * (onehot - p) - dH * p * (log p + H)) / temperature``.
    """
    op = "token_logprobs"
    temperature = _check_common(op, logits, temperature)
    check_tensor(op, "tokens", tokens, dtypes=INT_DTYPES)
    check_shape(op, "tokens", tokens, logits.shape[:-1], "the leading shape of logits")
    check_same_device(op, "logits", logits, tokens=tokens)
    ignore_index = check_int(op, "ignore_index", ignore_index)
    check_bool(op, "return_entropy", return_entropy)
    check_bool(op, "inplace_backward", inplace_backward)
    which = resolve_backend(backend, logits.device, op=op, native_ok=True)
    if process_group is not None:
        logp, ent = vocab_parallel_token_logprobs(
            logits, tokens, temperature, ignore_index, process_group, vocab_start_index, which,
            inplace_backward and which == "triton")
        return (logp, ent) if return_entropy else logp
    if vocab_start_index is not None:
        raise ValueError(f"{op}: vocab_start_index is only meaningful with process_group")
    if which == "reference":
        tokens = checked_tokens(op, tokens, logits.shape[-1], ignore_index)
        return reference.token_logprobs(logits, tokens, temperature, return_entropy, ignore_index)
    fn = _token_logprobs_ib if inplace_backward else _token_logprobs
    logp, ent, _ = fn(logits, tokens, temperature, ignore_index, which)
    return (logp, ent) if return_entropy else logp


@with_contract(reference.token_entropy)
def token_entropy(logits: Tensor, *, temperature: float = 1.0, backend: str = "auto",
                  process_group=None, vocab_start_index: Optional[int] = None) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dim: ``[..., V] -> [...]``.

    Same dtypes, strides, backends and vocab parallelism (``process_group``,
    ``vocab_start_index``) as :func:`token_logprobs`; differentiable.
    """
    op = "token_entropy"
    temperature = _check_common(op, logits, temperature)
    which = resolve_backend(backend, logits.device, op=op, native_ok=True)
    if process_group is not None:
        ignore = torch.full(logits.shape[:-1], -100, dtype=torch.int64, device=logits.device)
        with config.check_tokens(False):
            return vocab_parallel_token_logprobs(logits, ignore, temperature, -100, process_group,
                                                 vocab_start_index, which, False, op=op)[1]
    if vocab_start_index is not None:
        raise ValueError(f"{op}: vocab_start_index is only meaningful with process_group")
    if which == "reference":
        return reference.token_entropy(logits, temperature)
    ent, _ = _token_entropy(logits, temperature, which)
    return ent


def _check_common(op: str, logits, temperature) -> float:
    check_logits(op, logits)
    return check_positive_float(op, "temperature", temperature)
