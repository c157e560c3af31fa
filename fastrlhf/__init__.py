"""fastrlhf: fused Triton kernels for the RLHF / PPO hot path.

Public ops (see DESIGN.md and each docstring for shapes, dtypes and formulas)::

    logp = fastrlhf.token_logprobs(logits, tokens, temperature=1.0)
    logp, ent = fastrlhf.token_logprobs(logits, tokens, return_entropy=True)
    ent = fastrlhf.token_entropy(logits)
    kl = fastrlhf.kl_penalty(logp, ref_logp, kind="k3")
    kl = fastrlhf.full_kl(logits, ref_logits)
    adv = fastrlhf.group_advantages(scores, group_ids, kind="grpo")
    adv, ret = fastrlhf.gae(rewards, values, mask, gamma=1.0, lam=0.95)
"""

from . import config
from .ops import (GROUP_ADV_KINDS, KL_KINDS, full_kl, gae, group_advantages, kl_penalty,
                  token_entropy, token_logprobs)

__version__ = "0.1.0"

__all__ = ["token_logprobs", "token_entropy", "kl_penalty", "full_kl", "KL_KINDS",
           "group_advantages", "GROUP_ADV_KINDS", "gae", "config"]
