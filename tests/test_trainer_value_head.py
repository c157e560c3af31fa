"""``--value-head shared``: PPO's value model as a linear head on the policy's own body (the
lecture's question), next to the default separate critic."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

from fastrlhf.trainer import TrainConfig  # noqa: E402
from fastrlhf.trainer import losses as L  # noqa: E402
from fastrlhf.trainer.distributed import Runtime  # noqa: E402
from fastrlhf.trainer.models import (ValueHead, build_policy, policy_logits,  # noqa: E402
                                     policy_logits_and_values, reward_model_from)
from fastrlhf.trainer.ppo import Learner, collect_rollout, train  # noqa: E402
from fastrlhf.trainer.report import MetricsLog  # noqa: E402
from fastrlhf.trainer.task import SyntheticTask  # noqa: E402

KW = dict(value_head="shared", rollout_batch_size=8, response_length=6, prompt_len=3,
          sft_max_words=4, ppo_epochs=2, num_minibatches=2, micro_batch_size=2, hidden_size=32,
          num_layers=1, num_heads=2)


def _setup(**kw):
    cfg = TrainConfig(**dict(KW, **kw))
    task = SyntheticTask(cfg.prompt_len, cfg.response_length, cfg.sft_min_words,
                         cfg.sft_max_words)
    torch.manual_seed(0)
    policy = build_policy(cfg, task.vocab_size, 16)
    return cfg, task, policy, ValueHead(policy.config.hidden_size)


def test_shared_head_values_and_logits_from_one_forward():
    cfg, task, policy, head = _setup()
    q = task.sample_prompts(3, torch.Generator().manual_seed(0))
    r = task.sample_demonstrations(q, torch.Generator().manual_seed(1))
    m = (r != task.pad_id).float()
    with torch.no_grad():
        logits, values = policy_logits_and_values(policy, head, q, r, m)
        base = policy.base_model(input_ids=torch.cat([q, r], 1),
                                 attention_mask=torch.cat([torch.ones_like(q), m.long()], 1))
        want_v = head(base.last_hidden_state)[:, q.shape[1] - 1:-1]
    assert torch.equal(logits, policy_logits(policy, q, r, m))
    assert torch.allclose(values, want_v, atol=1e-6) and values.shape == r.shape


@pytest.mark.parametrize("value_coef", [0.5, 0.0])
def test_value_loss_trains_the_shared_body(value_coef):
    """With zero advantages and no entropy bonus the policy loss has no gradient: whatever
    reaches the policy's body comes from the value loss, scaled by value_coef."""
    cfg, task, policy, head = _setup(value_coef=value_coef, entropy_coef=0.0)
    batch, _ = collect_rollout(cfg, task, policy, policy, head, reward_model_from(policy),
                               Runtime(), 0.0, torch.Generator().manual_seed(1),
                               torch.Generator().manual_seed(2))
    assert batch.values.abs().sum() > 0 and batch.returns.abs().sum() > 0
    logits, values = policy_logits_and_values(policy, head, batch.query, batch.response,
                                              batch.mask)
    pl, vl, _ = L.ppo_loss(logits, values, tokens=batch.response, old_logp=batch.logp,
                           ref_logp=batch.ref_logp, old_values=batch.values,
                           adv=torch.zeros_like(batch.adv), returns=batch.returns,
                           mask=batch.mask, cfg=cfg, kl_coef=0.0, agg_kwargs={})
    (pl + cfg.value_coef * vl).backward()
    body = policy.model.layers[0].mlp.up_proj.weight.grad
    if value_coef:
        assert body is not None and float(body.abs().max()) > 1e-6
    else:
        assert body is None or float(body.abs().max()) == 0.0


def test_shared_head_update_moves_policy_and_head():
    cfg, task, policy, head = _setup()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    batch, _ = collect_rollout(cfg, task, policy, policy, head, reward_model_from(policy),
                               Runtime(), 0.05, torch.Generator().manual_seed(1),
                               torch.Generator().manual_seed(2))
    stats = Learner(cfg, policy, head, Runtime()).update(batch, 0.05)
    assert stats["value_loss"] > 0 and stats["critic_grad_norm"] > 0
    assert all((head.state_dict()[k] - v).abs().max() > 1e-5 for k, v in before.items())


def test_shared_head_end_to_end(tmp_path):
    out = tmp_path / "shared"
    summary = train(TrainConfig(
        out=str(out), value_head="shared", total_steps=3, sft_steps=5, rm_train_pairs=64,
        rm_eval_pairs=32, rm_epochs=1, rm_norm_samples=16, rollout_batch_size=8, ppo_epochs=1,
        num_minibatches=2, hidden_size=32, num_layers=1, num_heads=2, num_print_samples=0,
        progress=False, device="cpu"))
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert summary["steps"] == 3 and len(rows) == 3
    assert all(r["value_loss"] is not None and r["explained_variance"] is not None for r in rows)
    ckpt = torch.load(out / "checkpoints" / "step_000003" / "trainer.pt", weights_only=False)
    assert set(ckpt["critic"]) == {"head.weight", "head.bias"}       # the head, no transformer
    from safetensors.torch import load_file
    saved = load_file(os.path.join(out, "final", "policy", "model.safetensors"))
    assert not any("head.bias" == k or k.startswith("value") for k in saved)


def test_shared_head_config_errors():
    with pytest.raises(ValueError, match="value_head must be separate with a critic-free algo"):
        TrainConfig(value_head="shared", algo="grpo")
    with pytest.raises(ValueError, match="value_head must be one of separate, shared"):
        TrainConfig(value_head="tied")
