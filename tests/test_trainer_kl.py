"""``--kl-reward-kind full``: the per-token reward penalty is the exact KL over the vocabulary
(``fastrlhf.full_kl``), checked against a float64 computation from the two models' logits."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from helpers import assert_close  # noqa: E402

from fastrlhf.trainer import TrainConfig  # noqa: E402
from fastrlhf.trainer.distributed import Runtime  # noqa: E402
from fastrlhf.trainer.models import build_policy, policy_logits, reward_model_from  # noqa: E402
from fastrlhf.trainer.ppo import ROLLOUT_SUMS, collect_rollout, rollout_metrics  # noqa: E402
from fastrlhf.trainer.task import SyntheticTask  # noqa: E402


def test_full_kl_reward_penalty_is_the_exact_kl():
    cfg = TrainConfig(kl_reward_kind="full", gamma=1.0, lam=1.0, rollout_batch_size=8,
                      response_length=6, prompt_len=3, sft_max_words=4, hidden_size=32,
                      num_layers=1, num_heads=2, micro_batch_size=3)
    task = SyntheticTask(cfg.prompt_len, cfg.response_length, cfg.sft_min_words,
                         cfg.sft_max_words)
    torch.manual_seed(0)
    policy = build_policy(cfg, task.vocab_size, 16)
    critic, rm = reward_model_from(policy), reward_model_from(policy)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def rollout(kl_coef):
        return collect_rollout(cfg, task, policy, ref, critic, rm, Runtime(), kl_coef,
                               torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    with_kl, sums = rollout(0.1)
    without, _ = rollout(0.0)
    assert torch.equal(with_kl.response, without.response)
    # gamma = lam = 1: returns[:, 0] = sum of the rewards = score - beta * sum_t KL_t
    got = (without.returns[:, 0] - with_kl.returns[:, 0]) / 0.1                        # [B]
    with torch.no_grad():
        lp = torch.log_softmax(policy_logits(policy, with_kl.query, with_kl.response,
                                             with_kl.mask).double(), -1)
        lq = torch.log_softmax(policy_logits(ref, with_kl.query, with_kl.response,
                                             with_kl.mask).double(), -1)
    want = ((lp.exp() * (lp - lq)).sum(-1) * with_kl.mask).sum(1)                     # [B]
    assert float(want.min()) > 0
    assert_close("sum_t KL_full", got.double(), want, atol=1e-5, rtol=1e-4)
    m = rollout_metrics(sums)
    assert abs(m["kl_full"] - float(want.mean())) < 1e-5 and "kl" in m
    assert "kl_full" in ROLLOUT_SUMS


def test_full_kl_needs_the_kl_in_the_reward():
    with pytest.raises(ValueError, match="kl_reward_kind must be a sampled estimator"):
        TrainConfig(kl_reward_kind="full", kl_in_loss=True)


def test_full_kl_is_a_command_line_choice():
    from fastrlhf.trainer.cli import build_parser, config_from_args
    cfg = config_from_args(build_parser().parse_args(["--kl-reward-kind", "full"]))
    assert cfg.kl_reward_kind == "full"
