"""The compact PPO trainer (fastrlhf.trainer): learning, backend equivalence, exact resume,
data-parallel equivalence, configuration errors.

Runs on CPU in a few minutes: tiny models, short runs, one torch thread per process.  The
subprocess tests launch ``python -m fastrlhf.train`` / ``torchrun -m fastrlhf.train`` exactly as
a user would.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

from helpers import DEVICE, TRITON_OK, assert_close  # noqa: E402
from trainer_helpers import assert_first_update_replays, failure_text, subprocess_env  # noqa: E402

import fastrlhf as fr  # noqa: E402

from fastrlhf.trainer import TrainConfig  # noqa: E402
from fastrlhf.trainer.cli import main as cli_main  # noqa: E402
from fastrlhf.trainer.cli import to_flags  # noqa: E402
from fastrlhf.trainer.distributed import Runtime  # noqa: E402
from fastrlhf.trainer.models import (build_policy, pack_batch, packed_policy_logits,  # noqa: E402
                                     packed_position_values, policy_logits, position_values,
                                     response_mask, reward_model_from)
from fastrlhf.trainer.ppo import Learner, Rollout, collect_rollout, train  # noqa: E402
from fastrlhf.trainer.report import MetricsLog  # noqa: E402
from fastrlhf.trainer.task import SyntheticTask  # noqa: E402

# The tests that share the module fixture ``short_run`` (a 20-step training run) go to one
# pytest-xdist worker (--dist loadgroup), so it is built once; the rest spread over workers.
SHORT_RUN = pytest.mark.xdist_group("trainer_short_run")


# A small but complete pipeline: SFT, reward model, PPO (a few seconds per phase).
SMALL = dict(sft_steps=60, rm_train_pairs=1024, rm_eval_pairs=256, rm_epochs=2,
             rm_norm_samples=64, rollout_batch_size=32, ppo_epochs=2, num_minibatches=2,
             num_print_samples=2, progress=False)
# Smaller still, for the runs that only need to be identical to each other; on the CPU (gloo for
# data parallelism, bitwise-reproducible kernels for the resume test) also on a CUDA machine.
TINY = dict(SMALL, sft_steps=10, rm_train_pairs=128, rm_eval_pairs=64, rm_epochs=1,
            rm_norm_samples=32, rollout_batch_size=16, hidden_size=32, num_layers=1, num_heads=2,
            device="cpu")

TIME_KEYS = {"tokens_per_s", "time_s"}


def _train_cmd(out, **kw):
    return [sys.executable, "-m", "fastrlhf.train", "--out", str(out)] + to_flags(kw)


def _weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "final", "policy", "model.safetensors"))


def _rows(out):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS}
            for r in MetricsLog.read(os.path.join(out, "metrics.jsonl"))]


# ------------------------------------------------------------------------------------------------
# 1. it learns: the oracle score rises clearly while the KL to the reference stays bounded
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_short")
    cfg = TrainConfig(out=str(out), total_steps=20, checkpoint_every=10, **SMALL)
    summary = train(cfg)
    return out, cfg, summary


@SHORT_RUN
def test_short_run_score_rises_kl_bounded(short_run):
    out, cfg, summary = short_run
    rows = MetricsLog.read(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, cfg.total_steps + 1))
    required = {"step", "score", "rm_reward", "kl", "entropy", "approx_kl", "clipfrac",
                "policy_loss", "value_loss", "explained_variance", "response_len",
                "tokens_per_s"}
    assert required <= set(rows[0]), required - set(rows[0])
    for r in rows:
        for k in required:
            assert r[k] is not None and r[k] == r[k], f"step {r['step']}: {k} = {r[k]}"
    # The reward model learned the hidden preference.
    assert summary["rm_accuracy"] > 0.8, summary
    # The oracle score of the SFT policy is about 0; PPO must raise it clearly ...
    first = sum(r["score"] for r in rows[:3]) / 3
    last = sum(r["score"] for r in rows[-3:]) / 3
    assert first < 0.25, f"SFT policy already scores {first:.3f}"
    assert last > first + 0.3, f"score did not rise: {first:.3f} -> {last:.3f}"
    # ... through the reward model's view as well ...
    assert rows[-1]["rm_reward"] > rows[0]["rm_reward"] + 0.5
    # ... while the KL to the reference stays bounded (nats per sequence) and positive.
    assert max(r["kl"] for r in rows) < 15.0, [round(r["kl"], 2) for r in rows]
    assert rows[-1]["kl"] > 0.0
    assert 0.0 <= rows[-1]["clipfrac"] <= 1.0 and rows[-1]["entropy"] > 0.0
    # Outputs: curves, final policy (a Hugging Face directory), checkpoints.
    assert os.path.getsize(os.path.join(out, "curves.png")) > 10_000
    assert os.path.isfile(os.path.join(out, "checkpoints", "step_000020", "trainer.pt"))
    assert os.path.isfile(os.path.join(out, "final", "policy", "config.json"))


@SHORT_RUN
def test_model_flag_loads_local_checkpoint(short_run, tmp_path):
    """--model PATH: a local Hugging Face directory (here the trained policy, and a GPT-2 made
    from a config) initialises the policy; nothing is downloaded."""
    import transformers

    trained, _, _ = short_run
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=40, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    for src in (os.path.join(trained, "final", "policy"), str(gpt2)):
        out = tmp_path / ("run_" + os.path.basename(src))
        summary = train(TrainConfig(out=str(out), model=src, total_steps=2, **TINY))
        assert summary["steps"] == 2 and len(MetricsLog.read(out / "metrics.jsonl")) == 2
        assert (out / "final" / "policy" / "config.json").is_file()


# ------------------------------------------------------------------------------------------------
# 2. the same first update on every backend
# ------------------------------------------------------------------------------------------------

def _first_update(backend: str, kl_in_loss: bool, fused_loss: bool = False, **overrides):
    """Rollout + one PPO update of tiny random models, all loss math on ``backend``."""
    cfg = TrainConfig(**dict(dict(
        backend=backend, kl_in_loss=kl_in_loss, fused_loss=fused_loss, rollout_batch_size=8,
        response_length=6, prompt_len=3, sft_max_words=4, ppo_epochs=2, num_minibatches=2,
        micro_batch_size=2, hidden_size=32, num_layers=1, num_heads=2, entropy_coef=0.01,
        value_clip=0.2, dual_clip=3.0), **overrides))
    task = SyntheticTask(cfg.prompt_len, cfg.response_length, cfg.sft_min_words,
                         cfg.sft_max_words)
    torch.manual_seed(0)
    policy = build_policy(cfg, task.vocab_size, task.query_len + cfg.response_length)
    critic, rm = reward_model_from(policy), reward_model_from(policy)
    ref = copy.deepcopy(policy)
    with torch.no_grad():   # a reference that differs from the policy, so the KL is not 0
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    policy, critic, rm, ref = (m.to(DEVICE) for m in (policy, critic, rm, ref))
    rt = Runtime(device=torch.device(DEVICE))
    learner = Learner(cfg, policy, critic, rt)
    batch, _ = collect_rollout(cfg, task, policy, ref, critic, rm, rt, 0.1,
                               torch.Generator().manual_seed(1),
                               torch.Generator(device=DEVICE).manual_seed(2))
    stats = learner.update(batch, 0.1)
    return batch, stats, policy.state_dict(), critic.state_dict()


def test_rollout_scoring_in_micro_batches_equals_whole_batch():
    """micro_batch_size also chunks the rollout's scoring forwards (log-probs, reference
    log-probs, values, rewards): the experience must not depend on the chunking."""
    whole, *_ = _first_update("reference", False, micro_batch_size=0)
    chunked, *_ = _first_update("reference", False, micro_batch_size=2)
    assert torch.equal(whole.response, chunked.response) and whole.mask.sum() > 8
    for name in ("logp", "ref_logp", "values", "adv", "returns"):
        assert_close(f"rollout {name} (chunks of 2 vs whole batch)", getattr(chunked, name),
                     getattr(whole, name), atol=1e-6, rtol=1e-6)


def _native_ok() -> bool:
    """Whether the C++ ops are built here (``--backend native`` then runs)."""
    try:
        fr.token_logprobs(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), backend="native")
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("kl_in_loss, fused", [(False, False), (True, False), (True, True)],
                         ids=["kl_in_reward", "kl_in_loss", "fused_kl_in_loss"])
def test_first_update_same_on_every_backend(kl_in_loss, fused):
    """The reference run is the separate ops on the eager references; every other backend (and
    the fused loss on every backend) must give the same rollout, losses and weights."""
    if fused and not hasattr(fr, "fused_ppo_loss"):
        pytest.skip("fastrlhf.fused_ppo_loss is not exported by this build")
    ref_batch, ref_stats, ref_pol, ref_crit = _first_update("reference", kl_in_loss)
    assert ref_batch.mask.sum() > 8 and ref_stats["clipfrac"] >= 0
    others = ((["reference"] if fused else []) + ["auto"] + (["native"] if _native_ok() else [])
              + (["triton"] if TRITON_OK else []))
    for be in others:
        batch, stats, pol, crit = _first_update(be, kl_in_loss, fused)
        # auto is native (C++) or the reference on CPU, triton on CUDA; native: the C++ ops
        # where they exist; triton on CPU runs the kernels in the interpreter.  All float32: agreement to rounding, far below an update.
        tol = 1e-5
        assert torch.equal(batch.response, ref_batch.response)
        for name in ("logp", "ref_logp", "values", "adv", "returns"):
            assert_close(f"{be}: rollout {name}", getattr(batch, name), getattr(ref_batch, name),
                         atol=tol, rtol=tol)
        for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "grad_norm"):
            assert abs(stats[k] - ref_stats[k]) <= tol * (1 + abs(ref_stats[k])), (be, k)
        # Weights after two epochs of Adam steps (|update| ~ lr = 1e-3 per step).
        for k in ref_pol:
            assert_close(f"{be}: policy {k}", pol[k], ref_pol[k], atol=1e-5)
        for k in ref_crit:
            assert_close(f"{be}: critic {k}", crit[k], ref_crit[k], atol=1e-5)


@pytest.mark.parametrize("kl_in_loss", [False, True], ids=["kl_in_reward", "kl_in_loss"])
def test_fused_linear_update_equals_plain(kl_in_loss):
    """--fused-linear (the policy loss from hidden states + lm_head weight, no [B, R, V] logits)
    gives the plain update's losses, stats and weights on the same rollouts."""
    plain_batch, plain_stats, plain_pol, plain_crit = _first_update("auto", kl_in_loss)
    batch, stats, pol, crit = _first_update("auto", kl_in_loss, fused_linear=True)
    assert torch.equal(batch.response, plain_batch.response)
    assert stats.keys() == plain_stats.keys()
    for k in stats:
        assert abs(stats[k] - plain_stats[k]) <= 1e-5 * (1 + abs(plain_stats[k])), (
            k, stats[k], plain_stats[k])
    for name, got, want in (("policy", pol, plain_pol), ("critic", crit, plain_crit)):
        for k in want:
            assert_close(f"fused-linear {name} {k}", got[k], want[k], atol=1e-5)
    assert any((pol[k] - _first_update_init_policy()[k]).abs().max() > 1e-4 for k in pol)


