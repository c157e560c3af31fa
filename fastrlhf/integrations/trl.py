"""Drop-in replacements for TRL 1.16's log-prob / entropy helpers and GRPO loss, on fastrlhf ops.

One-line use (before ``GRPOTrainer.train()``; TRL trains in-process, so this is all)::

    import fastrlhf.integrations.trl as ft; ft.patch()

or use the pieces directly: :func:`selective_log_softmax`, :func:`entropy_from_logits` and
:func:`selective_log_softmax_and_entropy` (same signatures as ``trl.trainer.utils``), and
:func:`grpo_loss`, GRPOTrainer's loss for ``loss_type`` grpo / bnpo / dr_grpo / dapo and
``importance_sampling_level`` token / sequence as a standalone function of the per-token
log-probs.

:func:`patch` replaces the three helpers in ``trl.trainer.utils`` and in every imported module that
bound them by name, and ``GRPOTrainer._compute_loss`` by a version that computes the same loss
(and logs the same metrics) with fastrlhf's fused policy-loss op.  Configurations it does not
cover -- loss types cispo / sapo / vespo / luspo, the entropy bonus, the MoE auxiliary loss, a
``delta`` that is not above ``1 + epsilon_high``, ``epsilon == 0`` -- run TRL's own
``_compute_loss`` unchanged (a RuntimeWarning says so once).  :func:`unpatch` restores
everything.  Log-probs themselves come from TRL 1.16's fused LM head (``add_fused_lm_head``),
which already never materializes the logits; that part is left as it is.

Semantics kept from TRL (they differ from verl's): the importance ratio is not clamped
(fastrlhf clamps the log-ratio to [-20, 20] before ``exp``: identical unless a ratio leaves
[e^-20, e^20]); the sequence-level (GSPO) ratio's gradient goes *through* the sequence mean;
the KL term is the unclamped ``exp(ref - logp) - (ref - logp) - 1`` (computed in torch: fastrlhf's
``k3`` clamps at 10, which TRL does not); entropy is that of the tempered distribution
(temperature applied first, as TRL's fused head and ``selective_log_softmax_and_entropy`` do).
Results are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import ops
from ..tables import acc_dtype
from .patching import Adapter, MethodSwap, Patcher, PatchTable

__all__ = ["selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy",
           "grpo_loss", "GRPOLossOutput", "GRPO_LOSS_TYPES", "patch", "unpatch", "is_patched",
           "TESTED_VERSIONS"]

TESTED_VERSIONS = ("1.16.0",)
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

_patcher = Patcher("fastrlhf.integrations.trl", "trl", TESTED_VERSIONS,
                   'pip install "trl==1.16.0"')

_IGNORE = -100


# ------------------------------------------------------------------------------------------------
# trl.trainer.utils
# ------------------------------------------------------------------------------------------------

def _masked_index(index: Tensor, row_mask: Optional[Tensor]) -> Tensor:
    if row_mask is None:
        return index
    return torch.where(row_mask == 0, torch.full_like(index, _IGNORE), index)


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TRL ``selective_log_softmax``: ``log_softmax(logits / temperature)`` gathered at ``index``.

    ``index`` is ``(...)`` (one id per row) or ``(..., K)`` (K ids per row, e.g. top-K); rows
    where ``row_mask`` (same shape as ``index``) is 0 give 0 and no gradient.  Never materializes
    the softmax (fastrlhf ``token_logprobs``, one pass per gathered id).
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if index.dim() == logits.dim() - 1:
        return ops.token_logprobs(logits, _masked_index(index, row_mask), temperature=temperature)
    if index.dim() != logits.dim():
        raise ValueError(f"selective_log_softmax: index must have shape {tuple(logits.shape[:-1])} "
                         f"or {tuple(logits.shape[:-1])} + (K,), got {tuple(index.shape)}")
    idx = _masked_index(index, row_mask)
    cols = [ops.token_logprobs(logits, idx[..., k].contiguous(), temperature=temperature)
            for k in range(idx.shape[-1])]
    if not cols:
        return torch.zeros(index.shape, dtype=acc_dtype(logits), device=logits.device)
    return torch.stack(cols, dim=-1)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL ``entropy_from_logits``: entropy (nats) of ``softmax(logits)`` over the last dim.
    ``chunk_size`` is accepted for compatibility; fastrlhf streams the vocabulary anyway."""
    return ops.token_entropy(logits)


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL ``selective_log_softmax_and_entropy``: the gathered log-probs and the entropy of
    ``softmax(logits / temperature)`` in one pass; rows with ``row_mask == 0`` give zeros."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    logp, ent = ops.token_logprobs(logits, _masked_index(index, row_mask),
                                   temperature=temperature, return_entropy=True)
    if row_mask is not None:
        ent = ent.masked_fill(row_mask == 0, 0.0)
    return logp, ent if entropy_requires_grad else ent.detach()


