"""All of the trainer's loss and advantage math, in one place, on the public ``fastrlhf`` ops.

Every function takes ``backend`` and passes it to the op, so ``--backend reference`` runs the whole
loop on the eager references and ``--backend triton`` on the kernels.  Shapes: ``B`` sequences,
``R`` response positions, ``V`` vocabulary; masks are float ``[B, R]`` with 1 on real response
tokens (EOS included) and 0 on the padding after EOS.

``agg_kwargs`` carries the data-parallel normalisation of :func:`fastrlhf.agg_loss`
(``dp_size``, ``batch_num_tokens``, ``global_batch_size``): each rank divides its local sum by
the global count of the minibatch and multiplies by ``dp_size``, so that the gradient averaged by
DDP / FSDP equals the single-process gradient of the global minibatch, also when the minibatch is
split into micro-batches.

``vp`` (a dict, empty unless the policy is vocab-parallel; see
:func:`fastrlhf.trainer.vocab_parallel.op_kwargs`) carries ``process_group`` and
``vocab_start_index`` to the ops that read the logits, which then hold only this rank's slice of
the vocabulary.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import fastrlhf as fr

__all__ = ["logprobs", "sft_loss", "reward_pair_loss", "exact_kl", "token_rewards", "advantages",
           "group_advantages",
           "ppo_loss", "explained_variance_terms", "explained_variance"]


def logprobs(logits: Tensor, tokens: Tensor, *, temperature: float, backend: str,
             vp: Optional[Dict] = None) -> Tuple[Tensor, Tensor]:
    """``(logp [B, R], entropy [B, R])`` float32 of ``tokens`` under ``softmax(logits / T)``;
    logits ``[B, R, V]`` may be a strided view.  The rollout and the update both call this with
    the sampling temperature."""
    return fr.token_logprobs(logits, tokens, temperature=temperature, return_entropy=True,
                             backend=backend, **(vp or {}))


def sft_loss(logits: Tensor, tokens: Tensor, mask: Tensor, *, backend: str,
             agg_kwargs: Dict, vp: Optional[Dict] = None) -> Tensor:
    """Negative log-likelihood of the demonstration tokens, token-mean over the (global)
    batch."""
    logp = fr.token_logprobs(logits, tokens, backend=backend, **(vp or {}))         # [B, R]
    return fr.agg_loss(-logp, mask, "token-mean", **agg_kwargs)


def reward_pair_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tuple[Tensor, Tensor]:
    """Bradley-Terry loss ``-log sigmoid(r_w - r_l)`` (mean over pairs) and the accuracy
    ``mean(r_w > r_l)``; both ``[B] -> []``."""
    diff = r_chosen - r_rejected
    return -F.logsigmoid(diff).mean(), (diff > 0).float().mean()


def exact_kl(logits: Tensor, ref_logits: Tensor, *, temperature: float, backend: str,
             vp: Optional[Dict] = None) -> Tensor:
    """``KL(pi || pi_ref) [B, R]`` float32 at each position, exact over the vocabulary
    (``fastrlhf.full_kl``, one streaming pass; no softmax is materialised)."""
    return fr.full_kl(logits, ref_logits, temperature=temperature, backend=backend,
                      **(vp or {}))


def token_rewards(scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, *,
                  kl_coef: float, kind: str, in_reward: bool, backend: str,
                  full_kl: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per-token rewards ``[B, R]`` and the per-token KL ``[B, R]`` (masked).

    ``r_t = -kl_coef * kl_t`` on every real token (when the KL is in the reward) and the
    sequence score is added at the last real token (the EOS, or the last token).  ``kl_t`` is
    the sampled estimator ``kind`` of ``logp - ref_logp``, or with ``kind="full"`` the exact
    ``full_kl [B, R]`` (``fastrlhf.full_kl``: ``sum_v p_v log(p_v / q_v)`` at each position,
    the expectation that the k1 estimate ``log p(a_t) - log q(a_t)`` samples).
    """
    if kind == "full":
        kl = full_kl * mask                                                          # [B, R]
    else:
        kl = fr.kl_penalty(logp, ref_logp, kind=kind, backend=backend) * mask       # [B, R]
    rewards = -kl_coef * kl if in_reward else torch.zeros_like(kl)
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)                                # [B]
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
    return rewards * mask, kl


