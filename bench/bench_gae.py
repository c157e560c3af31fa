"""Benchmark: GAE (fastrlhf.gae) against verl's Python loop, eager and torch.compile'd.

Implementations (same inputs, fp32 rewards / values, bool multi-turn mask, gamma=1, lam=0.95):

* ``eager``: verl 0.9 ``compute_gae_advantage_return``'s reverse loop over T (without the
  whitening), one handful of kernels per time step.
* ``compile-step``: the same loop with its step body compiled by ``torch.compile`` (one fused
  kernel per step; compiling the whole T-step loop unrolls T steps and does not finish at these
  sizes).
* ``fastrlhf``: ``fastrlhf.gae`` (the Triton reverse-scan kernel on CUDA; on CPU ``auto`` is the
  reference loop, so CPU rows only show that the script runs).

GB/s counts the minimum traffic: 3 inputs read + 2 fp32 outputs written, once each
(B * T * (4 + 4 + 1 + 4 + 4) bytes).  ``run(device, quick)`` returns the rows for
``bench/common.py``; ``python bench/bench_gae.py [--device cuda] [--quick] [--write]`` prints the
table (and merges it into ``bench/results/<device>.json`` with ``--write``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GPU_SHAPES = [(512, 4096), (8192, 2048), (8192, 4096)]
CPU_SHAPES = [(8, 64), (64, 256)]
GAMMA, LAM = 1.0, 0.95


def verl_loop(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """verl 0.9's loop (multi-turn aware), not whitened: (advantages, returns)."""
    with torch.no_grad():
        m = mask.to(values.dtype)
        nextvalues = torch.zeros_like(values[:, 0])
        lastgaelam = torch.zeros_like(values[:, 0])
        out = []
        for t in reversed(range(rewards.shape[-1])):
            delta = rewards[:, t] + gamma * nextvalues - values[:, t]
            cur = delta + gamma * lam * lastgaelam
            nextvalues = values[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
            lastgaelam = cur * m[:, t] + (1 - m[:, t]) * lastgaelam
            out.append(lastgaelam)
        adv = torch.stack(out[::-1], dim=1)
        return adv, adv + values


def _step(r_t, v_t, m_t, nextvalues, lastgaelam, gamma: float, lam: float):
    delta = r_t + gamma * nextvalues - v_t
    cur = delta + gamma * lam * lastgaelam
    nextvalues = v_t * m_t + (1 - m_t) * nextvalues
    lastgaelam = cur * m_t + (1 - m_t) * lastgaelam
    return nextvalues, lastgaelam


def make_compiled_loop():
    step = torch.compile(_step, dynamic=False)

    def loop(rewards, values, mask, gamma=GAMMA, lam=LAM):
        with torch.no_grad():
            m = mask.to(values.dtype)
            nextvalues = torch.zeros_like(values[:, 0])
            lastgaelam = torch.zeros_like(values[:, 0])
            out = []
            for t in reversed(range(rewards.shape[-1])):
                nextvalues, lastgaelam = step(rewards[:, t], values[:, t], m[:, t], nextvalues,
                                              lastgaelam, gamma, lam)
                out.append(lastgaelam)
            adv = torch.stack(out[::-1], dim=1)
            return adv, adv + values

    return loop


def make_inputs(B, T, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rewards = torch.randn(B, T, generator=g) * 0.1
    values = torch.randn(B, T, generator=g)
    # multi-turn: a 64-token observation every 512 tokens, right padding on a quarter of the rows
    t = torch.arange(T)
    mask = ((t % 512) < 448).expand(B, T).clone()
    lens = torch.randint(T // 2, T + 1, (B,), generator=g)
    lens[: 3 * B // 4] = T
    mask &= t[None, :] < lens[:, None]
    return rewards.to(device), values.to(device), mask.to(device)


def run(device: str, quick: bool = False) -> list[dict]:
    from fastrlhf.ops.gae import gae

    cuda = device.startswith("cuda")
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    if quick:
        shapes = shapes[:1]
    compiled = make_compiled_loop()
    rows = []
    for B, T in shapes:
        r, v, m = make_inputs(B, T, device)
        nbytes = B * T * (r.element_size() + v.element_size() + m.element_size() + 4 + 4)
        impls = {
            "eager": lambda: verl_loop(r, v, m),
            "compile-step": lambda: compiled(r, v, m),
            "fastrlhf": lambda: gae(r, v, m, gamma=GAMMA, lam=LAM),
        }
        ref_adv = verl_loop(r, v, m)[0]
        for name, fn in impls.items():
            row = {"op": "gae", "impl": name, "mode": "fwd", "shape": f"{B}x{T}",
                   "dtype": "fp32", "bytes": nbytes}
            try:
                adv = fn()[0]
                # fastrlhf writes 0 at masked positions, verl the carried advantage
                row["max_err"] = float((adv - ref_adv)[m].abs().max()) if m.any() else 0.0
                slow = name != "fastrlhf"
                row.update(common.time_stats(fn, device, warmup=1 if slow else 5,
                                                rep=5 if slow else 50))
                row["peak_mb"] = (None if not cuda else
                                  round(common.peak_extra_bytes(fn, device) / 2**20, 1))
            except Exception as e:  # e.g. no C++ compiler for torch.compile on CPU
                row.pop("max_err", None)
                row["skipped"] = common.skip_reason(e, device)
            rows.append(row)
        del r, v, m, ref_adv
        if cuda:
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true", help="merge into bench/results/<device>.json")
    args = ap.parse_args(argv)
    rows = run(args.device, args.quick)
    copy_gbps = common.copy_bandwidth_gbps(args.device)
    rows = [common.finish_row(r, copy_gbps) for r in rows]
    common.add_speedups(rows)
    print(f"{common.device_name(args.device)}: copy bandwidth {copy_gbps:.0f} GB/s")
    print(common.format_table(rows))
    if args.write:
        path = os.path.join(common.RESULTS_DIR, f"{common.device_slug(args.device)}.json")
        common.write_results(path, common.environment(args.device), copy_gbps, {"gae": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
