"""The trainer's vocab (tensor) parallelism, ``TrainConfig.vocab_parallel``.

* the building blocks (``fastrlhf.trainer.vocab_parallel``) in 2 and 3 gloo processes against
  the unsharded model: sharded embedding + lm_head of a tiny Llama (untied, with a padding row)
  and GPT-2 (tied), forward, log-probs, every gradient, the gradient norm, full state dicts and
  Adam states gathered and scattered back, vocab-parallel Gumbel-max sampling;
* Gumbel-max sampling has the softmax's distribution;
* ``torchrun`` runs of the whole pipeline: the first PPO update of 2 vocab-parallel x 2
  data-parallel ranks (and of 2 vocab-parallel ranks with GPT-2's tied head, packed updates and
  the fused loss) equals one process updating on the same rollouts; such a run resumes from its
  checkpoint exactly;
* configuration errors.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from helpers import assert_close, run_gloo  # noqa: E402
from trainer_helpers import assert_first_update_replays, failure_text, subprocess_env  # noqa: E402

from fastrlhf.trainer.cli import to_flags  # noqa: E402

from fastrlhf.trainer import TrainConfig  # noqa: E402
from fastrlhf.trainer import vocab_parallel as VP  # noqa: E402


def test_vocab_range_is_a_balanced_partition():
    for size in (1, 2, 5, 33, 50257):
        for tp in range(1, min(size, 7) + 1):
            ranges = [VP.vocab_range(size, tp, r) for r in range(tp)]
            assert ranges[0][0] == 0 and ranges[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_gumbel_max_samples_the_softmax():
    """sample_tokens on one rank (tp=1) is plain Gumbel-max: its frequencies over 200k draws
    match softmax(logits / T) within 5 standard errors per id, and no draw is out of range."""
    V, T, n = 7, 0.8, 200_000
    logits = torch.tensor([2.0, 0.5, -1.0, 1.5, 0.0, -3.0, 1.0])
    shard = VP.VocabShard(0, V, V, 1, 0)
    g = torch.Generator().manual_seed(3)
    tok = VP.sample_tokens(logits.expand(n, V), T, g, shard)
    assert tok.dtype == torch.int64 and tok.shape == (n,)
    assert int(tok.min()) >= 0 and int(tok.max()) < V
    p = torch.softmax(logits.double() / T, dim=0)
    freq = torch.bincount(tok, minlength=V).double() / n
    se = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() <= 5 * se).all()), (freq, p)


# ------------------------------------------------------------------------------------------------
# building blocks, 2 and 3 processes
# ------------------------------------------------------------------------------------------------

def _tiny(arch: str, V: int):
    import transformers
    torch.manual_seed(0)
    if arch == "llama":
        conf = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=False, pad_token_id=0)
        model = transformers.LlamaForCausalLM(conf)
    else:
        conf = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1,
                                       n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(conf)
    return model.double().eval()


def _check_blocks(rank, world, arch):
    import fastrlhf as fr
    group = dist.group.WORLD
    V = 37
    full = _tiny(arch, V)
    tied = full.get_output_embeddings().weight is full.get_input_embeddings().weight
    assert tied == (arch == "gpt2")
    sharded = VP.shard_vocab(copy.deepcopy(full), group, world, rank)
    s = VP.vocab_shard(sharded)
    assert (s.start, s.end) == VP.vocab_range(V, world, rank) and s.tp == world
    head, emb = sharded.get_output_embeddings(), sharded.get_input_embeddings()
    assert (head.weight is emb.weight) == tied
    assert VP.op_kwargs(sharded) == {"process_group": group, "vocab_start_index": s.start}
    assert VP.op_kwargs(full) == {}

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (3, 9), generator=g)
    ids[0, :3] = 0                       # Llama's padding row (no gradient there)
    ids[1, 4] = V - 1                    # the last id lives on the last rank
    tokens = ids[:, 1:]
    w1, w2 = (torch.randn(3, 8, generator=g, dtype=torch.float64) for _ in range(2))

    logits = full(input_ids=ids).logits[:, :-1]                                 # [3, 8, V]
    lp, ent = fr.token_logprobs(logits, tokens, return_entropy=True, temperature=0.9,
                                backend="reference")
    (lp * w1 + ent * w2).sum().backward()
    local = sharded(input_ids=ids).logits[:, :-1]                               # [3, 8, V_r]
    assert local.shape[-1] == s.rows
    assert_close(f"rank {rank} local logits", local, logits[..., s.start:s.end], atol=1e-12)
    lp2, ent2 = fr.token_logprobs(local, tokens, return_entropy=True, temperature=0.9,
                                  backend="reference", **VP.op_kwargs(sharded))
    assert_close(f"rank {rank} logp", lp2, lp, atol=1e-12)
    assert_close(f"rank {rank} entropy", ent2, ent, atol=1e-12)
    (lp2 * w1 + ent2 * w2).sum().backward()
    VP.sync_grads(sharded, world, 1, None)
    shard_ids = {id(p) for p in VP.sharded_parameters(sharded)}
    assert len(shard_ids) == (1 if tied else 2)
    fp = dict(full.named_parameters())
    names = [n for n, _ in sharded.named_parameters()]
    assert names == list(fp)             # same names and order as the unsharded model
    for name, p in sharded.named_parameters():
        ref = fp[name].grad
        if id(p) in shard_ids:
            assert p.shape[0] == s.rows
            ref = ref[s.start:s.end]
        assert_close(f"rank {rank} grad {name}", p.grad, ref, atol=1e-12)
    full_sq = sum(float(p.grad.double().pow(2).sum()) for p in full.parameters())
    assert abs(float(VP.grad_norm_sq(sharded)) - full_sq) <= 1e-10 * full_sq

    # full state dicts: gathered == the unsharded model's; scattered back == the shards
    sd = VP.gather_state(sharded, sharded.state_dict())
    ref_sd = full.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k
    back = VP.scatter_state(sharded, ref_sd)
    for k, v in sharded.state_dict().items():
        assert torch.equal(back[k], v), k

    # Adam: a step on the slices == the unsharded step; its state gathers to the full state
    opt_f = torch.optim.AdamW(full.parameters(), lr=1e-2)
    opt_s = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    opt_f.step()
    opt_s.step()
    for name, p in sharded.named_parameters():
        ref = fp[name].detach()
        ref = ref[s.start:s.end] if id(p) in shard_ids else ref
        assert_close(f"rank {rank} stepped {name}", p.detach(), ref, atol=1e-12)
    full_state = VP.gather_optim_state(sharded, opt_s)
    for i, st in opt_f.state_dict()["state"].items():
        for k, v in st.items():
            assert_close(f"rank {rank} adam {i} {k}", full_state["state"][i][k], v, atol=1e-15)
    opt_new = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    opt_new.load_state_dict(VP.scatter_optim_state(sharded, opt_new, full_state))
    for i, st in opt_s.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(opt_new.state_dict()["state"][i][k], v), (i, k)

    # sampling: the group's token == the argmax of the concatenated per-slice scores, and the
    # same on every rank
    x = torch.randn(64, V, generator=torch.Generator().manual_seed(9)) * 2
    tok = VP.sample_tokens(x[:, s.start:s.end], 0.7,
                           torch.Generator().manual_seed(100 + rank), s)
    scores = torch.cat([VP.gumbel_scores(x[:, a:b], 0.7, torch.Generator().manual_seed(100 + r))
                        for r, (a, b) in enumerate(s.ranges())], dim=1)
    assert torch.equal(tok, scores.argmax(dim=1))
    everyone = [torch.empty_like(tok) for _ in range(world)]
    dist.all_gather(everyone, tok)
    assert all(torch.equal(t, tok) for t in everyone)


def _blocks_worker(rank, world, archs):
    for arch in archs:
        _check_blocks(rank, world, arch)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_embedding_and_head_match_unsharded(world):
    run_gloo(_blocks_worker, world, ("llama", "gpt2"), timeout_s=300)


def test_shard_vocab_rejects_bad_models():
    model = _tiny("llama", 5)
    with pytest.raises(ValueError, match=r"vocab_parallel=6 must be between 1 and the "
                                         r"vocabulary size 5"):
        VP.shard_vocab(copy.deepcopy(model), None, 6, 0)
    model.lm_head = torch.nn.Linear(16, 4, bias=False)
    with pytest.raises(ValueError, match="the lm_head has 4 rows but the embedding 5"):
        VP.shard_vocab(model, None, 2, 0)


# ------------------------------------------------------------------------------------------------
# the trainer under torchrun
# ------------------------------------------------------------------------------------------------

TINY = dict(sft_steps=10, rm_train_pairs=128, rm_eval_pairs=64, rm_epochs=1, rm_norm_samples=32,
            rollout_batch_size=16, hidden_size=32, num_layers=1, num_heads=2, device="cpu",
            ppo_epochs=2, num_minibatches=2, num_print_samples=2, progress=False)


def _torchrun(nproc, args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "fastrlhf.train"] + args
    r = subprocess.run(cmd, env=subprocess_env(), cwd=cwd, capture_output=True, timeout=300)
    assert r.returncode == 0, failure_text(r.stderr)
    return r.stdout.decode() + r.stderr.decode()


CASES = {
    # 4 ranks: 2 data-parallel replicas of 2 vocab-parallel ranks; micro-batches
    "tp2xdp2-llama": (4, dict(vocab_parallel=2, micro_batch_size=2)),
    # GPT-2 (tied head), packed updates, the fused loss with KL in the loss; 2 steps with a
    # checkpoint after each, for the resume check
    "tp2-gpt2-packed-fused": (2, dict(vocab_parallel=2, arch="gpt2", packed=True,
                                      fused_loss=True, kl_in_loss=True, total_steps=2,
                                      checkpoint_every=1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vocab_parallel_update_equals_single_process(tmp_path, case):
    from fastrlhf.trainer.ppo import Rollout
    from fastrlhf.trainer.report import MetricsLog
    from fastrlhf.trainer.task import SyntheticTask

    world, extra = CASES[case]
    out = tmp_path / "run"
    kw = {**TINY, "total_steps": 1, "dump_first_update": True, **extra}
    log = _torchrun(world, ["--out", str(out)] + to_flags(kw), tmp_path)
    tp = kw["vocab_parallel"]
    dp = world // tp
    assert f"world {world} (ddp, vocab-parallel {tp} x data-parallel {dp})" in log
    dump = torch.load(out / "debug" / "first_update.pt", weights_only=False)
    assert dump["world"] == world and dump["tp"] == tp
    parts = [torch.load(out / "debug" / f"rollout_rank{i}.pt", weights_only=False)["batch"]
             for i in range(world)]
    # the ranks of a vocab-parallel group share their rollouts; data-parallel groups do not
    for d in range(dp):
        for r in range(1, tp):
            for k in parts[0]:
                assert torch.equal(parts[d * tp + r][k], parts[d * tp][k]), (d, r, k)
    if dp > 1:
        assert not torch.equal(parts[0]["response"], parts[tp]["response"])
    batch = Rollout(**{k: torch.cat([parts[d * tp][k] for d in range(dp)]) for k in parts[0]})

    kl_coef = torch.load(out / "debug" / "rollout_rank0.pt", weights_only=False)["kl_coef"]
    assert_first_update_replays(dict(kw, out=str(out)), dump, batch, kl_coef, dp, case)

    if kw["total_steps"] > 1:
        # resume from the step-1 checkpoint (full weights, Adam moments gathered) == the run
        resumed = tmp_path / "resumed"
        _torchrun(world, ["--resume", str(out / "checkpoints" / "step_000001"),
                          "--out", str(resumed)], tmp_path)
        strip = {"tokens_per_s", "time_s"}
        rows_a = [{k: v for k, v in r.items() if k not in strip}
                  for r in MetricsLog.read(out / "metrics.jsonl")]
        rows_b = [{k: v for k, v in r.items() if k not in strip}
                  for r in MetricsLog.read(resumed / "metrics.jsonl")]
        assert rows_b == rows_a[1:]
        from safetensors.torch import load_file
        wa = load_file(out / "final" / "policy" / "model.safetensors")
        wb = load_file(resumed / "final" / "policy" / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        # the saved policy is an ordinary, unsharded Hugging Face model
        import transformers
        m = transformers.AutoModelForCausalLM.from_pretrained(out / "final" / "policy")
        assert m.get_output_embeddings().weight.shape[0] == SyntheticTask.vocab_size


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------

def test_vocab_parallel_config_errors():
    with pytest.raises(ValueError, match=r"TrainConfig\.vocab_parallel must be an integer >= 1"):
        TrainConfig(vocab_parallel=0)
    with pytest.raises(ValueError, match=r"vocab_parallel must be 1 with parallel='fsdp2'"):
        TrainConfig(vocab_parallel=2, parallel="fsdp2")
    with pytest.raises(ValueError, match=r"vocab_parallel=2 must divide the world size 1 "
                                         r"\(launch with torchrun\)"):
        TrainConfig(vocab_parallel=2).check_world(1)
    with pytest.raises(ValueError, match=r"vocab_parallel=2 must divide the world size 3"):
        TrainConfig(vocab_parallel=2).check_world(3)
    # the batch splits over the data-parallel size (world / vocab_parallel), not the world
    TrainConfig(vocab_parallel=2, rollout_batch_size=8, num_minibatches=4).check_world(4)
    with pytest.raises(ValueError, match=r"rollout_batch_size=8 must be divisible by 12 "
                                         r"\(data-parallel size 3 x num_minibatches 4\)"):
        TrainConfig(vocab_parallel=2, rollout_batch_size=8, num_minibatches=4).check_world(6)
