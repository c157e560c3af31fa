"""Shared by the trainer tests that launch ``fastrlhf.train`` (or torchrun) in subprocesses."""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env() -> dict:
    """This environment with the checkout importable, the reference / native backends (no
    Triton interpreter) and one OpenMP thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def assert_first_update_replays(kw: dict, dump: dict, batch, kl_coef: float, shards: int,
                                label: str) -> None:
    """One process replays the first PPO update of a distributed run on the ranks' rollouts
    (``batch``: the ``shards`` data-parallel batches concatenated) from the dumped weights
    (``--dump-first-update``); every policy and value-model tensor must have moved and must
    equal the run's (full, unsharded) result."""
    from helpers import assert_close

    from fastrlhf.trainer import TrainConfig
    from fastrlhf.trainer.distributed import Runtime
    from fastrlhf.trainer.models import build_policy, reward_model_from
    from fastrlhf.trainer.ppo import Learner
    from fastrlhf.trainer.task import SyntheticTask

    cfg = TrainConfig(**kw)
    task = SyntheticTask(cfg.prompt_len, cfg.response_length, cfg.sft_min_words,
                         cfg.sft_max_words)
    policy = build_policy(cfg, task.vocab_size, task.query_len + cfg.response_length)
    critic = reward_model_from(policy)
    policy.load_state_dict(dump["pre"]["policy"])
    critic.load_state_dict(dump["pre"]["critic"])
    Learner(cfg, policy, critic, Runtime()).update(batch, kl_coef, shards=shards)
    for name, model in (("policy", policy), ("critic", critic)):
        for k, v in model.state_dict().items():
            pre, post = dump["pre"][name][k], dump["post"][name][k]
            assert pre.shape == post.shape == v.shape, (name, k)   # full tensors in the dump
            assert (post - pre).abs().max() > 1e-4, f"{name} {k} did not move"
            assert_close(f"{name} {k} (1 process vs {label})", v, post, atol=2e-6, rtol=1e-5)
