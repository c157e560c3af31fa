"""Vocab-parallel token log-probs and entropy (tensor parallel over the lm_head's vocab).

Each rank holds the logits of its own vocab slice ``[start, start + V_r)``.  Per row, the local
pass produces partials -- the slice's max ``M_r``, ``log S_r`` (``S_r = sum exp(x - M_r)``), its
entropy ``H_r`` and, where the token falls in the slice, its local log-prob -- and the ranks
combine them with two all-reduces of ``[N]``-sized tensors (a max, then one sum of ``[N, 3]``),
never the logits:

    M    = max_r M_r,            a_r = S_r exp(M_r - M),        S = sum_r a_r
    H    = log S - sum_r a_r (log S_r - H_r + M_r - M) / S
    logp = sum_r [token in r] (logp_r + M_r - M + log S_r) - log S

(``log S_r - H_r`` is the slice's ``E_p[x - M_r]``.)  Every quantity is a difference of nearby
numbers, so logits at +1e4 lose nothing.  The backward is local: each rank writes the gradient
of its own slice from the global ``(M, log S, H)``; no communication.

Communication per call: ``N`` floats (max) + ``3 N`` floats (sum), in the accumulation dtype,
plus one scalar when the token-range check is on.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import reference


def _local_stats_torch(logits: Tensor, tokens_local: Tensor, temperature: float, ignore_local: int):
    """(logp_r, H_r, M_r, logS_r) of one slice in plain torch (reference / native backends)."""
    acc = reference.acc_dtype(logits.dtype)
    x = logits.to(acc) / temperature
    M = x.amax(-1)
    z = x - M.unsqueeze(-1)
    S = z.exp().sum(-1)
    logS = S.log()
    logsm = z - logS.unsqueeze(-1)
    p = logsm.exp()
    H = -(p * torch.where(p > 0, logsm, torch.zeros_like(logsm))).sum(-1)
    valid = tokens_local != ignore_local
    idx = torch.where(valid, tokens_local, torch.zeros_like(tokens_local)).long()
    lp = torch.where(valid, logsm.gather(-1, idx.unsqueeze(-1)).squeeze(-1), torch.zeros_like(M))
    return lp, H, M, logS


def _local_stats(logits, tokens_local, temperature, ignore_local, use_triton):
    if use_triton:
        from .logprobs import _fwd_impl
        from .. import config
        with config.check_tokens(False):  # local ids are in range by construction
            lp, H, lse = _fwd_impl(logits, tokens_local, temperature, ignore_local)
        return lp, H, lse[..., 0], lse[..., 1]
    with torch.no_grad():
        return _local_stats_torch(logits, tokens_local, temperature, ignore_local)


def _local_grad_torch(logits, onehot_tokens, dlogp, dent, M, logS, H, temperature):
    acc = reference.acc_dtype(logits.dtype)
    x = logits.to(acc) / temperature
    z = (x - M.unsqueeze(-1)) - logS.unsqueeze(-1)
    p = z.exp()
    g = torch.zeros_like(x)
    if dlogp is not None:
        g = g - dlogp.unsqueeze(-1) * p
        hit = onehot_tokens >= 0
        idx = torch.where(hit, onehot_tokens, torch.zeros_like(onehot_tokens)).long().unsqueeze(-1)
        g = g.scatter_add(-1, idx, torch.where(hit, dlogp, torch.zeros_like(dlogp)).unsqueeze(-1))
    if dent is not None:
        g = g - dent.unsqueeze(-1) * torch.where(p > 0, p * (z + H.unsqueeze(-1)), torch.zeros_like(p))
    return (g / temperature).to(logits.dtype)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, ignore_index, start, group, use_triton,
                inplace):
        V_r = logits.shape[-1]
        ignored = tokens == ignore_index
        in_slice = (tokens >= start) & (tokens < start + V_r) & ~ignored
        # Local ids: in-slice tokens map to [0, V_r); everything else to a local "ignore" id.
        ignore_local = -1
        tokens_local = torch.where(in_slice, tokens - start, torch.full_like(tokens, ignore_local))
        lp_r, H_r, M_r, logS_r = _local_stats(logits, tokens_local, temperature, ignore_local,
                                              use_triton)
        M = M_r.clone()
        dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
        a = torch.exp(logS_r + (M_r - M))
        packed = torch.stack([
            a,
            a * ((logS_r - H_r) + (M_r - M)),
            torch.where(in_slice, lp_r + (M_r - M) + logS_r, torch.zeros_like(lp_r)),
        ], dim=-1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        S = packed[..., 0]
        logS = S.log()
        H = logS - packed[..., 1] / S
        logp = torch.where(ignored, torch.zeros_like(S), packed[..., 2] - logS)
        # Backward needs: the local onehot index (-1 where the token is elsewhere or ignored), and
        # dlogp zeroed only at ignored positions (out-of-slice tokens still get the -p term).
        onehot = torch.where(in_slice, tokens - start, torch.full_like(tokens, -1))
        ctx.save_for_backward(logits, onehot, ignored, M, logS, H)
        ctx.temperature = temperature
        ctx.use_triton = use_triton
        ctx.inplace = inplace
        ctx.mark_non_differentiable(M)
        return logp, H

    @staticmethod
    def backward(ctx, dlogp, dent):
        logits, onehot, ignored, M, logS, H = ctx.saved_tensors
        if dlogp is not None:
            dlogp = torch.where(ignored, torch.zeros_like(dlogp), dlogp)
        if ctx.use_triton:
            from .logprobs import _tl_bwd, _tl_bwd_inplace
            lse = torch.stack([M, logS], dim=-1)
            # The kernel's onehot test is `col == token`; -1 never matches, and ignore_index is
            # set to a value no local token takes, so dlogp (already zeroed where ignored) is used.
            no_ignore = -(2 ** 62)
            args = (onehot if dlogp is not None else None, dlogp, dent, lse, H, ctx.temperature,
                    no_ignore)
            if ctx.inplace:
                _tl_bwd_inplace(logits, *args)
                g = logits
            else:
                g = _tl_bwd(logits, *args)
        else:
            g = _local_grad_torch(logits, onehot, dlogp, dent, M, logS, H, ctx.temperature)
        return g, None, None, None, None, None, None, None


def _check_group(op, process_group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: process_group was given but torch.distributed is not initialized")
    return process_group


def vocab_parallel_token_logprobs(logits, tokens, temperature, ignore_index, process_group,
                                  vocab_start_index, use_triton, inplace, check_tokens):
    op = "token_logprobs"
    group = _check_group(op, process_group)
    V_r = logits.shape[-1]
    if vocab_start_index is None:
        vocab_start_index = dist.get_rank(group) * V_r
    if isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int) \
            or vocab_start_index < 0:
        raise ValueError(f"{op}: vocab_start_index must be an int >= 0, got {vocab_start_index!r}")
    if check_tokens:
        V = torch.tensor([V_r], device=logits.device, dtype=torch.int64)
        dist.all_reduce(V, group=group)
        V = int(V.item())
        bad = ((tokens < 0) | (tokens >= V)) & (tokens != ignore_index)
        if bool(bad.any()):
            pos = int(bad.reshape(-1).nonzero()[0, 0])
            raise ValueError(f"{op}: tokens contains id {int(tokens.reshape(-1)[pos])} (flat "
                             f"position {pos}) outside the full vocab [0, {V}) that is not "
                             f"ignore_index={ignore_index}")
    return _VocabParallelLogprobs.apply(logits, tokens, temperature, ignore_index,
                                        vocab_start_index, group, use_triton, inplace)
