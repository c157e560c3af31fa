"""Run outputs: ``metrics.jsonl`` (one row per PPO step) and ``curves.png``.

Columns of ``metrics.jsonl`` (means over the whole global batch, all ranks):

=====================  ==========================================================================
step                   PPO step (1-based)
score                  hidden oracle's score of the sampled responses, in [-1, 1] (0 = SFT level);
                       with --prompts: the score (reward_fn_weight x reward_fn +
                       reward_model_weight x rm_reward, before the missing-EOS penalty)
rm_reward              normalised reward-model score (before the missing-EOS penalty); with
                       --prompts: the --reward-model's (absent without one)
reward_fn              the --reward-fn's score (--prompts with --reward-fn only)
kl                     KL(policy || reference) per sequence: sum over the response of
                       log pi - log pi_ref (k1 estimate), in nats
kl_full                the exact KL per sequence, sum over the response of sum_v p log(p / q)
                       (only with kl_reward_kind=full)
kl_coef                beta used for this step's KL penalty (adaptive or fixed)
reward                 total reward per sequence (score - beta * KL when the KL is in the reward)
entropy                mean per-token entropy of the policy on its samples, nats
response_len           response tokens up to and including EOS
eos_frac               fraction of responses that produced EOS
explained_variance     1 - Var(returns - V) / Var(returns) of the rollout values (PPO only)
policy_loss            clipped surrogate loss (mean over the update's minibatches)
value_loss             clipped value loss (PPO only, as value_clipfrac and critic_grad_norm)
approx_kl              mean (old logp - new logp) over the update (how far one update moved)
clipfrac               fraction of tokens where the ratio clip was active
value_clipfrac         fraction of tokens where the value clip was active
kl_loss                KL term of the loss (only with kl_in_loss)
grad_norm              policy gradient norm before clipping (critic_grad_norm: value model)
lr                     policy learning rate after the step
tokens_per_s           response tokens generated per second of the whole step (rollout + update)
time_s                 seconds since the start of the run
=====================  ==========================================================================
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List

__all__ = ["MetricsLog", "plot_curves", "CURVES"]

# The metrics plotted in curves.png, in panel order.
CURVES = ("score", "rm_reward", "kl", "kl_coef", "entropy", "approx_kl", "clipfrac",
          "policy_loss", "value_loss", "explained_variance", "response_len", "tokens_per_s")


class MetricsLog:
    """Appends one JSON object per PPO step to ``OUT/metrics.jsonl`` (rank 0 only).

    On resume the rows after the checkpoint's step (written by the interrupted run after its
    last checkpoint) are dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(self, out_dir: str, enabled: bool, resume_step: int = 0):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = enabled
        if not enabled:
            return
        rows = self.read(self.path) if resume_step > 0 and os.path.exists(self.path) else []
        with open(self.path, "w") as f:
            for r in rows:
                if r["step"] <= resume_step:
                    f.write(json.dumps(r) + "\n")

    def write(self, row: Dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")

    @staticmethod
    def read(path: str) -> List[Dict]:
        rows = []
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut short by a kill
                        break
        return rows


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def plot_curves(metrics_path: str, png_path: str) -> bool:
    """Plot the :data:`CURVES` of ``metrics.jsonl`` against the step; False if matplotlib is
    missing or there is nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not os.path.exists(metrics_path):
        return False
    rows = MetricsLog.read(metrics_path)
    if not rows:
        return False
    cols = 4
    rows_n = math.ceil(len(CURVES) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 2.8 * rows_n))
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes.flat, CURVES):
        ys = [r.get(key) for r in rows]
        ys = [float("nan") if y is None else y for y in ys]
        ax.plot(steps, ys, lw=1.2)
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_xlabel("PPO step", fontsize=8)
    for ax in list(axes.flat)[len(CURVES):]:
        ax.axis("off")
    fig.suptitle("fastrlhf PPO: " + os.path.basename(os.path.dirname(os.path.abspath(png_path))))
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return True
