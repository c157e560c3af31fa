"""Drop-in replacements for verl 0.9's loss functions, backed by fastrlhf ops.

One-line use (before the trainer / workers are built; in a Ray job, in every worker process, e.g.
``ray.init(runtime_env={"worker_process_setup_hook": "fastrlhf.integrations.verl.patch"})``)::

    import fastrlhf.integrations.verl as fv; fv.patch()

or call the functions directly: each has the name, parameters (same order and defaults) and
return type of its verl counterpart.

From ``verl.trainer.ppo.core_algos``: :func:`compute_gae_advantage_return`,
:func:`compute_policy_loss` (the deprecated tuple form), :func:`compute_policy_loss_vanilla`,
:func:`compute_policy_loss_gspo`, :func:`compute_value_loss`, :func:`kl_penalty`,
:func:`agg_loss`.  From ``verl.utils.torch_functional``: :func:`logprobs_from_logits`,
:func:`entropy_from_logits`, :func:`masked_mean`, :func:`masked_whiten`.

:func:`patch` swaps these into verl: the defining modules, every already-imported module that
bound one of them by name (``from verl.trainer.ppo.core_algos import agg_loss`` in
``verl.workers.utils.losses`` & co.), the policy-loss registry (``get_policy_loss_fn("vanilla")``
and ``"gspo"``) and the advantage-estimator registry (``get_adv_estimator_fn("gae")``) that the
trainer really calls through.  :func:`unpatch` restores the originals.  Both are idempotent.

Numbers are verl's within float32 rounding, with these deliberate differences (all where verl
gives NaN, raises or silently mixes garbage in):

* Results come back in float32 (float64 for float64 inputs) whatever the input dtype; verl keeps
  the input dtype (bf16 log-probs stay bf16 there).
* NaN / inf at masked positions never leaks into a result (verl's GAE and its seq-mean
  aggregations multiply them by 0 and propagate the NaN).
* Empty masks give 0 instead of NaN (aggregations) or an exception (``masked_whiten``, whose
  unbiased variance verl refuses for fewer than two elements).
* GAE needs a 0/1 response mask (verl mixes a fractional float mask in linearly) and
  ``gamma``, ``lam`` in [0, 1].
* ``kl_penalty``'s ``"+"`` kinds (straight-through: the base estimator's value with k2's
  gradient) are computed by fastrlhf's fused op; verl 0.9.x computes the same thing.
* GSPO keeps verl's stop-gradient form (each token's gradient is its own ratio times the clipped
  loss's slope, ``log r = logp - sg(logp) + sg(mean log-ratio)``), unlike OpenRLHF / TRL, whose
  gradient goes through the sequence mean (see :mod:`fastrlhf.integrations.openrlhf`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from .. import ops
from ..tables import acc_dtype
from .common import weighted_agg
from .patching import Adapter, Patcher, PatchTable

__all__ = ["compute_gae_advantage_return", "compute_policy_loss", "compute_policy_loss_vanilla",
           "compute_policy_loss_gspo", "compute_value_loss", "kl_penalty", "agg_loss",
           "logprobs_from_logits", "entropy_from_logits", "masked_mean", "masked_whiten",
           "patch", "unpatch", "is_patched", "TESTED_VERSIONS"]

TESTED_VERSIONS = ("0.9.1",)

_patcher = Patcher("fastrlhf.integrations.verl", "verl", TESTED_VERSIONS,
                   'pip install "verl==0.9.1"; its loss modules also import ray, tensordict, '
                   "omegaconf, hydra-core, codetiming, transformers, peft and datasets (see the "
                   "README, Integrations)")


# ------------------------------------------------------------------------------------------------
# verl.utils.torch_functional
# ------------------------------------------------------------------------------------------------

def _float_values(values: Tensor) -> Tensor:
    return values if values.is_floating_point() else values.to(torch.float32)


def masked_mean(values, mask, axis=None):
    """verl ``masked_mean``: ``sum(where(mask, values, 0) * mask, axis) / (sum(mask, axis) +
    1e-8)``.

    ``values`` and ``mask`` may broadcast against each other (as in verl); integer / bool values
    are averaged as float32.  Float32 result (float64 for float64 values).
    """
    v = _float_values(values)
    if v.shape != mask.shape:
        v, mask = torch.broadcast_tensors(v, mask)
    return ops.masked_mean(v, mask, dim=axis)


def masked_whiten(values, mask, shift_mean=True):
    """verl ``masked_whiten``: ``(values - mean) * rsqrt(var + 1e-8)`` with the masked mean and
    unbiased masked variance, applied at every position (``+ mean`` again if not ``shift_mean``).

    Where verl raises (fewer than two selected elements) this returns the uncorrected result
    (zeros for an empty mask).
    """
    v = _float_values(values)
    if v.shape != mask.shape:
        v, mask = torch.broadcast_tensors(v, mask)
    return ops.masked_whiten(v, mask, shift_mean=bool(shift_mean))


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl ``logprobs_from_logits``: ``log_softmax(logits)[labels]``, ``[..., V] -> [...]``,
    without materializing the softmax (fastrlhf ``token_logprobs``).

    ``inplace_backward`` (Triton backend) writes the gradient into the ``logits`` buffer, as verl's
    flash-attn path does; verl's engines turn it off when the same logits also feed the entropy.
    Labels equal to -100 give 0 (verl would fail on them).
    """
    return ops.token_logprobs(logits, labels, inplace_backward=bool(inplace_backward))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """verl ``entropy_from_logits``: entropy of ``softmax(logits)`` over the last dim.

    Like verl, no temperature here: verl divides the logits by the temperature before calling
    both this and :func:`logprobs_from_logits` (entropy *after* temperature).
    """
    return ops.token_entropy(logits)


