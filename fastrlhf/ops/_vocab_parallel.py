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

The same pattern serves the other vocab-parallel ops here:

* ``full_kl``: per row and slice, both distributions' ``(M_r, log S_r)``, the p-weighted
  ``E_r = sum_j p^r_j ((x_j - Mx_r) - (y_j - My_r))`` relative to the slice maxima, and two
  flags (a ``q_j = 0`` under ``p_j > 0``; a NaN / +inf).  One MAX all-reduce of ``[4, N]``
  (both maxima, both flags), one SUM of ``[3, N]``::

      ax_r = Sx_r e^(Mx_r - Mx),  ay_r = Sy_r e^(My_r - My),  Sx = sum ax_r,  Sy = sum ay_r
      KL   = sum_r ax_r (E_r + (Mx_r - Mx) - (My_r - My)) / Sx - log Sx + log Sy

  The backward is the unsharded kernel's, run on the slice with the global ``(M, log S)`` of
  both rows and the global KL: local, no communication.
* ``linear_token_logprobs``: the fused lm_head forward already merges per-vocab-split partials
  into ``(logp_r, H_r, M_r, log S_r)`` of its weight rows; those are combined exactly as above.
  The backward is local for ``dW`` / ``db`` of the slice; ``dhidden`` is a partial sum over the
  slice's vocab rows on every rank and is summed with one all-reduce of ``[N, H]`` (the usual
  tensor-parallel cost of a vocab-parallel lm_head: Megatron's
  ``copy_to_tensor_model_parallel_region`` does the same all-reduce).
* ``fused_ppo_loss`` / ``fused_linear_ppo_loss``: the vocab-parallel log-probs and entropy
  above, then the O(N) loss terms (:func:`compose_ppo_loss`).  For logits this is two sweeps
  over the slice plus one gradient write (forward reads it, backward reads it again and writes
  the gradient), not the single-device fused kernel's one DRAM sweep + an L2 re-read: the
  per-token loss derivatives need the *global* log-prob and entropy, which exist only after the
  all-reduce, so no sweep can write the gradient before the communication finishes.
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
    # a slice with nothing finite in a row (masked vocab): S = 0, log S = -inf, no NaN
    z = x - torch.where(M == float("-inf"), torch.zeros_like(M), M).unsqueeze(-1)
    S = z.exp().sum(-1)
    logS = S.log()
    logsm = z - logS.unsqueeze(-1)
    p = logsm.exp()
    H = -(p * torch.where(p > 0, logsm, torch.zeros_like(logsm))).sum(-1)
    valid = tokens_local != ignore_local
    idx = torch.where(valid, tokens_local, torch.zeros_like(tokens_local)).long()
    lp = torch.where(valid, logsm.gather(-1, idx.unsqueeze(-1)).squeeze(-1), torch.zeros_like(M))
    return lp, H, M, logS


def _local_stats(logits, tokens_local, temperature, ignore_local, impl):
    """Per-row statistics of one slice with the backend's own single-pass forward ("triton",
    "native": no [N, V_r] temporaries) or in plain torch (anything else)."""
    if impl == "triton":
        from .logprobs import _fwd_impl
        from .. import config
        with config.check_tokens(False):  # local ids are in range by construction
            lp, H, lse = _fwd_impl(logits, tokens_local, temperature, ignore_local)
        return lp, H, lse[..., 0], lse[..., 1]
    if impl == "native":
        from .._native import _tl_fwd_impl
        with torch.no_grad():
            lp, H, lse = _tl_fwd_impl(logits, tokens_local, temperature, ignore_local)
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


def _split_tokens(tokens, ignore_index, start, V_r):
    """(ignored, in_slice, local ids): in-slice tokens map to [0, V_r), all others to -1."""
    ignored = tokens == ignore_index
    in_slice = (tokens >= start) & (tokens < start + V_r) & ~ignored
    local = torch.where(in_slice, tokens - start, torch.full_like(tokens, -1))
    return ignored, in_slice, local


