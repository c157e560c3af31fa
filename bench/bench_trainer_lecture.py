"""The lecture's questions, measured: short ``fastrlhf train`` runs on the built-in task that
differ from the default run by one flag each (same seed, same SFT policy and reward model).

Each run is ``fastrlhf train --out RUNS/<name> --no-progress <flags>`` (100 PPO steps by
default, about 1.5 minutes on one CPU core).  Recorded per run: the exact command, its
``summary.json`` (first / last score, last KL, peak memory, time) and the means over the last
10 PPO steps of the logged metrics (oracle score, sampled k1 KL, exact KL where logged, clip
fraction, approx KL, explained variance, entropy).  ``score`` is the hidden oracle's score of
the sampled responses (in [-1, 1]); ``kl`` is the sequence KL to the reference (sum over tokens
of ``logp - ref_logp``, nats).

    python bench/bench_trainer_lecture.py [--runs-dir DIR] [--only NAME,...] [--write]

``--write`` saves ``bench/results/trainer-lecture-cpu.json`` (else ``bench/runs/``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# name -> (the lecture's question, extra flags)
RUNS = {
    "default": ("baseline: KL (k1) in the reward, separate critic, reference = copy, T = 1", []),
    "kl_in_loss": ("KL in the reward vs KL in the loss", ["--kl-in-loss"]),
    "kl_full": ("logprob - ref_logprob vs the full KL over the vocabulary",
                ["--kl-reward-kind", "full"]),
    "value_head_shared": ("does the value head share the policy's body",
                          ["--value-head", "shared"]),
    "reference_lora": ("a precomputed reference without a second model",
                       ["--reference", "lora"]),
    "one_update": ("old vs new policy: one epoch of one minibatch, so new == old at the update",
                   ["--ppo-epochs", "1", "--num-minibatches", "1"]),
    "no_value_clip": ("V - (A + V_old): the value loss without its clip around V_old",
                      ["--value-clip", "none"]),
    "temperature_0.7": ("what temperature does", ["--temperature", "0.7"]),
}
LAST_KEYS = ("score", "kl", "kl_full", "clipfrac", "approx_kl", "explained_variance", "entropy",
             "response_len", "value_loss")


def run_one(name: str, flags: list, runs_dir: str) -> dict:
    out = os.path.join(runs_dir, name)
    cmd = ["fastrlhf", "train", "--out", out, "--no-progress"] + flags
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "fastrlhf.train"] + cmd[2:],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"name": name, "command": shlex.join(cmd), "skipped": proc.stderr[-2000:]}
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    tail = rows[-10:]
    last10 = {k: sum(r[k] for r in tail) / len(tail) for k in LAST_KEYS
              if all(k in r for r in tail)}
    keep = ("score_first", "score_last", "kl_last", "rm_accuracy", "peak_memory_mib",
            "ppo_peak_memory_mib", "peak_memory_kind", "time_s", "steps")
    return {"name": name, "question": RUNS[name][0],
            "command": shlex.join(["fastrlhf", "train", "--out", f"runs/lecture/{name}",
                                   "--no-progress"] + flags),
            "summary": {k: summary[k] for k in keep if k in summary},
            "last10_mean": last10, "wall_s": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--only", default=None, help="comma-separated run names")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="fastrlhf-lecture-")
    names = args.only.split(",") if args.only else list(RUNS)
    results = []
    for name in names:
        r = run_one(name, RUNS[name][1], runs_dir)
        results.append(r)
        s, t = r.get("summary", {}), r.get("last10_mean", {})
        print(f"{name:>18}: score {s.get('score_first', float('nan')):+.3f} -> "
              f"{s.get('score_last', float('nan')):+.3f} (last-10 mean "
              f"{t.get('score', float('nan')):+.3f}), KL last-10 mean "
              f"{t.get('kl', float('nan')):.2f}, ppo peak "
              f"{s.get('ppo_peak_memory_mib', float('nan')):.0f} MiB, {r.get('wall_s')} s",
              flush=True)
    data = {"benchmark": "trainer_lecture", "env": common.environment("cpu"),
            "note": "CPU runs of the built-in task, seed 1, one flag changed per run; score = "
                    "hidden-oracle score, kl = sequence KL (k1) to the reference in nats; "
                    "peak memory = process peak RSS (MiB)",
            "runs": results}
    os.makedirs(common.RUNS_DIR, exist_ok=True)
    path = (os.path.join(common.RESULTS_DIR, "trainer-lecture-cpu.json") if args.write else
            os.path.join(common.RUNS_DIR, f"trainer-lecture-{int(time.time())}.json"))
    if args.write and args.only and os.path.exists(path):   # replace those runs, keep the rest
        with open(path) as f:
            old = json.load(f)
        done = {r["name"] for r in results}
        data["runs"] = [r for r in old["runs"] if r["name"] not in done] + results
        data["runs"].sort(key=lambda r: list(RUNS).index(r["name"]))
        data["env_by_run"] = {**old.get("env_by_run", {r["name"]: old["env"]
                                                       for r in old["runs"]}),
                              **{n: data["env"] for n in done}}
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
