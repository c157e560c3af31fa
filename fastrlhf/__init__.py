"""fastrlhf: fused Triton kernels for the RLHF / PPO hot path.

Public ops (see DESIGN.md and each docstring for shapes, dtypes and formulas)::

    logp = fastrlhf.token_logprobs(logits, tokens, temperature=1.0)
    logp, ent = fastrlhf.token_logprobs(logits, tokens, return_entropy=True)
    ent = fastrlhf.token_entropy(logits)
    kl = fastrlhf.kl_penalty(logp, ref_logp, kind="k3")
    kl = fastrlhf.full_kl(logits, ref_logits)
    adv = fastrlhf.group_advantages(scores, group_ids, kind="grpo")
    adv, ret = fastrlhf.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    adv = fastrlhf.masked_whiten(adv, mask)
    loss, stats = fastrlhf.ppo_policy_loss(logp, old_logp, adv, mask, clip_low=0.2, agg="token-mean")
    loss, stats = fastrlhf.ppo_value_loss(values, old_values, returns, mask, clip=0.5)
    loss, stats = fastrlhf.fused_ppo_loss(logits, tokens, old_logp, adv, mask, ref_logp=ref_logp,
                                          kl_coef=0.04, entropy_coef=0.01)
    logp, ent = fastrlhf.linear_token_logprobs(hidden, lm_head.weight, tokens, return_entropy=True)
"""

from . import config
from .ops import (AGG_MODES, FUSED_STATS, GROUP_ADV_KINDS, KL_KINDS, RATIO_LEVELS, agg_loss,
                  full_kl, fused_linear_ppo_loss, fused_ppo_loss, gae, group_advantages, kl_penalty,
                  linear_token_logprobs, masked_mean, masked_sum, masked_var, masked_whiten,
                  ppo_policy_loss, ppo_value_loss, token_entropy, token_logprobs)

__version__ = "0.1.0"

__all__ = ["token_logprobs", "token_entropy", "kl_penalty", "full_kl", "KL_KINDS",
           "group_advantages", "GROUP_ADV_KINDS", "gae", "masked_sum", "masked_mean", "masked_var",
           "masked_whiten", "agg_loss", "AGG_MODES", "RATIO_LEVELS", "ppo_policy_loss", "ppo_value_loss",
           "fused_ppo_loss", "FUSED_STATS", "linear_token_logprobs",
           "fused_linear_ppo_loss", "config"]
