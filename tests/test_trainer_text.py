"""``fastrlhf train`` on your own model, prompts and reward (``--model`` + ``--prompts`` +
``--reward-fn`` / ``--reward-model``): prompt files, left padding, the reward model read at the
last real token, dtypes, and a saved ``final/policy`` that reloads and stops at the trained EOS.

Tiny random-weight Llama / GPT-2 models with a real ``tokenizers`` tokenizer, made in a
temporary directory (no downloads)."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from helpers import assert_close  # noqa: E402
from trainer_helpers import tiny_text_model, word_prompts, word_tokenizer  # noqa: E402

from fastrlhf.trainer import TrainConfig  # noqa: E402
from fastrlhf.trainer.cli import main as cli_main  # noqa: E402
from fastrlhf.trainer.cli import to_flags  # noqa: E402
from fastrlhf.trainer.data import PromptTask, load_prompts  # noqa: E402
from fastrlhf.trainer.models import build_policy, policy_logits, response_mask  # noqa: E402
from fastrlhf.trainer.ppo import train  # noqa: E402
from fastrlhf.trainer.report import MetricsLog  # noqa: E402
from fastrlhf.trainer.rewards import HFRewardModel, call_reward_fn, load_reward_fn  # noqa: E402

# one worker runs this module under pytest-xdist (--dist loadgroup): its module fixture is
# expensive and would otherwise be built once per worker
pytestmark = pytest.mark.xdist_group("trainer_text")

REWARD_PY = '''
def frac_good(prompts, completions):
    """The fraction of the completion's words that are "good"."""
    return [c.split().count("good") / max(1, len(c.split())) for c in completions]
