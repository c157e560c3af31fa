"""What a person looks at: a few printed samples, and the held-out score of ``--prompts`` runs.
Each uses its own random streams, so training is unaffected by them."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import TrainConfig, stream_seed
from .data import PromptTask
from .distributed import Runtime, unwrap
from .models import autocast, generate, response_mask
from .rewards import TextScorer

__all__ = ["show_samples", "sample_and_score", "evaluate"]


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
    resp, mask, scores = sample_and_score(cfg, task, policy, scorer, rt, query, qmask, texts,
                                          sg)
    comps = task.completions(resp.cpu(), mask.cpu())
    lines = [f"--- held-out samples {title} (score in brackets) ---"]
    for t, c, sc in zip(texts, comps, scores.tolist()):
        lines.append(f"  {t!r:.60} -> {c!r:.120}  [{sc:+.3f}]")
    say("\n".join(lines))


@torch.no_grad()
def sample_and_score(cfg, task, policy, scorer, rt, query, qmask, texts, gen):
    """Sample responses to left-padded ``query`` and score them with ``scorer``: ``(response
    [b, R], mask [b, R], scores [b])``."""
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
    _, _, scores = sample_and_score(cfg, task, policy, scorer, rt, query, qmask, texts, g)
    return float(rt.all_reduce_sum(scores.mean().double()[None])[0]) / rt.dp_world

