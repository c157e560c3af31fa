"""fastrlhf.integrations.trl against TRL 1.16 itself.

* the log-prob / entropy helpers against ``trl.trainer.utils`` (values, gradients, signatures);
* :func:`grpo_loss` and the patched ``GRPOTrainer._compute_loss`` against TRL's real
  ``_compute_loss``, run on a stand-in trainer object whose model call returns given log-probs
  (every loss type / importance-sampling level / KL / delta / weighting combination, metrics too);
* patch() / unpatch();
* end to end: ``GRPOTrainer`` on a tiny randomly initialised Qwen2 built from a config, with a
  word-level tokenizer built in memory and an in-memory dataset (no downloads), two optimizer
  steps with and without patch(): same logged losses and metrics, same final weights.

Skipped when TRL (or datasets / accelerate / transformers) is not installed.
"""

from __future__ import annotations

import sys
import types
import warnings
from collections import defaultdict

import pytest
import torch

from helpers import assert_close
from integration_helpers import (_reference_unless_parametrized, assert_same_params,  # noqa: F401
                                 backend, import_or_skip)

TU = import_or_skip("trl.trainer.utils", "trl (with accelerate, datasets)")
GT = import_or_skip("trl.trainer.grpo_trainer", "trl's GRPOTrainer")

import fastrlhf.integrations.trl as T  # noqa: E402
from fastrlhf.integrations import UntestedVersionWarning  # noqa: E402

ORIG = {n: getattr(TU, n) for n in T._UTILS}
ORIG_COMPUTE_LOSS = GT.GRPOTrainer.__dict__["_compute_loss"]


@pytest.fixture(autouse=True)
def _unpatched():
    T.unpatch()
    yield
    T.unpatch()


# --------------------------------------------------------------------------------------------
# helpers: log-probs and entropy
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", T._UTILS)
def test_signatures_match_trl(name):
    assert_same_params(getattr(T, name), ORIG[name])


