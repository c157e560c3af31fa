"""Collective plumbing for vocab parallelism (tensor parallel over the lm_head's vocab).

Each op family owns its vocab-parallel mode (``process_group=`` in its public functions); what
they share is here: checking the group and the slice, the full-vocab token check, the split of
full-vocab ids into slice-local ones, merging per-slice softmax statistics across ranks, and the
identity-forward / all-reduce-backward Function that the trainer's vocab-parallel lm_head uses
too.

Merging a sharded softmax.  Each rank holds the logits of its slice ``[start, start + V_r)``.
Per row its local pass gives the slice's max ``M_r``, ``log S_r`` (``S_r = sum exp(x - M_r)``),
its entropy ``H_r`` and, where the token falls in the slice, its local log-prob.  Two all-reduces
of ``[N]``-sized tensors (a max, then one sum of ``[N, 3]``) combine them, never the logits::

    M    = max_r M_r,            a_r = S_r exp(M_r - M),        S = sum_r a_r
    H    = log S - sum_r a_r (log S_r - H_r + M_r - M) / S
    logp = sum_r [token in r] (logp_r + M_r - M + log S_r) - log S

(``log S_r - H_r`` is the slice's ``E_p[x - M_r]``.)  Every quantity is a difference of nearby
numbers, so logits at +1e4 lose nothing.  Communication per call: ``N`` floats (max) + ``3 N``
floats (sum) in the accumulation dtype, plus one scalar when the token-range check is on.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .common import check_token_range

__all__ = ["check_group", "slice_start", "check_full_vocab", "split_tokens",
           "combine_softmax_stats", "zero_rows_where", "CopyToGroup", "copy_to_group",
           "NO_IGNORE"]

# An ignore_index no local token id takes: the slice-local ids are in [0, V_r) or -1.
NO_IGNORE = -(2 ** 62)


def check_group(op: str, process_group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: process_group was given but torch.distributed is not initialized")
    return process_group


def slice_start(op: str, group, V_r: int, vocab_start_index) -> int:
    """This rank's first vocab id: ``vocab_start_index``, default ``rank * V_r`` (equal
    slices); validated."""
    if vocab_start_index is None:
        vocab_start_index = dist.get_rank(group) * V_r
    if isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int) \
            or vocab_start_index < 0:
        raise ValueError(f"{op}: vocab_start_index must be an int >= 0, got {vocab_start_index!r}")
    return vocab_start_index


def check_full_vocab(op: str, group, V_r: int, tokens: Tensor, ignore_index: int) -> None:
    """Every rank checks the ids against the full vocab (the sum of the slices): one scalar
    all-reduce and a host sync (disable with ``fastrlhf.config.set_check_tokens(False)``)."""
    V = torch.tensor([V_r], device=tokens.device, dtype=torch.int64)
    dist.all_reduce(V, group=group)
    check_token_range(op, tokens, int(V.item()), ignore_index, what="the full vocab ")


def split_tokens(tokens: Tensor, ignore_index: int, start: int, V_r: int):
    """``(ignored, in_slice, local)``: in-slice ids map to ``[0, V_r)``, all others to -1."""
    ignored = tokens == ignore_index
    in_slice = (tokens >= start) & (tokens < start + V_r) & ~ignored
    local = torch.where(in_slice, tokens - start, torch.full_like(tokens, -1))
    return ignored, in_slice, local


def combine_softmax_stats(lp_r, H_r, M_r, logS_r, in_slice, ignored, group):
    """Global ``(logp, H, M, log S)`` from each rank's slice partials: two all-reduces.

    A slice with nothing finite in a row (``log S_r = -inf``, e.g. a masked vocab padding)
    contributes nothing; NaN partials propagate to the row (through the SUM)."""
    M = M_r.clone()
    dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
    empty = logS_r == float("-inf")
    zero = torch.zeros_like(lp_r)
    a = torch.where(empty, zero, torch.exp(logS_r + (M_r - M)))
    # the target's logit relative to the global max (-inf when it sits in an empty slice)
    tgt = torch.where(empty, torch.full_like(lp_r, float("-inf")), lp_r + (M_r - M) + logS_r)
    packed = torch.stack([
        a,
        torch.where(empty, zero, a * ((logS_r - H_r) + (M_r - M))),
        torch.where(in_slice, tgt, zero),
    ], dim=-1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    S = packed[..., 0]
    logS = S.log()
    H = logS - packed[..., 1] / S
    logp = torch.where(ignored, torch.zeros_like(S), packed[..., 2] - logS)
    return logp, H, M, logS


def zero_rows_where(d, drop):
    """``d`` with zeros where ``drop`` (either may be None)."""
    if d is None or drop is None:
        return d
    return torch.where(drop, torch.zeros_like(d), d)


class CopyToGroup(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group (the input is consumed
    by every rank's slice, so its gradient is the sum of the ranks' partial gradients)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def copy_to_group(x: Tensor, group) -> Tensor:
    """``x`` unchanged; its gradient is all-reduced (summed) over ``group`` in the backward."""
    return CopyToGroup.apply(x, group)