'''

TEXT = dict(rollout_batch_size=8, response_length=6, ppo_epochs=1, num_minibatches=2,
            num_print_samples=2, eval_prompts=4, missing_eos_penalty=None, progress=False,
            device="cpu", checkpoint_every=0)


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    model = tiny_text_model(d / "policy")
    rm = tiny_text_model(d / "rm", classifier=True, seed=1)
    with open(d / "prompts.jsonl", "w") as f:
        for p in word_prompts(40):
            f.write(json.dumps({"prompt": p, "id": 0}) + "\n")
    (d / "reward.py").write_text(REWARD_PY)
    return d, model, rm


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------

def test_load_prompts_jsonl_parquet_and_saved_dataset(tmp_path, text_setup):
    d, _, _ = text_setup
    want = word_prompts(40)
    assert load_prompts(str(d / "prompts.jsonl")) == (want, None)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": want, "n": list(range(40))}), tmp_path / "p.parquet")
    assert load_prompts(str(tmp_path / "p.parquet"), "text") == (want, None)
    with pytest.raises(ValueError, match=r"has no column 'prompt' \(columns: text, n\)"):
        load_prompts(str(tmp_path / "p.parquet"))
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": want[:30]}),
                          "test": datasets.Dataset.from_dict({"prompt": want[30:]})}
                         ).save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(str(tmp_path / "ds")) == (want[:30], want[30:])
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not JSON"):
        load_prompts(str(tmp_path / "bad.jsonl"))


def test_prompt_task_left_pads_and_holds_out():
    tok = word_tokenizer()
    texts = word_prompts(20)
    task = PromptTask(texts, None, tok, eval_prompts=5, max_prompt_tokens=16,
                      chat_template=False, seed=3)
    assert len(task.train_texts) == 15 and len(task.eval_texts) == 5
    assert not set(task.train_texts) & set(task.eval_texts) or len(set(texts)) < 20
    ids, mask, got = task.sample_queries(6, torch.Generator().manual_seed(0))
    assert ids.shape == mask.shape and ids.shape[0] == 6 and len(got) == 6
    for row, m, t in zip(ids.tolist(), mask.tolist(), got):
        real = [x for x, k in zip(row, m) if k]
        assert real == tok(t)["input_ids"] and real[0] == tok.bos_token_id
        assert m == sorted(m)                       # left padding: zeros first, then ones
        assert all(x == tok.pad_token_id for x, k in zip(row, m) if not k)
    chat = PromptTask(texts, None, tok, eval_prompts=5, max_prompt_tokens=16,
                      chat_template=True, seed=3)
    ids, mask, got = chat.eval_queries(1)
    assert tok.decode(ids[0][mask[0].bool()]) == f"<bos> {got[0]} <sep>"
    with pytest.raises(ValueError, match="longer than TrainConfig.max_prompt_tokens=2"):
        PromptTask(texts, None, tok, eval_prompts=5, max_prompt_tokens=2, chat_template=False,
                   seed=3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_prompts_give_the_unpadded_logits(tmp_path, arch):
    """A left-padded prompt (attention mask + position ids) predicts its response exactly as
    the same prompt alone in a batch of one."""
    path = tiny_text_model(tmp_path / arch, arch)
    cfg = TrainConfig(model=path)
    policy = build_policy(cfg, None, 64)
    tok = word_tokenizer()
    task = PromptTask(word_prompts(12), None, tok, eval_prompts=2, max_prompt_tokens=16,
                      chat_template=False, seed=0)
    ids, qmask, _ = task.sample_queries(5, torch.Generator().manual_seed(1))
    assert not bool(qmask.all())                    # really padded
    resp = torch.randint(5, len(tok), (5, 4), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(5, 4)
    with torch.no_grad():
        batched = policy_logits(policy, ids, resp, mask, qmask)
        for i in range(5):
            alone = policy_logits(policy, ids[i:i + 1, qmask[i].bool()], resp[i:i + 1],
                                  mask[i:i + 1])
            assert_close(f"{arch} row {i}", batched[i], alone[0], atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# rewards
# ------------------------------------------------------------------------------------------------

def test_reward_fn_loading_and_checks(text_setup):
    d, _, _ = text_setup
    fn = load_reward_fn(f"{d / 'reward.py'}:frac_good")
    assert call_reward_fn(fn, ["p", "q"], ["good good bad", ""]).tolist() == [2 / 3, 0.0]
    assert load_reward_fn("os.path:exists") is os.path.exists
    with pytest.raises(ValueError, match="must be 'module:function'"):
        load_reward_fn("frac_good")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_reward_fn(f"{d / 'reward.py'}:nope")
    with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
        call_reward_fn(lambda p, c: [1.0], ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="returned nan for completion 1"):
        call_reward_fn(lambda p, c: [0.0, float("nan")], ["a", "b"], ["x", "y"])


def test_reward_model_scores_the_last_real_token(text_setup):
    """HFRewardModel reads the score at the last real token of a left-padded prompt +
    right-padded response: equal to scoring each sequence alone, unpadded."""
    import transformers
    _, _, rm_dir = text_setup
    tok = word_tokenizer()
    rm = HFRewardModel(rm_dir, tok, torch.float32)
    assert rm.same_vocab
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir)
    task = PromptTask(word_prompts(12), None, tok, eval_prompts=2, max_prompt_tokens=16,
                      chat_template=False, seed=0)
    q, qm, _ = task.sample_queries(4, torch.Generator().manual_seed(5))
    resp = torch.randint(5, len(tok), (4, 5), generator=torch.Generator().manual_seed(6))
    resp[0, 2], resp[0, 3:] = tok.eos_token_id, tok.pad_token_id
    mask, _ = response_mask(resp, tok.eos_token_id)
    got = rm(q, qm, resp, mask)
    for i in range(4):
        seq = torch.cat([q[i][qm[i].bool()], resp[i][mask[i].bool()]])[None]
        with torch.no_grad():
            want = plain(input_ids=seq).logits[0, 0]
        assert abs(float(got[i]) - float(want)) < 1e-5, (i, float(got[i]), float(want))


# ------------------------------------------------------------------------------------------------
# the whole run
# ------------------------------------------------------------------------------------------------

def test_bf16_weights_on_cpu_are_cast_to_float32(tmp_path):
    path = tiny_text_model(tmp_path / "bf16", dtype=torch.bfloat16)
    cfg = TrainConfig(model=path)
    cpu = build_policy(cfg, None, 64, "cpu")
    assert cpu.loaded_dtype == torch.bfloat16 and cpu.dtype == torch.float32
    cuda = build_policy(cfg, None, 64, "cuda")      # the choice only: nothing is moved here
    assert cuda.dtype == torch.bfloat16


def test_ppo_with_reward_fn_and_reward_model_saves_a_usable_policy(tmp_path, text_setup,
                                                                   capsys):
    import transformers
    d, model, rm = text_setup
    out = tmp_path / "run"
    flags = ["--model", model, "--prompts", str(d / "prompts.jsonl"), "--reward-fn",
             f"{d / 'reward.py'}:frac_good", "--reward-model", rm, "--reward-model-weight",
             "0.5", "--chat-template", "--out", str(out)] + to_flags(dict(TEXT, total_steps=2))
    assert cli_main(flags) == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    assert "36 training prompts, 4 held out" in printed.out + printed.err
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # score = 1 x reward_fn + 0.5 x rm_reward, all three logged
        assert abs(r["score"] - (r["reward_fn"] + 0.5 * r["rm_reward"])) < 1e-5, r
        assert r["explained_variance"] == r["explained_variance"] and r["grad_norm"] > 0
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["eval_prompts"] == 4
    assert summary["eval_score_before"] is not None and summary["eval_score_after"] is not None
    # final/policy: reloads with the Auto classes, its tokenizer and a generation config with
    # the trained EOS / PAD and pure sampling
    pol = out / "final" / "policy"
    m = transformers.AutoModelForCausalLM.from_pretrained(pol)
    tok = transformers.AutoTokenizer.from_pretrained(pol)
    gc = m.generation_config
    assert (gc.eos_token_id, gc.pad_token_id) == (tok.eos_token_id, tok.pad_token_id) == (2, 0)
    assert gc.do_sample and gc.temperature == 1.0 and gc.max_new_tokens == 6
    def eos_first(module, inputs, logits):     # EOS the overwhelming next token
        logits = logits.clone()
        logits[..., tok.eos_token_id] += 100.0
        return logits
    m.lm_head.register_forward_hook(eos_first)
    enc = tok(["good sun", "moon"], return_tensors="pt", padding=True, padding_side="left")
    gen = m.generate(**enc, generation_config=gc)
    new = gen[:, enc["input_ids"].shape[1]:]
    assert (new[:, 0] == tok.eos_token_id).all(), new
    assert new.shape[1] == 1, new            # stopped at the EOS it was trained with


@pytest.mark.parametrize("bad, match", [
    (dict(prompts="P"), r"TrainConfig\.prompts must be used with --model"),
    (dict(prompts="P", model="M"), r"used with --reward-fn and / or --reward-model"),
    (dict(reward_fn="m:f"), r"TrainConfig\.reward_fn must be None without --prompts"),
])
def test_text_config_errors(tmp_path, bad, match):
    kw = {k: str(tmp_path) if v in ("P", "M") else v for k, v in bad.items()}
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


# ------------------------------------------------------------------------------------------------
# GRPO / Dr. GRPO / RLOO: no critic, group advantages, KL in the loss
# ------------------------------------------------------------------------------------------------

def test_grpo_raises_a_verifiable_reward(tmp_path, text_setup):
    """--algo grpo with a reward function (the fraction of "good" in the completion) on a
    random-weight tiny Llama: the score climbs from chance (~1/35) far above it."""
    d, model, _ = text_setup
    out = tmp_path / "grpo"
    summary = train(TrainConfig(
        out=str(out), model=model, prompts=str(d / "prompts.jsonl"),
        reward_fn=f"{d / 'reward.py'}:frac_good", algo="grpo", group_size=4,
        **dict(TEXT, rollout_batch_size=32, total_steps=12, lr=1e-2, kl_coef=0.01,
               adaptive_kl=False, entropy_coef=0.0, num_print_samples=0)))
    rows = MetricsLog.read(out / "metrics.jsonl")
    first = sum(r["score"] for r in rows[:3]) / 3
    last = sum(r["score"] for r in rows[-3:]) / 3
    assert first < 0.1 and last > first + 0.3, [round(r["score"], 3) for r in rows]
    assert summary["eval_score_after"] > summary["eval_score_before"] + 0.2, summary
    # no value model: no value metrics; the KL is in the loss
    assert "value_loss" not in rows[-1] and "explained_variance" not in rows[-1]
    assert rows[-1]["kl_loss"] > 0
    with open(out / "config.json") as f:
        assert json.load(f)["kl_in_loss"] is True
    ckpt = torch.load(out / "checkpoints" / "step_000012" / "trainer.pt", weights_only=False)
    assert ckpt["critic"] is None and "critic_opt" not in ckpt["learner"]


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_in_the_rollout(algo):
    """The rollout of a critic-free algorithm samples each prompt group_size times in a row and
    gives every token of a response its group-relative advantage."""
    import fastrlhf as fr
    from fastrlhf.trainer.distributed import Runtime
    from fastrlhf.trainer.models import reward_model_from
    from fastrlhf.trainer.ppo import collect_rollout
    from fastrlhf.trainer.task import SyntheticTask

    cfg = TrainConfig(algo=algo, group_size=4, rollout_batch_size=12, num_minibatches=3,
                      response_length=6, prompt_len=3, sft_max_words=4, hidden_size=32,
                      num_layers=1, num_heads=2)
    task = SyntheticTask(cfg.prompt_len, cfg.response_length, cfg.sft_min_words,
                         cfg.sft_max_words)
    torch.manual_seed(0)
    policy = build_policy(cfg, task.vocab_size, 16)
    rm = reward_model_from(policy)
    batch, _ = collect_rollout(cfg, task, policy, policy, None, rm, Runtime(), 0.1,
                               torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    q = batch.query.view(3, 4, -1)
    assert (q == q[:, :1]).all() and not (q[0, 0] == q[1, 0]).all()    # 3 prompts x 4 samples
    with torch.no_grad():
        scores = rm(torch.cat([batch.query, batch.response], 1),
                    torch.cat([batch.query_mask, batch.mask.long()], 1))
        last = batch.query.shape[1] - 1 + batch.mask.sum(1).long()
        scores = scores.gather(1, last[:, None]).squeeze(1)
    has_eos = (batch.response == task.eos_id).any(1)
    scores = torch.where(has_eos, scores, torch.full_like(scores, cfg.missing_eos_penalty))
    want = fr.group_advantages(scores, torch.arange(3).repeat_interleave(4), kind=algo,
                               backend="reference")
    assert_close(f"{algo} advantages", batch.adv, want[:, None] * batch.mask, atol=1e-5,
                 rtol=1e-5)
    assert (batch.values == 0).all() and (batch.returns == 0).all()