def _logits(seed=0, shape=(3, 5, 47)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x[0, 0, 3] = 40.0
    x[1, 1] = -1e4
    return x, g


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("with_row_mask", [False, True])
@pytest.mark.usefixtures("backend")
def test_selective_log_softmax_matches_trl(temperature, k, with_row_mask):
    logits, g = _logits()
    shape = logits.shape[:-1] if k is None else logits.shape[:-1] + (k,)
    index = torch.randint(0, logits.shape[-1], shape, generator=g)
    row_mask = (torch.rand(shape, generator=g) > 0.3) if with_row_mask else None
    x = logits.clone().requires_grad_()
    y = logits.double().requires_grad_()  # TRL in float64 as the oracle
    a = T.selective_log_softmax(x, index, temperature, row_mask)
    b = ORIG["selective_log_softmax"](y, index, temperature, row_mask)
    assert_close("logps", a, b, atol=2e-5, rtol=1e-5)
    up = torch.randn(shape, generator=g)
    assert_close("d logps", torch.autograd.grad(a, x, up)[0], torch.autograd.grad(b, y, up)[0],
                 atol=1e-6, rtol=1e-5)
    if row_mask is not None:
        assert torch.all(a[~row_mask] == 0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        T.selective_log_softmax(x, index, 0.0)


@pytest.mark.usefixtures("backend")
def test_entropy_helpers_match_trl():
    logits, g = _logits(1)
    index = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g)
    row_mask = torch.rand(logits.shape[:-1], generator=g) > 0.3
    x = logits.clone().requires_grad_()
    y = logits.double().requires_grad_()
    a, b = T.entropy_from_logits(x), ORIG["entropy_from_logits"](y)
    assert_close("entropy", a, b, atol=2e-5, rtol=1e-5)
    up = torch.randn(logits.shape[:-1], generator=g)
    assert_close("d entropy", torch.autograd.grad(a, x, up)[0], torch.autograd.grad(b, y, up)[0],
                 atol=1e-5, rtol=1e-4)
    for requires_grad in (True, False):
        x = logits.clone().requires_grad_()
        y = logits.double().requires_grad_()
        lp, ent = T.selective_log_softmax_and_entropy(x, index, requires_grad, 0.8, row_mask)
        lp_t, ent_t = ORIG["selective_log_softmax_and_entropy"](y, index, requires_grad, 0.8,
                                                                row_mask)
        assert_close("logps", lp, lp_t, atol=2e-5, rtol=1e-5)
        assert_close("entropy", ent, ent_t, atol=2e-5, rtol=1e-5)
        assert ent.requires_grad == ent_t.requires_grad == requires_grad
        loss = (lp * up).sum() + ((ent * up).sum() if requires_grad else 0)
        loss_t = (lp_t * up).sum() + ((ent_t * up).sum() if requires_grad else 0)
        assert_close("grad", torch.autograd.grad(loss, x)[0], torch.autograd.grad(loss_t, y)[0],
                     atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# GRPO loss against TRL's own _compute_loss
# --------------------------------------------------------------------------------------------

class _Accelerator:
    num_processes = 1

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t


def _stand_in(logps, entropies, *, loss_type, level, beta=0.0, delta=None, bias_kl=True,
              eps=(0.2, 0.28), top_entropy_quantile=1.0, off_policy=None, training=True,
              accum=2, steps_per_generation=2, max_len=None):
    """A stand-in for a GRPOTrainer: just the attributes _compute_loss reads; the model call
    returns the given per-token log-probs and entropies."""
    t = types.SimpleNamespace()
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    t.get_off_policy_mask = GT.GRPOTrainer.get_off_policy_mask
    t.get_high_entropy_mask = types.MethodType(GT.GRPOTrainer.get_high_entropy_mask, t)
    t.accelerator = _Accelerator()
    t.model = types.SimpleNamespace(training=training)
    t.args = types.SimpleNamespace(delta=delta, use_bias_correction_kl=bias_kl,
                                   steps_per_generation=steps_per_generation)
    t.loss_type, t.importance_sampling_level, t.beta = loss_type, level, beta
    t.epsilon_low, t.epsilon_high = eps
    t.top_entropy_quantile, t.off_policy_mask_threshold = top_entropy_quantile, off_policy
    t.use_vllm = t.vllm_importance_sampling_correction = False
    t.current_gradient_accumulation_steps = accum
    t.max_completion_length = max_len or logps.shape[1]
    t._entropy_bonus_enabled = t.aux_loss_enabled = False
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return t


def _grpo_batch(seed=0, B=6, Tn=9, spread=0.3, extreme=False, adv_shape="B"):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, Tn, generator=g) > 0.25).long()
    mask[0] = 1
    mask[1] = 0          # an empty completion
    mask[2, 3:] = 0      # a short one
    logps = -torch.rand(B, Tn, generator=g) * 3
    old = logps + spread * torch.randn(B, Tn, generator=g)
    if extreme:
        old[0, :3] = logps[0, :3] + torch.tensor([9.0, -9.0, 3.0])
    adv = torch.randn(B if adv_shape == "B" else (B, Tn), generator=g)
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, Tn, dtype=torch.long), "completion_mask": mask,
        "advantages": adv, "old_per_token_logps": old,
        "ref_per_token_logps": logps + 0.5 * torch.randn(B, Tn, generator=g),
        "num_items_in_batch": torch.tensor(float(mask.sum()) * 2.0),
    }
    return logps.requires_grad_(), torch.rand(B, Tn, generator=g) * 4, inputs


def _run(method, logps, entropies, inputs, **cfg):
    t = _stand_in(logps, entropies, **cfg)
    loss = method(t, None, inputs)
    (g,) = torch.autograd.grad(loss, logps)
    return loss.detach(), g, {k: v for k, v in t._metrics["train" if cfg.get("training", True)
                                                          else "eval"].items()}


