"""RLHF with PPO, top to bottom: SFT warm start -> reward model -> PPO.

Read :func:`train` from the top; everything it calls is in this file except the models
(``models.py``), the loss math (``losses.py``, all on the public ``fastrlhf`` ops), the data
(``task.py``), data parallelism (``distributed.py``) and checkpoints (``checkpoint.py``).

The "N implementation details of RLHF with PPO" (Huang et al. 2023) this follows:

1. Sampling is pure: ``softmax(logits / temperature)``, no top-k / top-p; the update computes
   log-probs at the **same temperature** (``losses.logprobs``).
2. Responses are **truncated after the first EOS**: later tokens become padding, masked out of
   log-probs, values, KL, advantages and losses (``models.response_mask``).
3. A response **without EOS** gets ``missing_eos_penalty`` instead of the reward model's score.
4. The reward model scores the **last real token** (the EOS); its head starts at
   N(0, 1/sqrt(H+1)) and its scores are **normalised** to mean 0 / std 1 on SFT samples.
5. The per-token reward is ``-beta * KL_t`` plus the score at the last token; beta is **adaptive**
   (or fixed); KL can go in the loss instead (``kl_in_loss``).
6. **GAE** over the response tokens only; advantages **whitened** over the batch; optional reward
   whitening.
7. Old log-probs and values are **recomputed** by a forward pass after generation, not taken from
   the sampling loop.
8. **Dropout off** in every model; the value model is a separate critic **initialised from the
   reward model** (see ``models.py`` for why).
9. Several **epochs of shuffled minibatch** updates, clipped policy and value losses, entropy
   bonus, **gradient clipping**, linear / cosine **LR decay**, Adam eps 1e-5.

With ``prompts`` (your model, prompts and reward; ``data.py``, ``rewards.py``) there is no SFT
or reward-model phase: the loaded model is the policy and the reference, prompts come
left-padded, and the score is the reward function's and / or the reward model's.  With ``algo``
grpo / dr_grpo / rloo there is no critic: each prompt is sampled ``group_size`` times and the
advantages are group-relative (``losses.group_advantages``), with the KL in the loss.

With ``packed`` the update's forward passes and losses run padding-free
(:meth:`Learner._packed_loss`); everything else is unchanged.  With ``vocab_parallel`` the policy
and reference hold one vocab slice per rank (``vocab_parallel.py``): their logits are local
slices, every op that reads them gets ``vp = op_kwargs(policy)``, sampling is vocab-parallel,
and batch splits / loss normalisation / metrics use the data-parallel size ``rt.dp_world``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass, fields
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from . import losses as L
from .checkpoint import (check_out_dir, checkpoint_step, claim_out_dir, find_checkpoint,
                         load_checkpoint, load_model_state, load_optim_state, model_state,
                         optim_state, rng_state, save_checkpoint, set_rng_state)
from .config import TrainConfig
from .distributed import (PeakMemory, Runtime, clip_grad_norm, finish_grad_sync, grad_sync,
                          setup_runtime, unwrap, wrap_model)
from .models import (ValueHead, autocast, build_policy, check_linear_head, freeze, generate,
                     hidden_instead_of_logits, last_token_scores, pack_batch,
                     policy_logits_and_values,
                     pack_rows, packed_policy_logits, packed_position_values, policy_logits,
                     position_values, response_mask, reward_model_from)
from .data import PromptTask, load_prompts, load_tokenizer
from .report import MetricsLog, plot_curves
from .rewards import HFRewardModel, TextScorer, load_reward_fn
from .task import SyntheticTask
from .vocab_parallel import op_kwargs, shard_vocab

__all__ = ["train", "Rollout", "Learner", "KLController"]


# ================================================================================================
# pieces of state
# ================================================================================================

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


def lr_lambda(cfg: TrainConfig, total: int):
    """Multiplier of the learning rate after ``i`` optimizer steps: linear warm-up, then
    linear / cosine decay to 0 at ``total`` (or constant)."""
    def f(i: int) -> float:
        if i < cfg.warmup_steps:
            return (i + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (i - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return 1.0 - frac if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return f


def stream_seed(seed: int, stream: int, rank: int = 0) -> int:
    """Independent seeds for the random streams (stream id) of each rank."""
    return (seed * 1_000_003 + stream * 10_007 + rank) % (2 ** 63)


# ================================================================================================
# the PPO learner: policy + value model, their optimizers, the minibatch update
# ================================================================================================

class Learner:
    """Policy and value model (already DDP/FSDP-wrapped when distributed), two AdamW optimizers,
    two LR schedulers and :meth:`update`."""

    def __init__(self, cfg: TrainConfig, policy: nn.Module, critic: Optional[nn.Module],
                 rt: Runtime):
        self.cfg, self.rt = cfg, rt
        self.policy, self.critic = policy, critic       # critic None: GRPO / Dr. GRPO / RLOO
        self.shared = isinstance(critic, ValueHead)     # --value-head shared: a head only
        if cfg.fused_linear:
            check_linear_head(policy)
        self.vp = op_kwargs(unwrap(policy))       # {} unless the policy is vocab-parallel
        total = cfg.total_steps * cfg.ppo_epochs * cfg.num_minibatches   # optimizer steps
        LambdaLR = torch.optim.lr_scheduler.LambdaLR
        self.policy_opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, eps=cfg.adam_eps,
                                            weight_decay=cfg.weight_decay)
        self.policy_sched = LambdaLR(self.policy_opt, lr_lambda(cfg, total))
        self.critic_opt = self.critic_sched = None
        if critic is not None:
            self.critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr,
                                                eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
            self.critic_sched = LambdaLR(self.critic_opt, lr_lambda(cfg, total))
        # Minibatch shuffles: the same stream on every rank (each permutes its own local batch).
        self.shuffle_gen = torch.Generator().manual_seed(stream_seed(cfg.seed, 4))

    def update(self, batch: Rollout, kl_coef: float, *, shards: int = 1) -> Dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatch updates over ``batch``; returns the
        metrics of the update (means over all minibatches and ranks).

        Each rank permutes its local batch with the shared shuffle stream and takes minibatch
        ``k`` from the same positions, so global minibatch ``k`` is the union of the ranks'
        ``k``-th local minibatches.  ``shards > 1`` replays that on one process: ``batch`` is the
        concatenation of ``shards`` rank-local batches (used to test data-parallel equivalence).
        """
        cfg, rt = self.cfg, self.rt
        B = len(batch) // shards                         # local batch of one rank
        mb = B // cfg.num_minibatches                    # local minibatch
        # local sums: [policy loss, value loss, tokens, clipfrac, approx_kl, value clipfrac,
        # kl loss] (the last four weighted by tokens), and the two gradient norms
        sums = torch.zeros(7, dtype=torch.float64)
        norms = torch.zeros(2, dtype=torch.float64)
        models = [(self.policy, self.policy_opt, self.policy_sched)]
        if self.critic is not None:
            models.append((self.critic, self.critic_opt, self.critic_sched))
        for _, opt, _ in models:
            opt.zero_grad(set_to_none=True)
        for _epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=self.shuffle_gen)
            for k in range(cfg.num_minibatches):
                local = perm[k * mb:(k + 1) * mb]
                idx = torch.cat([s * B + local for s in range(shards)])
                sums += self._minibatch_step(batch.select(idx.to(batch.query.device)), kl_coef)
                for i, (model, opt, sched) in enumerate(models):
                    norms[i] += float(clip_grad_norm(model, cfg.max_grad_norm, rt))
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
        n = cfg.ppo_epochs * cfg.num_minibatches
        tot = rt.all_reduce_sum(sums.to(rt.device)).cpu()
        # each rank's loss is (local sum / global count) * dp_size: the global loss of a
        # minibatch is the sum over ranks / dp_size
        out = {"policy_loss": float(tot[0]) / rt.dp_world / n,
               "value_loss": float(tot[1]) / rt.dp_world / n,
               "grad_norm": float(norms[0]) / n, "critic_grad_norm": float(norms[1]) / n,
               "lr": self.policy_sched.get_last_lr()[0]}
        ntok = max(float(tot[2]), 1.0)
        for i, name in enumerate(("clipfrac", "approx_kl", "value_clipfrac", "kl_loss")):
            out[name] = float(tot[3 + i]) / ntok
        if not cfg.kl_in_loss:
            del out["kl_loss"]
        if self.critic is None:
            for k in ("value_loss", "critic_grad_norm", "value_clipfrac"):
                del out[k]
        return out

    def _minibatch_step(self, mini: Rollout, kl_coef: float) -> Tensor:
        """Gradients of one minibatch (accumulated over micro-batches; synchronised across
        ranks on the last one); returns this rank's metric sums (see :meth:`update`)."""
        cfg, rt = self.cfg, self.rt
        # global normalisation of agg_loss: token and sequence counts of the minibatch, all ranks
        counts = rt.all_reduce_sum(torch.stack([mini.mask.sum(),
                                                (mini.mask.sum(dim=1) > 0).sum().float()]))
        agg = {"dp_size": rt.dp_world, "batch_num_tokens": counts[0],
               "global_batch_size": counts[1]}
        micro = cfg.micro_batch_size or len(mini)
        starts = range(0, len(mini), micro)
        sums = torch.zeros(7, dtype=torch.float64)
        for c, start in enumerate(starts):
            mi = mini.select(torch.arange(start, min(start + micro, len(mini)),
                                          device=mini.query.device))
            with grad_sync([m for m in (self.policy, self.critic) if m is not None],
                           enabled=c == len(starts) - 1):
                if cfg.packed:
                    policy_loss, value_loss, st = self._packed_loss(mi, kl_coef, agg)
                else:
                    with autocast(rt, cfg.bf16):
                        if self.shared:       # one forward: logits and values, same body
                            logits, values = policy_logits_and_values(
                                self.policy, self.critic, mi.query, mi.response, mi.mask,
                                mi.query_mask)                                      # [b,R,V],[b,R]
                        else:
                            if cfg.fused_linear:  # hidden states [b,R,H]: no logits at all
                                with hidden_instead_of_logits(self.policy) as lm_head:
                                    logits = policy_logits(self.policy, mi.query, mi.response,
                                                           mi.mask, mi.query_mask)
                            else:
                                logits = policy_logits(self.policy, mi.query, mi.response,
                                                       mi.mask, mi.query_mask)         # [b,R,V]
                            values = None if self.critic is None else position_values(
                                self.critic, mi.query, mi.response, mi.mask,
                                mi.query_mask)                                         # [b,R]
                    policy_loss, value_loss, st = L.ppo_loss(
                        logits, values, tokens=mi.response, old_logp=mi.logp,
                        ref_logp=mi.ref_logp, old_values=mi.values, adv=mi.adv,
                        returns=mi.returns, mask=mi.mask, cfg=cfg, kl_coef=kl_coef,
                        agg_kwargs=agg, vp=self.vp,
                        lm_head=lm_head if cfg.fused_linear else None)
                vf = cfg.value_coef if self.shared else 1.0
                (policy_loss + vf * value_loss).backward()
            w = float(mi.mask.sum())
            sums += torch.tensor([float(st["pg_loss"]), float(value_loss.detach()), w,
                                  w * float(st["clipfrac"]), w * float(st["approx_kl"]),
                                  w * float(st["value_clipfrac"]),
                                  w * float(st.get("kl_loss", 0.0))], dtype=torch.float64)
        finish_grad_sync(self.policy, rt)            # vocab-parallel policy (not DDP-wrapped)
        if self.shared and rt.distributed:           # the head is not wrapped: average here
            for p in self.critic.parameters():
                if p.grad is not None:
                    p.grad.copy_(rt.all_reduce_sum(p.grad) / rt.dp_world)
        return sums

    def _packed_loss(self, mi: Rollout, kl_coef: float, agg: Dict
                     ) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
        """:func:`losses.ppo_loss` of a (micro-)batch run padding-free (``cfg.packed``).

        The ``b`` sequences' real tokens (prompt + response up to EOS) go through each model as
        one row ``[1, total]`` with per-sequence position ids; the outputs at the response
        positions form the packed layout ``[1, N]`` (``N = mask.sum()``), segmented by
        ``cu_seqlens [b+1]``.  The rollout tensors ``[b, R]`` are packed the same way (their
        entries under the mask, row by row), so the losses equal the padded path's.
        """
        cfg = self.cfg
        pb = pack_batch(mi.query, mi.response, mi.mask, mi.query_mask)
        with autocast(self.rt, cfg.bf16):
            logits = packed_policy_logits(self.policy, pb)                            # [1,N,V]
            values = (None if self.critic is None
                      else packed_position_values(self.critic, pb))                   # [1,N]
        packed = {k: pack_rows(getattr(mi, k), mi.mask)                               # [1,N]
                  for k in ("response", "logp", "ref_logp", "values", "adv", "returns")}
        # seq-mean-token-sum-norm divides by the padded length R (packed default: the longest
        # segment); the other modes ignore it
        agg = dict(agg, loss_scale_factor=float(mi.mask.shape[1]))
        return L.ppo_loss(
            logits, values, tokens=packed["response"], old_logp=packed["logp"],
            ref_logp=packed["ref_logp"], old_values=packed["values"], adv=packed["adv"],
            returns=packed["returns"], mask=torch.ones_like(packed["logp"]), cfg=cfg,
            kl_coef=kl_coef, agg_kwargs=agg, cu_seqlens=pb.cu_seqlens, vp=self.vp)

    def state_dict(self) -> Dict:
        s = {"policy_opt": optim_state(self.policy, self.policy_opt),
             "policy_sched": self.policy_sched.state_dict(),
             "shuffle_gen": self.shuffle_gen.get_state()}
        if self.critic is not None:
            s.update(critic_opt=optim_state(self.critic, self.critic_opt),
                     critic_sched=self.critic_sched.state_dict())
        return s

    def load_state_dict(self, s: Dict) -> None:
        load_optim_state(self.policy, self.policy_opt, s["policy_opt"])
        self.policy_sched.load_state_dict(s["policy_sched"])
        if self.critic is not None:
            load_optim_state(self.critic, self.critic_opt, s["critic_opt"])
            self.critic_sched.load_state_dict(s["critic_sched"])
        self.shuffle_gen.set_state(s["shuffle_gen"])