def advantages(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float,
               whiten_rewards: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """GAE over the response tokens, then whitened advantages: ``(adv [B, R], returns [B, R])``.

    Returns are the un-whitened ``adv + V`` (the value targets).  Whitening uses this rank's
    batch (as verl does): with data parallelism each rank whitens its own rollouts.  With
    ``whiten_rewards`` the rewards are first scaled to unit variance (mean kept), as in
    lm-human-preferences.
    """
    if whiten_rewards:
        rewards = fr.masked_whiten(rewards, mask, shift_mean=False) * mask
    adv, returns = fr.gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    adv = fr.masked_whiten(adv, mask) * mask
    return adv, returns


def group_advantages(scores: Tensor, group_ids: Tensor, mask: Tensor, *, kind: str,
                     backend: str) -> Tensor:
    """Critic-free advantages ``[B, R]`` (GRPO / Dr. GRPO / RLOO): each sequence's score
    against the other samples of its prompt (``fastrlhf.group_advantages``, ``kind`` = grpo:
    ``(x - mean) / (std + eps)``, dr_grpo: ``x - mean``, rloo: leave-one-out baseline), the same
    value on every real token of the response, 0 on the padding."""
    adv = fr.group_advantages(scores.float(), group_ids, kind=kind, backend=backend)   # [B]
    return adv[:, None] * mask


def ppo_loss(logits: Tensor, values: Optional[Tensor], *, tokens: Tensor, old_logp: Tensor,
             ref_logp: Tensor, old_values: Tensor, adv: Tensor, returns: Tensor, mask: Tensor,
             cfg, kl_coef: float, agg_kwargs: Dict, cu_seqlens: Optional[Tensor] = None,
             vp: Optional[Dict] = None, lm_head: Optional[Tuple[Tensor, Optional[Tensor]]] = None
             ) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """The PPO objective of one (micro-)batch, from the policy's logits ``[B, R, V]`` and the
    value model's outputs ``[B, R]``.

    Policy: clipped surrogate ``ppo_policy_loss`` - ``entropy_coef`` * entropy
    (+ ``kl_coef`` * KL to the reference when ``cfg.kl_in_loss``), log-probs at the sampling
    temperature.  With ``cfg.fused_loss`` the same loss comes from ``fastrlhf.fused_ppo_loss``
    in one pass over the logits.  Value: clipped ``ppo_value_loss``.  Every term is aggregated
    with ``cfg.loss_agg`` and ``agg_kwargs``.

    Packed (``cfg.packed``): every input is one row, ``logits [1, N, V]`` and the rest
    ``[1, N]`` (``N`` = real response tokens of the batch, no padding, ``mask`` all ones), and
    ``cu_seqlens [S+1]`` marks the sequences; every op then treats the segments as the rows, so
    the result equals the padded layout (``agg_kwargs`` must then carry ``loss_scale_factor`` =
    the padded ``R`` for ``seq-mean-token-sum-norm``, whose default is the longest segment).

    ``values`` None (no critic): the value loss is 0.

    ``lm_head = (weight [V, H], bias)`` (``cfg.fused_linear``): ``logits`` are then the final
    hidden states ``[B, R, H]`` and the policy loss comes from ``fastrlhf.fused_linear_ppo_loss``
    (the same loss, no ``[B, R, V]`` logits or logits gradient ever formed).

    Returns ``(policy_loss, value_loss, stats)``; stats are detached scalars (local means) plus
    ``pg_loss``, the clipped surrogate alone.
    """
    be = cfg.op_backend
    agg_kwargs = dict(agg_kwargs, cu_seqlens=cu_seqlens)   # None: the padded [B, R] layout
    kl_coef = kl_coef if cfg.kl_in_loss else 0.0
    if cfg.fused_loss or lm_head is not None:
        fused = (fr.fused_ppo_loss if lm_head is None else
                 lambda h, *a, **k: fr.fused_linear_ppo_loss(h, lm_head[0], *a, bias=lm_head[1],
                                                             **k))
        policy_loss, st = fused(
            logits, tokens, old_logp, adv, mask, ref_logp=ref_logp if cfg.kl_in_loss else None,
            kl_coef=kl_coef, kl_kind=cfg.kl_loss_kind, entropy_coef=cfg.entropy_coef,
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
            temperature=cfg.temperature, agg=cfg.loss_agg, backend=be, **agg_kwargs,
            **(vp or {}))
        ent_loss = fr.agg_loss(st["entropy"], mask, cfg.loss_agg, **agg_kwargs)
        kl_loss = fr.agg_loss(st["kl"], mask, cfg.loss_agg, **agg_kwargs)
        # the loss is linear in its per-token terms: recover the surrogate alone for the metrics
        pg_loss = policy_loss.detach() + cfg.entropy_coef * ent_loss - kl_coef * kl_loss
    else:
        logp, entropy = logprobs(logits, tokens, temperature=cfg.temperature, backend=be, vp=vp)
        pg_loss, st = fr.ppo_policy_loss(
            logp, old_logp, adv, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip, agg=cfg.loss_agg, backend=be, **agg_kwargs)
        ent_loss = fr.agg_loss(entropy, mask, cfg.loss_agg, **agg_kwargs)
        policy_loss = pg_loss - cfg.entropy_coef * ent_loss
        if cfg.kl_in_loss:
            kl = fr.kl_penalty(logp, ref_logp, kind=cfg.kl_loss_kind, backend=be)
            kl_loss = fr.agg_loss(kl, mask, cfg.loss_agg, **agg_kwargs)
            policy_loss = policy_loss + kl_coef * kl_loss
    stats = {"pg_loss": pg_loss.detach(), "clipfrac": st["clipfrac"], "approx_kl": st["approx_kl"]}
    if cfg.kl_in_loss:
        stats["kl_loss"] = kl_loss.detach()
    if values is None:          # no critic (GRPO / Dr. GRPO / RLOO)
        stats["value_clipfrac"] = torch.zeros((), device=logits.device)
        return policy_loss, torch.zeros((), device=logits.device), stats
    value_loss, v_stats = fr.ppo_value_loss(values, old_values, returns, mask,
                                            clip=cfg.value_clip, agg=cfg.loss_agg, backend=be,
                                            **agg_kwargs)
    stats["value_clipfrac"] = v_stats["clipfrac"]
    return policy_loss, value_loss, stats


def explained_variance_terms(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """Masked sums ``[n, sum y, sum y^2, sum e, sum e^2]`` (y = returns, e = y - values), to be
    summed over ranks; :func:`explained_variance` turns them into ``1 - Var(e) / Var(y)``."""
    e = (returns - values) * mask
    y = returns * mask
    return torch.stack([mask.sum(), y.sum(), (y * y).sum(), e.sum(), (e * e).sum()]).double()


def explained_variance(terms: Tensor) -> float:
    n, sy, syy, se, see = terms.tolist()
    if n < 2:
        return float("nan")
    var_y = syy / n - (sy / n) ** 2
    var_e = see / n - (se / n) ** 2
    return float("nan") if var_y <= 0 else 1.0 - var_e / var_y