# ------------------------------------------------------------------------------------------------
# 2b. packed (padding-free) updates equal the padded ones
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_forward_equals_padded(arch):
    """One packed row with per-sequence position ids (transformers' packed-sequence detection)
    gives the padded forward's logits and values at every real response position."""
    cfg = TrainConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2)
    torch.manual_seed(0)
    policy = build_policy(cfg, 33, 64)     # GPT-2: positions for the unpacked row below
    critic = reward_model_from(policy)
    g = torch.Generator().manual_seed(0)
    query = torch.randint(2, 33, (4, 5), generator=g)
    response = torch.randint(3, 33, (4, 8), generator=g)
    response[0, 2], response[2, 5] = 2, 2             # EOS (id 2) early in two rows
    response[0, 3:], response[2, 6:] = 0, 0           # PAD after it
    mask, has_eos = response_mask(response)
    assert has_eos.tolist() == [True, False, True, False] and mask.sum() == 3 + 8 + 6 + 8
    pb = pack_batch(query, response, mask)
    assert pb.input_ids.shape == (1, 4 * 5 + 25) and pb.cu_seqlens.tolist() == [0, 3, 11, 17, 25]
    with torch.no_grad():
        pad_logits = policy_logits(policy, query, response, mask)                   # [4, 8, V]
        pad_values = position_values(critic, query, response, mask)                 # [4, 8]
        pk_logits = packed_policy_logits(policy, pb)                                # [1, 25, V]
        pk_values = packed_position_values(critic, pb)                              # [1, 25]
    real = mask.bool()
    assert_close(f"{arch} packed logits", pk_logits[0], pad_logits[real], atol=1e-5, rtol=1e-5)
    assert_close(f"{arch} packed values", pk_values[0], pad_values[real], atol=1e-5, rtol=1e-5)
    # without the restarting position ids the row is one long sequence: clearly different
    with torch.no_grad():
        wrong = policy(input_ids=pb.input_ids, use_cache=False).logits[:, pb.resp_index]
    assert (wrong[0] - pad_logits[real]).abs().max() > 1e-2


