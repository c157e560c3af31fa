"""Public ops, one module per family (argument checks, torch.library registration, autograd,
backend choice)."""

from .advantages import GROUP_ADV_KINDS, group_advantages
from .gae import gae
from .kl import KL_KINDS, full_kl, kl_penalty
from .logprobs import token_entropy, token_logprobs

__all__ = ["token_logprobs", "token_entropy", "kl_penalty", "full_kl", "KL_KINDS",
           "group_advantages", "GROUP_ADV_KINDS", "gae"]