def _compare(ours, theirs, atol=2e-6):
    assert_close("loss", ours[0], theirs[0], atol=atol, rtol=1e-5)
    assert_close("d loss / d logps", ours[1], theirs[1], atol=1e-7, rtol=1e-5)
    assert set(ours[2]) == set(theirs[2])
    for k in theirs[2]:
        assert ours[2][k] == pytest.approx(theirs[2][k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("loss_type", T.GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,bias_kl,training", [(0.0, True, True), (0.04, True, True),
                                                   (0.04, False, False)])
@pytest.mark.usefixtures("backend")
def test_patched_compute_loss_matches_trl(loss_type, level, beta, bias_kl, training):
    logps, ent, inputs = _grpo_batch(seed=1)
    cfg = dict(loss_type=loss_type, level=level, beta=beta, bias_kl=bias_kl, training=training)
    _compare(_run(T._grpo_compute_loss, logps, ent, inputs, **cfg),
             _run(ORIG_COMPUTE_LOSS, logps, ent, inputs, **cfg))


@pytest.mark.parametrize("loss_type", T.GRPO_LOSS_TYPES)
@pytest.mark.parametrize("variant", ["delta", "extreme", "token_advantages", "entropy_mask",
                                     "off_policy_mask", "symmetric_eps"])
@pytest.mark.usefixtures("backend")
def test_patched_compute_loss_matches_trl_variants(loss_type, variant):
    logps, ent, inputs = _grpo_batch(seed=2, extreme=variant == "extreme",
                                     adv_shape="BT" if variant == "token_advantages" else "B",
                                     spread=1.0 if variant in ("delta", "off_policy_mask") else 0.3)
    cfg = dict(loss_type=loss_type, level="token", beta=0.02)
    if variant == "delta":
        cfg["delta"] = 1.5
    if variant == "entropy_mask":
        cfg["top_entropy_quantile"] = 0.4
    if variant == "off_policy_mask":
        cfg["off_policy"] = 0.3
    if variant == "symmetric_eps":
        cfg["eps"] = (0.2, 0.2)
    _compare(_run(T._grpo_compute_loss, logps, ent, inputs, **cfg),
             _run(ORIG_COMPUTE_LOSS, logps, ent, inputs, **cfg), atol=1e-5)


def test_grpo_loss_function_directly():
    logps, _, inputs = _grpo_batch(seed=3)
    out = T.grpo_loss(logps, inputs["old_per_token_logps"], inputs["advantages"],
                      inputs["completion_mask"], loss_type="bnpo", epsilon_high=0.28)
    assert isinstance(out, T.GRPOLossOutput) and out.loss.dim() == 0 and out.per_token_kl is None
    assert out.coef_1.shape == logps.shape and not out.coef_1.requires_grad
    seq = T.grpo_loss(logps, inputs["old_per_token_logps"], inputs["advantages"],
                      inputs["completion_mask"], loss_type="grpo",
                      importance_sampling_level="sequence")
    assert seq.coef_1.shape == (logps.shape[0], 1)
    # GSPO through the mean: all valid tokens of a row share one gradient value
    (g,) = torch.autograd.grad(seq.loss, logps)
    row = inputs["completion_mask"][0].bool()
    assert torch.allclose(g[0, row], g[0, row][:1].expand(int(row.sum())))
    with pytest.raises(ValueError, match="loss_type"):
        T.grpo_loss(logps, logps.detach(), inputs["advantages"], inputs["completion_mask"],
                    loss_type="sapo")
    with pytest.raises(ValueError, match="delta"):
        T.grpo_loss(logps, logps.detach(), inputs["advantages"], inputs["completion_mask"],
                    delta=1.1, epsilon_high=0.28)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        T.grpo_loss(logps, logps.detach(), inputs["advantages"], inputs["completion_mask"])


@pytest.mark.parametrize("unsupported", [dict(loss_type="sapo"), dict(loss_type="cispo"),
                                         dict(loss_type="dapo", delta=1.1)])
def test_unsupported_configurations_fall_back_to_trl(unsupported):
    logps, ent, inputs = _grpo_batch(seed=4)
    cfg = dict(level="token", beta=0.0) | unsupported
    T.patch()
    T._STATE["warned"].clear()
    t = _stand_in(logps, ent, **cfg)
    t.args.sapo_temperature_pos, t.args.sapo_temperature_neg = 1.0, 1.05
    with pytest.warns(RuntimeWarning, match="runs TRL's own loss"):
        ours = GT.GRPOTrainer._compute_loss(t, None, inputs)
    t2 = _stand_in(logps, ent, **cfg)
    t2.args = t.args
    theirs = ORIG_COMPUTE_LOSS(t2, None, inputs)
    assert torch.equal(ours.detach(), theirs.detach())


# --------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------

def test_patch_and_unpatch(monkeypatch):
    fake = types.ModuleType("fastrlhf_test_fake_trl_consumer")
    fake.selective_log_softmax = ORIG["selective_log_softmax"]
    fake.ent = ORIG["entropy_from_logits"]
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    locations = T.patch()
    assert T.is_patched()
    for n in T._UTILS:
        assert getattr(TU, n) is getattr(T, n), n
    assert fake.selective_log_softmax is T.selective_log_softmax
    assert fake.ent is T.entropy_from_logits
    assert GT.GRPOTrainer._compute_loss is T._grpo_compute_loss
    assert T.patch() == locations
    assert T.unpatch() == len(locations)
    for n in T._UTILS:
        assert getattr(TU, n) is ORIG[n], n
    assert fake.selective_log_softmax is ORIG["selective_log_softmax"]
    assert GT.GRPOTrainer.__dict__["_compute_loss"] is ORIG_COMPUTE_LOSS
    assert T.unpatch() == 0


def test_patch_warns_on_untested_version(monkeypatch):
    monkeypatch.setattr(T._patcher, "version", lambda: "1.15.0")
    with pytest.warns(UntestedVersionWarning, match="tested with trl 1.16.0"):
        T.patch()


def test_patch_without_trl_raises_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", None)
    monkeypatch.setattr(T._patcher, "version", lambda: None)
    with pytest.raises(ImportError, match=r"needs trl .*not installed: pip install"):
        T.patch()


# --------------------------------------------------------------------------------------------
# end to end: GRPOTrainer, two steps, with and without patch()
# --------------------------------------------------------------------------------------------

def _tiny_grpo(tmp_path, **overrides):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(45)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        eos_token="<eos>", unk_token="<unk>")
    tokenizer.padding_side = "left"
    config = Qwen2Config(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                         bos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    # Saved locally and passed by path: with beta > 0 GRPOTrainer builds the reference model from
    # the policy's name_or_path, which must then not point at the Hub.
    model_dir = tmp_path / "tiny-qwen2"
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    prompts = [" ".join(f"w{(5 * i + j) % 45}" for j in range(3)) for i in range(8)]
    dataset = Dataset.from_dict({"prompt": prompts})

    def reward(completions, **kwargs):
        return [0.1 * len(c.split()) + (1.0 if "w7" in c else 0.0) - (0.5 if "w3" in c else 0.0)
                for c in completions]

    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=8, max_steps=2, learning_rate=5e-3, logging_steps=1,
                report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0,
                num_iterations=2, epsilon_high=0.28, disable_tqdm=True)
    args.update(overrides)
    return GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=GRPOConfig(**args),
                       train_dataset=dataset, processing_class=tokenizer)


