"""Eager PyTorch definitions of every fastrlhf op: the specification.

Each function here implements its formula plainly (materializing whatever it likes) and works in
float64 as well as float32; the Triton and native backends are tested against these in float64.
Outputs follow the library's dtype rule: float32 for fp16/bf16/fp32 inputs, float64 for float64.

Argument validation lives in :mod:`fastrlhf.ops`; these functions assume well-formed inputs.
"""

from __future__ import annotations

import torch

from .tables import AGG_MODES, GROUP_ADV_KINDS, KL_BASE, MASKED_EPS, acc_dtype

__all__ = ["acc_dtype", "token_logprobs", "token_entropy"]


# --------------------------------------------------------------------------------------------
# token log-probabilities and entropy
# --------------------------------------------------------------------------------------------

def _entropy_from_logsm(logsm: torch.Tensor) -> torch.Tensor:
    # H = -sum_j p_j log p_j, with 0 * log 0 = 0 (entries at -inf contribute nothing).
    p = logsm.exp()
    return -(p * torch.where(p > 0, logsm, torch.zeros_like(logsm))).sum(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False, ignore_index: int = -100):
    """logp[...] = log_softmax(logits / temperature, -1)[..., tokens[...]].

    logits ``[..., V]``, tokens ``[...]`` (int).  Positions with ``tokens == ignore_index`` give
    logp = 0 (and no gradient through it).  With ``return_entropy`` also returns the entropy
    ``-sum_j p_j log p_j`` of the same tempered distribution (computed at every position).

    Edge-case contract (every backend):

    * An id outside ``[0, V)`` that is not ``ignore_index`` raises ValueError in the op (token
      check on, the default); with the check off (``fastrlhf.config.set_check_tokens(False)``)
      its logp is NaN, its entropy is still computed, and its gradient is
      ``-p * dlogp / T`` (the one-hot term is absent: the id selects no logit).
    * NaN anywhere in a row makes that row's logp, entropy and gradient NaN (other rows are
      untouched); a row with ``+inf`` is NaN likewise; ``-inf`` entries have p = 0 and
      contribute nothing (a row entirely ``-inf`` is NaN).  A huge common offset (``x + 1e4``)
      changes nothing: everything is computed relative to the row max.
    * Empty leading dims give empty outputs; an empty vocab (V = 0) raises ValueError.
    """
    x = logits.to(acc_dtype(logits.dtype)) / temperature
    logsm = torch.log_softmax(x, dim=-1)
    V = logits.shape[-1]
    valid = tokens != ignore_index
    in_range = (tokens >= 0) & (tokens < V)
    idx = torch.where(valid & in_range, tokens, torch.zeros_like(tokens)).long()
    logp = logsm.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    # An id outside [0, V) selects no logit: logp = NaN - logsumexp(x), so its gradient is the
    # -p part of (onehot - p) alone, as in the kernels (reachable only with the token check off).
    nan = torch.full_like(logp, float("nan"))
    logp = torch.where(in_range, logp, nan - torch.logsumexp(x, dim=-1))
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if return_entropy:
        return logp, _entropy_from_logsm(logsm)
    return logp


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dim, ``[..., V] -> [...]``.

    Edge cases as :func:`token_logprobs`: a row holding NaN or ``+inf`` (or entirely ``-inf``)
    gives NaN value and gradient in that row only; ``-inf`` entries contribute nothing."""
    x = logits.to(acc_dtype(logits.dtype)) / temperature
    return _entropy_from_logsm(torch.log_softmax(x, dim=-1))


# --------------------------------------------------------------------------------------------
# KL estimators, exact full-vocabulary KL, group (outcome) advantages
# --------------------------------------------------------------------------------------------

def _kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, base: str) -> torch.Tensor:
    if base == "k1":
        return logp - ref_logp
    if base == "abs":
        return (logp - ref_logp).abs()
    if base == "k2":
        return 0.5 * (logp - ref_logp).square()
    kl = torch.clamp(ref_logp - logp, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


class _ZeroWithGrad(torch.autograd.Function):
    """``x - x.detach()`` without the NaN at infinite ``x``: value 0, gradient the identity."""

    @staticmethod
    def forward(ctx, x):
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _zero_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _ZeroWithGrad.apply(x)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimator (verl ``kl_penalty_forward``), elementwise, same shape as ``logp``.

    With ``d = logp - ref_logp``: ``k1``/``kl``: d;  ``abs``: |d|;  ``k2``/``mse``: d^2 / 2;
    ``k3``/``low_var_kl``: ``k = clamp(-d, -20, 20)``, ``clamp(exp(k) - k - 1, -10, 10)``.
    A ``"+"`` suffix is the straight-through variant: the base value with k2's gradient,
    ``k2 - k2.detach() + base.detach()``.  Computed (and returned) in float32, float64 if either
    input is float64.

    Edge-case contract (every backend): NaN in either input gives NaN value and gradient at that
    element only.  An infinite difference ``d`` (one input ``+-inf``) gives the base value --
    k1 ``d``, abs / k2 ``+inf``, k3 ``10`` (its clamps) -- also for the ``"+"`` kinds (never
    ``inf - inf = NaN``); the gradient is the base kind's (k1 1, abs ``sign(d)``, k2 ``d``, k3 0
    outside its clamps), and k2's ``d = +-inf`` for every ``"+"`` kind.  Both inputs equal
    infinities give ``d = NaN``: NaN.
    """
    plus = kind.endswith("+")
    base = KL_BASE.get(kind[:-1] if plus else kind)
    if base is None:
        raise ValueError(f"kl_penalty: unknown kind {kind!r}")
    acc = acc_dtype(logp, ref_logp)
    x, y = logp.to(acc), ref_logp.to(acc)
    fwd = _kl_estimate(x, y, base)
    if not plus or base == "k2":
        return fwd
    # k2 - k2.detach() + base.detach(), written so that an infinite k2 (|d| = inf) keeps the
    # base value instead of giving inf - inf = NaN.
    return fwd.detach() + _zero_with_grad(0.5 * (x - y).square())


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0
            ) -> torch.Tensor:
    """KL(p || q) = sum_j p_j (log p_j - log q_j) over the last dim, ``[..., V] -> [...]``.

    ``p = softmax(logits / T)``, ``q = softmax(ref_logits / T)``.  Float32, float64 if either
    input is float64.

    Edge-case contract (every backend):

    * Terms with ``p_j = 0`` are 0 in the value and the gradient, also where ``q_j = 0`` -- and
      ``p_j`` is 0 where it underflows (``full_kl([[0., -1.]], [[0., -inf]], temperature=1e-3)``
      is 0 with gradient 0).
    * ``q_j = 0`` under ``p_j > 0`` gives ``+inf``; that row's ``logits`` gradient is not finite
      (``-inf`` / NaN), its ``ref_logits`` gradient stays finite (``g (q - p) / T``).
    * A row with NaN, or ``+inf`` in ``logits``, or entirely ``-inf`` in either tensor gives NaN;
      its ``logits`` gradient is NaN; its ``ref_logits`` gradient is 0 when only ``logits`` is
      bad and NaN when ``ref_logits`` is (a NaN, or entirely ``-inf``).  Other rows are
      untouched.
    * Empty leading dims give an empty result; an empty vocab (V = 0) raises ValueError.
    """
    acc = acc_dtype(logits, ref_logits)
    logp = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    logq = torch.log_softmax(ref_logits.to(acc) / temperature, dim=-1)
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return (p * diff).sum(-1)




