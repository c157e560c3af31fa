"""The trainer's sampling loop with a KV cache: the same tokens as re-running the whole prefix
each step (same seed), with and without left-padded prompts, for Llama and GPT-2; and each
cached step feeds the model one token."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from trainer_helpers import tiny_text_model, word_prompts, word_tokenizer  # noqa: E402

from fastrlhf.trainer import TrainConfig  # noqa: E402
from fastrlhf.trainer.data import PromptTask  # noqa: E402
from fastrlhf.trainer.distributed import Runtime  # noqa: E402
from fastrlhf.trainer.models import build_policy, generate  # noqa: E402
from fastrlhf.trainer.task import SyntheticTask  # noqa: E402


def _both(policy, query, qmask, eos, pad, R=12, T=1.0):
    rt = Runtime()
    out = []
    for cached in (False, True):
        g = torch.Generator().manual_seed(123)
        out.append(generate(policy, query, R, T, g, rt, query_mask=qmask, eos_id=eos,
                            pad_id=pad, kv_cache=cached))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_generation_equals_uncached_builtin(arch):
    """The built-in task's prompts (no padding): identical responses, EOS and PAD included."""
    cfg = TrainConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2)
    task = SyntheticTask(4, 12, 2, 8)
    torch.manual_seed(0)
    policy = build_policy(cfg, task.vocab_size, 32)
    query = task.sample_prompts(16, torch.Generator().manual_seed(0))
    plain, cached = _both(policy, query, None, task.eos_id, task.pad_id, T=0.7)
    assert torch.equal(plain, cached), (plain, cached)
    assert (plain == task.eos_id).any()           # some rows ended early: PAD after EOS too


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_generation_equals_uncached_left_padded(tmp_path, arch):
    model = tiny_text_model(tmp_path / arch, arch)
    policy = build_policy(TrainConfig(model=model), None, 64)
    task = PromptTask(word_prompts(20), None, word_tokenizer(), eval_prompts=2,
                      max_prompt_tokens=16, chat_template=False, seed=0)
    query, qmask, _ = task.sample_queries(8, torch.Generator().manual_seed(4))
    assert not bool(qmask.all())
    plain, cached = _both(policy, query, qmask, task.eos_id, task.pad_id)
    assert torch.equal(plain, cached), (plain, cached)
    # and each row equals its prompt generated alone (the padding is invisible); same noise
    # needs the same batch, so compare the first sampled token's distribution instead: the
    # last-position logits of the padded batch and of each prompt alone
    with torch.no_grad():
        from fastrlhf.trainer.models import positions
        full = policy(input_ids=query, attention_mask=qmask,
                      position_ids=positions(qmask)).logits[:, -1]
        for i in range(len(query)):
            alone = policy(input_ids=query[i:i + 1, qmask[i].bool()]).logits[0, -1]
            assert torch.allclose(full[i], alone, atol=2e-5, rtol=1e-5), i


def test_cached_steps_feed_one_token():
    """With the cache, the prompt goes through once and every later step feeds one token; without
    it, every step feeds the whole prefix."""
    cfg = TrainConfig(hidden_size=32, num_layers=1, num_heads=2)
    task = SyntheticTask(4, 10, 2, 8)
    torch.manual_seed(0)
    policy = build_policy(cfg, task.vocab_size, 32)
    lengths = []
    hook = policy.model.embed_tokens.register_forward_hook(
        lambda m, inp, out: lengths.append(inp[0].shape[1]))
    query = task.sample_prompts(4, torch.Generator().manual_seed(0))
    for cached in (True, False):
        lengths.clear()
        resp = generate(policy, query, 10, 1.0, torch.Generator().manual_seed(1), Runtime(),
                        eos_id=-1, kv_cache=cached)          # no EOS: all 10 steps run
        assert resp.shape == (4, 10)
        want = [5] + [1] * 9 if cached else list(range(5, 15))
        assert lengths == want, (cached, lengths)
    hook.remove()