# ================================================================================================
# rollout: sample, score, advantages
# ================================================================================================

@torch.no_grad()
def collect_rollout(cfg: TrainConfig, task, policy: nn.Module, ref: nn.Module,
                    critic: nn.Module, reward_model, rt: Runtime, kl_coef: float,
                    prompt_gen: torch.Generator, sample_gen: torch.Generator
                    ) -> Tuple[Rollout, Tensor]:
    """One batch of experience from the current policy, plus the sums for its metrics
    (:data:`ROLLOUT_SUMS`).

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
    # 5. metric sums (reduced over ranks by the caller) -----------------------------------------
    seq_kl = ((logp - ref_logp) * mask).sum(dim=1)                                  # [B] k1
    # score: the hidden oracle of the built-in task; with --prompts the score itself
    quality = rm_score if text else task.oracle(response).to(dev)
    nan = torch.tensor(float("nan"), device=dev)
    named = {"n": torch.tensor(float(B), device=dev), "score": quality.sum(),
             "rm_reward": (parts["rm_reward"].sum() if "rm_reward" in parts else nan)
             if text else rm_score.sum(),
             "reward_fn": parts["reward_fn"].sum() if "reward_fn" in parts else nan,
             "kl": seq_kl.sum(), "tokens": mask.sum(), "eos": has_eos.float().sum(),
             "kl_full": nan if full_kl is None else (full_kl * mask).sum(),
             "reward": (rewards * mask).sum(), "entropy": (entropy * mask).sum()}
    ev = (L.explained_variance_terms(values, returns, mask) if critic is not None
          else torch.zeros(5, dtype=torch.float64))                  # no critic: NaN metric
    sums = torch.cat([torch.stack([named[k] for k in ROLLOUT_SUMS]).double(), ev.to(dev)])
    return batch, sums


ROLLOUT_SUMS = ("n", "score", "rm_reward", "reward_fn", "kl", "kl_full", "tokens", "eos",
                "reward", "entropy")
"""The per-rank sums :func:`collect_rollout` returns (in this order, then the five
explained-variance terms); :func:`rollout_metrics` turns their sums over ranks into means."""


def rollout_metrics(sums: Tensor) -> Dict[str, float]:
    s = dict(zip(ROLLOUT_SUMS, sums[:len(ROLLOUT_SUMS)].tolist()))
    n, ntok = s["n"], s["tokens"]
    out = {"score": s["score"] / n, "rm_reward": s["rm_reward"] / n, "kl": s["kl"] / n,
           "response_len": ntok / n, "eos_frac": s["eos"] / n, "reward": s["reward"] / n,
           "entropy": s["entropy"] / max(ntok, 1.0),
           "explained_variance": L.explained_variance(sums[len(ROLLOUT_SUMS):].cpu()),
           "tokens": ntok}
    for k in ("reward_fn", "kl_full"):            # present (not NaN) only when used
        if s[k] == s[k]:
            out[k] = s[k] / n
    for k in ("rm_reward", "explained_variance"):  # no --reward-model / no critic
        if out[k] != out[k]:
            del out[k]
    return out


# ================================================================================================
# phase 1 and 2: SFT warm start, reward model
# ================================================================================================

def supervised_warm_start(cfg: TrainConfig, task: SyntheticTask, policy: nn.Module,
                          rt: Runtime, data_gen: torch.Generator, say) -> float:
    """Next-token training on demonstrations (loss on the response tokens only); returns the
    last loss.  Every rank draws the same global batch and trains on its slice."""
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_lr, eps=1e-8)
    b = cfg.sft_batch_size // rt.dp_world
    vp = op_kwargs(unwrap(policy))
    loss_val = float("nan")
    for _ in range(cfg.sft_steps):
        query = task.sample_prompts(cfg.sft_batch_size, data_gen)                   # [N, P]
        resp = task.sample_demonstrations(query, data_gen)                          # [N, R]
        query, resp = (t[rt.dp_rank * b:(rt.dp_rank + 1) * b].to(rt.device)
                       for t in (query, resp))
        mask, _ = response_mask(resp)
        n_tok = rt.all_reduce_sum(mask.sum())
        with autocast(rt, cfg.bf16):
            logits = policy_logits(policy, query, resp, mask)                       # [b, R, V]
        loss = L.sft_loss(logits, resp, mask, backend=cfg.op_backend, vp=vp,
                          agg_kwargs={"dp_size": rt.dp_world, "batch_num_tokens": n_tok})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        finish_grad_sync(policy, rt)
        clip_grad_norm(policy, 1.0, rt)
        opt.step()
        loss_val = float(rt.all_reduce_sum(loss.detach()) / rt.dp_world)
    opt.zero_grad(set_to_none=True)      # leave no gradient behind for the PPO update
    say(f"SFT: {cfg.sft_steps} steps, final loss {loss_val:.3f} nats/token")
    return loss_val


def _pair_scores(rm: nn.Module, q: Tensor, chosen: Tensor, rejected: Tensor
                 ) -> Tuple[Tensor, Tensor]:
    """Reward-model scores ``([n], [n])`` of the chosen and rejected responses."""
    both = torch.cat([chosen, rejected])                                            # [2n, R]
    mask, _ = response_mask(both)
    s = last_token_scores(rm, torch.cat([q, q]), both, mask)                        # [2n]
    return s[:len(q)], s[len(q):]


def train_reward_model(cfg: TrainConfig, task: SyntheticTask, rm: nn.Module, rt: Runtime,
                       data_gen: torch.Generator, say) -> float:
    """Bradley-Terry training on oracle-labelled pairs; returns the held-out accuracy."""
    q, ch, rj = task.sample_pairs(cfg.rm_train_pairs, data_gen)
    eq, ech, erj = (t.to(rt.device) for t in task.sample_pairs(cfg.rm_eval_pairs, data_gen))
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.rm_lr, eps=1e-8)
    b = cfg.rm_batch_size // rt.dp_world
    for _epoch in range(cfg.rm_epochs):
        perm = torch.randperm(cfg.rm_train_pairs, generator=data_gen)
        for s in range(0, cfg.rm_train_pairs - cfg.rm_batch_size + 1, cfg.rm_batch_size):
            idx = perm[s:s + cfg.rm_batch_size][rt.dp_rank * b:(rt.dp_rank + 1) * b]
            with autocast(rt, cfg.bf16):
                r_w, r_l = _pair_scores(rm, *(t[idx].to(rt.device) for t in (q, ch, rj)))
            loss, _ = L.reward_pair_loss(r_w, r_l)        # mean over the local pairs; DDP averages
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_norm(rm, 1.0, rt)
            opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad(), autocast(rt, cfg.bf16):
        r_w, r_l = _pair_scores(unwrap(rm), eq, ech, erj)
        eval_loss, acc = L.reward_pair_loss(r_w, r_l)
    say(f"reward model: Bradley-Terry loss {float(eval_loss):.3f}, held-out accuracy "
        f"{float(acc):.3f} on {cfg.rm_eval_pairs} pairs")
    return float(acc)


@torch.no_grad()
def normalize_reward_model(cfg: TrainConfig, task: SyntheticTask, policy: nn.Module,
                           rm: nn.Module, rt: Runtime, data_gen: torch.Generator,
                           sample_gen: torch.Generator, say) -> None:
    """Shift and scale the reward head so that scores of SFT-policy samples have mean 0 and
    std 1 (over all ranks)."""
    n = max(1, cfg.rm_norm_samples // rt.dp_world)
    query = task.sample_prompts(n * rt.dp_world, data_gen)[rt.dp_rank * n:(rt.dp_rank + 1) * n]
    query = query.to(rt.device)
    resp = generate(unwrap(policy), query, cfg.response_length, cfg.temperature, sample_gen, rt,
                    kv_cache=cfg.kv_cache)
    mask, _ = response_mask(resp)
    with autocast(rt, cfg.bf16):
        s = last_token_scores(unwrap(rm), query, resp, mask).double()
    count = torch.tensor(float(n), device=s.device, dtype=torch.float64)
    tot = rt.all_reduce_sum(torch.stack([count, s.sum(), (s * s).sum()]))
    cnt, s1, s2 = tot.tolist()
    mean = s1 / cnt
    std = math.sqrt(max(s2 / cnt - mean * mean, 1e-12))
    unwrap(rm).normalize(mean, std)
    say(f"reward normalisation on {int(cnt)} SFT samples: mean {mean:.3f}, std {std:.3f} -> 0, 1")


# ================================================================================================
# display
# ================================================================================================

@torch.no_grad()
def show_samples(cfg: TrainConfig, task, policy: nn.Module, rt: Runtime, title: str, say,
                 scorer: Optional[TextScorer] = None) -> None:
    """Print a few generations for fixed prompts (own RNG streams: training is unaffected):
    the built-in task's with their oracle score, or held-out ``--prompts`` with their score."""
    if cfg.num_print_samples == 0:
        return
    g = torch.Generator().manual_seed(stream_seed(cfg.seed, 7))
    # per-rank noise (the slices of a vocab-parallel policy need independent noise)
    sg = torch.Generator(device=rt.device).manual_seed(stream_seed(cfg.seed, 8, rt.rank))
    if scorer is None:
        query = task.sample_prompts(cfg.num_print_samples, g).to(rt.device)
        resp = generate(unwrap(policy), query, cfg.response_length, cfg.temperature, sg, rt,
                        kv_cache=cfg.kv_cache)
        scores = task.oracle(resp)
        lines = [f"--- samples {title} (oracle score in brackets) ---"]
        for i in range(len(query)):
            lines.append(f"  {task.decode(query[i]):<28} -> {task.decode(resp[i])}  "
                         f"[{float(scores[i]):+.2f}]")
        say("\n".join(lines))
        return
    query, qmask, texts = task.eval_queries(cfg.num_print_samples)
    if not texts:
        return
    resp, mask, scores = _sample_and_score(cfg, task, policy, scorer, rt, query, qmask, texts,
                                           sg)
    comps = task.completions(resp.cpu(), mask.cpu())
    lines = [f"--- held-out samples {title} (score in brackets) ---"]
    for t, c, sc in zip(texts, comps, scores.tolist()):
        lines.append(f"  {t!r:.60} -> {c!r:.120}  [{sc:+.3f}]")
    say("\n".join(lines))