def group_advantages(scores: torch.Tensor, group_ids: torch.Tensor, kind: str = "grpo",
                     eps: float = 1e-6, norm_by_std: bool = True) -> torch.Tensor:
    """Outcome advantages per sample, a plain loop over groups (verl 0.9's estimators).

    scores ``[B]`` float, group_ids ``[B]`` int (any ids).  For a group of size n, mean m and
    unbiased std s (``torch.std``):

    * ``grpo``: ``(x - m) / (s + eps)``; with ``norm_by_std=False`` it is ``dr_grpo``.
    * ``dr_grpo``: ``x - m``.
    * ``rloo``: ``x * n / (n - 1) - m * n / (n - 1)``.

    A group of size 1 has m = 0 and s = 1 (verl), i.e. grpo gives ``x / (1 + eps)``, dr_grpo
    ``x``, and rloo leaves ``x`` unchanged.  Returns ``[B]`` float32 (float64 for float64).

    Edge cases: a NaN / inf score makes its group's advantages NaN / non-finite, other groups
    are untouched; the gradient of a group of size 1 is its closed form (``1 / (1 + eps)`` for
    grpo, 1 otherwise) even for a NaN / inf score; a group of equal scores (zero std) passes
    no gradient through the std (``torch.std``'s backward), so grpo's gradient there is
    ``(onehot - 1 / n) / eps`` (NaN / inf for ``eps = 0``); ``B = 0`` gives an empty result.
    """
    if kind not in GROUP_ADV_KINDS:
        raise ValueError(f"group_advantages: unknown kind {kind!r}")
    acc = acc_dtype(scores)
    x = scores.to(acc)
    ids = group_ids.tolist()
    members: dict = {}
    for i, g in enumerate(ids):
        members.setdefault(g, []).append(i)
    out = [None] * len(ids)
    for idx in members.values():
        vals = torch.stack([x[i] for i in idx])
        n = len(idx)
        if n == 1:
            mean = torch.tensor(0.0, dtype=acc, device=x.device)
            std = torch.tensor(1.0, dtype=acc, device=x.device)
        else:
            mean = torch.mean(vals)
            std = torch.std(vals)
        for i in idx:
            if kind == "grpo" and norm_by_std:
                out[i] = (x[i] - mean) / (std + eps)
            elif kind in ("grpo", "dr_grpo"):
                out[i] = x[i] - mean
            elif n > 1:
                out[i] = x[i] * n / (n - 1) - mean * n / (n - 1)
            else:
                out[i] = x[i]
    if not out:
        return x.clone()
    return torch.stack(out)


__all__ += ["kl_penalty", "full_kl", "group_advantages", "GROUP_ADV_KINDS"]


# --------------------------------------------------------------------------------------------
# masked statistics, loss aggregation, clipped PPO policy / value losses (verl 0.9 semantics)
# --------------------------------------------------------------------------------------------
#
# Masks may be bool, integer or floating; a float mask acts as a per-token weight.  Everywhere a
# masked reduction is taken, positions where the mask is 0 are *selected out* before multiplying
# (``where(mask != 0, x, 0) * mask``), so NaN / inf outside the mask never leaks in.  Unlike verl,
# a fully masked input never produces NaN: masked means, variances, whitened values and losses
# are 0 there.

from typing import NamedTuple  # noqa: E402



def _div_or_zero(num: torch.Tensor, den) -> torch.Tensor:
    """``num / den``, and exactly 0 (with a zero gradient) where ``den == 0``."""
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


