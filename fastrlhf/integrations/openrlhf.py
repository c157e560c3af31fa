"""Drop-in replacements for OpenRLHF 0.11's PPO losses and helpers, backed by fastrlhf ops.

One-line use (before the actor / critic are built; OpenRLHF trains in Ray actors, so run it in
every worker process, e.g. ``ray.init(runtime_env={"worker_process_setup_hook":
"fastrlhf.integrations.openrlhf.patch"})``)::

    import fastrlhf.integrations.openrlhf as fo; fo.patch()

or use the pieces directly: :class:`PolicyLoss` and :class:`ValueLoss` (``nn.Module``; the
constructor and ``forward`` signatures and the returned values of ``openrlhf.models.loss``),
:func:`compute_approx_kl`, :func:`log_probs_from_logits`, :func:`compute_entropy`
(``openrlhf.models.utils``) and :func:`get_advantages_and_returns` (the GAE of
``RemoteExperienceMaker.get_advantages_and_returns``, as a plain function).

:func:`patch` replaces the classes and functions in their defining modules, in every imported
module that bound them by name (``openrlhf.models``, the Ray PPO actor / critic modules), and
``RemoteExperienceMaker.get_advantages_and_returns``.  :func:`unpatch` restores them.

OpenRLHF semantics kept (they differ from verl's):

* GAE *zeroes* instead of skipping: rewards and values are multiplied by the action mask and the
  recursion runs over every position, so a masked position contributes ``delta = 0 - 0`` and
  cuts nothing.  Implemented as fastrlhf ``gae`` on the pre-multiplied inputs with an all-valid
  mask.
* GSPO's gradient goes *through* the sequence mean: ``r_b = exp(mean_t log-ratio)`` is
  differentiated as a function of every token's log-prob (verl uses a stop-gradient form).
  Implemented by feeding the fused token-level loss the per-row mean log-ratio (a differentiable
  torch expression), so autograd spreads each row's gradient over its tokens.
* ``ppo_kl`` is the masked mean of the raw (unclamped) ``old - new`` log-ratio.
* Entropy: ``compute_entropy(logits)`` takes the logits as given.  OpenRLHF 0.11's ``Actor``
  divides the logits by the temperature *before* computing the entropy (older releases computed
  it before the temperature); pass tempered logits to match whichever you compare with.

Deliberate differences: results are float32 (float64 for float64 inputs); empty masks give 0
where OpenRLHF divides 0 by 0 (NaN); :func:`log_probs_from_logits` never divides ``logits`` in
place (OpenRLHF mutates the caller's tensor when ``temperature != 1``); log-ratios are clamped
to [-20, 20] before ``exp`` also for GSPO (OpenRLHF leaves the sequence log-ratio unclamped:
the two agree unless a sequence's mean log-ratio exceeds 20 in magnitude).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .. import ops
from ..tables import acc_dtype
from .common import weighted_agg
from .patching import Adapter, MethodSwap, Patcher, PatchTable

__all__ = ["PolicyLoss", "ValueLoss", "compute_approx_kl", "log_probs_from_logits",
           "compute_entropy", "get_advantages_and_returns", "patch", "unpatch", "is_patched",
           "TESTED_VERSIONS", "KL_IS_WEIGHT_CLIP"]

TESTED_VERSIONS = ("0.11.2",)
KL_IS_WEIGHT_CLIP = 10.0

_patcher = Patcher("fastrlhf.integrations.openrlhf", "openrlhf", TESTED_VERSIONS,
                   'pip install "openrlhf==0.11.2"; its loss modules also import deepspeed, '
                   "peft and flash-attn, its experience maker ray and vllm (see the README, "
                   "Integrations)")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _ones_like_mask(t: Tensor) -> Tensor:
    return torch.ones(t.shape, dtype=torch.bool, device=t.device)


def _token_mask(action_mask: Optional[Tensor], like: Tensor) -> Tensor:
    return _ones_like_mask(like) if action_mask is None else action_mask


def _aggregation(mask: Tensor, weights: Optional[Tensor], token_level_loss: bool, dp_size,
                 batch_num_tokens, global_batch_size):
    """OpenRLHF ``aggregate_loss`` as ``(token_weights, mode, kwargs)`` for a fastrlhf loss.

    token level: ``sum(L m w) / N * dp`` with ``N = batch_num_tokens`` (``dp`` only then; without
    it a plain masked mean).  Sequence level: ``sum_b [n_b > 0] sum_t(L m w) / (n_b + 1e-8) / G
    * dp`` with ``G = global_batch_size`` (else the number of non-empty rows, no ``dp``).
    """
    # verl's seq-mean-token-mean / token-mean, with dp_size applied only with the global count.
    mode = "token-mean" if token_level_loss else "seq-mean-token-mean"
    count = batch_num_tokens if token_level_loss else global_batch_size
    return weighted_agg(mask, weights, mode, dp_size=dp_size if count is not None else 1,
                        batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)


def _masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    # OpenRLHF masked_mean: sum(x * mask) / sum(mask) (0/0 -> NaN kept: it is their filter).
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------

class PolicyLoss(nn.Module):
    """OpenRLHF ``PolicyLoss`` (PPO with clip-higher and dual clip, or GSPO), on fastrlhf's fused
    policy-loss op.

    ``forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
    dp_size=1, batch_num_tokens=None, global_batch_size=None)`` returns
    ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`` (the last two None unless the
    train/rollout importance-sampling correction is on), exactly like OpenRLHF.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: list = (0.5, 5.0),
    ) -> None:
        super().__init__()
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"Invalid policy loss type: {policy_loss_type}")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if is_correction_level not in {"off", "token", "seq"}:
            raise ValueError(
                f"is_correction_level must be off/token/seq, got {is_correction_level}")
        if is_correction_mode not in {"mask", "clip"}:
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
        if is_correction_gating not in {"ratio", "binary_kl", "tv"}:
            raise ValueError(
                f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}")
        if is_correction_mode == "clip" and (is_correction_level == "seq"
                                             or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode=clip requires is_correction_level=token and "
                             "is_correction_gating=ratio")
        if (is_correction_gating != "ratio" and is_correction_level != "off"
                and is_correction_threshold[0] > 0):
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound "
                             "only (a single delta)")
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        # GSPO always aggregates per sequence (OpenRLHF forces it too).
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold

    def _is_correction(self, old_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor):
        """Train/rollout mismatch correction: (per-token weight, vllm_kl, is_filter_ratio)."""
        low, high = self.is_correction_threshold
        seq = self.is_correction_level == "seq"
        is_log_ratio = (old_log_probs - rollout_log_probs).detach()
        token_is = is_log_ratio.exp()
        if self.is_correction_gating == "ratio":
            stat = (_masked_mean(is_log_ratio, mask, -1).unsqueeze(-1) if seq
                    else is_log_ratio).exp()
        else:
            p = rollout_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq:
                stat = _masked_mean(stat, mask, -1).unsqueeze(-1)
        if self.is_correction_mode == "clip":
            coef = stat.clamp(min=low, max=high)
            filtered = (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            coef = torch.where(keep, token_is, torch.zeros_like(token_is))
            filtered = ~keep
        filter_ratio = (filtered.float().mean() if seq
                        else _masked_mean(filtered.float(), mask))
        vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, mask)
        return coef.expand_as(old_log_probs), vllm_kl, filter_ratio

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: Optional[torch.Tensor] = None,
        rollout_log_probs: Optional[torch.Tensor] = None,
        dp_size: int = 1,
        batch_num_tokens: Optional[float] = None,
        global_batch_size: Optional[float] = None,
    ) -> torch.Tensor:
        mask = _token_mask(action_mask, log_probs)
        old = old_log_probs.detach()
        if self.policy_loss_type == "ppo":
            lp_in, old_in = log_probs, old
        else:
            base = rollout_log_probs if self.is_correction_level != "off" else old
            # Differentiable per-row mean log-ratio, broadcast over the row: the fused loss sees
            # log-ratio s_b at every token and autograd carries d/ds_b back through the mean.
            s = (((log_probs - base.detach()) * mask).sum(-1)
                 / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
            lp_in = s.expand_as(log_probs)
            old_in = torch.zeros_like(lp_in, dtype=acc_dtype(lp_in))
        weights = vllm_kl = filter_ratio = None
        if self.is_correction_level != "off" and self.policy_loss_type == "ppo":
            weights, vllm_kl, filter_ratio = self._is_correction(old, rollout_log_probs, mask)
        w, mode, agg_kw = _aggregation(mask, weights, self.token_level_loss, dp_size,
                                       batch_num_tokens, global_batch_size)
        loss, _ = ops.ppo_policy_loss(lp_in, old_in, advantages.detach(), w,
                                      clip_low=self.clip_eps_low, clip_high=self.clip_eps_high,
                                      dual_clip=self.dual_clip, agg=mode, **agg_kw)
        with torch.no_grad():
            lr = (lp_in - old_in).clamp(-20.0, 20.0)
            ratio = lr.exp()
            if self.policy_loss_type == "gspo":
                ratio = ratio * mask
            surr1 = ratio * advantages
            surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
            clip_ratio = ops.masked_mean((surr2 < surr1).float(), mask)
            ppo_kl = ops.masked_mean(-(log_probs.detach() - old), mask)
        return loss, clip_ratio, ppo_kl, vllm_kl, filter_ratio


class ValueLoss(nn.Module):
    """OpenRLHF ``ValueLoss``: ``0.5 * aggregate(max((v - R)^2, (v_clipped - R)^2))`` with
    ``v_clipped = old + clamp(v - old, -clip_eps, clip_eps)`` (``(v - R)^2`` without clip), on
    fastrlhf's fused value-loss op.  ``forward`` returns the loss tensor."""

    def __init__(self, clip_eps: float = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(
        self,
        values: torch.Tensor,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        action_mask: Optional[torch.Tensor] = None,
        dp_size: int = 1,
        batch_num_tokens: Optional[float] = None,
        global_batch_size: Optional[float] = None,
    ) -> torch.Tensor:
        mask = _token_mask(action_mask, values)
        w, mode, agg_kw = _aggregation(mask, None, self.token_level_loss, dp_size,
                                       batch_num_tokens, global_batch_size)
        loss, _ = ops.ppo_value_loss(values, old_values.detach(), returns.detach(), w,
                                     clip=self.clip_eps, agg=mode, **agg_kw)
        return loss


# ------------------------------------------------------------------------------------------------
# openrlhf.models.utils
# ------------------------------------------------------------------------------------------------

def compute_approx_kl(
    log_probs: torch.Tensor,
    log_probs_base: torch.Tensor,
    log_probs_old: Optional[torch.Tensor] = None,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
) -> torch.Tensor:
    """OpenRLHF ``compute_approx_kl``: k1 / k2 / k3 estimate of KL(pi || pi_base) per token,
    clamped to [-10, 10] (fastrlhf ``kl_penalty``).

    With ``unbiased_gradient`` the value stays the estimator's while the gradient is that of
    ``w * k2`` (straight-through), ``w = exp(log_probs - log_probs_old)`` clamped at
    :data:`KL_IS_WEIGHT_CLIP` and detached (1 without ``log_probs_old``).
    """
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    value = ops.kl_penalty(log_probs, log_probs_base, kind=kl_estimator).clamp(min=-10, max=10)
    if not unbiased_gradient:
        return value
    if log_probs_old is None:
        w = 1.0
    else:
        w = (log_probs.float() - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
    surrogate = w * ops.kl_penalty(log_probs, log_probs_base, kind="k2")
    return value.detach() + surrogate - surrogate.detach()


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
                          ) -> torch.Tensor:
    """OpenRLHF ``log_probs_from_logits``: ``log_softmax(logits / temperature)[labels]`` without
    materializing the softmax (fastrlhf ``token_logprobs``); ``logits`` is left untouched."""
    return ops.token_logprobs(logits, labels, temperature=temperature)


def compute_entropy(logits: torch.Tensor):
    """OpenRLHF ``compute_entropy``: entropy of ``softmax(logits)`` (no temperature here)."""
    return ops.token_entropy(logits)


@torch.no_grad()
def get_advantages_and_returns(values: torch.Tensor, rewards: torch.Tensor,
                               action_mask: torch.Tensor, gamma: float, lambd: float):
    """OpenRLHF's GAE (``RemoteExperienceMaker.get_advantages_and_returns`` without ``self``).

    ``values = mask * values``, ``rewards = mask * rewards``, then plain GAE over every position
    (``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lambd A_{t+1}``, nothing past
    the end), ``returns = A + values``: masked positions are zeroed, not skipped.  Returns
    ``(advantages, returns)``, ``[B, T]``, detached.
    """
    if action_mask is not None:
        values = action_mask * values
        rewards = action_mask * rewards
    return ops.gae(rewards, values, _ones_like_mask(rewards), gamma=gamma, lam=lambd)


def _get_advantages_and_returns_method(self, values: torch.Tensor, rewards: torch.Tensor,
                                       action_mask: torch.Tensor, gamma: float, lambd: float):
    return get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)


_get_advantages_and_returns_method.__name__ = "get_advantages_and_returns"
_get_advantages_and_returns_method.__qualname__ = "RemoteExperienceMaker.get_advantages_and_returns"
_get_advantages_and_returns_method.__doc__ = get_advantages_and_returns.__doc__


# ------------------------------------------------------------------------------------------------
# patch / unpatch
# ------------------------------------------------------------------------------------------------

_LOSS = ("PolicyLoss", "ValueLoss")
_UTILS = ("compute_approx_kl", "log_probs_from_logits", "compute_entropy")
_EXPERIENCE = "openrlhf.trainer.ppo_utils.experience_maker"


_adapter = Adapter(_patcher, PatchTable(
    swaps={"openrlhf.models.loss": _LOSS, "openrlhf.models.utils": _UTILS},
    methods=(MethodSwap(_EXPERIENCE, "RemoteExperienceMaker", "get_advantages_and_returns",
                        "_get_advantages_and_returns_method", optional=True, reason="GAE"),)),
    globals())


def patch() -> list:
    """Swap the fastrlhf versions into the installed OpenRLHF; returns the patched locations.

    Replaces ``PolicyLoss`` / ``ValueLoss`` (``openrlhf.models.loss``), ``compute_approx_kl`` /
    ``log_probs_from_logits`` / ``compute_entropy`` (``openrlhf.models.utils``) in their modules
    and every imported module that bound them by name, and
    ``RemoteExperienceMaker.get_advantages_and_returns``.  Losses built before the call keep the
    original classes.  Idempotent.  Raises ImportError when OpenRLHF's loss modules cannot be
    imported; if only the experience maker cannot (it needs Ray and vLLM), GAE is left unpatched
    with a warning.
    """
    return _adapter.patch()


def unpatch() -> int:
    """Restore every original :func:`patch` replaced; returns how many locations were restored."""
    return _adapter.unpatch()


def is_patched() -> bool:
    return _adapter.is_patched()
