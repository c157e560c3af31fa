"""Benchmark: peak memory of one PPO policy update at V = 128256 (a Llama-3-sized vocabulary):
the plain path (logits -> separate ops), ``--fused-loss`` (``fastrlhf.fused_ppo_loss`` on the
logits) and ``--fused-linear`` (``fastrlhf.fused_linear_ppo_loss`` on the hidden states and the
lm_head weight, no ``[B, T, V]`` logits).

A random-weight Llama (hidden ``H``, 1 layer, vocabulary 128256, untied head; no downloads) and a
rollout of ``B`` sequences (prompt ``P``, response ``R``, old log-probs from the policy itself)
go through :meth:`fastrlhf.trainer.update.Learner.update` (one epoch, one minibatch: one forward,
one backward, one AdamW step; no critic, so only the policy's loss path differs).  Each mode
runs in a fresh process, after one warm-up update (so AdamW's moments exist before the
measurement).  Measured:

* CUDA: ``torch.cuda.max_memory_allocated`` during the update minus the memory allocated
  before it (the update's extra allocations: activations, logits, gradients);
* CPU: the process's peak resident set size during the update (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus its resident size before it.  The CPU allocator keeps no
  statistics, so this counts pages actually touched; large tensors are mmap-ed and returned on
  free, so it follows the live tensors closely, but it is an RSS figure, not an allocation count.

On CPU the fused ops run their eager references (``fused_linear_ppo_loss``'s reference forms the
logits), so CPU rows show the plain-PyTorch memory of each formulation, not the Triton kernels'.
``logits_mib`` is ``B (P + R) V * 4`` bytes, the size of one fp32 logits tensor of the forward
(a formula, not a measurement).

    python bench/bench_trainer_update_memory.py [--device cuda] [--B 4 --P 8 --R 64 --H 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

V = 128256
MODES = ("plain", "fused_loss", "fused_linear")


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(mode: str, device: str, B: int, P: int, R: int, H: int) -> dict:
    """One mode in this process: the update's extra peak memory in MiB."""
    import gc

    import torch

    from fastrlhf.trainer import TrainConfig
    from fastrlhf.trainer import losses as L
    from fastrlhf.trainer.distributed import Runtime
    from fastrlhf.trainer.models import build_policy, policy_logits
    from fastrlhf.trainer.rollout import Rollout
    from fastrlhf.trainer.update import Learner

    torch.manual_seed(0)
    cfg = TrainConfig(hidden_size=H, num_layers=1, num_heads=max(1, H // 32), ppo_epochs=1,
                      num_minibatches=1, rollout_batch_size=B, response_length=R,
                      fused_loss=mode == "fused_loss", fused_linear=mode == "fused_linear",
                      device=device, num_threads=0)
    dev = torch.device(device)
    policy = build_policy(cfg, V, P + R).to(dev)
    g = torch.Generator().manual_seed(1)
    query = torch.randint(3, V, (B, P), generator=g).to(dev)
    response = torch.randint(3, V, (B, R), generator=g).to(dev)
    mask = torch.ones(B, R, device=dev)
    qmask = torch.ones(B, P, dtype=torch.long, device=dev)
    with torch.no_grad():
        logp, _ = L.logprobs(policy_logits(policy, query, response, mask, qmask), response,
                             temperature=1.0, backend=cfg.op_backend)
    zeros = torch.zeros(B, R, device=dev)
    adv = torch.randn(B, R, generator=g).to(dev)
    batch = Rollout(query, qmask, response, mask, logp, logp.clone(), zeros, adv, zeros)
    learner = Learner(cfg, policy, None, Runtime(device=dev))
    learner.update(batch, 0.05)                      # warm-up: AdamW moments now exist
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        learner.update(batch, 0.05)
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
        kind = "cuda_max_allocated_delta"
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_mib("VmRSS")
        learner.update(batch, 0.05)
        extra = _rss_mib("VmHWM") - before
        kind = "cpu_peak_rss_delta"
    return {"op": "trainer_ppo_update", "impl": mode, "device": device,
            "shape": f"B={B} P={P} R={R} H={H} V={V}", "peak_extra_mib": round(extra, 1),
            "memory_kind": kind, "logits_mib": round(B * (P + R) * V * 4 / 2 ** 20, 1),
            "params_mib": round(sum(p.numel() for p in policy.parameters()) * 4 / 2 ** 20, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--P", type=int, default=8)
    ap.add_argument("--R", type=int, default=64)
    ap.add_argument("--H", type=int, default=64)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)   # child process
    ap.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mode:
        print(json.dumps(measure(args.mode, args.device, args.B, args.P, args.R, args.H)))
        return 0
    rows = []
    for mode in MODES:
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--device",
               args.device] + [f"--{k}={getattr(args, k)}" for k in ("B", "P", "R", "H")]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            rows.append({"impl": mode, "skipped": p.stderr[-1500:]})
            print(f"{mode:>13}: failed\n{p.stderr[-1500:]}")
            continue
        row = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{mode:>13}: {row['peak_extra_mib']:8.1f} MiB extra peak ({row['memory_kind']}), "
              f"{row['shape']}, one fp32 logits tensor {row['logits_mib']} MiB, params "
              f"{row['params_mib']} MiB")
    if args.out:
        import common
        with open(args.out, "w") as f:
            json.dump({"benchmark": "trainer_ppo_update_memory",
                       "env": common.environment(args.device),
                       "command": f"python bench/bench_trainer_update_memory.py --device "
                                  f"{args.device} --B {args.B} --P {args.P} --R {args.R} "
                                  f"--H {args.H} --out {args.out}",
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