@pytest.mark.parametrize("kl_in_loss, fused, loss_agg, micro", [
    (False, False, "token-mean", 2), (True, False, "seq-mean-token-mean", 4),
    (True, True, "seq-mean-token-sum-norm", 1)],
    ids=["kl_in_reward", "kl_in_loss-seq_mean", "fused-seq_norm"])
def test_packed_first_update_equals_padded(kl_in_loss, fused, loss_agg, micro):
    """--packed: the first PPO update (2 epochs x 2 minibatches, gradient accumulation over
    micro-batches) on the same rollouts gives the padded update's losses, stats and weights.
    (Micro-batches of 1 put a short response alone in a packed row: seq-mean-token-sum-norm
    must still divide by the padded length.)"""
    if fused and not hasattr(fr, "fused_ppo_loss"):
        pytest.skip("fastrlhf.fused_ppo_loss is not exported by this build")
    kw = dict(kl_in_loss=kl_in_loss, fused_loss=fused, loss_agg=loss_agg, micro_batch_size=micro)
    pad_batch, pad_stats, pad_pol, pad_crit = _first_update("auto", **kw)
    batch, stats, pol, crit = _first_update("auto", packed=True, **kw)
    # uneven responses, so the packed rows really differ from the padded ones
    lens = pad_batch.mask.sum(dim=1)
    assert lens.min() < lens.max() and lens.min() < pad_batch.mask.shape[1]
    assert torch.equal(batch.response, pad_batch.response)
    assert stats.keys() == pad_stats.keys() and ("kl_loss" in stats) == kl_in_loss
    for k in stats:
        assert abs(stats[k] - pad_stats[k]) <= 1e-5 * (1 + abs(pad_stats[k])), (k, stats[k],
                                                                                 pad_stats[k])
    for name, got, want in (("policy", pol, pad_pol), ("critic", crit, pad_crit)):
        for k in want:
            assert_close(f"packed {name} {k}", got[k], want[k], atol=1e-5)
    assert any((pol[k] - _first_update_init_policy()[k]).abs().max() > 1e-4 for k in pol)