@torch.no_grad()
def _sample_and_score(cfg, task, policy, scorer, rt, query, qmask, texts, gen):
    query, qmask = query.to(rt.device), qmask.to(rt.device)
    with autocast(rt, cfg.bf16):
        resp = generate(unwrap(policy), query, cfg.response_length, cfg.temperature, gen, rt,
                        query_mask=qmask, eos_id=task.eos_id, pad_id=task.pad_id,
                        kv_cache=cfg.kv_cache)
        mask, _ = response_mask(resp, task.eos_id)
        scores, _ = scorer(query, qmask, texts, resp, mask)
    return resp, mask, scores


@torch.no_grad()
def evaluate(cfg: TrainConfig, task: PromptTask, policy: nn.Module, scorer: TextScorer,
             rt: Runtime) -> float:
    """Mean score of the policy's samples on the held-out prompts (``--prompts`` only; NaN
    without any), averaged over the data-parallel ranks (each samples with its own noise)."""
    query, qmask, texts = task.eval_queries(cfg.eval_prompts)
    if not texts:
        return float("nan")
    g = torch.Generator(device=rt.device).manual_seed(stream_seed(cfg.seed, 9, rt.rank))
    _, _, scores = _sample_and_score(cfg, task, policy, scorer, rt, query, qmask, texts, g)
    return float(rt.all_reduce_sum(scores.mean().double()[None])[0]) / rt.dp_world