def _combine_logprobs(lp_r, H_r, M_r, logS_r, in_slice, ignored, group):
    """Global (logp, H, M, log S) from each rank's slice partials: two all-reduces.

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


def _zero_masked_rows(g, keep, M, logS, H):
    """Rows with ``keep == False`` whose statistics are not finite (NaN / inf logits there) get
    an exactly zero gradient (their upstream gradients are already zero; ``0 * NaN`` is not).
    Touches only those rows."""
    if keep is None:
        return g
    rows = ~keep & ~(torch.isfinite(M) & torch.isfinite(logS) & torch.isfinite(H))
    if bool(rows.any()):
        g[rows] = 0
    return g


def _mask_grad(d, drop):
    """``d`` with zeros where ``drop`` (both may be None)."""
    if d is None or drop is None:
        return d
    return torch.where(drop, torch.zeros_like(d), d)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, ignore_index, start, group, impl,
                inplace, keep=None):
        V_r = logits.shape[-1]
        # Local ids: in-slice tokens map to [0, V_r); everything else to a local "ignore" id.
        ignored, in_slice, tokens_local = _split_tokens(tokens, ignore_index, start, V_r)
        ignore_local = -1
        lp_r, H_r, M_r, logS_r = _local_stats(logits, tokens_local, temperature, ignore_local,
                                              impl)
        logp, H, M, logS = _combine_logprobs(lp_r, H_r, M_r, logS_r, in_slice, ignored, group)
        # Backward needs: the local onehot index (-1 where the token is elsewhere or ignored), and
        # dlogp zeroed only at ignored positions (out-of-slice tokens still get the -p term).
        # ``keep`` (optional, bool [...]): rows outside it get exactly zero gradient.
        onehot = tokens_local
        ctx.save_for_backward(logits, onehot, ignored, M, logS, H, keep)
        ctx.temperature = temperature
        ctx.impl = impl
        ctx.inplace = inplace
        ctx.mark_non_differentiable(M)
        return logp, H

    @staticmethod
    def backward(ctx, dlogp, dent):
        logits, onehot, ignored, M, logS, H, keep = ctx.saved_tensors
        dlogp = _mask_grad(dlogp, ignored if keep is None else ignored | ~keep)
        dent = _mask_grad(dent, None if keep is None else ~keep)
        if ctx.impl in ("triton", "native"):
            from .logprobs import _tl_bwd, _tl_bwd_inplace
            lse = torch.stack([M, logS], dim=-1)
            # The kernels' onehot test is `col == token` (native: token in [0, V)); -1 never
            # matches, and ignore_index is set to a value no local token takes, so dlogp
            # (already zeroed where ignored) is used.
            no_ignore = -(2 ** 62)
            args = (onehot if dlogp is not None else None, dlogp, dent, lse, H, ctx.temperature,
                    no_ignore)
            if ctx.impl == "native":
                from .._native import _launch_bwd
                g = _launch_bwd(logits, None, *args)
            elif ctx.inplace:
                _tl_bwd_inplace(logits, *args)
                g = logits
            else:
                g = _tl_bwd(logits, *args)
        else:
            g = _local_grad_torch(logits, onehot, dlogp, dent, M, logS, H, ctx.temperature)
        g = _zero_masked_rows(g, keep, M, logS, H)
        return g, None, None, None, None, None, None, None, None


def _check_group(op, process_group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: process_group was given but torch.distributed is not initialized")
    return process_group


def _resolve_start(op, group, V_r, vocab_start_index):
    if vocab_start_index is None:
        vocab_start_index = dist.get_rank(group) * V_r
    if isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int) \
            or vocab_start_index < 0:
        raise ValueError(f"{op}: vocab_start_index must be an int >= 0, got {vocab_start_index!r}")
    return vocab_start_index


def _check_full_vocab(op, group, V_r, tokens, ignore_index):
    """Every rank checks the ids against the full vocab (sum of the slices): one scalar
    all-reduce and a host sync (disable with ``fastrlhf.config.set_check_tokens(False)``)."""
    V = torch.tensor([V_r], device=tokens.device, dtype=torch.int64)
    dist.all_reduce(V, group=group)
    V = int(V.item())
    bad = ((tokens < 0) | (tokens >= V)) & (tokens != ignore_index)
    if bool(bad.any()):
        pos = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(f"{op}: tokens contains id {int(tokens.reshape(-1)[pos])} (flat "
                         f"position {pos}) outside the full vocab [0, {V}) that is not "
                         f"ignore_index={ignore_index}")


def vocab_parallel_token_logprobs(logits, tokens, temperature, ignore_index, process_group,
                                  vocab_start_index, impl, inplace, check_tokens, *,
                                  keep=None, op="token_logprobs"):
    group = _check_group(op, process_group)
    V_r = logits.shape[-1]
    vocab_start_index = _resolve_start(op, group, V_r, vocab_start_index)
    if check_tokens:
        _check_full_vocab(op, group, V_r, tokens, ignore_index)
    return _VocabParallelLogprobs.apply(logits, tokens, temperature, ignore_index,
                                        vocab_start_index, group, impl, inplace, keep)


# ---------------------------------------------------------------------------------------------
# full_kl
# ---------------------------------------------------------------------------------------------

def _kl_partials_torch(logits, ref_logits, temperature):
    """Slice partials in plain torch: ``(E [...], stats [6, ...])`` with stats rows
    ``(Mx, log Sx, My, log Sy, qzero, bad)`` -- the layout of the Triton kernel's PARTIAL mode."""
    acc = torch.float64 if torch.float64 in (logits.dtype, ref_logits.dtype) else torch.float32
    x = logits.to(acc) / temperature
    y = ref_logits.to(acc) / temperature
    ninf, pinf = float("-inf"), float("inf")
    bad = (x.isnan() | y.isnan() | (x == pinf) | (y == pinf)).any(-1)
    xlive, ydead = x > ninf, y == ninf
    qzero = (xlive & ydead).any(-1)
    Mx, My = x.amax(-1), y.amax(-1)
    mx = torch.where(Mx == ninf, torch.zeros_like(Mx), Mx).unsqueeze(-1)
    my = torch.where(My == ninf, torch.zeros_like(My), My).unsqueeze(-1)
    ex = (x - mx).exp()
    Sx, Sy = ex.sum(-1), (y - my).exp().sum(-1)
    r = torch.where(xlive & ~ydead, (x - mx) - (y - my), torch.zeros_like(x))
    E = torch.where(Sx > 0, (ex * r).sum(-1) / Sx, torch.zeros_like(Sx))
    stats = torch.stack([Mx, Sx.log(), My, Sy.log(), qzero.to(acc), bad.to(acc)])
    return E, stats