def _first_update_init_policy():
    """The weights :func:`_first_update` starts the policy from (to check the update moved)."""
    cfg = TrainConfig(response_length=6, prompt_len=3, sft_max_words=4, hidden_size=32,
                      num_layers=1, num_heads=2)
    task = SyntheticTask(cfg.prompt_len, cfg.response_length, cfg.sft_min_words,
                         cfg.sft_max_words)
    torch.manual_seed(0)
    return build_policy(cfg, task.vocab_size, task.query_len + cfg.response_length).state_dict()


def test_packed_short_run_end_to_end(tmp_path, capsys):
    """``fastrlhf train --packed``: the whole pipeline runs, PPO updates padding-free, and the
    metrics are finite."""
    out = tmp_path / "packed"
    kw = dict(TINY, total_steps=3, checkpoint_every=0, micro_batch_size=4)
    assert cli_main(["--out", str(out), "--packed"] + to_flags(kw)) == 0, capsys.readouterr().err
    with open(out / "config.json") as f:
        assert json.load(f)["packed"] is True
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for k in ("policy_loss", "value_loss", "grad_norm", "approx_kl", "clipfrac", "score"):
            assert r[k] == r[k] and abs(r[k]) < 1e3, (r["step"], k, r[k])
        assert r["grad_norm"] > 0 and r["critic_grad_norm"] > 0
    assert (out / "final" / "policy" / "config.json").is_file()


