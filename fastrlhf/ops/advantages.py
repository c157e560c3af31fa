"""Group-relative outcome advantages (GRPO, Dr. GRPO, RLOO), vectorized over groups.

No kernel: a handful of sort / segment-sum / gather ops over group ids (``torch.unique``, a
stable sort, :func:`fastrlhf.reference.segment_sum`) on whatever device the scores live, with no
Python loop over groups or samples and no float atomics (bitwise repeatable on CUDA too).  The plain loop
in :func:`fastrlhf.reference.group_advantages` is the specification.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from ..backend import requested
from ..tables import FLOAT_DTYPES, GROUP_ADV_KINDS, ID_DTYPES, acc_dtype
from .common import with_contract, check_bool, check_same_device, check_shape, check_tensor

__all__ = ["group_advantages", "GROUP_ADV_KINDS"]


def _vectorized(scores: Tensor, group_ids: Tensor, kind: str, eps: float, norm_by_std: bool
                ) -> Tensor:
    acc = acc_dtype(scores)
    x = scores.to(acc)
    if x.numel() == 0:
        return x.clone()
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    G = uniq.numel()
    counts = torch.bincount(inv, minlength=G)
    cnt = counts.to(acc)
    # Group sums over the samples sorted by group: consecutive segments, summed in a fixed order
    # (deterministic on CUDA, where index_add_ uses float atomics).
    order = torch.argsort(inv, stable=True)
    cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def group_sums(v):
        return reference.segment_sum(v[order], cu)

    single = cnt == 1
    n = cnt[inv]
    # A group of size 1 takes no statistics (mean 0, std 1 below): its score is kept out of the
    # sums, so a NaN / inf there cannot reach its gradient through the unused branch
    # (0 * NaN = NaN behind a where).
    xs = torch.where(single[inv], torch.zeros_like(x), x)
    mean_g = group_sums(xs) / cnt
    if kind == "grpo" and norm_by_std:
        dev = xs - mean_g[inv]
        ss = group_sums(dev * dev)
        var = ss / (cnt - 1).clamp_min(1)
        # sqrt only of var > 0: at var = 0 (a single member, or a group of equal scores) the
        # derivative of sqrt is inf and 0 * inf = NaN would reach the gradient even behind a
        # where; like torch.std's backward, a zero std passes no gradient
        pos = var > 0
        std_g = torch.where(pos, torch.sqrt(torch.where(pos, var, torch.ones_like(var))),
                            torch.where(var == 0, torch.zeros_like(var), var))
        # verl: a group of size 1 has mean 0 and std 1.
        mean_g = torch.where(single, torch.zeros_like(mean_g), mean_g)
        std_g = torch.where(single, torch.ones_like(std_g), std_g)
        return (x - mean_g[inv]) / (std_g[inv] + eps)
    if kind in ("grpo", "dr_grpo"):
        mean_g = torch.where(single, torch.zeros_like(mean_g), mean_g)
        return x - mean_g[inv]
    # rloo: x n/(n-1) - mean n/(n-1) for n > 1 (same operation order as verl); n == 1 unchanged.
    nm1 = (n - 1).clamp_min(1)
    loo = x * n / nm1 - mean_g[inv] * n / nm1
    return torch.where(n > 1, loo, x)


@with_contract(reference.group_advantages)
def group_advantages(scores: Tensor, group_ids: Tensor, *, kind: str = "grpo", eps: float = 1e-6,
                     norm_by_std: bool = True, backend: str = "auto") -> Tensor:
    """Outcome advantages relative to each sample's group (GRPO-style training), vectorized.

    Args:
        scores: ``[B]`` float (16/32/64-bit) sequence-level scores (e.g. the sum of token-level
            rewards).
        group_ids: ``[B]`` integer tensor on the same device; samples with equal ids form a group
            (e.g. the responses to one prompt).  Ids are arbitrary: not necessarily contiguous,
            sorted or non-negative.  (verl passes string uids: map them to ints first, e.g. with
            ``numpy.unique(uids, return_inverse=True)[1]``.)
        kind: for a group of size n with mean m and unbiased standard deviation s
            (``torch.std``, Bessel-corrected), as verl 0.9 computes them:

            * ``"grpo"``: ``(x - m) / (s + eps)``  (``compute_grpo_outcome_advantage``)
            * ``"dr_grpo"``: ``x - m``  (the same with ``norm_adv_by_std_in_grpo=False``)
            * ``"rloo"``: ``x * n / (n - 1) - m * n / (n - 1)``, the leave-one-out baseline
              (``compute_rloo_outcome_advantage``)

            A group of size 1 uses m = 0 and s = 1 (verl's convention): grpo gives
            ``x / (1 + eps)``, dr_grpo ``x``, rloo leaves ``x`` unchanged.
        eps: >= 0, added to the std (grpo only).
        norm_by_std: verl's ``norm_adv_by_std_in_grpo``; only consulted for ``kind="grpo"``,
            where False gives ``"dr_grpo"``.  The other kinds never divide by the std.
        backend: ``"auto"`` (and ``"triton"`` / ``"native"``) run the vectorized torch code on
            the scores' device; ``"reference"`` runs the plain per-group loop of
            :func:`fastrlhf.reference.group_advantages` (``FASTRLHF_BACKEND=reference``
            selects it for ``"auto"``).

    Returns:
        ``[B]`` advantages, float32 (float64 for float64 scores); the caller broadcasts them over
        the response mask (``adv[:, None] * mask``).  A NaN score makes its whole group NaN.
        Plain torch ops: differentiable w.r.t. ``scores`` if it requires grad (verl computes
        these under no_grad).
    """
    op = "group_advantages"
    check_tensor(op, "scores", scores, dtypes=FLOAT_DTYPES)
    if scores.dim() != 1:
        raise ValueError(f"{op}: scores must be 1-D [B], got shape {tuple(scores.shape)}")
    check_tensor(op, "group_ids", group_ids, dtypes=ID_DTYPES)
    check_shape(op, "group_ids", group_ids, scores.shape, "the shape of scores")
    check_same_device(op, "scores", scores, group_ids=group_ids)
    if not isinstance(kind, str) or kind not in GROUP_ADV_KINDS:
        raise ValueError(f"{op}: unknown kind {kind!r}; valid kinds are "
                         f"{', '.join(GROUP_ADV_KINDS)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps}")
    check_bool(op, "norm_by_std", norm_by_std)
    if requested(backend, op=op) == "reference":
        return reference.group_advantages(scores, group_ids, kind, eps, norm_by_std)
    return _vectorized(scores, group_ids, kind, eps, norm_by_std)
