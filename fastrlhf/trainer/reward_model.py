"""Stage 2 of the built-in task: the reward model (the SFT body with a new scalar head),
Bradley-Terry training on oracle-labelled pairs, then normalisation of its scores."""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn

from . import losses as L
from .config import TrainConfig
from .distributed import Runtime, clip_grad_norm, unwrap
from .models import autocast, generate, last_token_scores, response_mask
from .task import SyntheticTask

__all__ = ["pair_scores", "train_reward_model", "normalize_reward_model"]


def pair_scores(rm: nn.Module, q: Tensor, chosen: Tensor, rejected: Tensor
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
                r_w, r_l = pair_scores(rm, *(t[idx].to(rt.device) for t in (q, ch, rj)))
            loss, _ = L.reward_pair_loss(r_w, r_l)        # mean over the local pairs; DDP averages
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_norm(rm, 1.0, rt)
            opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad(), autocast(rt, cfg.bf16):
        r_w, r_l = pair_scores(unwrap(rm), eq, ech, erj)
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