# ------------------------------------------------------------------------------------------------
# 3. resume: a run killed mid-way and resumed equals an uninterrupted one, exactly
# ------------------------------------------------------------------------------------------------

def test_resume_after_kill_is_exact(tmp_path):
    kw = dict(TINY, total_steps=14, checkpoint_every=3, keep_checkpoints=2)
    full, cut = tmp_path / "full", tmp_path / "cut"
    env = subprocess_env()
    a = subprocess.Popen(_train_cmd(full, **kw), env=env, cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    b = subprocess.Popen(_train_cmd(cut, **kw), env=env, cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_ckpt = cut / "checkpoints" / "step_000003" / "trainer.pt"
    deadline = time.time() + 240
    while not first_ckpt.exists() and b.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    b.send_signal(signal.SIGKILL)
    b.wait(timeout=60)
    assert b.returncode == -signal.SIGKILL, b.stderr.read().decode()[-3000:]
    killed_at = len(MetricsLog.read(cut / "metrics.jsonl"))
    assert 3 <= killed_at < kw["total_steps"], killed_at   # really killed mid-way
    assert not (cut / "final").exists()
    c = subprocess.run([sys.executable, "-m", "fastrlhf.train", "--resume", str(cut)], env=env,
                       cwd=tmp_path, capture_output=True, timeout=240)
    assert c.returncode == 0, c.stderr.decode()[-3000:]
    assert "resumed from" in c.stdout.decode() + c.stderr.decode()
    a.wait(timeout=240)
    assert a.returncode == 0, a.stderr.read().decode()[-3000:]
    # metrics: every row equal (timings aside), final weights and value model bit for bit
    assert _rows(cut) == _rows(full)
    wa, wb = _weights(full), _weights(cut)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    last = os.path.join("checkpoints", "step_000014", "trainer.pt")
    ca = torch.load(full / last, weights_only=False)
    cb = torch.load(cut / last, weights_only=False)
    for k in ca["critic"]:
        assert torch.equal(ca["critic"][k], cb["critic"][k]), k
    assert ca["kl_ctl"] == cb["kl_ctl"] and ca["step"] == cb["step"] == 14


# ------------------------------------------------------------------------------------------------
# 4. data parallel: 2 CPU processes (DDP or FSDP2, gloo) == 1 process on the same global batch
# ------------------------------------------------------------------------------------------------

_CLOSE_SCRIPT = """
import gc, os, weakref
import torch, torch.distributed as dist
from fastrlhf.trainer.distributed import Runtime
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0",
                  WORLD_SIZE="1")
dist.init_process_group("gloo")
rt = Runtime(owns_group=True)
gc.disable()  # only close() may collect

def run():  # the trainer's models end with the run's locals, DDP and FSDP2 wrappers alike
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))
    ddp(torch.randn(2, 3)).sum().backward()
    fsdp = torch.nn.Sequential(torch.nn.Linear(3, 3))
    torch.distributed.fsdp.fully_shard(fsdp)
    fsdp(torch.randn(2, 3)).sum().backward()
    return weakref.ref(ddp), weakref.ref(fsdp)

refs = run()
print("alive after the run", [r() is not None for r in refs])
rt.close()
print("alive after close", [r() is not None for r in refs], dist.is_initialized())
"""


def test_runtime_close_collects_the_wrappers_before_destroying_the_group(tmp_path):
    # DDP / FSDP2 modules sit in reference cycles: without a collection they would outlive the
    # run until some later GC pass, destroying their reducer's process group then (possibly at
    # interpreter shutdown).  Runtime.close() collects them while the group exists.
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-c", _CLOSE_SCRIPT], env={**subprocess_env(),
                       "PORT": str(port)}, cwd=tmp_path, capture_output=True, timeout=120)
    assert r.returncode == 0, failure_text(r.stderr)
    out = r.stdout.decode()
    assert "alive after the run [True, True]" in out, out  # the cycles are real
    assert "alive after close [False, False] False" in out, out


