"""The op layer: one module per op family, each holding its public functions, its custom ops
(one fake and one autograd formula each) and its vocab-parallel mode.

Shared pieces: :mod:`.common` (argument checks and layouts), :mod:`.registry` (the seam to the
backends' launchers), :mod:`.parallel` (collective plumbing for vocab parallelism).  Names and
codes shared with the kernels and the native layer live in :mod:`fastrlhf.tables`.
"""

from ..tables import AGG_MODES, FUSED_STATS, GROUP_ADV_KINDS, KL_KINDS, RATIO_LEVELS
from .advantages import group_advantages
from .fused_linear import fused_linear_ppo_loss, linear_token_logprobs
from .fused_loss import fused_ppo_loss
from .gae import gae
from .kl import full_kl, kl_penalty
from .logprobs import token_entropy, token_logprobs
from .losses import agg_loss, ppo_policy_loss, ppo_value_loss
from .masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = ["token_logprobs", "token_entropy", "kl_penalty", "full_kl", "KL_KINDS",
           "group_advantages", "GROUP_ADV_KINDS", "gae", "masked_sum", "masked_mean", "masked_var",
           "masked_whiten", "agg_loss", "AGG_MODES", "RATIO_LEVELS", "ppo_policy_loss", "ppo_value_loss",
           "fused_ppo_loss", "FUSED_STATS", "linear_token_logprobs",
           "fused_linear_ppo_loss"]
