"""Shared by the trainer tests that launch ``fastrlhf.train`` (or torchrun) in subprocesses."""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env() -> dict:
    """This environment with the reference / native backends (no Triton interpreter) and one
    OpenMP thread per process.  fastrlhf is importable through its install; the checkout is
    not put on PYTHONPATH, where its root's ``kernels/`` would shadow the PyPI ``kernels``
    package that recent transformers imports.  ``PYTHONFAULTHANDLER``: a process killed by a
    fatal signal (an abort in C++) prints every thread's Python stack first (see
    :func:`failure_text`)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def failure_text(stderr: bytes, tail: int = 3000) -> str:
    """What a failed subprocess run says: the fault handler's reports of the processes that
    died on a signal (which a launcher's own error report would push out of a plain tail),
    then the last ``tail`` characters."""
    text = stderr.decode(errors="replace")
    start = text.find("Fatal Python error")
    if 0 <= start < len(text) - tail:  # not already in the tail
        return text[start:start + 6000] + "\n...\n" + text[-tail:]
    return text[-tail:]


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


WORDS = ("alpha beta gamma delta good bad sun moon tree cat dog red blue green one two three "
         "four five six seven eight nine ten yes no maybe very so and").split()
CHAT_TEMPLATE = ("{% for m in messages %}<bos> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<sep>{% endif %}")


def word_tokenizer():
    """A real ``tokenizers`` word-level tokenizer (special tokens <pad> <bos> <eos> <unk> <sep>,
    then :data:`WORDS`) with a BOS template and a chat template; no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "<sep>"]
                                        + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_text_model(path, arch: str = "llama", *, seed: int = 0, dtype=None,
                    classifier: bool = False):
    """A random-weight tiny Llama / GPT-2 (causal LM, or a one-label sequence classifier) with
    :func:`word_tokenizer` saved in ``path``; returns ``path`` as a string."""
    import torch
    import transformers

    tok = word_tokenizer()
    V = len(tok)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    if arch == "llama":
        conf = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=False, **ids)
        cls = (transformers.LlamaForSequenceClassification if classifier
               else transformers.LlamaForCausalLM)
    else:
        conf = transformers.GPT2Config(vocab_size=V, n_positions=128, n_embd=32, n_layer=2,
                                       n_head=2, **ids)
        cls = (transformers.GPT2ForSequenceClassification if classifier
               else transformers.GPT2LMHeadModel)
    if classifier:
        conf.num_labels = 1
    torch.manual_seed(seed)
    model = cls(conf)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def word_prompts(n: int, seed: int = 0):
    """``n`` prompts of 1-5 random :data:`WORDS` (uneven lengths: left padding happens)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 6, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g)))
    return out
