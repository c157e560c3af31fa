"""token_logprobs / token_entropy: log softmax + gather (+ entropy) without an [N, V] softmax.

Public entry points check their arguments, pick a backend and call either the eager reference or
the registered ``torch.library`` ops below (``fastrlhf::token_logprobs`` & co.), whose autograd
formula runs the Triton backward kernel.  Registration makes ``torch.compile(fullgraph=True)``
trace a model that calls these without graph breaks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend, config, reference
from ._common import (FLOAT_DTYPES, INT_DTYPES, check_int, check_positive_float, check_same_device,
                      check_shape, check_tensor, contiguous_row_strides, rows_layout)

__all__ = ["token_logprobs", "token_entropy"]


def _kernels():
    from ..kernels import logprobs as k  # lazy: TRITON_INTERPRET may be set after fastrlhf import
    return k


def _check_token_range(tokens: Tensor, V: int, ignore_index: int, op: str = "token_logprobs"
                       ) -> None:
    if not config.check_tokens_enabled() or tokens.numel() == 0:
        return
    bad = ((tokens < 0) | (tokens >= V)) & (tokens != ignore_index)
    if bool(bad.any()):
        pos = int(bad.reshape(-1).nonzero()[0, 0])
        val = int(tokens.reshape(-1)[pos])
        raise ValueError(
            f"{op}: tokens contains id {val} (flat position {pos}) outside [0, {V}) that "
            f"is not ignore_index={ignore_index}; disable this check with "
            "fastrlhf.config.set_check_tokens(False) or FASTRLHF_CHECK_TOKENS=0 (e.g. for CUDA "
            "graph capture), in which case such positions give NaN")


# ---------------------------------------------------------------------------------------------
# torch.library ops (Triton backend)
# ---------------------------------------------------------------------------------------------

def _fwd_impl(logits: Tensor, tokens: Tensor, temperature: float, ignore_index: int):
    V = logits.shape[-1]
    _check_token_range(tokens, V, ignore_index)
    lg, dims, strides = rows_layout(logits)
    tok = tokens.reshape(-1).contiguous()
    logp, ent, lse = _kernels().logprobs_fwd(lg, dims, strides, V, tok, 1.0 / temperature,
                                             ignore_index, True)
    lead = logits.shape[:-1]
    return logp.view(lead), ent.view(lead), lse.view(*lead, 2)


def _fwd_fake(logits, tokens, temperature, ignore_index):
    acc = reference.acc_dtype(logits.dtype)
    lead = logits.shape[:-1]
    return (logits.new_empty(lead, dtype=acc), logits.new_empty(lead, dtype=acc),
            logits.new_empty((*lead, 2), dtype=acc))


@torch.library.custom_op("fastrlhf::token_logprobs", mutates_args=())
def _tl_fwd(logits: Tensor, tokens: Tensor, temperature: float, ignore_index: int
            ) -> Tuple[Tensor, Tensor, Tensor]:
    return _fwd_impl(logits, tokens, temperature, ignore_index)


_tl_fwd.register_fake(_fwd_fake)


@torch.library.custom_op("fastrlhf::token_entropy", mutates_args=())
def _te_fwd(logits: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    V = logits.shape[-1]
    lg, dims, strides = rows_layout(logits)
    _, ent, lse = _kernels().logprobs_fwd(lg, dims, strides, V, None, 1.0 / temperature, -100, True)
    lead = logits.shape[:-1]
    return ent.view(lead), lse.view(*lead, 2)


@_te_fwd.register_fake
def _(logits, temperature):
    acc = reference.acc_dtype(logits.dtype)
    lead = logits.shape[:-1]
    return logits.new_empty(lead, dtype=acc), logits.new_empty((*lead, 2), dtype=acc)


def _launch_bwd(logits, out, tokens, dlogp, dent, lse, ent, temperature, ignore_index):
    V = logits.shape[-1]
    lg, dims, strides = rows_layout(logits)
    if out is logits:
        if lg.data_ptr() != logits.data_ptr() or lg.stride() != logits.stride():
            raise RuntimeError("in-place backward needs logits with unit stride on the vocab dim")
        ob, ostrides = lg, strides
    else:
        ob, ostrides = out, contiguous_row_strides(dims, V)
    flat = lambda t: None if t is None else t.reshape(-1).contiguous()  # noqa: E731
    _kernels().logprobs_bwd(lg, ob, dims, strides, ostrides, V, flat(tokens), flat(dlogp),
                            flat(dent), flat(lse), flat(ent), 1.0 / temperature, ignore_index)


@torch.library.custom_op("fastrlhf::token_logprobs_bwd", mutates_args=())
def _tl_bwd(logits: Tensor, tokens: Optional[Tensor], dlogp: Optional[Tensor],
            dent: Optional[Tensor], lse: Tensor, ent: Tensor, temperature: float,
            ignore_index: int) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_bwd(logits, out, tokens, dlogp, dent, lse, ent, temperature, ignore_index)
    return out


@_tl_bwd.register_fake
def _(logits, tokens, dlogp, dent, lse, ent, temperature, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("fastrlhf::token_logprobs_bwd_", mutates_args=("logits",))
def _tl_bwd_inplace(logits: Tensor, tokens: Optional[Tensor], dlogp: Optional[Tensor],
                    dent: Optional[Tensor], lse: Tensor, ent: Tensor, temperature: float,
                    ignore_index: int) -> None:
    _launch_bwd(logits, logits, tokens, dlogp, dent, lse, ent, temperature, ignore_index)


@_tl_bwd_inplace.register_fake
def _(logits, tokens, dlogp, dent, lse, ent, temperature, ignore_index):
    return None


def _backward_common(ctx, logits, tokens, dlogp, dent, lse, ent):
    if dlogp is None and dent is None:
        return None
    if ctx.inplace:
        _tl_bwd_inplace(logits, tokens, dlogp, dent, lse, ent, ctx.temperature, ctx.ignore_index)
        return logits
    return _tl_bwd(logits, tokens, dlogp, dent, lse, ent, ctx.temperature, ctx.ignore_index)


def _tl_setup(ctx, inputs, output):
    logits, tokens, temperature, ignore_index = inputs
    logp, ent, lse = output
    ctx.save_for_backward(logits, tokens, lse, ent)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.inplace = False
    ctx.mark_non_differentiable(lse)


def _tl_backward(ctx, dlogp, dent, dlse):
    logits, tokens, lse, ent = ctx.saved_tensors
    return _backward_common(ctx, logits, tokens, dlogp, dent, lse, ent), None, None, None


_tl_fwd.register_autograd(_tl_backward, setup_context=_tl_setup)


def _te_setup(ctx, inputs, output):
    logits, temperature = inputs
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


# In-place variant: the same forward, whose backward writes the gradient into the logits buffer.
# A separate op (not a flag) so that the registered schema states the mutation honestly.
@torch.library.custom_op("fastrlhf::token_logprobs_ib", mutates_args=())
def _tl_fwd_ib(logits: Tensor, tokens: Tensor, temperature: float, ignore_index: int
               ) -> Tuple[Tensor, Tensor, Tensor]:
    return _fwd_impl(logits, tokens, temperature, ignore_index)


_tl_fwd_ib.register_fake(_fwd_fake)


def _tl_setup_ib(ctx, inputs, output):
    _tl_setup(ctx, inputs, output)
    ctx.inplace = True


_tl_fwd_ib.register_autograd(_tl_backward, setup_context=_tl_setup_ib)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def _check_logits(op: str, logits, temperature) -> float:
    check_tensor(op, "logits", logits, dtypes=FLOAT_DTYPES, min_dim=1)
    if logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have a non-empty vocab (last) dim, got shape "
                         f"{tuple(logits.shape)}")
    return check_positive_float(op, "temperature", temperature)


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
            ignores it; native falls back to a fresh buffer if the rows had to be copied).
        backend: ``"auto" | "triton" | "native" | "reference"`` (see :mod:`fastrlhf._backend`).
        process_group: vocab parallelism (tensor-parallel lm_head): ``logits`` holds only this
            rank's vocab slice ``[vocab_start_index, vocab_start_index + V_local)`` and ``tokens``
            are full-vocab ids.  Ranks exchange per-row partials (two all-reduces of ``[N]`` and
            ``[N, 3]`` floats, never the logits) and every rank returns the full-vocab logp /
            entropy; the backward is local.  See :mod:`fastrlhf.ops._vocab_parallel`.  With the
            native / reference backends the local slice is processed in plain torch.
        vocab_start_index: first vocab id of this rank's slice (default ``rank * V_local``,
            i.e. equal shards).

    Returns:
        ``logp`` ``[...]`` (float32; float64 for float64 logits), or ``(logp, entropy)``.

    Formula: ``logp = x[token] - logsumexp(x)`` with ``x = logits / temperature``; backward
    ``dlogits = (dlogp * (onehot - p) - dH * p * (log p + H)) / temperature``.
    """
    op = "token_logprobs"
    temperature = _check_logits(op, logits, temperature)
    check_tensor(op, "tokens", tokens, dtypes=INT_DTYPES)
    check_shape(op, "tokens", tokens, logits.shape[:-1], "the leading shape of logits")
    check_same_device(op, "logits", logits, tokens=tokens)
    ignore_index = check_int(op, "ignore_index", ignore_index)
    which = _backend.resolve(backend, logits.device, op=op, native_ok=True)
    if process_group is not None:
        from ._vocab_parallel import vocab_parallel_token_logprobs
        logp, ent = vocab_parallel_token_logprobs(
            logits, tokens, temperature, ignore_index, process_group, vocab_start_index,
            which, inplace_backward and which == "triton", config.check_tokens_enabled())
        return (logp, ent) if return_entropy else logp
    if vocab_start_index is not None:
        raise ValueError(f"{op}: vocab_start_index is only meaningful with process_group")
    if which == "reference":
        V = logits.shape[-1]
        _check_token_range(tokens, V, ignore_index)
        return reference.token_logprobs(logits, tokens, temperature, return_entropy, ignore_index)
    if which == "native":  # C++ CPU backend (fastrlhf/_native.py, csrc/logprobs.cpp)
        from .. import _native
        logp, ent = _native.token_logprobs(logits, tokens, temperature, ignore_index,
                                           inplace_backward)
        return (logp, ent) if return_entropy else logp
    fn = _tl_fwd_ib if inplace_backward else _tl_fwd
    logp, ent, _ = fn(logits, tokens, temperature, ignore_index)
    return (logp, ent) if return_entropy else logp


def token_entropy(logits: Tensor, *, temperature: float = 1.0, backend: str = "auto",
                  process_group=None, vocab_start_index: Optional[int] = None) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dim: ``[..., V] -> [...]``.

    Same dtypes, strides, backends and vocab parallelism (``process_group``,
    ``vocab_start_index``) as :func:`token_logprobs`; differentiable.
    """
    op = "token_entropy"
    temperature = _check_logits(op, logits, temperature)
    which = _backend.resolve(backend, logits.device, op=op, native_ok=True)
    if process_group is not None:
        from ._vocab_parallel import vocab_parallel_token_logprobs
        ignore = torch.full(logits.shape[:-1], -100, dtype=torch.int64, device=logits.device)
        return vocab_parallel_token_logprobs(logits, ignore, temperature, -100, process_group,
                                             vocab_start_index, which, False, False)[1]
    if vocab_start_index is not None:
        raise ValueError(f"{op}: vocab_start_index is only meaningful with process_group")
    if which == "reference":
        return reference.token_entropy(logits, temperature)
    if which == "native":  # C++ CPU backend
        from .. import _native
        return _native.token_entropy(logits, temperature)
    ent, _ = _te_fwd(logits, temperature)
    return ent