# ------------------------------------------------------------------------------------------------
# verl.trainer.ppo.core_algos
# ------------------------------------------------------------------------------------------------

def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens: Optional[int] = None, global_batch_size: Optional[int] = None,
             loss_scale_factor: Optional[int] = None):
    """verl ``agg_loss``: token-mean / token-sum / seq-mean-token-sum(-norm) / seq-mean-token-mean
    over the global batch (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
    ``loss_scale_factor`` as verl).  A zero denominator gives 0 instead of NaN."""
    _check_dp(loss_agg_mode, dp_size, batch_num_tokens, global_batch_size)
    if loss_mat.dim() != 2 and loss_mat.dim() >= 1 and loss_mask.shape == loss_mat.shape:
        # verl reduces the last dim as "the sequence" whatever the rank: same as rows of [-1, T].
        rows = (math.prod(loss_mat.shape[:-1]), loss_mat.shape[-1])  # not -1: T may be 0
        loss_mat = loss_mat.reshape(rows)
        loss_mask = loss_mask.reshape(rows)
    return ops.agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=dp_size,
                        batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                        loss_scale_factor=loss_scale_factor)


def _check_dp(mode, dp_size, batch_num_tokens, global_batch_size) -> None:
    # verl's own error for a data-parallel run without the global counts.
    if mode not in ops.AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {mode}")
    if dp_size > 1 and mode == "token-mean" and batch_num_tokens is None:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and mode != "token-mean" and mode != "token-sum" and global_batch_size is None:
        raise ValueError("global_batch_size is required when dp_size > 1")


def compute_gae_advantage_return(token_level_rewards: torch.Tensor, values: torch.Tensor,
                                 response_mask: torch.Tensor, gamma: torch.Tensor,
                                 lam: torch.Tensor):
    """verl ``compute_gae_advantage_return`` (multi-turn GAE, then whitening over the mask).

    ``token_level_rewards``, ``values``, ``response_mask``: ``[B, T]``.  Returns
    ``(advantages, returns)``, both ``[B, T]``:

    * the GAE recursion skips masked (observation) tokens: a valid token's next value / next
      advantage are those of the next valid token (fastrlhf ``gae``, one fused reverse scan);
    * at a masked position verl writes the advantage carried from the next valid token (0 after
      the last one) and ``returns = that + values``; reproduced here with one gather;
    * ``advantages = masked_whiten(advantages, response_mask)``; ``returns`` are not whitened.
    """
    with torch.no_grad():
        mask = response_mask
        if mask.is_floating_point() and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("compute_gae_advantage_return: response_mask must hold only 0 and 1 "
                             "(verl blends a fractional mask linearly; fastrlhf does not)")
        adv, _ = ops.gae(token_level_rewards, values, mask, gamma=gamma, lam=lam)
        valid = mask != 0
        B, T = valid.shape
        pos = torch.arange(T, device=valid.device).expand(B, T)
        first_valid_at_or_after = torch.where(valid, pos, torch.full_like(pos, T)) \
            .flip(-1).cummin(-1).values.flip(-1)
        carried = torch.cat([adv, adv.new_zeros(B, 1)], dim=1).gather(1, first_valid_at_or_after)
        returns = carried + values
        advantages = ops.masked_whiten(carried, mask)
    return advantages, returns


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None,
                        cliprange_low=None, cliprange_high=None, clip_ratio_c=3.0,
                        loss_agg_mode: str = "token-mean"):
    """verl's deprecated ``compute_policy_loss``: dual-clip PPO, returns the tuple
    ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)`` (0-dim tensors).

    ``ratio = exp(clamp(log_prob - old_log_prob, -20, 20))``, clip range
    ``[1 - cliprange_low, 1 + cliprange_high]`` (each defaulting to ``cliprange``), dual clip
    ``clip_ratio_c`` (> 1) on negative advantages, aggregated with ``loss_agg_mode``; one fused
    fastrlhf ``ppo_policy_loss`` call.
    """
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    if low is None or high is None:
        raise ValueError("compute_policy_loss: cliprange (or both cliprange_low and "
                         "cliprange_high) is required")
    _check_clip_ratio_c(clip_ratio_c)
    loss, stats = ops.ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask,
                                      clip_low=low, clip_high=high, dual_clip=clip_ratio_c,
                                      agg=loss_agg_mode)
    return loss, stats["clipfrac"], stats["approx_kl"], stats["clipfrac_lower"]