def _kl_partials_triton(logits, ref_logits, temperature):
    from .kl import _kernels, _layouts
    V = logits.shape[-1]
    x, xd, xs, y, yd, ys = _layouts(logits, ref_logits)
    E, stats = _kernels().full_kl_fwd(x, xd, xs, y, yd, ys, V, 1.0 / temperature, partial=True)
    lead = tuple(logits.shape[:-1])
    return E.view(lead), stats.view((6,) + lead)


def _combine_kl(E, st, group):
    """Global (KL, stats [4, ...] = (Mx, log Sx, My, log Sy)) from the slice partials."""
    Mx_r, lsx_r, My_r, lsy_r, qz_r, bad_r = st.unbind(0)
    mx = torch.stack([Mx_r, My_r, qz_r, bad_r])
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    Mx, My, qz, bad = mx.unbind(0)
    ninf = float("-inf")
    zero = torch.zeros_like(E)
    ax = torch.where(lsx_r == ninf, zero, torch.exp(lsx_r + (Mx_r - Mx)))
    ay = torch.where(lsy_r == ninf, zero, torch.exp(lsy_r + (My_r - My)))
    # slices with p mass and no flag (a flagged row's value is decided by the flag below)
    ok = (lsx_r > ninf) & (qz_r == 0) & (bad_r == 0)
    tx = torch.where(ok, ax * (E + (Mx_r - Mx) - (My_r - My)), zero)
    sums = torch.stack([ax, ay, tx])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    Sx, Sy, Tt = sums.unbind(0)
    lsx, lsy = Sx.log(), Sy.log()
    kl = Tt / Sx - lsx + lsy
    kl = torch.where(qz > 0, torch.full_like(kl, float("inf")), kl)
    kl = torch.where((bad > 0) | (Mx == ninf) | (My == ninf), torch.full_like(kl, float("nan")),
                     kl)
    return kl, torch.stack([Mx, lsx, My, lsy])