@pytest.mark.parametrize("parallel, packed", [("ddp", False), ("fsdp2", False), ("fsdp2", True)],
                         ids=["ddp", "fsdp2", "fsdp2-packed"])
def test_data_parallel_update_equals_single_process(tmp_path, parallel, packed):
    """torchrun, 2 CPU ranks (gloo), the whole pipeline; the first PPO update (2 epochs x 2
    minibatches, gradient accumulation over micro-batches, clipping, Adam) of the 2 ranks must
    equal one process updating on their concatenated batches (also with --packed updates)."""
    out = tmp_path / parallel
    kw = dict(TINY, total_steps=1, ppo_epochs=2, num_minibatches=2, micro_batch_size=2,
              dump_first_update=True, parallel=parallel, packed=packed)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastrlhf.train", "--out", str(out)] + to_flags(kw)
    r = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True, timeout=300)
    assert r.returncode == 0, failure_text(r.stderr)
    assert f"world 2 ({parallel})" in r.stdout.decode() + r.stderr.decode()
    dump = torch.load(out / "debug" / "first_update.pt", weights_only=False)
    assert dump["world"] == 2
    parts = [torch.load(out / "debug" / f"rollout_rank{i}.pt", weights_only=False)
             for i in range(2)]
    # the two ranks sampled different rollouts with different token counts: a per-rank mean
    # would weight tokens wrongly, the global normalisation must not
    m0, m1 = (p["batch"]["mask"].sum() for p in parts)
    assert not torch.equal(parts[0]["batch"]["response"], parts[1]["batch"]["response"])
    batch = Rollout(**{k: torch.cat([p["batch"][k] for p in parts]) for k in parts[0]["batch"]})
    assert_first_update_replays(dict(kw, out=str(out)), dump, batch, parts[0]["kl_coef"], 2,
                                f"2 {parallel} ranks; tokens {m0:.0f}/{m1:.0f}")