def _check_clip_ratio_c(c) -> None:
    if not c > 1.0:
        raise ValueError("The lower bound of the clip_ratio_c for dual-clip PPO should be greater "
                         f"than 1.0, but get the value: {c}.")


def _config_clips(config):
    if config is None:
        raise ValueError("verl policy loss: config (the actor config) is required")
    if type(config).__name__ == "AlgoConfig":
        raise TypeError("verl policy loss: pass the actor config, not the algorithm config")
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    info = getattr(config, "global_batch_info", None) or {}
    return low, high, {k: info[k] for k in info}


def _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights, *, dual_clip, ratio_level):
    low, high, info = _config_clips(config)
    info = {k: info.get(k) for k in ("batch_num_tokens", "global_batch_size", "loss_scale_factor")
            } | {"dp_size": info.get("dp_size", 1) or 1}
    _check_dp(loss_agg_mode, info["dp_size"], info["batch_num_tokens"], info["global_batch_size"])
    kw = dict(clip_low=low, clip_high=high, dual_clip=dual_clip, ratio_level=ratio_level)
    if rollout_is_weights is None:
        loss, stats = ops.ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask,
                                          agg=loss_agg_mode, **kw, **info)
    else:
        # verl multiplies the per-token loss by the weights before aggregating; the counts in
        # the denominators stay those of response_mask.  Statistics use response_mask alone.
        w, mode, agg_kw = weighted_agg(response_mask, rollout_is_weights.detach(), loss_agg_mode,
                                       **info)
        lp, old = log_prob, old_log_prob
        if ratio_level == "sequence":
            # The weighted mask must not enter the sequence mean: feed the token-level op
            # lp - old = lp - sg(lp) + sg(min(s_b, 10)) (verl's form; no gradient past the clamp).
            with torch.no_grad():
                s = ops.masked_sum(log_prob - old_log_prob, response_mask, dim=-1) \
                    / response_mask.sum(-1).clamp(min=1)
                keep = (s <= 10.0).unsqueeze(-1)
                s = s.clamp(min=-20.0, max=10.0).unsqueeze(-1)
                old = log_prob.detach().to(acc_dtype(log_prob)) - s
            lp = torch.where(keep, log_prob, log_prob.detach())
            kw["ratio_level"] = "token"
        loss, _ = ops.ppo_policy_loss(lp, old, advantages, w, agg=mode, **kw, **agg_kw)
        kw["ratio_level"] = ratio_level
        with torch.no_grad():
            _, stats = ops.ppo_policy_loss(log_prob.detach(), old_log_prob, advantages,
                                           response_mask, **kw)
    metrics = {
        "actor/pg_clipfrac": stats["clipfrac"].item(),
        "actor/ppo_kl": stats["approx_kl"].item(),
        "actor/pg_clipfrac_lower": stats["clipfrac_lower"].item(),
    }
    return loss, metrics


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                                advantages: torch.Tensor, response_mask: torch.Tensor,
                                loss_agg_mode: str = "token-mean", config: Optional[Any] = None,
                                rollout_is_weights: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl ``compute_policy_loss_vanilla`` (registered as policy loss ``"vanilla"``).

    Clip range from ``config.clip_ratio_low`` / ``clip_ratio_high`` (falling back to
    ``clip_ratio``), dual clip ``config.clip_ratio_c`` (default 3.0), aggregation
    ``loss_agg_mode`` with ``config.global_batch_info``; ``rollout_is_weights`` multiply each
    token's loss.  Returns ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl",
    "actor/pg_clipfrac_lower"})`` with Python floats in the dict, as verl.
    """
    if config is None:
        raise ValueError("compute_policy_loss_vanilla: config (the actor config) is required")
    clip_ratio_c = config.get("clip_ratio_c", 3.0)
    _check_clip_ratio_c(clip_ratio_c)
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights, dual_clip=clip_ratio_c, ratio_level="token")


def compute_policy_loss_gspo(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                             advantages: torch.Tensor, response_mask: torch.Tensor,
                             loss_agg_mode: str = "seq-mean-token-mean",
                             config: Optional[Any] = None,
                             rollout_is_weights: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl ``compute_policy_loss_gspo`` (policy loss ``"gspo"``), verl's stop-gradient form:
    ``log r_t = logp_t - sg(logp_t) + sg(s_b)`` with ``s_b`` the masked mean log-ratio of the
    sequence, clamped at 10; no dual clip; ``pg_clipfrac_lower`` is 0."""
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights, dual_clip=None, ratio_level="sequence")