def _kl_grad_torch(g, logits, ref_logits, kl, stats, temperature, need_x, need_y):
    acc = kl.dtype
    Mx, lsx, My, lsy = (t.unsqueeze(-1) for t in stats.unbind(0))
    a = (logits.to(acc) / temperature - Mx) - lsx
    b = (ref_logits.to(acc) / temperature - My) - lsy
    p = a.exp()
    gs = (g.to(acc) / temperature).unsqueeze(-1)
    dx = dy = None
    if need_x:
        dx = (torch.where(p > 0, p * ((a - b) - kl.unsqueeze(-1)), torch.zeros_like(p)) * gs)
        dx = dx.to(logits.dtype)
    if need_y:
        dy = ((b.exp() - p) * gs).to(ref_logits.dtype)
    return dx, dy


class _VocabParallelFullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, temperature, group, use_triton):
        part = _kl_partials_triton if use_triton else _kl_partials_torch
        with torch.no_grad():
            E, st = part(logits, ref_logits, temperature)
        kl, stats = _combine_kl(E, st, group)
        ctx.save_for_backward(logits, ref_logits, kl, stats)
        ctx.temperature = temperature
        ctx.use_triton = use_triton
        return kl

    @staticmethod
    def backward(ctx, g):
        logits, ref_logits, kl, stats = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_y):
            return None, None, None, None, None
        if ctx.use_triton:
            from .kl import _fkl_bwd
            dx, dy = _fkl_bwd(g.contiguous(), logits, ref_logits, kl, stats.contiguous(),
                              ctx.temperature, need_x, need_y)
        else:
            dx, dy = _kl_grad_torch(g, logits, ref_logits, kl, stats, ctx.temperature, need_x,
                                    need_y)
        return (dx if need_x else None), (dy if need_y else None), None, None, None


