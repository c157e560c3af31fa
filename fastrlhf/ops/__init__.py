"""Public ops, one module per family (argument checks, torch.library registration, autograd,
backend choice)."""

from .advantages import GROUP_ADV_KINDS, group_advantages
from .fused_linear import fused_linear_ppo_loss, linear_token_logprobs
from .fused_loss import FUSED_STATS, fused_ppo_loss
from .gae import gae
from .losses import AGG_MODES, RATIO_LEVELS, agg_loss, ppo_policy_loss, ppo_value_loss
from .masked import masked_mean, masked_sum, masked_var, masked_whiten
from .kl import KL_KINDS, full_kl, kl_penalty
from .logprobs import token_entropy, token_logprobs

__all__ = ["token_logprobs", "token_entropy", "kl_penalty", "full_kl", "KL_KINDS",
           "group_advantages", "GROUP_ADV_KINDS", "gae", "masked_sum", "masked_mean", "masked_var",
           "masked_whiten", "agg_loss", "AGG_MODES", "RATIO_LEVELS", "ppo_policy_loss", "ppo_value_loss",
           "fused_ppo_loss", "FUSED_STATS", "linear_token_logprobs",
           "fused_linear_ppo_loss"]
