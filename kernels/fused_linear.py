"""Triton kernels: token log-probs and entropy straight from hidden states (lm_head fused).

``logits = (hidden @ weight.T + bias) / T`` is never stored.  Shapes: hidden rows ``[N, H]``
addressed like ``kernels/logprobs.py`` rows (up to three strided leading dims ``(D0, D1, D2)``,
unit stride on H, so ``hidden[:, :-1]`` is read in place), weight ``[V, H]`` (unit stride on H),
bias ``[V]``.

Forward (``linear_logprobs_fwd``), two kernels:

1. ``_fwd_kernel``: program = (row tile of BLOCK_N rows, vocab split).  It walks its split's vocab
   tiles; for each it forms the ``[BLOCK_N, BLOCK_V]`` logits tile with ``tl.dot`` over H
   (fp32 accumulation), then folds the tile into per-row running state: max ``m``,
   ``s = sum exp(x - m)``, ``t = sum exp(x - m) (x - m)`` (the entropy's sum, kept relative to the
   running max like the logits kernel) and the target logit (gathered from the tile that holds
   it).  One partial ``(m, s, t, x_tok)`` per (row, split) is written: ``[S, 4, N]`` fp32.
2. ``_merge_kernel`` combines the S partials of each row in a fixed order (deterministic, no
   atomics): ``M = max m_i``, ``S = sum s_i e^(m_i - M)``,
   ``T = sum e^(m_i - M) (t_i + (m_i - M) s_i)``; ``logp = (x_tok - M) - log S``,
   ``H = log S - T / S``; the logsumexp is kept as the pair ``(M, log S)``.

Program order puts the split index fastest, so the ~SM-count programs resident at once cover a
few row tiles and all splits: their hidden rows stay in L2 while weight tiles stream past.

Backward (``linear_logprobs_bwd``), per vocab chunk of ``Vc`` columns (``N * Vc`` of the order of
``N * H``, so memory stays O(N*H + V*H)):

3. ``_dlogits_kernel`` recomputes the chunk's logits tiles and writes
   ``dlogits = (dlogp (onehot - p) - dH p (log p + H)) / T`` into a ``[N, Vc]`` scratch buffer
   in the input dtype (bf16 inputs: bf16, as eager autograd would store the logits gradient).
4. ``_dh_kernel``: ``dH (+)= dlogits_c @ W_c``, program per (row tile, H tile), fp32 accumulator
   carried across chunks in an fp32 ``[N, H]`` buffer (only when there is more than one chunk).
5. ``_dw_kernel``: ``dW_c = dlogits_c^T @ hidden``, program per (vocab tile, H tile) reducing
   over all N (fp32), and ``db_c = sum_n dlogits_c`` from the same operand loads.

Every output element is owned by exactly one program and reductions run in a fixed order: the
results are bitwise reproducible run to run (for a given N, V, H and device).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .utils import acc_dtype_of, cdiv, interpreting, max_nan, tl_dtype

__all__ = ["linear_logprobs_fwd", "linear_logprobs_bwd", "dot_precision", "AOT_SPECS"]

# GPU tiles: 128 x 128 logits tiles, K step 64, 8 warps, 3-stage pipeline (96 KiB shared for
# bf16).  The interpreter runs numpy per block: small blocks keep CPU tests quick and still
# exercise several row / vocab / K tiles, splits and chunks at tiny shapes.
BLOCK_N, BLOCK_V, BLOCK_K = 128, 128, 64
BLOCK_K_FP32 = 32  # same shared-memory bytes per stage as bf16 at BLOCK_K (and no spills)
FP64_BLOCKS = (32, 64, 16)  # fp64 (FMA dot): 4 warps, no spills
# fp32 under torch's default matmul precision ("highest" -> PREC="ieee"): exact fp32 products on
# FMA units, not tensor cores; the tf32 tiles would need 255 registers and spill there.
FP32_IEEE_BLOCKS = (64, 64, 16)
FP32_IEEE_OPTS = {"num_warps": 4, "num_stages": 1}
NUM_WARPS, NUM_STAGES = 8, 3
GROUP_M = 8  # row tiles per group in the grouped (L2-friendly) order of the GEMM kernels
INTERP_BLOCKS = (16, 32, 16)
INTERP_GROUP = 2  # several (and a partial) tile groups at test sizes
MIN_SPLITS = 8          # forward: vocab splits at least (see the module docstring)
CHUNK_MIN_ELEMS = 1 << 25  # backward: scratch of at least this many elements per chunk ...
CHUNK_H_FACTOR = 2         # ... or 2 * N * H, whichever is larger


# ---------------------------------------------------------------------------------------------
# shared device helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _row_offsets(rows, D1, D2, s0, s1, s2):
    r = rows.to(tl.int64)
    i2 = r % D2
    q = r // D2
    return (q // D1) * s0 + (q % D1) * s1 + i2 * s2


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, hoff, rmask, cols, cmask, H, w_stride, inv_temp,
                 HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """x[i, j] = (hidden[row_i] . weight[col_j] + bias[col_j]) * inv_temp, fp32 (fp64) acc."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], ACC)
    woff = cols.to(tl.int64) * w_stride
    ks0 = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + ks0
        kmask = ks < H
        a = tl.load(h_ptr + (hoff[:, None] + ks[None, :]),
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + (woff[None, :] + ks[:, None]),
                    mask=cmask[None, :] & kmask[:, None], other=0.0)
        if UPCAST:  # the interpreter cannot multiply bf16 / fp16
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)
    x = acc * inv_temp
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
        x += bias[None, :] * inv_temp
    return x


