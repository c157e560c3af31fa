"""Eager PyTorch definitions of every fastrlhf op: the specification.

Each function here implements its formula plainly (materializing whatever it likes) and works in
float64 as well as float32; the Triton and native backends are tested against these in float64.
Outputs follow the library's dtype rule: float32 for fp16/bf16/fp32 inputs, float64 for float64.

Argument validation lives in :mod:`fastrlhf.ops`; these functions assume well-formed inputs.
"""

from __future__ import annotations

import torch

__all__ = ["acc_dtype", "token_logprobs", "token_entropy"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes and returns float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    """
    x = logits.to(acc_dtype(logits.dtype)) / temperature
    logsm = torch.log_softmax(x, dim=-1)
    valid = tokens != ignore_index
    idx = torch.where(valid, tokens, torch.zeros_like(tokens)).long()
    logp = logsm.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if return_entropy:
        return logp, _entropy_from_logsm(logsm)
    return logp


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dim, ``[..., V] -> [...]``."""
    x = logits.to(acc_dtype(logits.dtype)) / temperature
    return _entropy_from_logsm(torch.log_softmax(x, dim=-1))
