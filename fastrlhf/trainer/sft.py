"""Stage 1 of the built-in task: the SFT warm start (next-token training on demonstrations)."""

from __future__ import annotations

import torch
from torch import nn

from . import losses as L
from .config import TrainConfig
from .distributed import Runtime, clip_grad_norm, finish_grad_sync, unwrap
from .models import autocast, policy_logits, response_mask
from .task import SyntheticTask
from .vocab_parallel import op_kwargs

__all__ = ["supervised_warm_start"]


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