def vocab_parallel_full_kl(logits, ref_logits, temperature, process_group, vocab_start_index,
                           use_triton):
    """KL over the full vocab from each rank's slice of both logits (equal slices on both)."""
    op = "full_kl"
    group = _check_group(op, process_group)
    _resolve_start(op, group, logits.shape[-1], vocab_start_index)  # validated; KL needs no ids
    return _VocabParallelFullKL.apply(logits, ref_logits, temperature, group, use_triton)


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs (vocab-parallel lm_head: weight rows [V_r, H] of this rank's slice)
# ---------------------------------------------------------------------------------------------

class _CopyToGroup(torch.autograd.Function):
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


class _VocabParallelLinear(torch.autograd.Function):
    """Triton path: the fused lm_head kernels on the slice, partials combined across ranks."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, ignore_index, start, group):
        from ._common import rows_layout
        from .fused_linear import _kernels, _weight_view
        V_r = weight.shape[0]
        ignored, in_slice, tokens_local = _split_tokens(tokens, ignore_index, start, V_r)
        h, dims, strides = rows_layout(hidden)
        b = None if bias is None else bias.contiguous()
        lp_r, H_r, lse = _kernels().linear_logprobs_fwd(
            h, dims, strides, _weight_view(weight), b, tokens_local.reshape(-1).contiguous(),
            1.0 / temperature, -1)
        lead = hidden.shape[:-1]
        lp_r, H_r, lse = lp_r.view(lead), H_r.view(lead), lse.view(*lead, 2)
        logp, H, M, logS = _combine_logprobs(lp_r, H_r, lse[..., 0], lse[..., 1], in_slice,
                                             ignored, group)
        ctx.save_for_backward(hidden, weight, bias, tokens_local, ignored, M, logS, H)
        ctx.temperature = temperature
        ctx.group = group
        ctx.mark_non_differentiable(M)
        ctx.set_materialize_grads(False)
        return logp, H

    @staticmethod
    def backward(ctx, dlogp, dent):
        from .fused_linear import _lin_bwd
        hidden, weight, bias, onehot, ignored, M, logS, H = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        if dlogp is None and dent is None:
            return (None,) * 8
        dlogp = _mask_grad(dlogp, ignored)
        lse = torch.stack([M, logS], dim=-1)
        # onehot is -1 off the slice (matches no column); no id equals the "ignore" value, and
        # dlogp is already zero where the token was ignored.
        dh, dw, db = _lin_bwd(hidden, weight, bias, onehot, dlogp, dent, lse, H,
                              ctx.temperature, -(2 ** 62), need_dh, need_dw, need_db)
        if need_dh:
            # dhidden: this slice's partial sum over its vocab rows; the full gradient is the sum
            # over the ranks (one all-reduce of [N, H], in hidden's dtype).
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=ctx.group)
        return (dh if need_dh else None, dw if need_dw else None, db if need_db else None,
                None, None, None, None, None)


def vocab_parallel_linear_token_logprobs(hidden, weight, tokens, bias, temperature, ignore_index,
                                         process_group, vocab_start_index, use_triton,
                                         check_tokens, op="linear_token_logprobs"):
    """(logp, entropy) over the full vocab; ``weight`` / ``bias`` hold this rank's rows."""
    group = _check_group(op, process_group)
    V_r = weight.shape[0]
    start = _resolve_start(op, group, V_r, vocab_start_index)
    if check_tokens:
        _check_full_vocab(op, group, V_r, tokens, ignore_index)
    if use_triton:
        return _VocabParallelLinear.apply(hidden, weight, bias, tokens, temperature,
                                          ignore_index, start, group)
    # reference / native: the slice's logits in plain torch (autograd gives the local dlogits,
    # dW, db; the all-reduce of dhidden is _CopyToGroup's backward).
    h = _CopyToGroup.apply(hidden, group) if hidden.requires_grad else hidden
    logits = reference.linear_logits(h, weight, bias)
    return _VocabParallelLogprobs.apply(logits, tokens, temperature, ignore_index, start, group,
                                        False, False, None)


# ---------------------------------------------------------------------------------------------
# the PPO loss on vocab-parallel log-probs (fused_ppo_loss / fused_linear_ppo_loss)
# ---------------------------------------------------------------------------------------------

def compose_ppo_loss(logp, ent, old_logp, advantages, mask, ref_logp, kl_coef, kl_kind,
                     entropy_coef, clip_low, clip_high, dual_clip, agg, ratio_level, backend,
                     kw):
    """``fused_ppo_loss``'s definition on per-token ``logp`` / ``ent`` (O(B T) work):
    returns ``(loss, stats)`` with the keys of :data:`fastrlhf.ops.fused_loss.FUSED_STATS`."""
    from .kl import kl_penalty
    from .losses import agg_loss, ppo_policy_loss
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


def vocab_parallel_fused_ppo_loss(logits, tokens, old_logp, advantages, mask, ref_logp, kl_coef,
                                  kl_kind, entropy_coef, clip_low, clip_high, dual_clip,
                                  temperature, agg, ratio_level, ignore_index, backend,
                                  inplace_backward, check_tokens, process_group,
                                  vocab_start_index, kw):
    """``fused_ppo_loss`` on this rank's vocab slice of the logits: the vocab-parallel
    ``token_logprobs`` (entropy included) composed with the O(B T) loss terms.  Masked
    tokens get exactly zero gradient, also where their logits are NaN."""
    logp, ent = vocab_parallel_token_logprobs(
        logits, tokens, temperature, ignore_index, process_group, vocab_start_index, backend,
        inplace_backward and backend == "triton", check_tokens, keep=mask != 0,
        op="fused_ppo_loss")
    return compose_ppo_loss(logp, ent, old_logp, advantages, mask, ref_logp, kl_coef, kl_kind,
                            entropy_coef, clip_low, clip_high, dual_clip, agg, ratio_level,
                            backend, kw)