def _train(tmp_path, **overrides):
    trainer = _tiny_grpo(tmp_path, **overrides)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return logs, weights


@pytest.mark.parametrize("overrides", [
    dict(loss_type="dapo", beta=0.04),
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="bnpo", delta=1.6, gradient_accumulation_steps=2, per_device_train_batch_size=2),
    dict(loss_type="dr_grpo"),
], ids=["dapo-kl", "grpo-gspo", "bnpo-delta-accum", "dr_grpo"])
@pytest.mark.usefixtures("backend")
def test_grpo_trainer_two_steps_same_with_patch(tmp_path, monkeypatch, overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logs_ref, w_ref = _train(tmp_path / "ref", **overrides)
        T.patch()
        calls = []
        real = T.ops.ppo_policy_loss
        monkeypatch.setattr(T.ops, "ppo_policy_loss",
                            lambda *a, **k: calls.append(1) or real(*a, **k))
        logs, w = _train(tmp_path / "patched", **overrides)
    assert calls, "GRPOTrainer did not run fastrlhf's loss after patch()"
    assert len(logs) == len(logs_ref) == 2
    for step, (a, b) in enumerate(zip(logs, logs_ref)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), f"step {step} loss"
        for key in b:
            if key.startswith(("clip_ratio", "entropy", "kl", "reward", "grad_norm")):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), f"step {step} {key}"
    # second step's loss has ratios != 1 (num_iterations=2): the clipped branch was exercised
    assert set(w) == set(w_ref)
    for k in w_ref:
        assert_close(f"weight {k}", w[k], w_ref[k], atol=1e-5, rtol=1e-4)
