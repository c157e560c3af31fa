"""fastrlhf: fused Triton kernels for the RLHF / PPO hot path.

Public ops (each docstring gives the shapes, dtypes and formula)::

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

from __future__ import annotations

import importlib as _importlib
import sys as _sys

from . import config

__version__ = "0.1.0"

__all__ = ["token_logprobs", "token_entropy", "kl_penalty", "full_kl", "KL_KINDS",
           "group_advantages", "GROUP_ADV_KINDS", "gae", "masked_sum", "masked_mean", "masked_var",
           "masked_whiten", "agg_loss", "AGG_MODES", "RATIO_LEVELS", "ppo_policy_loss", "ppo_value_loss",
           "fused_ppo_loss", "FUSED_STATS", "linear_token_logprobs",
           "fused_linear_ppo_loss", "config"]

# The ops (and torch) load on first use of any public name, so that ``fastrlhf --version`` and the
# command line's argument errors answer without importing torch.  Where torch is already imported
# (any program that uses the ops), they load here, as an ordinary eager import would.
_OPS = frozenset(__all__) - {"config"}


def __getattr__(name: str):
    if name in _OPS or name == "ops":
        ops = _importlib.import_module(".ops", __name__)
        if name == "ops":
            return ops
        value = getattr(ops, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastrlhf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _OPS)


if "torch" in _sys.modules:
    for _name in _OPS:
        __getattr__(_name)
    del _name