def _masked_terms(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # where(mask != 0, x, 0) * mask: the mask weight, with anything outside the mask ignored.
    return torch.where(m != 0, x, torch.zeros_like(x)) * m


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """``sum(where(mask != 0, x, 0) * mask)`` over ``dim`` (all dims when None).

    Edge-case contract of all masked statistics (every backend name): NaN / inf where the mask
    is 0 is ignored (value and gradient); an empty or fully masked input gives 0 (whiten: all
    zeros), never NaN; the mask never receives a gradient."""
    acc = acc_dtype(x.dtype)
    t = _masked_terms(x.to(acc), mask.detach().to(acc))
    return t.sum() if dim is None else t.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """``masked_sum(x, mask, dim) / (sum(mask, dim) + 1e-8)``; 0 where the mask is all zero."""
    acc = acc_dtype(x.dtype)
    m = mask.detach().to(acc)
    s = masked_sum(x, m, dim)
    n = m.sum() if dim is None else m.sum(dim=dim)
    return s / (n + MASKED_EPS)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over all masked elements: ``masked_mean((x - masked_mean(x))^2)``, times the
    Bessel factor ``n / (n - 1)`` (``n = sum(mask)``) when ``unbiased`` and ``n > 1``.

    verl raises for ``n <= 1``; here the uncorrected value is returned (0 for a single element
    or an empty mask)."""
    acc = acc_dtype(x.dtype)
    xv, m = x.to(acc), mask.detach().to(acc)
    mean = masked_mean(xv, m)
    var = masked_mean((xv - mean) ** 2, m)
    if unbiased:
        n = m.sum()
        big = n > 1
        var = torch.where(big, var * n / torch.where(big, n - 1, torch.ones_like(n)), var)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + 1e-8)`` (``+ mean`` again when not ``shift_mean``) at every
    position, with ``mean = masked_mean(x, mask)`` and ``var = masked_var(x, mask)`` (unbiased).
    An all-zero mask gives zeros everywhere."""
    acc = acc_dtype(x.dtype)
    xv, m = x.to(acc), mask.detach().to(acc)
    mean = masked_mean(xv, m)
    var = masked_var(xv, m, unbiased=True)
    w = (xv - mean) * torch.rsqrt(var + MASKED_EPS)
    if not shift_mean:
        w = w + mean
    return torch.where((m != 0).any(), w, torch.zeros_like(w))


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Packed layout: the segment of every column, int64 ``[total]`` (``s`` for columns
    ``cu_seqlens[s]:cu_seqlens[s+1]``)."""
    cu = cu_seqlens.to(torch.int64)
    S = cu.numel() - 1
    return torch.repeat_interleave(torch.arange(S, device=cu.device), cu[1:] - cu[:-1],
                                   output_size=total)


def segment_sum(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sums of the consecutive segments ``x[cu[s]:cu[s+1]]`` of a 1-D ``x``: ``[S]`` (0 for an
    empty segment), differentiable.  Deterministic on every device: each segment is summed in
    order by one reduction (no atomics, unlike ``index_add_`` on CUDA), so repeated runs give
    bitwise the same sums and gradients."""
    cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
    return torch.segment_reduce(x, "sum", lengths=cu[1:] - cu[:-1], unsafe=True)


class _SegmentBroadcast(torch.autograd.Function):
    """``x[segment_ids]`` whose backward is :func:`segment_sum` (indexing's own backward
    accumulates with atomics on CUDA)."""

    @staticmethod
    def forward(ctx, x, cu_seqlens, total):
        ctx.save_for_backward(cu_seqlens)
        return x[segment_ids(cu_seqlens, total)]

    @staticmethod
    def backward(ctx, g):
        (cu,) = ctx.saved_tensors
        return segment_sum(g, cu), None, None


def segment_broadcast(x: torch.Tensor, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Each segment's value of ``x`` ``[S]`` repeated over its columns: ``[total]``,
    differentiable with a deterministic backward."""
    return _SegmentBroadcast.apply(x, cu_seqlens.to(device=x.device, dtype=torch.int64), total)


def _row_sums(x: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
    """Sum over the last dim of ``[B, T]`` (``[B]``), or over each segment of the packed
    ``[1, total]`` layout (``[S]``)."""
    if cu_seqlens is None:
        return x.sum(-1)
    return segment_sum(x.reshape(-1), cu_seqlens)


def _per_token(x: torch.Tensor, like: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
    """A per-row ``[B]`` (per-segment ``[S]``) value broadcast to the tokens of ``like``."""
    if cu_seqlens is None:
        return x.unsqueeze(-1).expand_as(like)
    return segment_broadcast(x, cu_seqlens, like.shape[-1]).reshape(like.shape)


def _default_norm_len(per_token: torch.Tensor, cu_seqlens=None) -> int:
    """``loss_scale_factor``'s default: T, or the longest segment of the packed layout."""
    if cu_seqlens is None:
        return per_token.shape[-1]
    cu = cu_seqlens.to(torch.int64)
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def agg_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
             dp_size: int = 1, batch_num_tokens=None, global_batch_size=None,
             loss_scale_factor=None, cu_seqlens=None) -> torch.Tensor:
    """Aggregate a ``[B, T]`` per-token loss into a scalar, as verl 0.9 ``agg_loss``.

    With ``m`` the mask, ``S_b = sum_t where(m != 0, L, 0) * m`` and ``n_b = sum_t m``:

    * ``token-mean``: ``dp_size * sum_b S_b / N``, ``N = batch_num_tokens`` or ``sum_b n_b``.
    * ``token-sum``: ``dp_size * sum_b S_b``.
    * ``seq-mean-token-sum``: ``dp_size * sum_{b: n_b > 0} S_b / G``, ``G = global_batch_size``
      or the number of rows with ``n_b > 0``.
    * ``seq-mean-token-mean``: ``dp_size * sum_{b: n_b > 0} S_b / (n_b + 1e-8) / G``.
    * ``seq-mean-token-sum-norm``: ``seq-mean-token-sum / loss_scale_factor`` (default ``T``).

    Packed layout: ``per_token`` / ``mask`` ``[1, total]`` with ``cu_seqlens`` ``[S+1]``; the
    segments ``cu_seqlens[s]:cu_seqlens[s+1]`` are the rows ``b`` above (and the default ``T``
    is the longest segment), so the result equals the padded ``[S, Tmax]`` layout.

    Edge-case contract (every backend):

    * A zero denominator (fully masked batch) gives 0, never NaN; so does an empty batch
      (``B = 0`` or ``T = 0``) in every mode, ``seq-mean-token-sum-norm`` included (its default
      factor is then 0).
    * NaN / inf where the mask is 0 never enters the value or the gradient (the gradient there
      is exactly 0); NaN / inf at a position with ``mask != 0`` propagates to the loss.
    * The mask is a constant: it never receives a gradient, even a floating mask with
      ``requires_grad``.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"agg_loss: unknown mode {mode!r}; expected one of {AGG_MODES}")
    acc = acc_dtype(per_token.dtype)
    m = mask.detach().to(acc)
    terms = _masked_terms(per_token.to(acc), m)
    if mode == "token-mean":
        n = m.sum() if batch_num_tokens is None else batch_num_tokens
        return _div_or_zero(terms.sum(), n) * dp_size
    if mode == "token-sum":
        return terms.sum() * dp_size
    n_b = _row_sums(m, cu_seqlens)
    seq_valid = (n_b > 0).to(acc)
    seq = _row_sums(terms, cu_seqlens)
    if mode == "seq-mean-token-mean":
        seq = seq / (n_b + MASKED_EPS)
    g = seq_valid.sum() if global_batch_size is None else global_batch_size
    loss = _div_or_zero(_masked_terms(seq, seq_valid).sum(), g) * dp_size
    if mode == "seq-mean-token-sum-norm":
        # The default factor is 0 only for an empty batch (T = 0), whose loss is 0.
        loss = _div_or_zero(loss, _default_norm_len(per_token, cu_seqlens)
                            if loss_scale_factor is None else loss_scale_factor)
    return loss


def agg_row_weights(mask: torch.Tensor, mode: str = "token-mean", dp_size: int = 1,
                    batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None,
                    dtype: torch.dtype = torch.float32, cu_seqlens=None) -> torch.Tensor:
    """Per-row coefficients ``c`` ``[B]`` with ``agg_loss(L, mask, mode, ...) ==
    sum_b c_b * sum_t where(m != 0, L, 0) * m`` for every ``L``: the aggregation is linear in the
    per-token loss and its weights depend on the mask only (so ``d loss / d L = c_b * m``).

    token-mean: ``dp / N``; token-sum: ``dp``; seq-mean-token-sum: ``dp * [n_b > 0] / G``
    (``/ loss_scale_factor`` for -norm); seq-mean-token-mean: ``dp * [n_b > 0] / ((n_b + 1e-8) G)``;
    0 wherever the denominator ``N`` or ``G`` is 0.  Packed ``[1, total]`` mask with
    ``cu_seqlens``: one coefficient per segment, ``[S]`` (as :func:`agg_loss`).
    """
    if mode not in AGG_MODES:
        raise ValueError(f"agg_row_weights: unknown mode {mode!r}; expected one of {AGG_MODES}")
    if mode == "token-mean":
        host = mask.device.type == "cpu" and not torch.compiler.is_compiling()
        rows = mask.shape[:-1] if cu_seqlens is None else (cu_seqlens.numel() - 1,)
        nv = None  # N read on the host, rounded to ``dtype``
        if (batch_num_tokens is None and host and mask.dtype == torch.bool
                and mask.numel() < (1 << 24)):
            # a bool mask's count is exact in every float dtype below 2^24: the N of the float
            # row sums below, from one integer count
            nv = float(mask.count_nonzero())
        else:
            n = (_row_sums(mask.detach().to(dtype), cu_seqlens).sum()
                 if batch_num_tokens is None else batch_num_tokens)
            if host and not (isinstance(n, torch.Tensor) and n.dtype == dtype):
                n = torch.as_tensor(n, dtype=dtype)  # rounded to dtype first, as _div_or_zero
            if host and n.device.type == "cpu" and n.numel() == 1:
                nv = float(n)
        if nv is not None:
            # the same values with one host read instead of five small tensor ops (per call on
            # the CPU path): dp / N rounded once to ``dtype``, as the tensor division rounds it
            return torch.full(rows, 0.0 if nv == 0 else float(dp_size) / nv, dtype=dtype,
                              device=mask.device)
        return _div_or_zero(torch.full(rows, float(dp_size), dtype=dtype, device=mask.device), n)
    m = mask.detach().to(dtype)
    n_b = _row_sums(m, cu_seqlens)
    if mode == "token-sum":
        return torch.full_like(n_b, float(dp_size))
    seq_valid = (n_b > 0).to(dtype)
    g = seq_valid.sum() if global_batch_size is None else global_batch_size
    c = _div_or_zero(seq_valid * dp_size, g)
    if mode == "seq-mean-token-mean":
        c = c / (n_b + MASKED_EPS)
    elif mode == "seq-mean-token-sum-norm":
        c = _div_or_zero(c, _default_norm_len(mask, cu_seqlens) if loss_scale_factor is None
                         else loss_scale_factor)
    return c


class _NaNGradWhere(torch.autograd.Function):
    """A 0-dim zero whose gradient w.r.t. ``x`` is NaN where ``bad`` and 0 elsewhere."""

    @staticmethod
    def forward(ctx, x, bad):
        ctx.save_for_backward(bad)
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        (bad,) = ctx.saved_tensors
        return torch.where(bad, float("nan"), 0.0).to(g.dtype) * g, None


def _nan_grad_where(x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """Adding this to a loss makes its gradient NaN at ``bad`` (where autograd of the eager
    formula may give 0, e.g. through a clamp whose input is NaN), leaving the value unchanged."""
    return _NaNGradWhere.apply(x, bad)


class PolicyTokenTerms(NamedTuple):
    """Per-token pieces of the clipped policy loss (all ``[B, T]``)."""
    loss: torch.Tensor          # the per-token loss (before aggregation)
    dloss_dlogp: torch.Tensor   # its derivative w.r.t. logp (torch's subgradient conventions)
    clipped: torch.Tensor       # bool: the clipped term won (verl pg_clipfrac numerator)
    clipped_lower: torch.Tensor  # bool: the dual clip applied (verl pg_clipfrac_lower numerator)
    approx_kl: torch.Tensor     # old_logp - logp (clamped to [-20, 20] for ratio_level="token")


def _policy_log_ratio(lp, old, m, ratio_level, cu_seqlens=None):
    """(log-ratio value, 1 where d(log-ratio)/d(logp) = 1 else 0, per-token approx-KL)."""
    if ratio_level == "token":
        d = lp - old
        lr = torch.clamp(d, min=-20.0, max=20.0)
        return lr, ((d >= -20.0) & (d <= 20.0)), -lr
    # GSPO: mean log-ratio of the sequence (verl: sum / clamp(count, min=1)), clamped at 10.
    seq = _row_sums(_masked_terms(lp - old, m), cu_seqlens) / _row_sums(m, cu_seqlens).clamp(min=1)
    lr = _per_token(torch.clamp(seq, max=10.0), lp, cu_seqlens)
    return lr, _per_token(seq <= 10.0, lp, cu_seqlens), -(lp - old)


def policy_loss_per_token(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                          mask: torch.Tensor = None, clip_low: float = 0.2, clip_high=None,
                          dual_clip=None, ratio_level: str = "token",
                          cu_seqlens=None) -> PolicyTokenTerms:
    """Per-token clipped PPO / GSPO loss and its derivative w.r.t. ``logp``, in closed form.

    ``logp``, ``old_logp``: ``[B, T]``; ``advantages``: ``[B, T]`` or ``[B]`` (broadcast over T);
    ``mask`` ``[B, T]`` (needed for ``ratio_level="sequence"`` only).  With ``lo = 1 - clip_low``,
    ``hi = 1 + clip_high`` (``clip_high=None``: ``clip_low``):

    * token: ``s = clamp(logp - old_logp, -20, 20)``, ``r = exp(s)``, ``dr/dlogp = r`` inside the
      clamp, 0 outside (torch's clamp passes the gradient at the bounds).
    * sequence (GSPO, verl's stop-gradient form): ``s_b = sum_t m (logp - old) / max(sum_t m, 1)``,
      ``r = exp(min(s_b, 10))`` per row; ``dr/dlogp_t = r`` (0 when ``s_b > 10``).
    * ``l1 = -A r``, ``l2 = -A clamp(r, lo, hi)``, ``L = max(l1, l2)``;
      with ``dual_clip = c``: ``L = min(L, -A c)`` where ``A < 0``.

    Ties follow torch's subgradients (``maximum`` / ``minimum`` split the gradient 50/50 on
    equality), so ``dloss_dlogp`` equals autograd of the eager formula.
    Packed ``[1, total]`` inputs with ``cu_seqlens`` ``[S+1]``: segments are the rows
    (``advantages`` ``[1, total]`` or ``[S]``, the GSPO ratio per segment).
    """
    acc = acc_dtype(logp, old_logp, advantages)
    lp, old, adv = logp.to(acc), old_logp.to(acc), advantages.to(acc)
    if adv.dim() == 1:
        adv = _per_token(adv, lp, cu_seqlens)
    m = None if mask is None else mask.detach().to(acc)
    if ratio_level == "sequence" and m is None:
        raise ValueError("policy_loss_per_token: ratio_level='sequence' needs the mask")
    lr, ind, kl = _policy_log_ratio(lp, old, m, ratio_level, cu_seqlens)
    clip_high = clip_low if clip_high is None else clip_high
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    r = torch.exp(lr)
    l1 = -adv * r
    l2 = -adv * torch.clamp(r, lo, hi)
    c1 = torch.maximum(l1, l2)
    half = lambda c: c.to(acc) * 0.5  # noqa: E731
    w1 = (l1 > l2).to(acc) + half(l1 == l2)
    w2 = (l2 > l1).to(acc) + half(l1 == l2)
    dl_dr = -adv * (w1 + w2 * ((r >= lo) & (r <= hi)).to(acc))
    if dual_clip is not None:
        l3 = -adv * dual_clip
        neg = adv < 0
        loss = torch.where(neg, torch.minimum(l3, c1), c1)
        wd = (c1 < l3).to(acc) + half(c1 == l3)
        dl_dr = torch.where(neg, dl_dr * wd, dl_dr)
        lower = (c1 > l3) & neg
    else:
        loss = c1
        lower = torch.zeros_like(l1, dtype=torch.bool)
    grad = dl_dr * r * ind.to(acc)
    grad = torch.where(torch.isnan(loss), loss, grad)
    return PolicyTokenTerms(loss, grad, l2 > l1, lower, kl)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_low: float = 0.2, clip_high=None, dual_clip=None,
                    agg: str = "token-mean", ratio_level: str = "token", dp_size: int = 1,
                    batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None,
                    cu_seqlens=None):
    """Clipped PPO policy loss (verl ``compute_policy_loss_vanilla``) or, with
    ``ratio_level="sequence"``, GSPO (verl ``compute_policy_loss_gspo``), written as verl does.

    Returns ``(loss, stats)``: ``loss = agg_loss(L, mask, agg, ...)`` with ``L`` the per-token loss
    of :func:`policy_loss_per_token`; stats (detached scalars), each ``masked_mean(., mask)``:
    ``clipfrac`` = [l2 > l1] (verl pg_clipfrac), ``clipfrac_lower`` = [A < 0 and max(l1, l2) >
    -A c] (verl pg_clipfrac_lower; 0 without dual clip), ``approx_kl`` = old_logp - logp (verl
    ppo_kl: clamped log-ratio for token level, raw for sequence level).
    Gradient flows to ``logp`` only.  Packed ``[1, total]`` inputs with ``cu_seqlens``: the
    segments are the sequences (GSPO ratio and seq-mode aggregation per segment; ``advantages``
    ``[1, total]`` or ``[S]``), equal to the padded ``[S, Tmax]`` layout.

    Edge-case contract (every backend):

    * Masked positions (``mask == 0``) never matter: NaN / inf there changes neither the loss,
      the stats nor the gradient, which is exactly 0 there.
    * NaN at a valid position makes the loss and ``approx_kl`` NaN; that token's
      comparisons are false, so it counts in neither ``clipfrac`` nor ``clipfrac_lower``.  The
      gradient is NaN exactly where the per-token loss is NaN (and the mask is nonzero): at
      token level the NaN token only; for GSPO every valid token of the row, whose sequence
      ratio is then NaN.  ``logp = old_logp = +-inf`` (``d = inf - inf``) counts as NaN.
    * Infinite log-ratios are clamped: token level to ``[-20, 20]`` (gradient 0 outside), GSPO
      ``exp(min(s_b, 10))``; an infinite ``logp`` at a valid GSPO position gives ``s_b = -inf``
      (ratio 0) or ``+inf`` (ratio ``e^10``), a finite loss and a zero gradient for that row.
    * Empty batches (``B = 0`` or ``T = 0``) and fully masked batches give loss 0 and stats 0 in
      every ``agg`` mode.  The mask, ``old_logp`` and ``advantages`` never receive a gradient.
    """
    acc = acc_dtype(logp, old_logp, advantages)
    m = mask.detach().to(acc)
    lp_in = logp.to(acc)
    # Masked positions take no part in the gradient, whatever they hold (NaN / inf included).
    lp = torch.where(m != 0, lp_in, lp_in.detach())
    old, adv = old_logp.detach().to(acc), advantages.detach().to(acc)
    if adv.dim() == 1:
        adv = _per_token(adv, lp, cu_seqlens)
    clip_high = clip_low if clip_high is None else clip_high
    if ratio_level == "token":
        neg_kl = torch.clamp(lp - old, min=-20.0, max=20.0)
        ratio = torch.exp(neg_kl)
        approx_kl = masked_mean(-neg_kl, m)
    else:
        neg_kl = lp - old
        seq = (_row_sums(_masked_terms(neg_kl, m), cu_seqlens)
               / _row_sums(m, cu_seqlens).clamp(min=1))
        # verl's lp - lp.detach() + sg(s_b), without inf - inf = NaN at an infinite logp.
        log_ratio = _zero_with_grad(lp) + _per_token(seq.detach(), lp, cu_seqlens)
        ratio = torch.exp(torch.clamp(log_ratio, max=10.0))
        approx_kl = masked_mean(-neg_kl, m)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    c1 = torch.maximum(l1, l2)
    clipfrac = masked_mean((l2 > l1).to(acc), m)
    if dual_clip is not None:
        l3 = -adv * dual_clip
        per_token = torch.where(adv < 0, torch.min(l3, c1), c1)
        clipfrac_lower = masked_mean(((c1 > l3) & (adv < 0)).to(acc), m)
    else:
        per_token = c1
        clipfrac_lower = torch.zeros((), dtype=acc, device=lp.device)
    loss = agg_loss(per_token, m, agg, dp_size, batch_num_tokens, global_batch_size,
                    loss_scale_factor, cu_seqlens)
    loss = loss + _nan_grad_where(lp_in, per_token.detach().isnan() & (m != 0))
    stats = {"clipfrac": clipfrac.detach(), "clipfrac_lower": clipfrac_lower.detach(),
             "approx_kl": approx_kl.detach()}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip=0.5, agg: str = "token-mean", dp_size: int = 1,
                   batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None,
                   cu_seqlens=None):
    """Clipped value loss (verl ``compute_value_loss``):
    ``0.5 * agg_loss(max((v - R)^2, (vc - R)^2))`` with
    ``vc = max(min(v, old + clip), old - clip)``; ``clip=None``: ``0.5 * agg_loss((v - R)^2)``.
    Returns ``(loss, {"clipfrac": masked_mean([(vc - R)^2 > (v - R)^2], mask)})``.
    Gradient flows to ``values`` only.  Packed layout (``cu_seqlens``) as :func:`agg_loss`.

    Edge-case contract (every backend): NaN / inf at masked positions changes nothing (gradient
    exactly 0 there); NaN at a valid position gives a NaN loss and a NaN gradient at that token
    (the gradient is NaN exactly where the per-token loss is NaN and the mask nonzero); an
    empty or fully masked batch gives loss 0 and clipfrac 0.
    """
    acc = acc_dtype(values, old_values, returns)
    m = mask.detach().to(acc)
    v_in = values.to(acc)
    # Masked positions take no part in the gradient, whatever they hold (NaN / inf included).
    v = torch.where(m != 0, v_in, v_in.detach())
    old, ret = old_values.detach().to(acc), returns.detach().to(acc)
    l1 = (v - ret) ** 2
    if clip is None:
        per_token = l1
        clipfrac = torch.zeros((), dtype=acc, device=v.device)
    else:
        vc = torch.max(torch.min(v, old + clip), old - clip)
        l2 = (vc - ret) ** 2
        per_token = torch.max(l1, l2)
        clipfrac = masked_mean((l2 > l1).to(acc), m)
    loss = 0.5 * agg_loss(per_token, m, agg, dp_size, batch_num_tokens, global_batch_size,
                          loss_scale_factor, cu_seqlens)
    loss = loss + _nan_grad_where(v_in, per_token.detach().isnan() & (m != 0))
    return loss, {"clipfrac": clipfrac.detach()}


__all__ += ["AGG_MODES", "masked_sum", "masked_mean", "masked_var", "masked_whiten", "agg_loss",
            "agg_row_weights", "PolicyTokenTerms", "policy_loss_per_token", "ppo_policy_loss",
            "ppo_value_loss"]


# --------------------------------------------------------------------------------------------
# GAE (verl 0.9 ``compute_gae_advantage_return``, multi-turn aware, not whitened)
# --------------------------------------------------------------------------------------------

def _gae_rows(r: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, gamma: float, lam: float):
    # The plain reverse loop over T, rows in parallel.  Masked steps are skipped: the next value
    # and the running advantage carry across them unchanged (torch.where, so whatever sits at a
    # masked position -- NaN included -- never enters the arithmetic).
    B, T = r.shape
    nextvalues = torch.zeros(B, dtype=r.dtype, device=r.device)
    lastgaelam = torch.zeros(B, dtype=r.dtype, device=r.device)
    adv = torch.zeros(B, T, dtype=r.dtype, device=r.device)
    for t in reversed(range(T)):
        ok = valid[:, t]
        delta = r[:, t] + gamma * nextvalues - v[:, t]
        cur = delta + gamma * lam * lastgaelam
        nextvalues = torch.where(ok, v[:, t], nextvalues)
        lastgaelam = torch.where(ok, cur, lastgaelam)
        adv[:, t] = torch.where(ok, lastgaelam, torch.zeros_like(lastgaelam))
    ret = torch.where(valid, adv + v, torch.zeros_like(adv))
    return adv, ret


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95, cu_seqlens: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None):
    """Generalized advantage estimation, a plain Python loop over T (the spec of ``fr.gae``).

    rewards, values, mask ``[B, T]`` (mask: any dtype, ``mask != 0`` = valid), or the packed
    layout ``[1, total]`` with ``cu_seqlens`` ``[S+1]`` (segment s = columns
    ``cu_seqlens[s]:cu_seqlens[s+1]``, each an independent sequence).  Per row, for t = T-1..0
    with ``nv = A = 0`` past the end::

        valid t:  delta = r_t + gamma * nv - V_t;  A = delta + gamma * lam * A;  nv = V_t
                  adv_t = A;  ret_t = A + V_t
        masked t: nv, A unchanged;  adv_t = ret_t = 0

    Edge-case contract (every backend): whatever sits at a masked step (NaN / inf included)
    never enters the recurrence; a NaN reward or value at a valid step t makes adv and ret NaN
    at the valid steps ``<= t`` of that row (or segment) only.  Empty inputs give empty outputs.

    Computed and returned in ``compute_dtype`` (default float64 if rewards or values is
    float64, else float32).  Returns ``(advantages, returns)``, detached.
    """
    if compute_dtype is None:
        compute_dtype = acc_dtype(rewards, values)
    with torch.no_grad():
        r = rewards.detach().to(compute_dtype)
        v = values.detach().to(compute_dtype)
        valid = mask.detach() != 0
        if cu_seqlens is None:
            return _gae_rows(r, v, valid, gamma, lam)
        adv = torch.zeros_like(r)
        ret = torch.zeros_like(r)
        bounds = [int(x) for x in cu_seqlens.tolist()]
        for s in range(len(bounds) - 1):
            a, b = bounds[s], bounds[s + 1]
            if b > a:
                adv[:, a:b], ret[:, a:b] = _gae_rows(r[:, a:b], v[:, a:b], valid[:, a:b], gamma,
                                                     lam)
        return adv, ret


__all__ += ["gae"]


# --------------------------------------------------------------------------------------------
# fused PPO loss from the logits (the spec of ``fr.fused_ppo_loss``)
# --------------------------------------------------------------------------------------------

def fused_ppo_loss(logits: torch.Tensor, tokens: torch.Tensor, old_logp: torch.Tensor,
                   advantages: torch.Tensor, mask: torch.Tensor, ref_logp=None,
                   kl_coef: float = 0.0, kl_kind: str = "k3", entropy_coef: float = 0.0,
                   clip_low: float = 0.2, clip_high=None, dual_clip=None,
                   temperature: float = 1.0, agg: str = "token-mean", ratio_level: str = "token",
                   ignore_index: int = -100, dp_size: int = 1, batch_num_tokens=None,
                   global_batch_size=None, loss_scale_factor=None, cu_seqlens=None):
    """``agg_loss(pg + kl_coef * kl - entropy_coef * H, mask, agg)``, composed of the references.

    ``logp, H = token_logprobs(logits, tokens, temperature, True, ignore_index)``; ``pg`` the
    per-token loss of :func:`ppo_policy_loss`; ``kl = kl_penalty(logp, ref_logp, kl_kind)`` (no
    KL term when ``ref_logp`` is None).  The aggregation is linear in the per-token loss (weights
    from the mask only, :func:`agg_row_weights`), so this is computed as
    ``ppo_policy_loss(...)[0] + kl_coef * agg_loss(kl) - entropy_coef * agg_loss(H)``.
    The per-token inputs are cast to the logits' accumulation dtype (float32, float64 for
    float64 logits).  Masked tokens get exactly zero gradient, even where their logits are NaN.
    Returns ``(loss, stats)``: stats (detached) per-token ``logp``,
    ``entropy``, ``kl`` (zeros without ``ref_logp``) and the scalars ``clipfrac``,
    ``clipfrac_lower``, ``approx_kl`` (of :func:`ppo_policy_loss`), ``entropy_mean`` and
    ``kl_mean`` (``masked_mean`` of the per-token values).  Packed layout: logits
    ``[1, total, V]``, the per-token inputs ``[1, total]`` and ``cu_seqlens`` ``[S+1]`` (as
    :func:`ppo_policy_loss`).

    Edge-case contract (every backend): a masked token's logits get exactly zero gradient, NaN
    included; NaN logits at a valid token make the loss NaN and that token's logits row NaN in
    the gradient (GSPO: every valid token of the sequence); an empty batch gives loss 0 in
    every ``agg`` mode; the rest as :func:`token_logprobs` and :func:`ppo_policy_loss`.
    """
    acc = acc_dtype(logits.dtype)
    kw = dict(dp_size=dp_size, batch_num_tokens=batch_num_tokens,
              global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor,
              cu_seqlens=cu_seqlens)
    # Masked tokens get exactly zero gradient, also where their logits hold NaN (the separate
    # ops would give 0 * NaN there): same values, gradient routed to the unmasked tokens only.
    keep = (mask != 0).unsqueeze(-1)
    logits = torch.where(keep, logits, logits.detach())
    logp, ent = token_logprobs(logits, tokens, temperature, True, ignore_index)
    old, adv = old_logp.detach().to(acc), advantages.detach().to(acc)
    loss, pg_stats = ppo_policy_loss(logp, old, adv, mask, clip_low, clip_high, dual_clip, agg,
                                     ratio_level, **kw)
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp.detach().to(acc), kl_kind)
        loss = loss + kl_coef * agg_loss(kl, mask, agg, **kw)
    else:
        kl = torch.zeros_like(logp)
    loss = loss - entropy_coef * agg_loss(ent, mask, agg, **kw)
    stats = {"logp": logp.detach(), "entropy": ent.detach(), "kl": kl.detach(), **pg_stats,
             "entropy_mean": masked_mean(ent.detach(), mask),
             "kl_mean": masked_mean(kl.detach(), mask)}
    return loss, stats


__all__ += ["fused_ppo_loss"]


# --------------------------------------------------------------------------------------------
# lm_head fused in: log-probs / entropy / PPO loss straight from hidden states
# --------------------------------------------------------------------------------------------

def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``hidden @ weight.T + bias`` formed in the accumulation dtype (float32; float64 for
    float64 inputs) from the input values, never rounded to the input dtype.
    ``[..., H]``, ``[V, H]``, ``[V]`` -> ``[..., V]``."""
    acc = acc_dtype(hidden.dtype)
    logits = hidden.to(acc) @ weight.to(acc).T
    if bias is not None:
        logits = logits + bias.to(acc)
    return logits


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                          bias=None, temperature: float = 1.0, return_entropy: bool = False,
                          ignore_index: int = -100):
    """``token_logprobs(linear_logits(hidden, weight, bias), tokens, ...)``: the lm_head and the
    log-softmax + gather (+ entropy) in one; gradients flow to hidden, weight and bias."""
    return token_logprobs(linear_logits(hidden, weight, bias), tokens, temperature,
                          return_entropy, ignore_index)


