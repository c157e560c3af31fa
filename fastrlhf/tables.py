"""Names, codes and dtype rules shared by every layer of fastrlhf, defined once.

The op layer (:mod:`fastrlhf.ops`), the reference (:mod:`fastrlhf.reference`), the Triton
launchers (:mod:`fastrlhf.kernels`), the native binding layer (:mod:`fastrlhf.native`) and the
integrations all read these tables; none of them keeps a copy.  This module imports nothing from
fastrlhf (only torch), so any layer may import it without creating a cycle.
"""

from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "INT_DTYPES", "MASK_DTYPES", "ID_DTYPES", "acc_dtype", "KL_BASE",
           "KL_KINDS", "KL_CODES", "AGG_MODES", "AGG_MODE_IDS", "AGG_KWARGS", "RATIO_LEVELS",
           "GROUP_ADV_KINDS", "MASKED_EPS", "BACKENDS", "FUSED_STATS", "FUSED_AUX_ROWS",
           "FUSED_AUX", "FUSED_TERM_ROWS"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)
# A mask may be bool, any integer type or floating (a float mask weights each element).
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Group ids of group_advantages.
ID_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def acc_dtype(*args) -> torch.dtype:
    """The accumulation (and output) dtype rule of every op: float64 if any argument is float64,
    else float32.  Arguments are dtypes or tensors; None is skipped."""
    for a in args:
        if a is None:
            continue
        if (a.dtype if isinstance(a, torch.Tensor) else a) == torch.float64:
            return torch.float64
    return torch.float32


# KL estimators: accepted names -> canonical base kind.  A trailing "+" selects the
# straight-through variant (the base kind's value with k2's gradient).
KL_BASE = {"k1": "k1", "kl": "k1", "abs": "abs", "k2": "k2", "mse": "k2", "k3": "k3",
           "low_var_kl": "k3"}
KL_KINDS = tuple(KL_BASE) + tuple(f"{k}+" for k in KL_BASE)
# Codes of the base kinds in the Triton kernels and the C++ sources (csrc/ppo_terms.h).
KL_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}

# Loss aggregation modes (verl 0.9 agg_loss) and their codes in the kernels / C++ sources.
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm")
AGG_MODE_IDS = {mode: i for i, mode in enumerate(AGG_MODES)}
# Keyword arguments of the aggregation (verl's global-batch arguments).
AGG_KWARGS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
RATIO_LEVELS = ("token", "sequence")
GROUP_ADV_KINDS = ("grpo", "dr_grpo", "rloo")
# verl: the masked_mean denominator's epsilon (also whitening and seq-mean-token-mean).
MASKED_EPS = 1e-8

BACKENDS = ("auto", "triton", "native", "reference")
# Keys of the stats dict of fused_ppo_loss / fused_linear_ppo_loss: per-token [B, T] tensors,
# then 0-dim scalars.
FUSED_STATS = ("logp", "entropy", "kl", "clipfrac", "clipfrac_lower", "approx_kl", "entropy_mean",
               "kl_mean")

# Rows of the fused losses' per-token output buffer ``aux [rows, N]``, written by the Triton
# kernel (kernels/fused_loss.py: the first nine) and the native loop (csrc/native.h, enum
# FusedAux; the extension reports its names, and fastrlhf.native refuses a build whose list
# differs).  The first seven are the per-token terms; ``g_lp`` / ``g_h`` (d loss / d logp,
# d loss / d H) and the row statistics ``M`` / ``logS`` (max, log sum exp) are the inputs of a
# deferred gradient sweep (grad_timing="backward").
FUSED_AUX_ROWS = ("loss", "logp", "entropy", "kl", "clipped", "clipped_lower", "approx_kl",
                  "g_lp", "g_h", "M", "logS")
FUSED_AUX = {name: i for i, name in enumerate(FUSED_AUX_ROWS)}
FUSED_TERM_ROWS = FUSED_AUX["approx_kl"] + 1  # the per-token terms: the rows without defer
