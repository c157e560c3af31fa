"""Stage 3b, the update: :class:`Learner` holds the policy and the value model (or the shared
value head, or nothing for GRPO / Dr. GRPO / RLOO), their optimizers and LR schedules, and runs
``ppo_epochs`` passes of shuffled minibatch updates over a :class:`~.rollout.Rollout`."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import losses as L
from .checkpoint import load_optim_state, optim_state
from .config import TrainConfig, stream_seed
from .distributed import Runtime, clip_grad_norm, finish_grad_sync, grad_sync, unwrap
from .models import (ValueHead, autocast, check_linear_head, hidden_instead_of_logits,
                     pack_batch, pack_rows, packed_policy_logits, packed_position_values,
                     policy_logits, policy_logits_and_values, position_values)
from .rollout import Rollout, reduce_sums
from .vocab_parallel import op_kwargs

__all__ = ["Learner", "lr_lambda", "UPDATE_SUMS"]

UPDATE_SUMS = ("policy_loss", "value_loss", "tokens", "clipfrac", "approx_kl", "value_clipfrac",
               "kl_loss")
"""The per-rank sums of one update (over its minibatches and micro-batches): the two losses as
computed, the token count, and the other four weighted by tokens."""


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
        # this rank's sums (UPDATE_SUMS) over all minibatches, and the two gradient norms
        sums = dict.fromkeys(UPDATE_SUMS, 0.0)
        norms = {"grad_norm": 0.0, "critic_grad_norm": 0.0}
        models = [(self.policy, self.policy_opt, self.policy_sched, "grad_norm")]
        if self.critic is not None:
            models.append((self.critic, self.critic_opt, self.critic_sched, "critic_grad_norm"))
        for _, opt, _, _ in models:
            opt.zero_grad(set_to_none=True)
        for _epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=self.shuffle_gen)
            for k in range(cfg.num_minibatches):
                local = perm[k * mb:(k + 1) * mb]
                idx = torch.cat([s * B + local for s in range(shards)])
                step = self._minibatch_step(batch.select(idx.to(batch.query.device)), kl_coef)
                for name, v in step.items():
                    sums[name] += v
                for model, opt, sched, norm in models:
                    norms[norm] += float(clip_grad_norm(model, cfg.max_grad_norm, rt))
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
        n = cfg.ppo_epochs * cfg.num_minibatches
        tot = reduce_sums(rt, sums)
        # each rank's loss is (local sum / global count) * dp_size: the global loss of a
        # minibatch is the sum over ranks / dp_size
        out = {"policy_loss": tot["policy_loss"] / rt.dp_world / n,
               "value_loss": tot["value_loss"] / rt.dp_world / n,
               "grad_norm": norms["grad_norm"] / n,
               "critic_grad_norm": norms["critic_grad_norm"] / n,
               "lr": self.policy_sched.get_last_lr()[0]}
        ntok = max(tot["tokens"], 1.0)
        for name in ("clipfrac", "approx_kl", "value_clipfrac", "kl_loss"):   # token-weighted
            out[name] = tot[name] / ntok
        if not cfg.kl_in_loss:
            del out["kl_loss"]
        if self.critic is None:
            for k in ("value_loss", "critic_grad_norm", "value_clipfrac"):
                del out[k]
        return out

    def _minibatch_step(self, mini: Rollout, kl_coef: float) -> Dict[str, float]:
        """Gradients of one minibatch (accumulated over micro-batches; synchronised across
        ranks on the last one); returns this rank's metric sums (:data:`UPDATE_SUMS`)."""
        cfg, rt = self.cfg, self.rt
        # global normalisation of agg_loss: token and sequence counts of the minibatch, all ranks
        counts = rt.all_reduce_sum(torch.stack([mini.mask.sum(),
                                                (mini.mask.sum(dim=1) > 0).sum().float()]))
        agg = {"dp_size": rt.dp_world, "batch_num_tokens": counts[0],
               "global_batch_size": counts[1]}
        micro = cfg.micro_batch_size or len(mini)
        starts = range(0, len(mini), micro)
        sums = dict.fromkeys(UPDATE_SUMS, 0.0)
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
            step = {"policy_loss": float(st["pg_loss"]), "value_loss": float(value_loss.detach()),
                    "tokens": w, "clipfrac": w * float(st["clipfrac"]),
                    "approx_kl": w * float(st["approx_kl"]),
                    "value_clipfrac": w * float(st["value_clipfrac"]),
                    "kl_loss": w * float(st.get("kl_loss", 0.0))}
            for name, v in step.items():
                sums[name] += v
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