def fused_linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                          old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                          bias=None, **kwargs):
    """``fused_ppo_loss(linear_logits(hidden, weight, bias), tokens, old_logp, advantages, mask,
    **kwargs)`` (same keyword arguments and stats as :func:`fused_ppo_loss`)."""
    return fused_ppo_loss(linear_logits(hidden, weight, bias), tokens, old_logp, advantages,
                          mask, **kwargs)


__all__ += ["linear_logits", "linear_token_logprobs", "fused_linear_ppo_loss"]


# --------------------------------------------------------------------------------------------
# per-row softmax statistics and the gradients written from them (the spec of what the
# vocab-parallel modes compute on one vocab slice; see fastrlhf.ops.parallel)
# --------------------------------------------------------------------------------------------

def softmax_stats(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                  ignore_index: int = -100):
    """Per row of ``x = logits / temperature``: ``(logp, H, M, log S)`` with ``M = max x``,
    ``S = sum exp(x - M)``, ``H`` the entropy and ``logp`` the token's log-prob (0 where
    ``tokens == ignore_index``).  A row with nothing finite (all ``-inf``) gives
    ``log S = -inf`` and no NaN."""
    x = logits.to(acc_dtype(logits.dtype)) / temperature
    M = x.amax(-1)
    z = x - torch.where(M == float("-inf"), torch.zeros_like(M), M).unsqueeze(-1)
    logS = z.exp().sum(-1).log()
    logsm = z - logS.unsqueeze(-1)
    H = _entropy_from_logsm(logsm)
    valid = tokens != ignore_index
    idx = torch.where(valid, tokens, torch.zeros_like(tokens)).long()
    lp = torch.where(valid, logsm.gather(-1, idx.unsqueeze(-1)).squeeze(-1), torch.zeros_like(M))
    return lp, H, M, logS