def compute_value_loss(vpreds: torch.Tensor, returns: torch.Tensor, values: torch.Tensor,
                       response_mask: torch.Tensor, cliprange_value: float,
                       loss_agg_mode: str = "token-mean", dp_size: int = 1,
                       batch_num_tokens: Optional[int] = None,
                       global_batch_size: Optional[int] = None,
                       loss_scale_factor: Optional[int] = None):
    """verl ``compute_value_loss``: ``0.5 * agg_loss(max((v - R)^2, (clip(v, old +- c) - R)^2))``;
    returns ``(vf_loss, vf_clipfrac)`` (0-dim tensors).  Note verl's argument order:
    ``(vpreds, returns, values, ...)`` with ``values`` the old values."""
    _check_dp(loss_agg_mode, dp_size, batch_num_tokens, global_batch_size)
    loss, stats = ops.ppo_value_loss(vpreds, values, returns, response_mask, clip=cliprange_value,
                                     agg=loss_agg_mode, dp_size=dp_size,
                                     batch_num_tokens=batch_num_tokens,
                                     global_batch_size=global_batch_size,
                                     loss_scale_factor=loss_scale_factor)
    return loss, stats["clipfrac"]


def kl_penalty(logprob: torch.FloatTensor, ref_logprob: torch.FloatTensor, kl_penalty
               ) -> torch.FloatTensor:
    """verl ``kl_penalty``: per-token KL estimate, ``kl_penalty`` one of ``kl``/``k1``, ``abs``,
    ``mse``/``k2``, ``low_var_kl``/``k3``, each optionally with a ``"+"`` suffix (straight-through:
    the base value with k2's gradient).  ``"full"`` and unknown names raise NotImplementedError,
    as in verl (use ``fastrlhf.full_kl`` on the logits for the exact KL)."""
    if not isinstance(kl_penalty, str) or kl_penalty not in ops.KL_KINDS:
        raise NotImplementedError(f"kl_penalty: unsupported kind {kl_penalty!r}")
    return ops.kl_penalty(logprob, ref_logprob, kind=kl_penalty)


# ------------------------------------------------------------------------------------------------
# patch / unpatch
# ------------------------------------------------------------------------------------------------

_CORE = ("compute_gae_advantage_return", "compute_policy_loss", "compute_policy_loss_vanilla",
         "compute_policy_loss_gspo", "compute_value_loss", "kl_penalty", "agg_loss")
_TF = ("logprobs_from_logits", "entropy_from_logits", "masked_mean", "masked_whiten")
_POLICY_REGISTRY = {"vanilla": "compute_policy_loss_vanilla", "gspo": "compute_policy_loss_gspo"}
_ADV_REGISTRY = {"gae": "compute_gae_advantage_return"}


_adapter = Adapter(_patcher, PatchTable(
    swaps={"verl.trainer.ppo.core_algos": _CORE, "verl.utils.torch_functional": _TF},
    registries=(("verl.trainer.ppo.core_algos", "POLICY_LOSS_REGISTRY", _POLICY_REGISTRY),
                ("verl.trainer.ppo.core_algos", "ADV_ESTIMATOR_REGISTRY", _ADV_REGISTRY))),
    globals())


def patch() -> list:
    """Swap the fastrlhf versions into the installed verl; returns the patched locations.

    Replaces the functions above in ``verl.trainer.ppo.core_algos`` and
    ``verl.utils.torch_functional``, in every imported module that bound them by name, and in
    ``POLICY_LOSS_REGISTRY`` (``"vanilla"``, ``"gspo"``) and ``ADV_ESTIMATOR_REGISTRY``
    (``"gae"``).  Idempotent (a second call only catches modules imported since).  Raises
    ImportError when verl (or what its loss modules import) is missing; warns
    (:class:`~fastrlhf.integrations.UntestedVersionWarning`) on an untested version.
    """
    return _adapter.patch()


def unpatch() -> int:
    """Restore every original :func:`patch` replaced; returns how many locations were restored.
    Idempotent; a location someone else re-patched since is left alone."""
    return _adapter.unpatch()


def is_patched() -> bool:
    return _adapter.is_patched()
