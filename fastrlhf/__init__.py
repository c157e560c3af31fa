"""fastrlhf: fused Triton kernels for the RLHF / PPO hot path.

Public ops (see DESIGN.md and each docstring for shapes, dtypes and formulas)::

    logp = fastrlhf.token_logprobs(logits, tokens, temperature=1.0)
    logp, ent = fastrlhf.token_logprobs(logits, tokens, return_entropy=True)
    ent = fastrlhf.token_entropy(logits)
"""

from .ops import token_entropy, token_logprobs

__version__ = "0.1.0"

__all__ = ["token_logprobs", "token_entropy"]