# ------------------------------------------------------------------------------------------------
# GRPO loss
# ------------------------------------------------------------------------------------------------

class GRPOLossOutput(NamedTuple):
    """What :func:`grpo_loss` returns."""
    loss: Tensor                    # GRPOTrainer._compute_loss's value (no entropy bonus / aux)
    policy_loss: Tensor             # detached, before gradient-accumulation scaling (TRL metric)
    coef_1: Tensor                  # detached ratio, (B, T) token / (B, 1) sequence level
    per_token_kl: Optional[Tensor]  # detached (B, T) KL term when beta != 0, else None


def grpo_loss(per_token_logps: Tensor, old_per_token_logps: Tensor, advantages: Tensor,
              mask: Tensor, *, loss_type: str = "dapo", importance_sampling_level: str = "token",
              epsilon_low: float = 0.2, epsilon_high: Optional[float] = None,
              delta: Optional[float] = None, beta: float = 0.0,
              ref_per_token_logps: Optional[Tensor] = None, use_bias_correction_kl: bool = True,
              per_token_weights: Optional[Tensor] = None,
              max_completion_length: Optional[int] = None, num_items_in_batch=None,
              num_processes: int = 1, gradient_accumulation_steps: int = 1,
              steps_per_generation: int = 1, training: bool = True) -> GRPOLossOutput:
    """GRPOTrainer's clipped loss (TRL 1.16) from per-token log-probs.

    Args:
        per_token_logps: ``(B, T)`` log-probs of the completion tokens under the policy (the
            differentiable input).
        old_per_token_logps: ``(B, T)`` log-probs at generation time (TRL passes
            ``per_token_logps.detach()`` when there is a single iteration).
        advantages: ``(B,)``, ``(B, 1)`` or ``(B, T)``.
        mask: ``(B, T)`` completion mask (times the tool mask, if any).
        loss_type: ``"grpo"`` (per-sequence token mean, averaged over the batch), ``"bnpo"`` (token
            mean over the micro-batch), ``"dr_grpo"`` (token sum / (B * max_completion_length)),
            ``"dapo"`` (token sum / the generation batch's token count: ``num_items_in_batch /
            num_processes``, times ``gradient_accumulation_steps / steps_per_generation`` in
            training).
        importance_sampling_level: ``"token"``: ``r = exp(logp - old)``; ``"sequence"`` (GSPO):
            ``r_b = exp(mean_t m (logp - old))`` per row, differentiated through the mean.
        epsilon_low, epsilon_high: clip range ``[1 - epsilon_low, 1 + epsilon_high]``
            (``epsilon_high=None``: ``epsilon_low``).
        delta: two-sided GRPO's upper bound on the ratio for negative advantages (must exceed
            ``1 + epsilon_high``; it is then exactly a dual clip).
        beta, ref_per_token_logps, use_bias_correction_kl: KL term
            ``beta * (exp(ref - logp) - (ref - logp) - 1)``, times the (differentiable) ratio
            when ``use_bias_correction_kl``.
        per_token_weights: optional non-negative factors on the policy term (TRL's off-policy
            mask, high-entropy mask, vLLM importance-sampling ratio), broadcastable to
            ``(B, T)``; the KL term is not weighted (as in TRL).
        training: False for evaluation (no gradient-accumulation scaling).

    Returns a :class:`GRPOLossOutput`.  The policy term runs through fastrlhf's fused
    ``ppo_policy_loss`` (token weights ``c_bt`` with aggregation ``token-sum``); the KL term, if
    any, in torch.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_loss: loss_type must be one of {GRPO_LOSS_TYPES}, got "
                         f"{loss_type!r} (use TRL's own loss for the others)")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"Unknown importance sampling level: {importance_sampling_level}. "
                         "Possible values are 'token' and 'sequence'.")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if delta is not None and not delta > 1.0 + epsilon_high:
        raise ValueError(f"grpo_loss: delta={delta} must be > 1 + epsilon_high = "
                         f"{1.0 + epsilon_high} (TRL's recommended range)")
    if per_token_logps.dim() != 2:
        raise ValueError(f"grpo_loss: per_token_logps must be (B, T), got "
                         f"{tuple(per_token_logps.shape)}")
    B, T = per_token_logps.shape
    acc = acc_dtype(per_token_logps, old_per_token_logps)
    m = mask.to(acc)
    adv = advantages.detach()
    if adv.dim() == 2 and adv.shape[1] == 1:
        adv = adv.reshape(B)  # TRL's (B, 1) per-sequence advantages
    accum = gradient_accumulation_steps if training else 1.0

    # Token weights of the aggregation: loss = sum_bt L_bt * norm_bt.
    if loss_type == "grpo":
        norm = m / m.sum(-1, keepdim=True).clamp(min=1.0) / B
    elif loss_type == "bnpo":
        norm = m / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("grpo_loss: loss_type='dr_grpo' needs max_completion_length")
        norm = m / (B * max_completion_length)
    else:
        if num_items_in_batch is None:
            raise ValueError("grpo_loss: loss_type='dapo' needs num_items_in_batch (the "
                             "generation batch's completion-token count)")
        n = torch.as_tensor(num_items_in_batch, dtype=acc, device=m.device).clamp(min=1.0)
        normalizer = n / num_processes
        if training:
            normalizer = normalizer * gradient_accumulation_steps / steps_per_generation
        norm = m / normalizer

    old = old_per_token_logps.detach()
    if importance_sampling_level == "token":
        log_iw = per_token_logps - old
        lp_in, old_in = per_token_logps, old
    else:
        log_iw = (((per_token_logps - old) * mask).sum(-1)
                  / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        lp_in = log_iw.expand(B, T)
        old_in = torch.zeros(B, T, dtype=lp_in.dtype, device=lp_in.device)

    w_policy = norm if per_token_weights is None else norm * per_token_weights.detach().to(acc)
    w_policy = w_policy.expand(B, T)
    loss, _ = ops.ppo_policy_loss(lp_in, old_in, adv, w_policy, clip_low=epsilon_low,
                                  clip_high=epsilon_high, dual_clip=delta, agg="token-sum")
    per_token_kl = None
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_per_token_logps")
        d = ref_per_token_logps.detach().to(acc) - per_token_logps.to(acc)
        per_token_kl = torch.exp(d) - d - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * torch.exp(log_iw.to(acc))
        loss = loss + beta * (per_token_kl * norm).sum()
        per_token_kl = per_token_kl.detach()
    policy_loss = loss.detach()
    if loss_type != "dapo":
        loss = loss / accum
    with torch.no_grad():
        coef_1 = torch.exp(log_iw.detach().to(acc))
        if delta is not None:
            coef_1 = coef_1.clamp(max=delta)
    return GRPOLossOutput(loss, policy_loss, coef_1, per_token_kl)


# ------------------------------------------------------------------------------------------------
# GRPOTrainer._compute_loss replacement
# ------------------------------------------------------------------------------------------------

_STATE = {"grpo_module": None, "warned": set()}


def _unsupported(trainer) -> Optional[str]:
    if trainer.loss_type not in GRPO_LOSS_TYPES:
        return f"loss_type={trainer.loss_type!r}"
    if getattr(trainer, "_entropy_bonus_enabled", False):
        return "the entropy bonus (entropy_coef / adaptive entropy)"
    if getattr(trainer, "aux_loss_enabled", False):
        return "the MoE router auxiliary loss"
    if trainer.importance_sampling_level not in ("token", "sequence"):
        return f"importance_sampling_level={trainer.importance_sampling_level!r}"
    if not trainer.epsilon_low > 0:
        return f"epsilon={trainer.epsilon_low}"
    delta = getattr(trainer.args, "delta", None)
    if delta is not None and not delta > 1.0 + trainer.epsilon_high:
        return f"delta={delta} <= 1 + epsilon_high"
    return None


def _grpo_module():
    if _STATE["grpo_module"] is None:
        _STATE["grpo_module"] = _patcher.require("trl.trainer.grpo_trainer")
    return _STATE["grpo_module"]


def _fallback(trainer, model, inputs, reason: str):
    if reason not in _STATE["warned"]:
        _STATE["warned"].add(reason)
        warnings.warn(f"fastrlhf.integrations.trl: GRPOTrainer runs TRL's own loss for {reason}",
                      RuntimeWarning, stacklevel=3)
    grpo = _grpo_module()
    return _patcher.original_attr(grpo.GRPOTrainer, "_compute_loss")(trainer, model, inputs)


def _mul(a: Optional[Tensor], b: Tensor) -> Tensor:
    return b if a is None else a * b


def _grpo_compute_loss(self, model, inputs):
    """GRPOTrainer._compute_loss on fastrlhf's fused policy loss (see fastrlhf.integrations.trl)."""
    reason = _unsupported(self)
    if reason is not None:
        return _fallback(self, model, inputs, reason)
    grpo = _grpo_module()
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits_to_keep = completion_ids.size(1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, logits_to_keep, compute_entropy=True,
        compute_aux_loss=False,
        **{k: inputs.get(k) for k in (
            "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
            "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids",
            "image_position_ids")})

    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = inputs.get("old_per_token_logps")
    old = per_token_logps.detach() if old is None else old

    weights = None
    if self.off_policy_mask_threshold is not None:
        sampling = inputs.get("sampling_per_token_logps", old)
        weights = _mul(weights, self.get_off_policy_mask(
            advantages=advantages, per_token_logps=per_token_logps,
            sampling_per_token_logps=sampling, mask=mask,
            off_policy_threshold=self.off_policy_mask_threshold))
    if self.top_entropy_quantile < 1.0:
        weights = _mul(weights, self.get_high_entropy_mask(entropies, mask,
                                                           1 - self.top_entropy_quantile))
    if self.use_vllm and self.vllm_importance_sampling_correction:
        weights = _mul(weights, inputs["importance_sampling_ratio"])

    mode = "train" if self.model.training else "eval"
    out = grpo_loss(
        per_token_logps, old, advantages, mask, loss_type=self.loss_type,
        importance_sampling_level=self.importance_sampling_level, epsilon_low=self.epsilon_low,
        epsilon_high=self.epsilon_high, delta=self.args.delta, beta=self.beta,
        ref_per_token_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
        use_bias_correction_kl=self.args.use_bias_correction_kl, per_token_weights=weights,
        max_completion_length=self.max_completion_length,
        num_items_in_batch=inputs.get("num_items_in_batch"),
        num_processes=self.accelerator.num_processes,
        gradient_accumulation_steps=self.current_gradient_accumulation_steps,
        steps_per_generation=self.args.steps_per_generation, training=mode == "train")

    # Metrics, as GRPOTrainer logs them.
    def masked_seq_mean(x):
        if x.shape[1] == 1:
            return x.squeeze(1)
        return (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            local_sum, local_count = (x * mask).sum(), mask.sum().float()
        totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    metrics = self._metrics[mode]
    if self.beta != 0.0:
        metrics["kl"].append(global_masked_mean(out.per_token_kl))
    metrics["entropy"].append(global_masked_mean(entropies))
    low = (out.coef_1 < 1 - self.epsilon_low) & (advantages < 0)
    high = (out.coef_1 > 1 + self.epsilon_high) & (advantages > 0)
    metrics["clip_ratio/low_mean"].append(global_masked_mean(low.float()))
    metrics["clip_ratio/high_mean"].append(global_masked_mean(high.float()))
    metrics["clip_ratio/region_mean"].append(global_masked_mean((low | high).float()))
    metrics["clip_ratio/low_min"].append(
        grpo.nanmin(self.accelerator.gather(masked_seq_mean(low.float()))).item())
    metrics["clip_ratio/high_max"].append(
        grpo.nanmax(self.accelerator.gather(masked_seq_mean(high.float()))).item())
    return out.loss


# ------------------------------------------------------------------------------------------------
# patch / unpatch
# ------------------------------------------------------------------------------------------------

_UTILS = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")


def _remember_grpo(mods) -> None:
    _STATE["grpo_module"] = mods["trl.trainer.grpo_trainer"]


_adapter = Adapter(_patcher, PatchTable(
    swaps={"trl.trainer.utils": _UTILS},
    methods=(MethodSwap("trl.trainer.grpo_trainer", "GRPOTrainer", "_compute_loss",
                        "_grpo_compute_loss"),)),
    globals(), on_patch=_remember_grpo)


def patch() -> list:
    """Swap the fastrlhf versions into the installed TRL; returns the patched locations.

    Replaces ``selective_log_softmax``, ``entropy_from_logits`` and
    ``selective_log_softmax_and_entropy`` in ``trl.trainer.utils`` and every imported module that
    bound them by name, and ``GRPOTrainer._compute_loss``.  Idempotent.  Raises ImportError when
    TRL is not installed; warns on an untested version.
    """
    return _adapter.patch()


def unpatch() -> int:
    """Restore every original :func:`patch` replaced; returns how many locations were restored."""
    return _adapter.unpatch()


def is_patched() -> bool:
    return _adapter.is_patched()
