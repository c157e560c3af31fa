"""``--reference lora | offload``: the KL anchor without a second model on the device.

lora: the reference is the policy with its peft LoRA adapters switched off (no copy of the
weights); offload: a frozen copy kept in CPU memory, on the device only for the rollout's
reference log-probs (on a CPU run nothing moves: the run equals ``--reference copy``)."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

from fastrlhf.trainer import TrainConfig  # noqa: E402
from fastrlhf.trainer.models import build_policy, policy_logits  # noqa: E402
from fastrlhf.trainer.ppo import train  # noqa: E402
from fastrlhf.trainer.report import MetricsLog  # noqa: E402
from fastrlhf.trainer.task import SyntheticTask  # noqa: E402

TINY = dict(sft_steps=5, rm_train_pairs=64, rm_eval_pairs=32, rm_epochs=1, rm_norm_samples=16,
            rollout_batch_size=8, ppo_epochs=1, num_minibatches=2, hidden_size=32,
            num_layers=1, num_heads=2, num_print_samples=0, progress=False, device="cpu",
            lr_schedule="constant")
TIME_KEYS = ("time_s", "tokens_per_s")


def _rows(out):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS}
            for r in MetricsLog.read(os.path.join(out, "metrics.jsonl"))]


def _tiny_policy(arch="llama"):
    cfg = TrainConfig(hidden_size=32, num_layers=1, num_heads=2, arch=arch, reference="lora",
                      lora_r=4)
    task = SyntheticTask(cfg.prompt_len, cfg.response_length, cfg.sft_min_words,
                         cfg.sft_max_words)
    torch.manual_seed(0)
    return cfg, task, build_policy(cfg, task.vocab_size, 32)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_reference_is_the_policy_without_adapters(arch):
    pytest.importorskip("peft")
    import transformers

    from fastrlhf.trainer.reference_policy import (AdaptersDisabled, attach_lora,
                                                   merged_lora_state)
    cfg, task, policy = _tiny_policy(arch)
    base = copy.deepcopy(policy)
    q = task.sample_prompts(3, torch.Generator().manual_seed(0))
    r = task.sample_demonstrations(q, torch.Generator().manual_seed(1))
    m = (r != task.pad_id).float()
    attach_lora(policy, cfg)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ref = AdaptersDisabled(policy)
    assert list(ref.parameters()) == [] and ref.state_dict() == {}
    with torch.no_grad():
        want = policy_logits(base, q, r, m)
        assert torch.equal(policy_logits(policy, q, r, m), want)   # B = 0: policy == reference
        for n, p in policy.named_parameters():                     # move the adapters
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
        got_policy = policy_logits(policy, q, r, m)
        got_ref = policy_logits(ref, q, r, m)
    assert torch.equal(got_ref, want)                   # adapters off: the base weights, exactly
    assert (got_policy - want).abs().max() > 1e-2       # adapters on: a different policy
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)
    # the exported weights: an ordinary model of the same class equal to the adapted policy
    plain = type(base)(base.config)
    plain.load_state_dict(merged_lora_state(policy, policy.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(policy_logits(plain, q, r, m), got_policy, atol=1e-5,
                                   rtol=1e-5)
    assert isinstance(plain, transformers.PreTrainedModel)


def test_lora_run_resumes_exactly_and_exports_a_plain_model(tmp_path):
    pytest.importorskip("peft")
    import transformers

    kw = dict(TINY, reference="lora", lora_r=4, lr=1e-2, checkpoint_every=2)
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    train(TrainConfig(out=full, total_steps=4, **kw))
    train(TrainConfig(out=cut, total_steps=2, **kw))
    train(TrainConfig(out=cut, total_steps=4, **kw), resume=cut)
    assert _rows(cut) == _rows(full) and len(_rows(full)) == 4
    ck = torch.load(os.path.join(full, "checkpoints", "step_000004", "trainer.pt"),
                    weights_only=False)
    assert ck["ref"] == {}                        # no second copy of the weights
    lora_b = [v for k, v in ck["policy"].items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)   # trained off B = 0
    ca = torch.load(os.path.join(cut, "checkpoints", "step_000004", "trainer.pt"),
                    weights_only=False)
    assert all(torch.equal(ck["policy"][k], ca["policy"][k]) for k in ck["policy"])
    # Adam moments for the adapters only
    n_lora = sum(1 for k in ck["policy"] if "lora_" in k)
    assert len(ck["learner"]["policy_opt"]["state"]) == n_lora
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(full, "final",
                                                                           "policy"))
    assert not any("lora" in k for k in model.state_dict())


def test_offload_reference_equals_copy_on_cpu(tmp_path):
    kw = dict(TINY, total_steps=2)
    a = train(TrainConfig(out=str(tmp_path / "copy"), **kw))
    b = train(TrainConfig(out=str(tmp_path / "off"), reference="offload", **kw))
    assert _rows(tmp_path / "copy") == _rows(tmp_path / "off")
    assert a["score_last"] == b["score_last"] and a["kl_last"] == b["kl_last"]


def test_reference_lora_refusals(monkeypatch):
    with pytest.raises(ValueError, match="TrainConfig.reference must be one of copy, lora"):
        TrainConfig(reference="twin")
    with pytest.raises(ValueError, match="TrainConfig.reference must be copy or offload with"):
        TrainConfig(reference="lora", packed=True)
    with pytest.raises(ValueError, match="TrainConfig.reference must be copy with parallel=fsdp2"):
        TrainConfig(reference="offload", parallel="fsdp2")
    if "peft" in sys.modules or _has_peft():
        with pytest.raises(ValueError, match="reference='lora' runs in a single process"):
            TrainConfig(reference="lora").check_world(2)
    monkeypatch.setitem(sys.modules, "peft", None)        # as if peft were not installed
    with pytest.raises(ValueError, match=r"needs the peft package: pip install "
                                         r"'fastrlhf\[integrations\]'"):
        TrainConfig(reference="lora")


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True
