"""Stage 3a, experience: sample responses, score them, per-token rewards, advantages.

:func:`collect_rollout` returns one :class:`Rollout` (the batch the update trains on) and the
named per-rank sums of its metrics; :func:`reduce_sums` adds them over the data-parallel ranks
and :func:`rollout_metrics` turns the totals into the logged means.  :class:`KLController` is
the adaptive (or fixed) beta of the KL penalty.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Mapping, Tuple, Union

import torch
from torch import Tensor, nn

from . import losses as L
from .config import TrainConfig
from .distributed import Runtime, unwrap
from .models import (ValueHead, autocast, generate, last_token_scores, policy_logits,
                     policy_logits_and_values, position_values, response_mask)
from .reference_policy import reference_on_device
from .rewards import TextScorer
from .vocab_parallel import op_kwargs

__all__ = ["Rollout", "KLController", "collect_rollout", "ROLLOUT_SUMS", "reduce_sums",
           "rollout_metrics"]


@dataclass
class Rollout:
    """One batch of experience on this rank; every tensor is ``[B, ...]`` on the device."""

    query: Tensor       # [B, P]  int64  prompt ids (BOS + words), left-padded
    query_mask: Tensor  # [B, P]  int64  1 on real prompt tokens, 0 on the left padding
    response: Tensor    # [B, R]  int64  sampled ids, PAD after the first EOS
    mask: Tensor        # [B, R]  fp32   1 on real response tokens (EOS included)
    logp: Tensor        # [B, R]  fp32   log pi_old(a_t | s_t) at the sampling temperature
    ref_logp: Tensor    # [B, R]  fp32   log pi_ref(a_t | s_t)
    values: Tensor      # [B, R]  fp32   V_old(s_t), 0 on padding
    adv: Tensor         # [B, R]  fp32   whitened GAE advantages, 0 on padding
    returns: Tensor     # [B, R]  fp32   value targets (GAE + V_old), 0 on padding

    def __len__(self) -> int:
        return self.query.shape[0]

    def select(self, idx: Tensor) -> "Rollout":
        return Rollout(*(getattr(self, f.name)[idx] for f in fields(self)))

    def to_dict(self) -> Dict[str, Tensor]:
        return {f.name: getattr(self, f.name).detach().cpu() for f in fields(self)}


class KLController:
    """beta of the KL penalty: fixed, or adaptive (Ziegler et al. 2019):
    ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon`` after each batch of n samples."""

    def __init__(self, init: float, target: float, horizon: int, adaptive: bool):
        self.value, self.target, self.horizon, self.adaptive = init, target, horizon, adaptive

    def update(self, kl: float, n: int) -> None:
        if self.adaptive:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n / self.horizon

    def state_dict(self) -> Dict:
        return {"value": self.value}

    def load_state_dict(self, s: Dict) -> None:
        self.value = s["value"]



@torch.no_grad()
def collect_rollout(cfg: TrainConfig, task, policy: nn.Module, ref: nn.Module,
                    critic: nn.Module, reward_model, rt: Runtime, kl_coef: float,
                    prompt_gen: torch.Generator, sample_gen: torch.Generator
                    ) -> Tuple[Rollout, Dict[str, Tensor]]:
    """One batch of experience from the current policy, plus the named sums of its metrics
    (:data:`ROLLOUT_SUMS`, float64 scalars on the device).

    ``task``: the built-in :class:`SyntheticTask` (``reward_model``: its trained
    :class:`~fastrlhf.trainer.models.ScalarModel`) or a ``--prompts``
    :class:`~fastrlhf.trainer.data.PromptTask` (``reward_model``: a
    :class:`~fastrlhf.trainer.rewards.TextScorer`, reward function and / or reward model)."""
    B = cfg.rollout_batch_size // rt.dp_world
    dev = rt.device
    vp = op_kwargs(unwrap(policy))
    text = isinstance(reward_model, TextScorer)
    # 1. sample responses, truncate after EOS ------------------------------------------------
    G = cfg.group_size if cfg.algo != "ppo" else 1      # samples per prompt
    query, qmask, texts = task.sample_queries(B // G, prompt_gen)                  # [B/G, P] x2
    if G > 1:                          # each prompt G times in a row: group g = rows gG..gG+G-1
        query, qmask = query.repeat_interleave(G, 0), qmask.repeat_interleave(G, 0)   # [B, P]
        texts = None if texts is None else [t for t in texts for _ in range(G)]
    query, qmask = query.to(dev), qmask.to(dev)
    with autocast(rt, cfg.bf16):
        response = generate(unwrap(policy), query, cfg.response_length, cfg.temperature,
                            sample_gen, rt, query_mask=qmask, eos_id=task.eos_id,
                            pad_id=task.pad_id, kv_cache=cfg.kv_cache)              # [B, R]
    mask, has_eos = response_mask(response, task.eos_id)                            # [B, R], [B]
    # 2. old log-probs, reference log-probs, values: fresh forward passes, in chunks of
    #    micro_batch_size sequences (so that the logits held at once are [micro, R, V]) ----------
    # 3. score: reward model at the last real token (and / or the reward function) -----------
    chunks = []
    parts = {}
    fkl = []
    micro = cfg.micro_batch_size or B
    with reference_on_device(unwrap(ref), dev, cfg.reference == "offload"):
        for c in range(0, B, micro):
            q, qm, r, m = (t[c:c + micro] for t in (query, qmask, response, mask))
            with autocast(rt, cfg.bf16):
                if isinstance(critic, ValueHead):     # --value-head shared: values from this pass
                    logits, val = policy_logits_and_values(unwrap(policy), critic, q, r, m, qm)
                else:
                    logits = policy_logits(unwrap(policy), q, r, m, qm)                 # [b, R, V]
                lp, ent = L.logprobs(logits, r, temperature=cfg.temperature,
                                     backend=cfg.op_backend, vp=vp)                     # [b, R] x2
                if cfg.kl_reward_kind != "full":
                    del logits
                ref_logits = policy_logits(unwrap(ref), q, r, m, qm)
                ref_lp, _ = L.logprobs(ref_logits, r, temperature=cfg.temperature,
                                       backend=cfg.op_backend, vp=op_kwargs(unwrap(ref)))
                if cfg.kl_reward_kind == "full":      # exact KL over the vocabulary, per position
                    fkl.append(L.exact_kl(logits, ref_logits, temperature=cfg.temperature,
                                          backend=cfg.op_backend, vp=vp))               # [b, R]
                    del logits
                del ref_logits
                if critic is None:
                    val = torch.zeros_like(m)
                elif isinstance(critic, ValueHead):
                    val = val * m
                else:
                    val = position_values(unwrap(critic), q, r, m, qm) * m              # [b, R]
                if text:
                    rm, p = reward_model(q, qm, texts[c:c + micro], r, m)               # [b]
                    for k, v in p.items():
                        parts.setdefault(k, []).append(v)
                else:
                    rm = last_token_scores(unwrap(reward_model), q, r, m, qm)           # [b]
            chunks.append((lp, ent, ref_lp, val, rm))
    logp, entropy, ref_logp, values, rm_score = (torch.cat(t) for t in zip(*chunks))
    parts = {k: torch.cat(v) for k, v in parts.items()}
    score = rm_score
    if cfg.missing_eos_penalty is not None:
        score = torch.where(has_eos, rm_score, torch.full_like(rm_score, cfg.missing_eos_penalty))
    # 4. per-token rewards (KL penalty + score at the last token), GAE, whitening --------------
    full_kl = torch.cat(fkl) if fkl else None                                       # [B, R]
    rewards, _ = L.token_rewards(score, logp, ref_logp, mask, kl_coef=kl_coef,
                                  kind=cfg.kl_reward_kind, in_reward=not cfg.kl_in_loss,
                                  backend=cfg.op_backend, full_kl=full_kl)          # [B, R] x2
    if cfg.algo == "ppo":                         # GAE on the critic's values, whitened
        adv, returns = L.advantages(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam,
                                    whiten_rewards=cfg.whiten_rewards, backend=cfg.op_backend)
    else:                                         # each score against its group's: no critic
        group_ids = torch.arange(B // G, device=dev).repeat_interleave(G)          # [B]
        adv = L.group_advantages(score, group_ids, mask, kind=cfg.algo,
                                 backend=cfg.op_backend)                            # [B, R]
        returns = torch.zeros_like(adv)
    batch = Rollout(query, qmask, response, mask, logp * mask, ref_logp * mask, values, adv,
                    returns)
    # 5. metric sums, by name (reduced over ranks by the caller) ------------------------------
    seq_kl = ((logp - ref_logp) * mask).sum(dim=1)                                  # [B] k1
    # score: the hidden oracle of the built-in task; with --prompts the score itself
    quality = rm_score if text else task.oracle(response).to(dev)
    nan = torch.tensor(float("nan"), device=dev)
    sums = {"n": torch.tensor(float(B), device=dev), "score": quality.sum(),
            "rm_reward": (parts["rm_reward"].sum() if "rm_reward" in parts else nan)
            if text else rm_score.sum(),
            "reward_fn": parts["reward_fn"].sum() if "reward_fn" in parts else nan,
            "kl": seq_kl.sum(), "kl_full": nan if full_kl is None else (full_kl * mask).sum(),
            "tokens": mask.sum(), "eos": has_eos.float().sum(),
            "reward": (rewards * mask).sum(), "entropy": (entropy * mask).sum()}
    ev = (L.explained_variance_terms(values, returns, mask) if critic is not None
          else torch.zeros(5, dtype=torch.float64))                  # no critic: NaN metric
    sums.update(zip(EV_TERMS, ev.to(dev)))
    return batch, {k: sums[k].double() for k in ROLLOUT_SUMS}


EV_TERMS = ("ev_n", "ev_y", "ev_y2", "ev_e", "ev_e2")
"""The masked sums behind the explained variance (:func:`losses.explained_variance_terms`):
count, sum and sum of squares of the returns ``y`` and of the errors ``e = y - V``."""

ROLLOUT_SUMS = ("n", "score", "rm_reward", "reward_fn", "kl", "kl_full", "tokens", "eos",
                "reward", "entropy") + EV_TERMS
"""The names of the per-rank sums :func:`collect_rollout` returns (float64 scalars; NaN for a
metric this run does not have); :func:`rollout_metrics` turns their sums over ranks into
means."""


def reduce_sums(rt: Runtime, sums: Mapping[str, Tensor]) -> Dict[str, float]:
    """Named scalar sums added over the data-parallel ranks (one all-reduce, in key order)."""
    names = list(sums)
    tot = rt.all_reduce_sum(torch.stack([torch.as_tensor(sums[k], dtype=torch.float64)
                                         for k in names]).to(rt.device)).cpu()
    return dict(zip(names, tot.tolist()))


def rollout_metrics(sums: Mapping[str, Union[float, Tensor]]) -> Dict[str, float]:
    """The logged rollout metrics (means per sample or per token) from the named sums of
    :func:`collect_rollout` (one rank's, or their totals over ranks from :func:`reduce_sums`)."""
    s = {k: float(v) for k, v in sums.items()}
    n, ntok = s["n"], s["tokens"]
    out = {"score": s["score"] / n, "rm_reward": s["rm_reward"] / n, "kl": s["kl"] / n,
           "response_len": ntok / n, "eos_frac": s["eos"] / n, "reward": s["reward"] / n,
           "entropy": s["entropy"] / max(ntok, 1.0),
           "explained_variance": L.explained_variance(
               torch.tensor([s[k] for k in EV_TERMS], dtype=torch.float64)),
           "tokens": ntok}
    for k in ("reward_fn", "kl_full"):            # present (not NaN) only when used
        if s[k] == s[k]:
            out[k] = s[k] / n
    for k in ("rm_reward", "explained_variance"):  # no --reward-model / no critic
        if out[k] != out[k]:
            del out[k]
    return out