# ------------------------------------------------------------------------------------------------
# 5. bad configuration fails fast with a clear message
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (dict(lam=1.5), r"TrainConfig\.lam must be in \[0, 1\], got 1\.5"),
    (dict(gamma=0.0), r"TrainConfig\.gamma must be in \(0, 1\]"),
    (dict(ppo_epochs=0), r"TrainConfig\.ppo_epochs must be an integer >= 1, got 0"),
    (dict(clip_low=-0.1), r"TrainConfig\.clip_low must be a finite number > 0"),
    (dict(dual_clip=0.5), r"TrainConfig\.dual_clip must be None or > 1"),
    (dict(backend="cuda"), r"TrainConfig\.backend must be one of auto, triton, native, reference"),
    (dict(loss_agg="mean"), r"TrainConfig\.loss_agg must be one of token-mean"),
    (dict(kl_reward_kind="k9"), r"TrainConfig\.kl_reward_kind must be one of"),
    (dict(rollout_batch_size=30, num_minibatches=4),
     r"rollout_batch_size must be divisible by num_minibatches=4"),
    (dict(hidden_size=30, num_heads=4), r"hidden_size must be divisible by num_heads=4"),
    (dict(sft_max_words=12, response_length=12), r"sft_max_words must be < response_length=12"),
    (dict(temperature=float("nan")), r"TrainConfig\.temperature must be finite"),
    (dict(seed="one"), r"TrainConfig\.seed must be int, got 'one'"),
    (dict(adaptive_kl="sometimes"), r"TrainConfig\.adaptive_kl must be bool"),
    (dict(model="/nonexistent/dir"), r"TrainConfig\.model must be an existing local directory"),
    (dict(device="tpu"), r"TrainConfig\.device must be auto, cpu, cuda or cuda:N"),
])
def test_bad_config_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_bad_config_cli_and_world(tmp_path, capsys):
    assert cli_main(["--lam", "2", "--out", str(tmp_path)]) == 2
    assert "TrainConfig.lam must be in [0, 1], got 2.0" in capsys.readouterr().err
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"total_steps": 3, "learning_rate": 1e-3}))
    assert cli_main(["--config", str(cfg_file)]) == 2
    assert "unknown TrainConfig field(s): learning_rate" in capsys.readouterr().err
    assert cli_main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    # flags > config file > defaults, and the result validates
    cfg_file.write_text(json.dumps({"total_steps": 3, "lr": 5e-4}))
    assert cli_main(["--config", str(cfg_file), "--lr", "1e-4", "--no-adaptive-kl",
                     "--clip-high", "none", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["total_steps"] == 3 and printed["lr"] == 1e-4
    assert printed["adaptive_kl"] is False and printed["clip_high"] is None
    # batch sizes must split over the data-parallel ranks
    with pytest.raises(ValueError, match=r"rollout_batch_size=64 must be divisible by 12"):
        TrainConfig().check_world(3)


def test_peak_memory_sections_on_cpu():
    """PeakMemory: a section's peak sees a 256 MiB buffer freed inside it; the next section,
    after the reset, does not (Linux VmHWM; where it cannot be reset, the run's peak stays)."""
    from fastrlhf.trainer.distributed import PeakMemory
    mem = PeakMemory(torch.device("cpu"))
    mem.start()
    base = mem.read()
    x = torch.ones(64 * 2 ** 20)           # 256 MiB, every page touched
    del x
    mem.stop()
    assert mem.section >= base + 200, (base, mem.section)
    first = mem.section
    mem.start()
    mem.stop()
    assert mem.total() >= first
    if os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK):
        assert mem.read() < first - 150, (mem.read(), first)    # the reset worked


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fsdp2_grad_clip_applies_the_unrounded_coefficient(dtype):
    """The FSDP2 clip (norm summed in fp32 over the local shards) multiplies each shard by its
    fp32 coefficient in one fp32 multiply rounded once to the gradient's dtype -- not by the
    coefficient first rounded to a bf16 / fp16 gradient's dtype (1/3 -> 0.33398 in bf16: every
    element scaled by the same wrong amount)."""
    from fastrlhf.trainer.distributed import scale_grads_
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(37, generator=g).to(dtype), torch.randn(5, 3, generator=g).to(dtype)]
    coef = torch.tensor(1.0 / 3.0)
    mine = [t.clone() for t in grads]
    scale_grads_(mine, coef)
    for t, m in zip(grads, mine):
        assert m.dtype == dtype
        assert torch.equal(m, (t.float() * coef).to(dtype))
        if dtype != torch.float32:
            assert not torch.equal(m, t * coef.to(dtype))
