"""Small helpers shared by the Triton kernels (from fastrlhf: only the leaf fastrlhf.tables)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..tables import acc_dtype

_TL = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tl_dtype(dtype: torch.dtype):
    return _TL[dtype]


# Accumulation / output dtype: float64 for float64 inputs, float32 otherwise (the one rule of
# fastrlhf.tables, a leaf module with no fastrlhf imports).
acc_dtype_of = acc_dtype


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


# Whether the kernels in this process were decorated in interpreter mode (fixed at import time).
INTERPRET_AT_IMPORT = interpreting()


@triton.jit
def scalar_to(x, ACC: tl.constexpr):
    """Round a scalar kernel argument (declared ``tl.float64`` so float64 compute stays exact) to
    the accumulation dtype once.  Adding to a typed zero keeps this valid in the interpreter,
    where ``x`` is a Python float."""
    return (tl.zeros([], ACC) + x).to(ACC)


@triton.jit
def row_offset(row, D1, D2, s0, s1, s2):
    """Element offset of row ``row`` of a ``[D0, D1, D2, V]`` strided view (64-bit: rows x V
    exceeds 2**31 at real sizes)."""
    row = row.to(tl.int64)
    i2 = row % D2
    r = row // D2
    i1 = r % D1
    i0 = r // D1
    return i0 * s0 + i1 * s1 + i2 * s2


@triton.jit
def row_softmax_stats(base, V, inv_temp, ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    """One streaming sweep over a row: ``(M, log S, H, bad)`` of ``softmax(x)``, ``x = row *
    inv_temp``, with ``S = sum exp(x - M)``, ``H`` the entropy and ``bad`` = the row holds a NaN.

    Every lane keeps its own running max ``m``, ``s = sum exp(x - m)`` and
    ``t = sum exp(x - m) (x - m)`` (the entropy's sum, relative to the running max so that offsets
    like +1e4 lose nothing), updated with a single ``exp`` per element; lanes merge once at the
    end: ``H = log S - T / S``.  ``x == -inf`` (masked vocab, padding lanes) contributes nothing.
    """
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), ACC)
    s = tl.zeros([BLOCK_V], ACC)
    t = tl.zeros([BLOCK_V], ACC)
    nan_seen = tl.zeros([BLOCK_V], tl.int1)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(ACC) * inv_temp
        nan_seen = nan_seen | (x != x)
        gt = x > m
        # the larger of (x, m) becomes the max; the other side is scaled by exp(-|x - m|)
        d = tl.exp(-tl.abs(x - m))
        d = tl.where(x == float("-inf"), 0.0, d)
        alpha = tl.where(gt, d, 1.0)
        e = tl.where(gt, 1.0, d)
        m_new = tl.where(gt, x, m)
        shift = tl.where(s > 0, m - m_new, 0.0)
        xm = tl.where(e > 0, x - m_new, 0.0)
        t = alpha * (t + shift * s) + e * xm
        s = s * alpha + e
        m = m_new
    M = tl.max(m, axis=0)
    w = tl.where(s > 0, tl.exp(m - M), 0.0)
    S = tl.sum(s * w, axis=0)
    Tsum = tl.sum(tl.where(s > 0, w * (t + (m - M) * s), 0.0), axis=0)
    log_s = tl.log(S)
    ent = log_s - Tsum / S
    bad = tl.max(nan_seen.to(tl.int32), axis=0) > 0
    return M, log_s, ent, bad
