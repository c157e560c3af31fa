"""Helpers shared by the adapters: mapping upstream aggregation conventions onto fastrlhf ops."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..tables import AGG_MODES, MASKED_EPS, acc_dtype


def weighted_agg(mask: Tensor, weights: Optional[Tensor], mode: str, *, dp_size: int = 1,
                 batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """Express verl's ``agg_loss(L * weights, mask, mode, ...)`` as a fastrlhf aggregation.

    Returns ``(token_weights, mode2, kwargs)`` such that
    ``fastrlhf.agg_loss(L, token_weights, mode2, **kwargs)`` (and the same arguments to the fused
    policy / value losses) equals verl's aggregation of the weighted per-token loss.  The token
    and sequence counts (``N = sum(mask)``, ``n_b``, the number of non-empty rows) always come
    from ``mask``, never from the weights, so the weights only rescale each token's term --
    exactly what multiplying the per-token loss by them does upstream.  ``weights`` must be
    non-negative (importance ratios, 0/1 filters); ``None`` means 1.
    """
    acc = acc_dtype(weights)
    m = mask.to(acc)
    w = m if weights is None else m * weights.to(acc).expand_as(m)
    kw = {"dp_size": dp_size, "loss_scale_factor": loss_scale_factor}
    if mode == "token-mean":
        kw["batch_num_tokens"] = m.sum() if batch_num_tokens is None else batch_num_tokens
        return w, mode, kw
    if mode == "token-sum":
        return w, mode, kw
    if mode not in AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {mode}")
    n_b = m.sum(-1, keepdim=True)
    kw["global_batch_size"] = ((n_b > 0).sum() if global_batch_size is None
                               else global_batch_size)
    if mode == "seq-mean-token-mean":
        return w / (n_b + MASKED_EPS), "seq-mean-token-sum", kw
    return w, mode, kw
