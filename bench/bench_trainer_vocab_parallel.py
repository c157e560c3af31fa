"""Benchmark: the trainer's ``--vocab-parallel`` against one process and plain DDP, large vocab.

A local tiny Llama with a large vocabulary (V = 128256, hidden 64, 2 layers: the embedding and
the lm_head are 99% of its 16.5M parameters; the built-in task still speaks 33 of those ids)
goes through the whole pipeline (``fastrlhf train --model DIR``, SFT -> reward model -> PPO) with
the same global batch three ways:

* ``single``: one process;
* ``ddp x2``: ``torchrun --nproc_per_node=2``: each rank samples half the rollouts and holds
  the whole vocabulary;
* ``vocab-parallel x2``: ``torchrun --nproc_per_node=2 --vocab-parallel 2``: both ranks see all
  rollouts, each holds half of the vocabulary (embedding, lm_head, their gradients and Adam
  moments, the logits).

Every mode runs its forwards in micro-batches of 4 sequences per rank (``--micro-batch-size``:
the rollout's scoring passes and the update), so the logits held at once are
``[4, R, V]`` (single, ddp) or ``[4, R, V / 2]`` (vocab-parallel): the situation where data
parallelism cannot shrink them any further, and vocab parallelism still halves them, at the
price of each rank processing twice the sequences.

Rows: ``ms`` = median wall time of a PPO step (rollout + update, steps after the first);
``peak_mb`` = the trainer's ``ppo_peak_memory_mib``, the peak during the PPO steps' rollout and
update, and ``run_peak_mb`` = ``peak_memory_mib``, the whole run's (SFT, reward model and the
checkpoint / final-model writes, which hold full unsharded copies of all four models, included);
both the largest over ranks, allocated CUDA memory or the process's peak RSS on CPU (which
includes ~0.5 GiB of Python, torch and transformers).  The reward and value models keep their
full embeddings in every mode.  On a CUDA machine with fewer
than 2 GPUs the 2-process rows are recorded as skipped.

    python bench/bench_trainer_vocab_parallel.py [--device cuda] [--quick] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

REPO = os.path.dirname(common.BENCH_DIR)
RUN = dict(sft_steps=5, sft_batch_size=8, rm_train_pairs=128, rm_eval_pairs=64, rm_epochs=1,
           rm_norm_samples=32, rollout_batch_size=32, ppo_epochs=2, num_minibatches=2,
           micro_batch_size=4, num_print_samples=0, checkpoint_every=0, progress=False)


def _model_dir(root: str, vocab: int) -> str:
    import transformers
    from fastrlhf.trainer.task import EOS, PAD
    torch.manual_seed(0)
    conf = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, max_position_embeddings=64,
                                    tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=1,
                                    eos_token_id=EOS)
    path = os.path.join(root, f"llama-v{vocab}")
    transformers.LlamaForCausalLM(conf).save_pretrained(path)
    return path


def _run(cmd, out: str, steps: int):
    # (not the checkout on PYTHONPATH: its kernels/ would shadow the PyPI `kernels` package)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return None, r.stderr[-2000:]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        t = [json.loads(line)["time_s"] for line in f if line.strip()]
    step_s = [b - a for a, b in zip(t, t[1:])]        # steps 2..n (the first warms up)
    return {**common.spread([x * 1e3 for x in step_s]),
            "peak_mb": round(summary["ppo_peak_memory_mib"], 1),
            "run_peak_mb": round(summary["peak_memory_mib"], 1), "steps": len(t)}, None


def run(device: str, quick: bool) -> list:
    from fastrlhf.trainer.cli import to_flags
    vocab = 32000 if quick else 128256
    steps = 3 if quick else 6
    dev = "cuda" if device.startswith("cuda") else "cpu"
    n_gpu = torch.cuda.device_count() if dev == "cuda" else 0
    rows = []
    with tempfile.TemporaryDirectory() as root:
        model = _model_dir(root, vocab)
        base = dict(RUN, model=model, total_steps=steps, device=dev)
        shape = (f"V={vocab} H=64 L=2, {RUN['rollout_batch_size']} rollouts/step, "
                 f"micro-batch {RUN['micro_batch_size']}")
        for impl, nproc, extra in (("single", 1, {}), ("ddp x2", 2, {}),
                                   ("vocab-parallel x2", 2, {"vocab_parallel": 2})):
            row = {"op": "ppo trainer step", "impl": impl, "mode": "rollout+update",
                   "shape": shape, "dtype": "float32", "backend": "auto"}
            if dev == "cuda" and nproc > n_gpu:
                rows.append(dict(row, skipped=f"needs {nproc} CUDA devices, have {n_gpu}"))
                continue
            out = os.path.join(root, impl.replace(" ", "_"))
            args = ["--out", out] + to_flags(dict(base, **extra))
            cmd = ([sys.executable, "-m", "fastrlhf.train"] if nproc == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", "-m", "fastrlhf.train"]) + args
            res, err = _run(cmd, out, steps)
            rows.append(dict(row, skipped=f"run failed: {err}") if res is None
                        else dict(row, **res))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    copy_gbps = common.copy_bandwidth_gbps(args.device)
    rows = [common.finish_row(r, copy_gbps) for r in run(args.device, args.quick)]
    print(common.format_table(rows))
    if args.write:
        path = os.path.join(common.RESULTS_DIR, f"{common.device_slug(args.device)}.json")
        common.write_results(path, common.environment(args.device), copy_gbps,
                             {"trainer_vocab_parallel": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