# ================================================================================================
# the whole run
# ================================================================================================

def train(cfg: TrainConfig, *, resume: Optional[str] = None) -> Dict:
    """Run SFT, reward modelling and PPO as configured (or continue the run in ``resume``).

    Returns a summary dict (on every rank; rank 0 also writes it to ``OUT/summary.json``):
    ``out``, ``steps``, ``rm_accuracy``, ``score_first``, ``score_last``, ``kl_last``,
    ``time_s``, ``world``, ``vocab_parallel``, ``peak_memory_mib`` (whole run) and
    ``ppo_peak_memory_mib`` (the PPO steps' rollout + update, checkpoints excluded), each the
    largest over ranks (:class:`~fastrlhf.trainer.distributed.PeakMemory`: allocated CUDA
    memory, or the process's peak RSS on CPU).
    """
    rt = setup_runtime(cfg.device, cfg.parallel, cfg.vocab_parallel)
    threads = torch.get_num_threads()
    try:
        return _train(cfg, rt, resume)
    finally:
        torch.set_num_threads(threads)
        rt.close()


def _train(cfg: TrainConfig, rt: Runtime, resume: Optional[str]) -> Dict:
    t_start = time.perf_counter()
    cfg.check_world(rt.world)
    cfg.check_backend(rt.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    say = _printer(rt)
    # ---- the run directory: validated before anything is written --------------------------
    ckpt = None
    if resume is not None:
        ckpt = find_checkpoint(resume)
        if ckpt is None:
            raise ValueError(f"--resume {resume!r}: no checkpoint found there")
        done = checkpoint_step(ckpt)
        if done >= cfg.total_steps:          # a finished run: report it, touch nothing
            say(f"fastrlhf train: the run in {_run_root(ckpt)} is already finished (step {done} "
                f"of total_steps={cfg.total_steps}); nothing to do (pass --total-steps N > "
                f"{done} to train it further)")
            summary_file = os.path.join(_run_root(ckpt), "summary.json")
            if os.path.isfile(summary_file):
                with open(summary_file) as f:
                    return json.load(f)
            return {"out": _run_root(ckpt), "steps": done, "finished": True}
    resuming_here = ckpt is not None and os.path.abspath(_run_root(ckpt)) == \
        os.path.abspath(cfg.out)
    check_out_dir(cfg.out, overwrite=cfg.overwrite, resuming_here=resuming_here)
    rt.barrier()                        # every rank validated before rank 0 writes
    if rt.is_main:
        claim_out_dir(cfg.out, fresh=ckpt is None)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)

    # ---- 0. seeds (identical on every rank, so that the models start identical) ---------------
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2 ** 32))
    torch.manual_seed(cfg.seed)
    data_gen = torch.Generator().manual_seed(stream_seed(cfg.seed, 1))          # shared data
    # prompts: one stream per data-parallel rank (the ranks of a vocab-parallel group share
    # them); sampling noise: one per rank
    prompt_gen = torch.Generator().manual_seed(stream_seed(cfg.seed, 2, rt.dp_rank))
    sample_gen = torch.Generator(device=rt.device).manual_seed(stream_seed(cfg.seed, 3, rt.rank))

    # ---- 1. the task and the models ------------------------------------------------------------
    scorer = None                        # --prompts: reward function and / or reward model
    if cfg.prompts is None:              # the built-in task: four models
        task = SyntheticTask(cfg.prompt_len, cfg.response_length, cfg.sft_min_words,
                             cfg.sft_max_words)
        policy = build_policy(cfg, task.vocab_size, task.query_len + cfg.response_length,
                              rt.device.type)                                   # causal LM
        reward_model = reward_model_from(policy)                                # body + head
    else:                                # your model, prompts and reward
        task = PromptTask(*load_prompts(cfg.prompts, cfg.prompt_column), load_tokenizer(cfg.model),
                          eval_prompts=cfg.eval_prompts, max_prompt_tokens=cfg.max_prompt_tokens,
                          chat_template=cfg.chat_template, seed=cfg.seed)
        policy = build_policy(cfg, None, task.query_len + cfg.response_length, rt.device.type)
        reward_model = None
    loaded = getattr(policy, "loaded_dtype", torch.float32)
    if loaded != torch.float32:
        if rt.device.type == "cuda":
            rt.amp_dtype = loaded
            say(f"--model: {loaded} weights kept in {loaded}; forwards under autocast({loaded})")
        else:
            say(f"--model: {loaded} weights cast to float32 on {rt.device} (bf16 / fp16 "
                "training is kept for CUDA; on CPU it is slow and lossy)")
    # the value model: PPO only (GRPO / Dr. GRPO / RLOO compare each sample with its group)
    critic = reward_model_from(policy) if cfg.algo == "ppo" else None           # body + head
    if cfg.value_head == "shared":          # ... or a head on the policy's own body
        critic = ValueHead(policy.config.hidden_size)
    if rt.tp > 1:       # after the reward / value models took their full copies of the body
        shard_vocab(policy, rt.tp_group, rt.tp, rt.tp_rank)
    ref = copy.deepcopy(policy)
    policy, ref = policy.to(rt.device), ref.to(rt.device)
    policy = wrap_model(policy, rt, trainable=True)
    if critic is not None:
        critic = critic.to(rt.device)
        if not isinstance(critic, ValueHead):   # a shared head's gradients: see the Learner
            critic = wrap_model(critic, rt, trainable=True)
    ref = wrap_model(freeze(ref), rt, trainable=False)
    if reward_model is not None:
        reward_model = wrap_model(reward_model.to(rt.device), rt, trainable=True)
    else:
        hf_rm = None
        if cfg.reward_model is not None:
            hf_rm = HFRewardModel(cfg.reward_model, task.tokenizer,
                                  rt.amp_dtype or torch.float32).to(rt.device)
        scorer = TextScorer(task, load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None,
                            cfg.reward_fn_weight, hf_rm, cfg.reward_model_weight)
    mode = rt.parallel if rt.distributed else "single"
    if rt.tp > 1:
        mode += f", vocab-parallel {rt.tp} x data-parallel {rt.dp_world}"
    say(f"fastrlhf train: world {rt.world} ({mode}), "
        f"device {rt.device}, backend {cfg.backend}, policy "
        f"{sum(p.numel() for p in policy.parameters()) / 1e3:.0f}k params"
        + (f" (x{rt.world} shards)" if rt.parallel == "fsdp2" and rt.distributed else "")
        + (" on this rank (vocab rows sharded)" if rt.tp > 1 else ""))

    rm_accuracy = float("nan")
    start_step = 0
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl)
    eval_before = float("nan")
    if ckpt is None and scorer is None:
        # ---- 2. SFT warm start ---------------------------------------------------------------
        if cfg.sft_steps:
            supervised_warm_start(cfg, task, policy, rt, data_gen, say)
        sft_state = model_state(policy)
        load_model_state(ref, sft_state)                       # reference = frozen SFT policy
        # ---- 3. reward model: SFT body + new head, Bradley-Terry on oracle preferences -------
        rm_state = model_state(reward_model)
        prefix = unwrap(policy).base_model_prefix + "."
        rm_state.update({"backbone." + k[len(prefix):]: v for k, v in sft_state.items()
                         if k.startswith(prefix)})
        load_model_state(reward_model, rm_state)
        rm_accuracy = train_reward_model(cfg, task, reward_model, rt, data_gen, say)
        normalize_reward_model(cfg, task, policy, reward_model, rt, data_gen, sample_gen, say)
        # ---- 4. value model initialised from the reward model --------------------------------
        if critic is not None and not isinstance(critic, ValueHead):
            load_model_state(critic, model_state(reward_model))
        show_samples(cfg, task, policy, rt, "before PPO (SFT policy)", say)
    elif ckpt is None:
        # ---- 2-4 with --prompts: the loaded model is the policy and the reference; no SFT, no
        # reward-model training; the critic is the policy's body with a fresh head -----------
        say(f"--prompts: {len(task.train_texts)} training prompts, {len(task.eval_texts)} "
            f"held out; reward: " + " + ".join(
                ([f"{cfg.reward_fn_weight:g} x {cfg.reward_fn}"] if cfg.reward_fn else [])
                + ([f"{cfg.reward_model_weight:g} x {cfg.reward_model}"]
                   if cfg.reward_model else [])))
        eval_before = evaluate(cfg, task, policy, scorer, rt)
        show_samples(cfg, task, policy, rt, "before training", say, scorer)
    if reward_model is not None:
        freeze(unwrap(reward_model))
    learner = Learner(cfg, policy, critic, rt)
    if ckpt is not None:
        payload, rng = load_checkpoint(ckpt, rt)
        for m, k in ((policy, "policy"), (critic, "critic"), (ref, "ref"),
                     (reward_model, "reward_model")):
            if m is not None:
                load_model_state(m, payload[k])
        learner.load_state_dict(payload["learner"])
        kl_ctl.load_state_dict(payload["kl_ctl"])
        start_step, rm_accuracy = payload["step"], payload["rm_accuracy"]
        eval_before = payload.get("eval_before", float("nan"))
        set_rng_state(rng, {"data": data_gen, "prompt": prompt_gen, "sample": sample_gen})
        say(f"resumed from {ckpt} at step {start_step}")
        show_samples(cfg, task, policy, rt, f"at step {start_step} (resumed)", say, scorer)

    # ---- 5. PPO --------------------------------------------------------------------------------
    log = MetricsLog(cfg.out, rt.is_main, resume_step=start_step)
    bar = _progress(cfg, rt, start_step)
    last: Dict[str, float] = {}
    first_score: Optional[float] = None
    mem = PeakMemory(rt.device)
    try:
        for step in range(start_step + 1, cfg.total_steps + 1):
            t0 = time.perf_counter()
            mem.start()              # the PPO steps' peak: rollout + update, no checkpoints
            kl_coef = kl_ctl.value
            # 5a. experience: sample, score, KL-penalised rewards, GAE, whitened advantages
            batch, sums = collect_rollout(cfg, task, policy, ref, critic,
                                          reward_model if scorer is None else scorer, rt,
                                          kl_coef, prompt_gen, sample_gen)
            ro = rollout_metrics(rt.all_reduce_sum(sums).cpu())
            if cfg.dump_first_update and step == 1:
                pre = {"policy": model_state(policy),
                       "critic": {} if critic is None else model_state(critic)}
            # 5b. ppo_epochs x num_minibatches clipped updates of policy and value model
            up = learner.update(batch, kl_coef)
            mem.stop()
            if cfg.dump_first_update and step == 1:
                _dump_first_update(cfg, rt, batch, kl_coef, pre, policy, critic)
            # 5c. adapt beta to the KL of this batch
            kl_ctl.update(ro["kl"], cfg.rollout_batch_size)
            dt = time.perf_counter() - t0
            row = {"step": step, **{k: v for k, v in ro.items() if k != "tokens"}, **up,
                   "kl_coef": kl_coef, "tokens_per_s": ro["tokens"] / dt,
                   "time_s": time.perf_counter() - t_start}
            log.write(row)
            last = row
            first_score = row["score"] if first_score is None else first_score
            if bar is not None:
                bar.update(1)
                bar.set_postfix(score=f"{row['score']:+.3f}", kl=f"{row['kl']:.2f}",
                                beta=f"{kl_coef:.3f}")
            # 5d. checkpoint
            if step == cfg.total_steps or (cfg.checkpoint_every
                                           and step % cfg.checkpoint_every == 0):
                payload = {"step": step, "config": cfg.to_dict(), "rm_accuracy": rm_accuracy,
                           "policy": model_state(policy),
                           "critic": None if critic is None else model_state(critic),
                           "ref": model_state(ref), "learner": learner.state_dict(),
                           "kl_ctl": kl_ctl.state_dict(), "eval_before": eval_before,
                           # the built-in task's trained reward model (a --reward-model is
                           # reloaded from its directory)
                           "reward_model": None if reward_model is None
                           else model_state(reward_model)}
                rng = rng_state({"data": data_gen, "prompt": prompt_gen, "sample": sample_gen})
                save_checkpoint(cfg.out, step, payload if rt.is_main else {}, rng, rt,
                                cfg.keep_checkpoints)
    finally:               # also on Ctrl-C / SIGTERM: leave the terminal tidy
        if bar is not None:
            bar.close()

    # ---- 6. results ----------------------------------------------------------------------------
    show_samples(cfg, task, policy, rt, f"after PPO (step {cfg.total_steps})", say, scorer)
    eval_after = evaluate(cfg, task, policy, scorer, rt) if scorer is not None else float("nan")
    final_state = model_state(policy)
    if rt.is_main:
        save_policy(cfg, task, unwrap(policy), final_state, os.path.join(cfg.out, "final",
                                                                         "policy"))
        plot_curves(os.path.join(cfg.out, "metrics.jsonl"), os.path.join(cfg.out, "curves.png"))
    rt.barrier()
    rows = MetricsLog.read(os.path.join(cfg.out, "metrics.jsonl")) if rt.is_main else []
    peak, ppo_peak = rt.all_reduce_max(torch.tensor([mem.total(), mem.section],
                                                    device=rt.device)).tolist()
    summary = {"out": cfg.out, "steps": cfg.total_steps, "rm_accuracy": rm_accuracy,
               "score_first": rows[0]["score"] if rows else first_score,
               "score_last": last.get("score"), "kl_last": last.get("kl"),
               "time_s": time.perf_counter() - t_start, "world": rt.world,
               "vocab_parallel": rt.tp, "peak_memory_mib": peak, "ppo_peak_memory_mib": ppo_peak,
               "peak_memory_kind": "cuda_allocated" if rt.device.type == "cuda" else "cpu_rss"}
    if scorer is not None:
        summary.update(eval_score_before=eval_before, eval_score_after=eval_after,
                       eval_prompts=len(task.eval_texts))
    if rt.is_main:
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if last:
        quality = (f"reward-model accuracy {rm_accuracy:.3f}" if scorer is None else
                   f"held-out score {eval_before:+.3f} -> {eval_after:+.3f}")
        say(f"done: score {summary['score_first']:+.3f} -> {summary['score_last']:+.3f}, "
            f"KL {summary['kl_last']:.2f} nats, {quality}, "
            f"{summary['time_s']:.0f}s, peak memory {peak:.0f} MiB per rank; outputs in "
            f"{cfg.out}")
    return summary