@triton.jit
def _grouped(pid, n_m, n_n, GROUP: tl.constexpr):
    """Grouped ordering of a 2-D tile grid: GROUP row tiles share each column tile in L2."""
    width = GROUP * n_n
    group = pid // width
    first = group * GROUP
    size = tl.minimum(n_m - first, GROUP)
    pid_m = first + (pid % width) % size
    pid_n = (pid % width) // size
    return pid_m, pid_n


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["n_rows", "D1", "D2", "n_splits", "v_per_split"])
def _fwd_kernel(
    h_ptr, w_ptr, b_ptr, tok_ptr, part_ptr,
    n_rows, V, H, D1, D2, s0, s1, s2, w_stride,
    n_splits, v_per_split, inv_temp, inv_temp_ptr,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    if ACC == tl.float64:
        # a float argument arrives as fp32: float64 compute reads the exact value from memory
        inv_temp = tl.load(inv_temp_ptr)
    pid = tl.program_id(0)
    split = pid % n_splits
    tile = pid // n_splits
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    hoff = _row_offsets(rows, D1, D2, s0, s1, s2)
    tok = tl.load(tok_ptr + rows, mask=rmask, other=-1)
    tok = tl.where((tok >= 0) & (tok < V), tok, -1).to(tl.int32)  # 32-bit compares per tile

    NEG: tl.constexpr = float("-inf")
    m = tl.full([BLOCK_N], NEG, ACC)
    s = tl.zeros([BLOCK_N], ACC)
    t = tl.zeros([BLOCK_N], ACC)
    xt = tl.full([BLOCK_N], NEG, ACC)
    v_begin = split * v_per_split
    v_end = tl.minimum(V, v_begin + v_per_split)
    vv = tl.arange(0, BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + vv
        cmask = cols < v_end
        x = _logits_tile(h_ptr, w_ptr, b_ptr, hoff, rmask, cols, cmask, H, w_stride, inv_temp,
                         HAS_BIAS, ACC, PREC, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        x = tl.where(cmask[None, :], x, NEG)
        # tl.max drops NaN on the GPU (a NaN logit still makes p, so s, NaN); the running max
        # itself propagates an all-NaN tile's NaN: every statistic of that row only is NaN
        m_new = max_nan(m, tl.max(x, axis=1))
        m_ref = tl.where(m_new == NEG, 0.0, m_new)     # rows with nothing finite yet
        alpha = tl.exp(m - m_ref)                      # m = -inf -> 0
        d = x - m_ref[:, None]
        p = tl.exp(d)                                  # x = -inf -> 0; NaN stays NaN
        shift = tl.where(s > 0, m - m_ref, 0.0)
        # p * d with p = 0 at d = -inf must give 0 (not NaN): clamp d, which leaves every term
        # with p > 0 unchanged (p > 0 needs d > -104).
        t = alpha * (t + shift * s) + tl.sum(p * tl.maximum(d, -1e30), axis=1)
        s = alpha * s + tl.sum(p, axis=1)
        m = m_new
        hit = cols[None, :] == tok[:, None]
        xt = tl.maximum(xt, tl.max(tl.where(hit, x, NEG), axis=1))

    base = part_ptr + split.to(tl.int64) * 4 * n_rows + rows
    tl.store(base, m, mask=rmask)
    tl.store(base + n_rows, s, mask=rmask)
    tl.store(base + 2 * n_rows, t, mask=rmask)
    tl.store(base + 3 * n_rows, xt, mask=rmask)


@triton.jit(do_not_specialize=["n_rows", "n_splits"])
def _merge_kernel(
    part_ptr, tok_ptr, logp_ptr, ent_ptr, lse_ptr,
    n_rows, n_splits, V, ignore_index,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    NEG: tl.constexpr = float("-inf")
    M = tl.full([BLOCK_R], NEG, ACC)
    for i in range(n_splits):
        m_i = tl.load(part_ptr + i * 4 * n_rows + rows, mask=rmask, other=NEG)
        M = max_nan(M, m_i)
    M_ref = tl.where(M == NEG, 0.0, M)
    S = tl.zeros([BLOCK_R], ACC)
    T = tl.zeros([BLOCK_R], ACC)
    XT = tl.full([BLOCK_R], NEG, ACC)
    for i in range(n_splits):
        b = part_ptr + i * 4 * n_rows + rows
        m_i = tl.load(b, mask=rmask, other=NEG)
        s_i = tl.load(b + n_rows, mask=rmask, other=0.0)
        t_i = tl.load(b + 2 * n_rows, mask=rmask, other=0.0)
        x_i = tl.load(b + 3 * n_rows, mask=rmask, other=NEG)
        empty = s_i == 0  # a split with nothing finite (NaN s_i is not empty: it propagates)
        w = tl.where(empty, 0.0, tl.exp(m_i - M_ref))
        S += w * s_i
        T += w * (t_i + tl.where(empty, 0.0, (m_i - M_ref) * s_i))
        XT = max_nan(XT, x_i)
    log_s = tl.log(S)
    tl.store(lse_ptr + 2 * rows, M, mask=rmask)
    tl.store(lse_ptr + 2 * rows + 1, log_s, mask=rmask)
    tl.store(ent_ptr + rows, log_s - T / S, mask=rmask)
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    valid = (tok >= 0) & (tok < V)
    logp = tl.where(valid, (XT - M_ref) - log_s, float("nan"))
    logp = tl.where(log_s != log_s, float("nan"), logp)
    logp = tl.where(tok == ignore_index, 0.0, logp)
    tl.store(logp_ptr + rows, logp, mask=rmask)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["n_rows", "D1", "D2", "c0", "c_len"])
def _dlogits_kernel(
    h_ptr, w_ptr, b_ptr, tok_ptr, dlogp_ptr, dent_ptr, lse_ptr, ent_ptr, dl_ptr,
    n_rows, V, H, D1, D2, s0, s1, s2, w_stride, c0, c_len, ld_dl,
    inv_temp, inv_temp_ptr, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_DLOGP: tl.constexpr, HAS_DENT: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    if ACC == tl.float64:
        inv_temp = tl.load(inv_temp_ptr)  # exact (see _fwd_kernel)
    n_m = tl.cdiv(n_rows, BLOCK_N)
    n_v = tl.cdiv(c_len, BLOCK_V)
    pid_m, pid_v = _grouped(tl.program_id(0), n_m, n_v, GROUP)
    rows = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    lc = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column within the chunk
    cmask = lc < c_len
    cols = c0 + lc
    hoff = _row_offsets(rows, D1, D2, s0, s1, s2)
    x = _logits_tile(h_ptr, w_ptr, b_ptr, hoff, rmask, cols, cmask, H, w_stride, inv_temp,
                     HAS_BIAS, ACC, PREC, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
    # The same select as the forward's, between the scale's multiply and the subtract below:
    # without it the compiler fuses acc * (1 / T) - M into one FMA (exact product) while the
    # forward's statistics saw the rounded product, and the row's largest logit gets log p off
    # by up to half an ulp of x / T, times 1 / T in the gradient (compiled-code analysis, sm_90:
    # fma.rn.f32 on the inv_temp register here before, none after).  Masked columns: p = 0.
    x = tl.where(cmask[None, :], x, float("-inf"))
    row_max = tl.load(lse_ptr + 2 * rows, mask=rmask, other=0.0)
    log_s = tl.load(lse_ptr + 2 * rows + 1, mask=rmask, other=0.0)
    z = (x - row_max[:, None]) - log_s[:, None]
    p = tl.exp(z)
    g = tl.zeros([BLOCK_N, BLOCK_V], ACC)
    if HAS_DLOGP:
        tok = tl.load(tok_ptr + rows, mask=rmask, other=-1)
        g_lp = tl.load(dlogp_ptr + rows, mask=rmask, other=0.0).to(ACC)
        g_lp = tl.where(tok == ignore_index, 0.0, g_lp)
        tok = tl.where((tok >= 0) & (tok < V), tok, -1).to(tl.int32)
        g = -g_lp[:, None] * p
        g = tl.where(cols[None, :] == tok[:, None], g + g_lp[:, None], g)
    if HAS_DENT:
        g_h = tl.load(dent_ptr + rows, mask=rmask, other=0.0).to(ACC)
        ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0).to(ACC)
        # d H / d x_j = -p_j (log p_j + H); p_j = 0 (x = -inf) contributes exactly 0.
        g -= g_h[:, None] * tl.where(p > 0, p * (z + ent[:, None]), 0.0)
    # Columns past the chunk's end (up to the tile's end) get exact zeros: the GEMMs then read
    # whole tiles without a column mask, which keeps their loads vectorized.
    g = tl.where(cmask[None, :], g * inv_temp, 0.0)
    out = dl_ptr + (rows.to(tl.int64) * ld_dl)[:, None] + lc[None, :]
    tl.store(out, g.to(dl_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit(do_not_specialize=["n_rows", "c0", "c_len"])
def _dh_kernel(
    dl_ptr, w_ptr, acc_ptr, out_ptr,
    n_rows, H, c0, c_len, ld_dl, w_stride,
    ACCUMULATE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """out[N, H] = (acc[N, H] if ACCUMULATE) + dl[:, :c_len] @ weight[c0 : c0 + c_len, :]."""
    n_m = tl.cdiv(n_rows, BLOCK_M)
    n_h = tl.cdiv(H, BLOCK_H)
    pid_m, pid_h = _grouped(tl.program_id(0), n_m, n_h, GROUP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hs < H
    ks0 = tl.arange(0, BLOCK_K)
    a_base = dl_ptr + (rows.to(tl.int64) * ld_dl)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_H], ACC)
    for k0 in range(0, c_len, BLOCK_K):
        ks = k0 + ks0
        kmask = ks < c_len
        a = tl.load(a_base + ks[None, :], mask=rmask[:, None], other=0.0)  # zero-padded cols
        b = tl.load(w_ptr + ((c0 + ks).to(tl.int64) * w_stride)[:, None] + hs[None, :],
                    mask=kmask[:, None] & hmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)
    off = (rows.to(tl.int64) * H)[:, None] + hs[None, :]
    omask = rmask[:, None] & hmask[None, :]
    if ACCUMULATE:
        acc += tl.load(acc_ptr + off, mask=omask, other=0.0)
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["n_rows", "D1", "D2", "c0", "c_len"])
def _dw_kernel(
    dl_ptr, h_ptr, dw_ptr, db_ptr,
    n_rows, H, D1, D2, s0, s1, s2, c0, c_len, ld_dl, dw_stride,
    HAS_DW: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    """dW[c0 + j, :] = sum_n dl[n, j] hidden[n, :];  db[c0 + j] = sum_n dl[n, j].

    Without HAS_DW the grid has one H tile per vocab tile and only db is computed."""
    n_v = tl.cdiv(c_len, BLOCK_V)
    if HAS_DW:
        pid_v, pid_h = _grouped(tl.program_id(0), n_v, tl.cdiv(H, BLOCK_H), GROUP)
    else:
        pid_v = tl.program_id(0)
        pid_h = 0
    lc = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = lc < c_len
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hs < H
    ks0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_V, BLOCK_H], ACC)
    db = tl.zeros([BLOCK_V], ACC)
    for k0 in range(0, n_rows, BLOCK_K):
        ks = k0 + ks0  # rows of hidden / dl
        kmask = ks < n_rows
        # [BLOCK_V, BLOCK_K]; columns past c_len read the zeros the dlogits kernel wrote
        a = tl.load(dl_ptr + (ks.to(tl.int64) * ld_dl)[None, :] + lc[:, None],
                    mask=kmask[None, :], other=0.0)
        if HAS_BIAS:
            db += tl.sum(a.to(ACC), axis=1)
        if HAS_DW:
            hoff = _row_offsets(ks, D1, D2, s0, s1, s2)
            b = tl.load(h_ptr + hoff[:, None] + hs[None, :],
                        mask=kmask[:, None] & hmask[None, :], other=0.0)      # [BLOCK_K, BLOCK_H]
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)
    cols = (c0 + lc).to(tl.int64)
    if HAS_DW:
        off = (cols * dw_stride)[:, None] + hs[None, :]
        tl.store(dw_ptr + off, acc.to(dw_ptr.dtype.element_ty),
                 mask=cmask[:, None] & hmask[None, :])
    if HAS_BIAS:
        if HAS_DW:
            cmask = cmask & ((lc * 0 + pid_h) == 0)
        tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=cmask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _ieee_fp32(dtype) -> bool:
    return dtype == torch.float32 and dot_precision(dtype) == "ieee"


def _blocks(dtype):
    if interpreting():
        return INTERP_BLOCKS
    if dtype == torch.float64:  # no fp64 tensor-core path: small FMA tiles (tests, mostly)
        return FP64_BLOCKS
    if _ieee_fp32(dtype):
        return FP32_IEEE_BLOCKS
    return BLOCK_N, BLOCK_V, (BLOCK_K if dtype in (torch.bfloat16, torch.float16) else BLOCK_K_FP32)


def _launch_opts(dtype):
    if interpreting():
        return {}
    if dtype == torch.float64:
        return {"num_warps": 4, "num_stages": 2}
    if _ieee_fp32(dtype):
        return dict(FP32_IEEE_OPTS)
    return {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 operands follow torch's matmul setting (``"highest"``
    -> exact fp32 products, otherwise tf32 tensor cores); other dtypes multiply exactly."""
    if dtype == torch.float32 and not interpreting():
        if torch.get_float32_matmul_precision() != "highest":
            return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype in (torch.float16, torch.bfloat16)


def num_splits(n_rows: int, V: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """(splits, columns per split): the vocab cut into splits of whole BLOCK_V tiles."""
    bn, bv, _ = _blocks(dtype)
    n_vt = cdiv(V, bv)
    if interpreting() or device.type != "cuda":
        want = 3  # exercises the merge at tiny V
    else:
        want = max(MIN_SPLITS, cdiv(2 * _sm_count(device.index or 0), cdiv(n_rows, bn)))
    tiles_per = cdiv(n_vt, max(1, min(want, n_vt)))
    return cdiv(n_vt, tiles_per), tiles_per * bv


def chunk_columns(n_rows: int, H: int, V: int, dtype: torch.dtype) -> int:
    """Vocab columns per backward chunk: scratch ``[N, Vc]`` of at most
    ``max(CHUNK_H_FACTOR * N * H, CHUNK_MIN_ELEMS)`` elements (whole tiles, at least one)."""
    _, bv, _ = _blocks(dtype)
    budget = max(CHUNK_H_FACTOR * n_rows * H, CHUNK_MIN_ELEMS if not interpreting() else 0)
    vc = (budget // max(n_rows, 1)) // bv * bv
    return max(bv, min(vc, cdiv(V, bv) * bv))


def _exact_scalar(value: float, acc, dummy):
    """A float64 scalar argument as a one-element device tensor (``torch.full``: a fill launch,
    no host-device copy) for float64 compute; ``dummy`` (never read) otherwise."""
    if acc != torch.float64:
        return dummy
    return torch.full((1,), float(value), dtype=torch.float64, device=dummy.device)


def linear_logprobs_fwd(hidden, dims, strides, weight, bias, tokens, inv_temp, ignore_index):
    """Launch the forward: hidden rows described by ``dims``/``strides`` (unit stride on H),
    weight [V, H] (unit stride on H), bias [V] or None, tokens contiguous int [N].

    Returns (logp, entropy, lse) -- [N], [N], [N, 2] (row max M, log S) in the accumulation dtype.
    """
    D0, D1, D2 = dims
    n_rows = D0 * D1 * D2
    V, H = weight.shape
    acc = acc_dtype_of(hidden.dtype)
    dev = hidden.device
    logp = torch.empty(n_rows, dtype=acc, device=dev)
    ent = torch.empty(n_rows, dtype=acc, device=dev)
    lse = torch.empty(n_rows, 2, dtype=acc, device=dev)
    if n_rows == 0:
        return logp, ent, lse
    bn, bv, bk = _blocks(hidden.dtype)
    splits, per = num_splits(n_rows, V, dev, hidden.dtype)
    part = torch.empty(splits, 4, n_rows, dtype=acc, device=dev)
    grid = (cdiv(n_rows, bn) * splits,)
    _fwd_kernel[grid](
        hidden, weight, bias if bias is not None else weight, tokens, part,
        n_rows, V, H, D1, D2, strides[0], strides[1], strides[2], weight.stride(0),
        splits, per, inv_temp, _exact_scalar(inv_temp, acc, part),
        HAS_BIAS=bias is not None, ACC=tl_dtype(acc), PREC=dot_precision(hidden.dtype),
        UPCAST=_upcast(hidden.dtype), BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk,
        **_launch_opts(hidden.dtype))
    block_r = 1024 if not interpreting() else 16
    _merge_kernel[(cdiv(n_rows, block_r),)](
        part, tokens, logp, ent, lse, n_rows, splits, V, ignore_index,
        ACC=tl_dtype(acc), BLOCK_R=block_r, num_warps=4)
    return logp, ent, lse


def linear_logprobs_bwd(hidden, dims, strides, weight, bias, tokens, dlogp, dent, lse, ent,
                        inv_temp, ignore_index, need_dh, need_dw, need_db, chunk=None):
    """Launch the backward; returns (dhidden [N, H] contiguous or None, dweight [V, H] or None,
    dbias [V] or None), in the dtypes of hidden / weight / bias.

    ``dlogp`` / ``dent``: contiguous [N] upstream gradients (either may be None).  ``chunk``
    overrides :func:`chunk_columns` (tests).
    """
    D0, D1, D2 = dims
    n_rows = D0 * D1 * D2
    V, H = weight.shape
    dev = hidden.device
    acc = acc_dtype_of(hidden.dtype)
    dh = torch.empty(n_rows, H, dtype=hidden.dtype, device=dev) if need_dh else None
    dw = torch.empty(V, H, dtype=weight.dtype, device=dev) if need_dw else None
    db = torch.empty(V, dtype=bias.dtype, device=dev) if need_db else None
    if n_rows == 0 or (dlogp is None and dent is None):
        for t in (dh, dw, db):
            if t is not None:
                t.zero_()
        return dh, dw, db
    if not (need_dh or need_dw or need_db):
        return dh, dw, db
    bn, bv, bk = _blocks(hidden.dtype)
    vc = chunk if chunk is not None else chunk_columns(n_rows, H, V, hidden.dtype)
    if vc <= 0 or vc % bv:
        raise ValueError(f"chunk must be a positive multiple of BLOCK_V={bv}, got {vc}")
    n_chunks = cdiv(V, vc)
    prec = dot_precision(hidden.dtype)
    up = _upcast(hidden.dtype)
    ACC = tl_dtype(acc)
    opts = _launch_opts(hidden.dtype)
    group = INTERP_GROUP if interpreting() else GROUP_M
    scratch = torch.empty(n_rows, vc, dtype=hidden.dtype, device=dev)
    dh_acc = None
    if need_dh and n_chunks > 1:
        dh_acc = dh if dh.dtype == acc else torch.empty(n_rows, H, dtype=acc, device=dev)
    dummy = lse
    inv_temp_t = _exact_scalar(inv_temp, acc, lse)
    need_dw_kernel = need_dw or need_db
    for c in range(n_chunks):
        c0 = c * vc
        c_len = min(vc, V - c0)
        grid = (cdiv(n_rows, bn) * cdiv(c_len, bv),)
        _dlogits_kernel[grid](
            hidden, weight, bias if bias is not None else dummy, tokens,
            dlogp if dlogp is not None else dummy, dent if dent is not None else dummy,
            lse, ent, scratch,
            n_rows, V, H, D1, D2, strides[0], strides[1], strides[2], weight.stride(0),
            c0, c_len, vc, inv_temp, inv_temp_t, ignore_index,
            HAS_BIAS=bias is not None, HAS_DLOGP=dlogp is not None, HAS_DENT=dent is not None,
            ACC=ACC, PREC=prec, UPCAST=up, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, GROUP=group,
            **opts)
        if need_dh:
            last = c == n_chunks - 1
            out = dh if (last or dh_acc is None) else dh_acc
            _dh_kernel[(cdiv(n_rows, bn) * cdiv(H, bv),)](
                scratch, weight, dh_acc if dh_acc is not None else dh, out,
                n_rows, H, c0, c_len, vc, weight.stride(0),
                ACCUMULATE=c > 0, ACC=ACC, PREC=prec, UPCAST=up,
                BLOCK_M=bn, BLOCK_H=bv, BLOCK_K=bk, GROUP=group, **opts)
        if need_dw_kernel:
            _dw_kernel[(cdiv(c_len, bv) * (cdiv(H, bv) if need_dw else 1),)](
                scratch, hidden, dw if need_dw else dummy, db if need_db else dummy,
                n_rows, H, D1, D2, strides[0], strides[1], strides[2], c0, c_len, vc, H,
                HAS_DW=need_dw, HAS_BIAS=need_db, ACC=ACC, PREC=prec, UPCAST=up,
                BLOCK_V=bv, BLOCK_H=bv, BLOCK_K=bk, GROUP=group, **opts)
    return dh, dw, db


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (the tests compile these for sm_90 / sm_80 without a GPU and
# read registers, spills and the SASS).  Production case: 16-byte aligned pointers and strides,
# H a multiple of 16 (Triton specializes such integer arguments the same way at run time; the
# per-batch sizes and chunk offsets are do_not_specialize and declared without alignment).
# The tl.dot operands are loaded with 128-bit cp.async (LDGSTS), not LDG, so these specs carry
# no "stream_dtype"; "dot_operands" marks them for tests/test_fused_linear.py, which checks the
# cp.async width and the tensor-core instructions (HGMMA on sm_90, HMMA on sm_80).
# ---------------------------------------------------------------------------------------------

def _aot_specs():
    specs = []
    opts = dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    rows = {"n_rows": "i32", "V": "i32", "H": "i32", "D1": "i32", "D2": "i32",
            "s0": "i64", "s1": "i64", "s2": "i64", "w_stride": "i32"}
    base_opts = opts
    for dt, prec in (("bf16", "ieee"), ("fp32", "tf32"), ("fp32", "ieee")):
        bk = BLOCK_K if dt == "bf16" else BLOCK_K_FP32
        blocks = dict(BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_K=bk)
        BN, BV = BLOCK_N, BLOCK_V
        opts = base_opts
        tag = dt
        if dt == "fp32" and prec == "ieee":  # torch's default fp32 matmul precision
            BN, BV, bk = FP32_IEEE_BLOCKS
            blocks = dict(BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=bk)
            opts = dict(FP32_IEEE_OPTS)
            tag = "fp32-ieee"
        for bias in (True, False):
            specs.append(dict(
                name=f"fused_linear_fwd[{tag},bias={bias}]", fn=_fwd_kernel,
                signature={"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}",
                           "tok_ptr": "*i64", "part_ptr": "*fp32", **rows,
                           "n_splits": "i32", "v_per_split": "i32", "inv_temp": "fp32", "inv_temp_ptr": "*fp32",
                           "HAS_BIAS": "constexpr", "ACC": "constexpr", "PREC": "constexpr",
                           "UPCAST": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr",
                           "BLOCK_K": "constexpr"},
                constexprs={"HAS_BIAS": bias, "ACC": tl.float32, "PREC": prec, "UPCAST": False,
                            **blocks},
                aligned=["h_ptr", "w_ptr", "b_ptr", "tok_ptr", "part_ptr", "H", "s0", "s1", "s2",
                         "w_stride"],
                dot_operands=dt, **opts))
        for bias, has_lp, has_ent in ((True, True, True), (False, True, False),
                                      (False, False, True)):
            specs.append(dict(
                name=f"fused_linear_dlogits[{tag},bias={bias},dlogp={has_lp},dent={has_ent}]",
                fn=_dlogits_kernel,
                signature={"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}",
                           "tok_ptr": "*i64", "dlogp_ptr": "*fp32", "dent_ptr": "*fp32",
                           "lse_ptr": "*fp32", "ent_ptr": "*fp32", "dl_ptr": f"*{dt}",
                           **rows, "c0": "i32", "c_len": "i32", "ld_dl": "i32",
                           "inv_temp": "fp32", "inv_temp_ptr": "*fp32", "ignore_index": "i64",
                           "HAS_BIAS": "constexpr", "HAS_DLOGP": "constexpr",
                           "HAS_DENT": "constexpr", "ACC": "constexpr", "PREC": "constexpr",
                           "UPCAST": "constexpr", "BLOCK_N": "constexpr",
                           "BLOCK_V": "constexpr", "BLOCK_K": "constexpr",
                           "GROUP": "constexpr"},
                constexprs={"HAS_BIAS": bias, "HAS_DLOGP": has_lp, "HAS_DENT": has_ent,
                            "ACC": tl.float32, "PREC": prec, "UPCAST": False, **blocks,
                            "GROUP": GROUP_M},
                aligned=["h_ptr", "w_ptr", "b_ptr", "tok_ptr", "dlogp_ptr", "dent_ptr",
                         "lse_ptr", "ent_ptr", "dl_ptr", "H", "s0", "s1", "s2", "w_stride",
                         "ld_dl"],
                dot_operands=dt, **opts))
        outs = ((False, "fp32"), (True, "fp32")) + (((True, dt), (False, dt)) if dt != "fp32"
                                                       else ())
        for accumulate, out in outs:
            specs.append(dict(
                name=f"fused_linear_dh[{tag},accumulate={accumulate},out={out}]", fn=_dh_kernel,
                signature={"dl_ptr": f"*{dt}", "w_ptr": f"*{dt}", "acc_ptr": "*fp32",
                           "out_ptr": f"*{out}", "n_rows": "i32", "H": "i32", "c0": "i32",
                           "c_len": "i32", "ld_dl": "i32", "w_stride": "i32",
                           "ACCUMULATE": "constexpr", "ACC": "constexpr", "PREC": "constexpr",
                           "UPCAST": "constexpr", "BLOCK_M": "constexpr", "BLOCK_H": "constexpr",
                           "BLOCK_K": "constexpr", "GROUP": "constexpr"},
                constexprs={"ACCUMULATE": accumulate, "ACC": tl.float32, "PREC": prec,
                            "UPCAST": False, "BLOCK_M": BN, "BLOCK_H": BV,
                            "BLOCK_K": bk, "GROUP": GROUP_M},
                aligned=["dl_ptr", "w_ptr", "acc_ptr", "out_ptr", "H", "ld_dl", "w_stride"],
                dot_operands=dt, **opts))
        for has_dw, bias in ((True, True), (True, False), (False, True)):
            specs.append(dict(
                name=f"fused_linear_dw[{tag},dw={has_dw},bias={bias}]", fn=_dw_kernel,
                signature={"dl_ptr": f"*{dt}", "h_ptr": f"*{dt}", "dw_ptr": f"*{dt}",
                           "db_ptr": f"*{dt}", "n_rows": "i32", "H": "i32", "D1": "i32",
                           "D2": "i32", "s0": "i64", "s1": "i64", "s2": "i64", "c0": "i32",
                           "c_len": "i32", "ld_dl": "i32", "dw_stride": "i32",
                           "HAS_DW": "constexpr", "HAS_BIAS": "constexpr", "ACC": "constexpr",
                           "PREC": "constexpr", "UPCAST": "constexpr", "BLOCK_V": "constexpr",
                           "BLOCK_H": "constexpr", "BLOCK_K": "constexpr", "GROUP": "constexpr"},
                constexprs={"HAS_DW": has_dw, "HAS_BIAS": bias, "ACC": tl.float32, "PREC": prec,
                            "UPCAST": False, "BLOCK_V": BV, "BLOCK_H": BV,
                            "BLOCK_K": bk, "GROUP": GROUP_M},
                aligned=["dl_ptr", "h_ptr", "dw_ptr", "db_ptr", "H", "s0", "s1", "s2", "ld_dl",
                         "dw_stride"],
                dot_operands=dt if has_dw else None, **opts))
    specs.append(dict(
        name="fused_linear_merge", fn=_merge_kernel,
        signature={"part_ptr": "*fp32", "tok_ptr": "*i64", "logp_ptr": "*fp32",
                   "ent_ptr": "*fp32", "lse_ptr": "*fp32", "n_rows": "i32", "n_splits": "i32",
                   "V": "i32", "ignore_index": "i64", "ACC": "constexpr", "BLOCK_R": "constexpr"},
        constexprs={"ACC": tl.float32, "BLOCK_R": 1024},
        aligned=["part_ptr", "tok_ptr", "logp_ptr", "ent_ptr", "lse_ptr"],
        num_warps=4))
    return specs


AOT_SPECS = _aot_specs