def token_logprobs_grad(logits: torch.Tensor, tokens: torch.Tensor, dlogp, dent, M, logS, H,
                        temperature: float = 1.0) -> torch.Tensor:
    """d loss / d logits of :func:`token_logprobs` from the rows' statistics ``(M, log S, H)``
    (possibly those of the full vocab while ``logits`` is one slice of it):
    ``(dlogp * (onehot - p) - dent * p * (log p + H)) / temperature`` with ``p = exp(x - M -
    log S)``; ``tokens < 0`` has no one-hot entry; ``dlogp`` / ``dent`` may be None."""
    x = logits.to(acc_dtype(logits.dtype)) / temperature
    z = (x - M.unsqueeze(-1)) - logS.unsqueeze(-1)
    p = z.exp()
    g = torch.zeros_like(x)
    if dlogp is not None:
        g = g - dlogp.unsqueeze(-1) * p
        hit = tokens >= 0
        idx = torch.where(hit, tokens, torch.zeros_like(tokens)).long().unsqueeze(-1)
        g = g.scatter_add(-1, idx, torch.where(hit, dlogp, torch.zeros_like(dlogp)).unsqueeze(-1))
    if dent is not None:
        g = g - dent.unsqueeze(-1) * torch.where(p > 0, p * (z + H.unsqueeze(-1)),
                                                 torch.zeros_like(p))
    return (g / temperature).to(logits.dtype)


def full_kl_partials(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0):
    """Per row: ``(E, stats [6, ...])`` with ``E = sum_j p_j ((x_j - Mx) - (y_j - My))`` (0 where
    the row has no p mass) and stats rows ``(Mx, log Sx, My, log Sy, qzero, bad)``: the flags are
    1 where some ``q_j = 0`` under ``p_j > 0`` / some NaN or ``+inf`` was seen."""
    acc = acc_dtype(logits, ref_logits)
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


def full_kl_grad(g: torch.Tensor, logits: torch.Tensor, ref_logits: torch.Tensor,
                 kl: torch.Tensor, stats: torch.Tensor, temperature: float, need_x: bool,
                 need_y: bool):
    """Gradients of :func:`full_kl` from the rows' ``stats = (Mx, log Sx, My, log Sy)`` and KL:
    ``dx = g p (log p - log q - KL) / T``, ``dy = g (q - p) / T`` (None where not needed)."""
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