def save_policy(cfg: TrainConfig, task, policy: nn.Module, state: Dict, path: str) -> None:
    """``final/policy``: the weights, the tokenizer (the model's own with --prompts, a word-level
    one of the built-in vocabulary otherwise) and a ``generation_config.json`` that samples as
    the trainer did (pure sampling at ``temperature``, no top-k / top-p, the trained EOS / PAD /
    BOS, ``response_length`` new tokens), so ``AutoModelForCausalLM`` + ``AutoTokenizer`` +
    ``generate()`` reproduce the trained behaviour."""
    import transformers

    policy.generation_config = transformers.GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
        max_new_tokens=cfg.response_length, eos_token_id=task.eos_id, pad_token_id=task.pad_id,
        bos_token_id=task.bos_id)
    policy.save_pretrained(path, state_dict=state)
    tok = task.tokenizer if isinstance(task, PromptTask) else task.hf_tokenizer()
    tok.save_pretrained(path)


def _run_root(ckpt: str) -> str:
    """The run directory of a checkpoint ``RUN/checkpoints/step_N``."""
    parent = os.path.dirname(os.path.normpath(ckpt))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else ckpt


def _dump_first_update(cfg, rt, batch, kl_coef, pre, policy, critic) -> None:
    d = os.path.join(cfg.out, "debug")
    if rt.is_main:
        os.makedirs(d, exist_ok=True)
    rt.barrier()
    torch.save({"batch": batch.to_dict(), "kl_coef": kl_coef},
               os.path.join(d, f"rollout_rank{rt.rank}.pt"))
    post = {"policy": model_state(policy), "critic": {} if critic is None else model_state(critic)}
    if rt.is_main:
        torch.save({"pre": pre, "post": post, "world": rt.world, "tp": rt.tp},
                   os.path.join(d, "first_update.pt"))
    rt.barrier()


def _printer(rt: Runtime):
    def say(msg: str) -> None:
        if rt.is_main:
            try:
                from tqdm import tqdm
                tqdm.write(msg)
            except ImportError:
                print(msg, flush=True)
    return say


def _progress(cfg: TrainConfig, rt: Runtime, start: int):
    if not (cfg.progress and rt.is_main):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.total_steps, initial=start, desc="PPO", unit="step", dynamic_ncols=True)
