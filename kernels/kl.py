"""Triton kernels: KL estimators on sampled log-probs, and the exact full-vocabulary KL.

``kl_penalty``: fused elementwise forward / backward over flat contiguous ``[n]`` tensors.  With
``x = logp``, ``y = ref_logp``, ``d = x - y`` (KIND codes in :data:`KINDS`)::

    k1   v = d                      dv/dx =  1                   dv/dy = -dv/dx
    abs  v = |d|                    dv/dx =  sign(d)  (0 at d = 0 and for NaN, like torch)
    k2   v = d^2 / 2                dv/dx =  d
    k3   k = clamp(y - x, -20, 20)  v = clamp(exp(k) - k - 1, -10, 10)
                                    dv/dx = -(exp(k) - 1) * [-20 <= y - x <= 20]
                                                          * [-10 <= exp(k) - k - 1 <= 10]

The clamp masks are inclusive and false for NaN, exactly what ``torch.clamp``'s backward does.
Every program handles one block; blocks that lie wholly inside ``[0, n)`` run unmasked (so the
streams vectorize to 128-bit accesses whatever ``n`` is), only the last block is masked.

``full_kl``: one program per row of ``[N, V]`` logits (rows addressed with arbitrary strides, as
in :mod:`.logprobs`), one streaming pass over both rows.  With ``x = logits / T`` and
``y = ref_logits / T``, every thread loads four 128-bit vectors of each row per iteration and
keeps, per row, one running max and (relative to it, base-2 units, one FMA + one ``exp2`` per
element) the sum of exponentials, plus

    t = sum_j 2^(zx_j) (zx_j - zy_j)       (zx, zy the base-2 offsets from the running maxima)

with ``zx - zy`` clamped to +-1e30 (so ``p_j = 0`` and ``q_j = 0`` entries stay finite), and the
minimum of ``y``.  After merging the threads::

    KL = ln2 T / S_x - ln S_x + ln S_y      (= sum_j p_j (log p_j - log q_j))

The row's KL follows ``fastrlhf.reference.full_kl`` evaluated in the accumulation dtype: terms
with ``p_j = 0`` vanish -- also where ``p_j`` underflows against ``q_j = 0``; ``q_j = 0``
(``y_j = -inf``) under ``p_j = exp(log p_j) > 0`` gives ``+inf`` (only rows whose ``y`` holds a
``-inf`` are swept a second time, to find the largest such ``x_j``); a row that is entirely
``-inf`` in either tensor, or holds a NaN / +inf, gives NaN.  The kernel saves
``(M_x, log S_x, M_y, log S_y)`` per row; the backward recomputes ``log p_j`` and ``log q_j``
from them and writes the reference's autograd gradient:

    dKL/dlogits_j     = g p_j (log p_j - log q_j - KL) / T    (0 where p_j = 0)
    dKL/dref_logits_j = g (q_j P - p_j) / T                   (P = sum_j p_j: 1, or 0 when
                                                               the policy row is NaN)

-- in rows whose KL is NaN the policy gradient is NaN; in +inf rows it is -inf * sign(g) where
``p_j, q_j > 0`` and NaN elsewhere (``0 * inf``), exactly as autograd through the reference.
Nothing of size [N, V] besides the gradients is allocated.

Vocab parallelism (``PARTIAL``): on a slice of the vocab the forward instead stores the slice's
``T / S_x`` and the two flags (q = 0 under p > 0; NaN / +inf seen) next to the four maxima /
log-sums; ``fastrlhf.ops.kl`` (vocab-parallel mode) combines the slices and runs this backward unchanged
with the global statistics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tables import KL_CODES, acc_dtype
from .utils import (FMA_REF, exp2_, interpreting, load_block, max_nan, raw_reference,
                    row_offset, scalar_to, scaled_max, stream_block, sub_block_offsets,
                    tl_dtype, token_logp)

__all__ = ["KINDS", "kl_penalty_fwd", "kl_penalty_bwd", "full_kl_fwd", "full_kl_bwd", "AOT_SPECS"]

# Kind codes of the elementwise estimators (the ops module maps names and aliases onto these).
KINDS = KL_CODES  # {"k1": 0, "abs": 1, "k2": 2, "k3": 3}, defined once in fastrlhf.tables

# Elementwise kernels: 1024 elements over 4 warps = 8 per thread (two 128-bit fp32 accesses).
BLOCK_E = 1024
NUM_WARPS_E = 4
# full_kl: two rows streamed at once, 8 warps.  Forward: every thread loads four 128-bit vectors
# of each row per iteration (bf16: 8192 vocab positions per block); backward: one vector of
# each (bf16: 2048), its loop body already holds two rows.
NUM_WARPS_V = 8
BLOCK_V = stream_block(torch.bfloat16, NUM_WARPS_V)
BLOCK_V_FP32 = stream_block(torch.float32, NUM_WARPS_V)
BLOCK_V_BWD = stream_block(torch.bfloat16, NUM_WARPS_V, 1)
BLOCK_V_BWD_FP32 = stream_block(torch.float32, NUM_WARPS_V, 1)
BLOCK_V_INTERPRET = 64


# ---------------------------------------------------------------------------------------------
# kl_penalty (elementwise)
# ---------------------------------------------------------------------------------------------

@triton.jit
def klp_value(x, y, KIND: tl.constexpr):
    if KIND == 0:
        v = x - y
    elif KIND == 1:
        v = tl.abs(x - y)
    elif KIND == 2:
        d = x - y
        v = 0.5 * (d * d)
    else:
        k = y - x
        # where-based clamps keep NaN as NaN (tl.minimum / tl.maximum may drop it on GPU).
        k = tl.where(k < -20.0, -20.0, tl.where(k > 20.0, 20.0, k))
        v = tl.exp(k) - k - 1.0
        v = tl.where(v < -10.0, -10.0, tl.where(v > 10.0, 10.0, v))
    return v


@triton.jit
def klp_dvdx(x, y, KIND: tl.constexpr):
    """d v / d x (d v / d y is its negative for every kind)."""
    if KIND == 0:
        g = tl.full(x.shape, 1.0, x.dtype)
    elif KIND == 1:
        d = x - y
        g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(x.dtype)
    elif KIND == 2:
        g = x - y
    else:
        raw = y - x
        k = tl.where(raw < -20.0, -20.0, tl.where(raw > 20.0, 20.0, raw))
        r = tl.exp(k)
        v = r - k - 1.0
        live = (raw >= -20.0) & (raw <= 20.0) & (v >= -10.0) & (v <= 10.0)
        g = tl.where(live, 1.0 - r, 0.0).to(x.dtype)
    return g


@triton.jit(do_not_specialize=["n"])
def _kl_penalty_fwd_kernel(x_ptr, y_ptr, out_ptr, n,
                           KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        x = tl.load(x_ptr + offs).to(ACC)
        y = tl.load(y_ptr + offs).to(ACC)
        v = klp_value(x, y, KIND)
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty))
    else:
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
        y = tl.load(y_ptr + offs, mask=m, other=0.0).to(ACC)
        v = klp_value(x, y, KIND)
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["n"])
def _kl_penalty_bwd_kernel(g_ptr, x_ptr, y_ptr, dx_ptr, dy_ptr, n,
                           KIND: tl.constexpr, NEED_DX: tl.constexpr, NEED_DY: tl.constexpr,
                           ACC: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        g = tl.load(g_ptr + offs).to(ACC)
        x = tl.load(x_ptr + offs).to(ACC)
        y = tl.load(y_ptr + offs).to(ACC)
        dx = g * klp_dvdx(x, y, KIND)
        if NEED_DX:
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty))
        if NEED_DY:
            tl.store(dy_ptr + offs, (-dx).to(dy_ptr.dtype.element_ty))
    else:
        m = offs < n
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
        y = tl.load(y_ptr + offs, mask=m, other=0.0).to(ACC)
        dx = g * klp_dvdx(x, y, KIND)
        if NEED_DX:
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if NEED_DY:
            tl.store(dy_ptr + offs, (-dx).to(dy_ptr.dtype.element_ty), mask=m)


def _wider(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype with the larger element (fewer elements per 128-bit vector)."""
    return a if a.itemsize >= b.itemsize else b


_acc_of = acc_dtype  # float64 if either input is float64


def kl_penalty_fwd(x, y, kind_code: int):
    """x, y: contiguous flat [n] float tensors.  Returns the [n] estimate in the acc dtype."""
    n = x.numel()
    acc = _acc_of(x.dtype, y.dtype)
    out = torch.empty(n, dtype=acc, device=x.device)
    if n == 0:
        return out
    _kl_penalty_fwd_kernel[(triton.cdiv(n, BLOCK_E),)](
        x, y, out, n, KIND=kind_code, ACC=tl_dtype(acc), BLOCK=BLOCK_E, num_warps=NUM_WARPS_E)
    return out


def kl_penalty_bwd(g, x, y, kind_code: int, need_dx: bool, need_dy: bool):
    """Gradients (dx in x.dtype, dy in y.dtype; a 0-element tensor where not needed)."""
    n = x.numel()
    acc = _acc_of(x.dtype, y.dtype)
    dx = torch.empty(n if need_dx else 0, dtype=x.dtype, device=x.device)
    dy = torch.empty(n if need_dy else 0, dtype=y.dtype, device=y.device)
    if n == 0 or not (need_dx or need_dy):
        return dx, dy
    _kl_penalty_bwd_kernel[(triton.cdiv(n, BLOCK_E),)](
        g, x, y, dx if need_dx else x, dy if need_dy else y, n,
        KIND=kind_code, NEED_DX=need_dx, NEED_DY=need_dy, ACC=tl_dtype(acc), BLOCK=BLOCK_E,
        num_warps=NUM_WARPS_E)
    return dx, dy


# ---------------------------------------------------------------------------------------------
# full_kl (streaming over the vocab)
# ---------------------------------------------------------------------------------------------

# rows addressed with kernels/utils.py row_offset (shared with every logits kernel)


@triton.jit
def _kl_step(xb, yb, start, offs, V, c, mx, rx, sx, my, ry, sy, t, ymin, Q: tl.constexpr,
             MASKED: tl.constexpr, ACC: tl.constexpr):
    # four 128-bit vectors of each row per thread, all loaded before any is used
    x0 = load_block(xb + start + offs, start + offs, V, MASKED, False).to(ACC)
    x1 = load_block(xb + (start + Q) + offs, start + Q + offs, V, MASKED, False).to(ACC)
    x2 = load_block(xb + (start + 2 * Q) + offs, start + 2 * Q + offs, V, MASKED, False).to(ACC)
    x3 = load_block(xb + (start + 3 * Q) + offs, start + 3 * Q + offs, V, MASKED, False).to(ACC)
    y0 = load_block(yb + start + offs, start + offs, V, MASKED, False).to(ACC)
    y1 = load_block(yb + (start + Q) + offs, start + Q + offs, V, MASKED, False).to(ACC)
    y2 = load_block(yb + (start + 2 * Q) + offs, start + 2 * Q + offs, V, MASKED, False).to(ACC)
    y3 = load_block(yb + (start + 3 * Q) + offs, start + 3 * Q + offs, V, MASKED, False).to(ACC)
    bx = max_nan(max_nan(tl.reduce(x0, 1, max_nan), tl.reduce(x1, 1, max_nan)),
                 max_nan(tl.reduce(x2, 1, max_nan), tl.reduce(x3, 1, max_nan)))
    by = max_nan(max_nan(tl.reduce(y0, 1, max_nan), tl.reduce(y1, 1, max_nan)),
                 max_nan(tl.reduce(y2, 1, max_nan), tl.reduce(y3, 1, max_nan)))
    # any q_j = 0 (y = -inf) in this thread? (decided exactly after the sweep, rarely taken)
    ymin = tl.minimum(ymin, tl.minimum(tl.minimum(tl.min(y0, axis=1), tl.min(y1, axis=1)),
                                       tl.minimum(tl.min(y2, axis=1), tl.min(y3, axis=1))))
    mx_new = max_nan(mx, bx)
    my_new = max_nan(my, by)
    rx_new = tl.where(mx_new == float("-inf"), 0.0, mx_new)
    ry_new = tl.where(my_new == float("-inf"), 0.0, my_new)
    if FMA_REF:
        rx_new = rx_new * c
        ry_new = ry_new * c
        nx = -rx_new[:, None]
        ny = -ry_new[:, None]
        zx0 = tl.fma(x0, c, nx)
        zx1 = tl.fma(x1, c, nx)
        zx2 = tl.fma(x2, c, nx)
        zx3 = tl.fma(x3, c, nx)
        zy0 = tl.fma(y0, c, ny)
        zy1 = tl.fma(y1, c, ny)
        zy2 = tl.fma(y2, c, ny)
        zy3 = tl.fma(y3, c, ny)
        drx = rx - rx_new
        dry = ry - ry_new
    else:
        nx = rx_new[:, None]
        ny = ry_new[:, None]
        zx0 = (x0 - nx) * c
        zx1 = (x1 - nx) * c
        zx2 = (x2 - nx) * c
        zx3 = (x3 - nx) * c
        zy0 = (y0 - ny) * c
        zy1 = (y1 - ny) * c
        zy2 = (y2 - ny) * c
        zy3 = (y3 - ny) * c
        drx = (rx - rx_new) * c
        dry = (ry - ry_new) * c
    ex0 = exp2_(zx0, ACC)
    ex1 = exp2_(zx1, ACC)
    ex2 = exp2_(zx2, ACC)
    ex3 = exp2_(zx3, ACC)
    ey0 = exp2_(zy0, ACC)
    ey1 = exp2_(zy1, ACC)
    ey2 = exp2_(zy2, ACC)
    ey3 = exp2_(zy3, ACC)
    ax = exp2_(tl.minimum(drx, 0.0), ACC)
    ay = exp2_(tl.minimum(dry, 0.0), ACC)
    # e_x (z_x - z_y), with the difference clamped to +-1e30: e_x = 0 entries (x = -inf) give
    # 0, q = 0 entries a finite stand-in (the row's KL is then decided by the q = 0 check)
    tv = ex0 * tl.minimum(tl.maximum(zx0 - zy0, -1e30), 1e30)
    tv += ex1 * tl.minimum(tl.maximum(zx1 - zy1, -1e30), 1e30)
    tv += ex2 * tl.minimum(tl.maximum(zx2 - zy2, -1e30), 1e30)
    tv += ex3 * tl.minimum(tl.maximum(zx3 - zy3, -1e30), 1e30)
    t = ax * (t + (drx - dry) * sx) + tl.sum(tv, axis=1)
    sx = ax * sx + tl.sum((ex0 + ex1) + (ex2 + ex3), axis=1)
    sy = ay * sy + tl.sum((ey0 + ey1) + (ey2 + ey3), axis=1)
    return mx_new, rx_new, sx, my_new, ry_new, sy, t, ymin


@triton.jit
def _merge_ref(m, r, s, c, ACC: tl.constexpr):
    """Row max, its finite reference, ``w_i`` per thread, ``ln S`` and the exact rounding of the
    base-2 reference (``delta``) from the per-thread states."""
    M = tl.reduce(m, 0, max_nan)
    Rg = tl.where(M == float("-inf"), 0.0, M)
    if FMA_REF:
        RC = Rg * c
        delta = tl.fma(Rg, c, -RC)
        dr = r - RC
    else:
        delta = tl.zeros([], ACC)
        dr = (r - Rg) * c
    w = tl.where(s == 0, 0.0, exp2_(dr, ACC))
    S = tl.sum(s * w, axis=0)
    return M, w, dr, S, delta


@triton.jit(do_not_specialize=["n_rows", "Dx1", "Dx2", "Dy1", "Dy2"])
def _full_kl_fwd_kernel(
    x_ptr, y_ptr, kl_ptr, stats_ptr,
    n_rows, V, Dx1, Dx2, sx0, sx1, sx2, Dy1, Dy2, sy0, sy1, sy2,
    inv_temp_in: tl.float64,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr, PARTIAL: tl.constexpr,
):
    inv_temp = scalar_to(inv_temp_in, ACC)  # fp64 argument: float64 compute stays exact
    row = tl.program_id(0)
    if row >= n_rows:
        return
    xb = x_ptr + row_offset(row, Dx1, Dx2, sx0, sx1, sx2)
    yb = y_ptr + row_offset(row, Dy1, Dy2, sy0, sy1, sy2)
    VEC: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
    R: tl.constexpr = BLOCK_V // (4 * VEC)
    Q: tl.constexpr = R * VEC
    offs = sub_block_offsets(R, VEC)
    ninf = float("-inf")
    pinf = float("inf")
    c = inv_temp * 1.4426950408889634
    mx = tl.full([R], ninf, ACC)
    my = tl.full([R], ninf, ACC)
    rx = tl.zeros([R], ACC)
    ry = tl.zeros([R], ACC)
    sx = tl.zeros([R], ACC)
    sy = tl.zeros([R], ACC)
    t = tl.zeros([R], ACC)
    ymin = tl.full([R], pinf, ACC)
    v_full = V - V % BLOCK_V
    for start in range(0, v_full, BLOCK_V):
        mx, rx, sx, my, ry, sy, t, ymin = _kl_step(xb, yb, start, offs, V, c, mx, rx, sx, my,
                                                   ry, sy, t, ymin, Q, False, ACC)
    if v_full < V:
        mx, rx, sx, my, ry, sy, t, ymin = _kl_step(xb, yb, v_full, offs, V, c, mx, rx, sx, my,
                                                   ry, sy, t, ymin, Q, True, ACC)
    Mx, wx, drx, Sx, dlx = _merge_ref(mx, rx, sx, c, ACC)
    My, wy, dry, Sy, dly = _merge_ref(my, ry, sy, c, ACC)
    Tsum = tl.sum(tl.where(sx == 0, 0.0, wx * (t + (drx - dry) * sx)), axis=0)
    lsx = tl.log(Sx) - dlx * 0.6931471805599453
    lsy = tl.log(Sy) - dly * 0.6931471805599453
    # NaN or +inf in either row makes its sums NaN
    any_bad = (Sx != Sx) | (Sy != Sy)
    # q_j = 0 entries: only when some y_j = -inf (rare) is the row swept again for them
    has_qzero_cand = tl.min(ymin, axis=0) == ninf
    qx = tl.full([], ninf, ACC)
    if has_qzero_cand:
        o1 = tl.arange(0, BLOCK_V)
        qv = tl.full([BLOCK_V], ninf, ACC)
        for start in range(0, V, BLOCK_V):
            cols = start + o1
            cm = cols < V
            xv = tl.load(xb + cols, mask=cm, other=ninf).to(ACC)
            yv = tl.load(yb + cols, mask=cm, other=0.0).to(ACC)
            qv = tl.maximum(qv, tl.where(yv == ninf, xv, ninf))
        qx = tl.max(qv, axis=0)
    srow = stats_ptr + row.to(tl.int64)
    # the stored pairs (M, log S) are relative to the stored scaled maxima (utils.scaled_max)
    Mxn, res_x = scaled_max(Mx, inv_temp)
    Myn, res_y = scaled_max(My, inv_temp)
    lsx = lsx + res_x
    lsy = lsy + res_y
    if PARTIAL:
        # Vocab-parallel slice partials: E = sum p ((x - M_x) - (y - M_y)) against the stored
        # maxima (0 for a slice without p mass) and the two flags; an all -inf slice is not an
        # error here.
        E = (Tsum / Sx - dlx + dly) * 0.6931471805599453 + (res_x - res_y)
        tl.store(kl_ptr + row, tl.where(Sx > 0, E, 0.0))
        tl.store(srow + 4 * n_rows, (qx > ninf).to(ACC))
        tl.store(srow + 5 * n_rows, any_bad.to(ACC))
    else:
        kl = (Tsum / Sx) * 0.6931471805599453 - tl.log(Sx) + tl.log(Sy)
        # q_j = 0 under p_j > 0 (p_j as the reference forms it: exp(log_softmax)) -> +inf;
        # where p_j underflows to 0 the term is 0 like every p_j = 0 term
        p_q = tl.exp(token_logp(qx, inv_temp, Mxn, lsx))
        kl = tl.where(p_q > 0, pinf, kl)
        kl = tl.where(any_bad | (Mx == ninf) | (My == ninf), float("nan"), kl)
        tl.store(kl_ptr + row, kl)
    tl.store(srow, Mxn)
    tl.store(srow + n_rows, lsx)
    tl.store(srow + 2 * n_rows, Myn)
    tl.store(srow + 3 * n_rows, lsy)


@triton.jit
def _kl_grad_step(xb, yb, dxp, dyp, start, offs, V, Mxr, Myr, c, L2x, L2y, g, gl, gk, gP, UB,
                  Q: tl.constexpr, MASKED: tl.constexpr, NEED_DX: tl.constexpr,
                  NEED_DY: tl.constexpr, ACC: tl.constexpr):
    cols = start + offs
    x = load_block(xb + cols, cols, V, MASKED, False).to(ACC)
    y = load_block(yb + cols, cols, V, MASKED, False).to(ACC)
    a2 = (x - Mxr) * c - L2x      # log2 p
    b2 = (y - Myr) * c - L2y      # log2 q
    p = exp2_(a2, ACC)
    if NEED_DX:
        # g p (ln p - ln q - KL) / T; the clamp turns p = 0 entries (x = -inf, or q = 0 where p
        # underflows) into exact zeros; UB = +inf in +inf-KL rows keeps the reference's NaN
        dd = tl.minimum(tl.maximum(a2 - b2, -1e30), UB)
        dx = p * (dd * gl + gk)
        if MASKED:
            tl.store(dxp + cols, dx.to(dxp.dtype.element_ty), mask=cols < V)
        else:
            tl.store(dxp + cols, dx.to(dxp.dtype.element_ty))
    if NEED_DY:
        # g (q P - p) / T with P = sum_j p_j (1, or 0 where every p_j is NaN); NaN p -> 0
        dy = exp2_(b2, ACC) * gP - tl.maximum(p, 0.0) * g
        if MASKED:
            tl.store(dyp + cols, dy.to(dyp.dtype.element_ty), mask=cols < V)
        else:
            tl.store(dyp + cols, dy.to(dyp.dtype.element_ty))


@triton.jit(do_not_specialize=["n_rows", "Dx1", "Dx2", "Dy1", "Dy2"])
def _full_kl_bwd_kernel(
    x_ptr, y_ptr, g_ptr, kl_ptr, stats_ptr, dx_ptr, dy_ptr,
    n_rows, V, Dx1, Dx2, sx0, sx1, sx2, Dy1, Dy2, sy0, sy1, sy2,
    inv_temp_in: tl.float64,
    NEED_DX: tl.constexpr, NEED_DY: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    inv_temp = scalar_to(inv_temp_in, ACC)
    row = tl.program_id(0)
    if row >= n_rows:
        return
    xb = x_ptr + row_offset(row, Dx1, Dx2, sx0, sx1, sx2)
    yb = y_ptr + row_offset(row, Dy1, Dy2, sy0, sy1, sy2)
    obase = row.to(tl.int64) * V  # the gradients are fresh contiguous [N, V] buffers
    VEC: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
    R: tl.constexpr = BLOCK_V // VEC
    offs = sub_block_offsets(R, VEC)
    srow = stats_ptr + row.to(tl.int64)
    Mx = tl.load(srow).to(ACC)
    lsx = tl.load(srow + n_rows).to(ACC)
    My = tl.load(srow + 2 * n_rows).to(ACC)
    lsy = tl.load(srow + 3 * n_rows).to(ACC)
    kl = tl.load(kl_ptr + row).to(ACC)
    g = tl.load(g_ptr + row).to(ACC) * inv_temp
    c = inv_temp * 1.4426950408889634
    Mxr, lsx = raw_reference(Mx, lsx, inv_temp)
    Myr, lsy = raw_reference(My, lsy, inv_temp)
    L2x = lsx * 1.4426950408889634
    L2y = lsy * 1.4426950408889634
    # dx = p (ln2 (a2 - b2) - KL) g:  gl = g ln2, gk = -KL g
    gl = g * 0.6931471805599453
    gk = -kl * g
    # the reference's sum_j p_j: 1, or 0 when the policy row's log-softmax is NaN
    gP = tl.where((Mx > float("-inf")) & (Mx < float("inf")), g, 0.0)
    UB = tl.where(kl == float("inf"), float("inf"), 1e30)
    dxp = dx_ptr + obase
    dyp = dy_ptr + obase
    v_full = V - V % BLOCK_V
    for start in range(0, v_full, BLOCK_V):
        _kl_grad_step(xb, yb, dxp, dyp, start, offs, V, Mxr, Myr, c, L2x, L2y, g, gl, gk, gP, UB,
                      BLOCK_V, False, NEED_DX, NEED_DY, ACC)
    if v_full < V:
        _kl_grad_step(xb, yb, dxp, dyp, v_full, offs, V, Mxr, Myr, c, L2x, L2y, g, gl, gk, gP, UB,
                      BLOCK_V, True, NEED_DX, NEED_DY, ACC)


def _block_v(V: int, dtype, nsub: int = 4) -> int:
    if interpreting():
        return min(BLOCK_V_INTERPRET, max(triton.next_power_of_2(max(V, 1)), 32))
    return min(stream_block(dtype, NUM_WARPS_V, nsub), max(triton.next_power_of_2(V), 128))


def full_kl_fwd(x, x_dims, x_strides, y, y_dims, y_strides, V, inv_temp, partial=False):
    """Launch the forward.  ``x`` / ``y`` rows described by (dims, strides) as produced by
    ``rows_layout`` (the two layouts may differ; both enumerate the same N rows in row-major
    order).  Returns (kl [N], stats [4, N]) in the accumulation dtype.

    ``partial=True`` (vocab parallelism, the rows are one slice of the vocab): the first output
    is ``E = sum_j p_j ((x_j - M_x) - (y_j - M_y))`` of the slice (0 where it has no p mass)
    instead of the KL, and stats is [6, N]: ``(M_x, log S_x, M_y, log S_y, qzero, bad)``, the
    flags 1.0 where some ``q_j = 0`` under ``p_j > 0`` / some NaN or +inf was seen."""
    n_rows = x_dims[0] * x_dims[1] * x_dims[2]
    acc = _acc_of(x.dtype, y.dtype)
    kl = torch.empty(n_rows, dtype=acc, device=x.device)
    stats = torch.empty((6 if partial else 4, n_rows), dtype=acc, device=x.device)
    if n_rows == 0:
        return kl, stats
    _full_kl_fwd_kernel[(n_rows,)](
        x, y, kl, stats, n_rows, V,
        x_dims[1], x_dims[2], x_strides[0], x_strides[1], x_strides[2],
        y_dims[1], y_dims[2], y_strides[0], y_strides[1], y_strides[2],
        inv_temp, ACC=tl_dtype(acc), BLOCK_V=_block_v(V, _wider(x.dtype, y.dtype)), PARTIAL=partial,
        num_warps=NUM_WARPS_V)
    return kl, stats


def full_kl_bwd(x, x_dims, x_strides, y, y_dims, y_strides, V, g, kl, stats, inv_temp,
                need_dx, need_dy):
    """Launch the backward.  g, kl: contiguous [N]; stats [4, N].  Returns (dx, dy) as contiguous
    [N, V] buffers in x.dtype / y.dtype (0-element tensors where not needed)."""
    n_rows = x_dims[0] * x_dims[1] * x_dims[2]
    acc = _acc_of(x.dtype, y.dtype)
    dx = torch.empty((n_rows, V) if need_dx else (0,), dtype=x.dtype, device=x.device)
    dy = torch.empty((n_rows, V) if need_dy else (0,), dtype=y.dtype, device=y.device)
    if n_rows == 0 or not (need_dx or need_dy):
        return dx, dy
    _full_kl_bwd_kernel[(n_rows,)](
        x, y, g, kl, stats, dx if need_dx else kl, dy if need_dy else kl, n_rows, V,
        x_dims[1], x_dims[2], x_strides[0], x_strides[1], x_strides[2],
        y_dims[1], y_dims[2], y_strides[0], y_strides[1], y_strides[2],
        inv_temp, NEED_DX=need_dx, NEED_DY=need_dy, ACC=tl_dtype(acc),
        BLOCK_V=_block_v(V, _wider(x.dtype, y.dtype), 1), num_warps=NUM_WARPS_V)
    return dx, dy


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (the tests compile these for sm_90 / sm_80 without a GPU).
# Pointers 16-byte aligned; for full_kl the vocab size and row strides divisible by 16.
# ---------------------------------------------------------------------------------------------

def _aot_specs():
    specs = []
    for dt in ("bf16", "fp32"):
        for kind, code in KINDS.items():
            specs.append(dict(
                name=f"kl_penalty_fwd[{dt},{kind}]",
                fn=_kl_penalty_fwd_kernel,
                signature={"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "out_ptr": "*fp32", "n": "i32",
                           "KIND": "constexpr", "ACC": "constexpr", "BLOCK": "constexpr"},
                constexprs={"KIND": code, "ACC": tl.float32, "BLOCK": BLOCK_E},
                aligned=["x_ptr", "y_ptr", "out_ptr"],
                num_warps=NUM_WARPS_E,
                stream_dtype=dt,
            ))
            for need_dx, need_dy in ((True, False), (True, True)):
                specs.append(dict(
                    name=f"kl_penalty_bwd[{dt},{kind},dx={need_dx},dy={need_dy}]",
                    fn=_kl_penalty_bwd_kernel,
                    signature={"g_ptr": "*fp32", "x_ptr": f"*{dt}", "y_ptr": f"*{dt}",
                               "dx_ptr": f"*{dt}", "dy_ptr": f"*{dt}", "n": "i32",
                               "KIND": "constexpr", "NEED_DX": "constexpr",
                               "NEED_DY": "constexpr", "ACC": "constexpr", "BLOCK": "constexpr"},
                    constexprs={"KIND": code, "NEED_DX": need_dx, "NEED_DY": need_dy,
                                "ACC": tl.float32, "BLOCK": BLOCK_E},
                    aligned=["g_ptr", "x_ptr", "y_ptr", "dx_ptr", "dy_ptr"],
                    num_warps=NUM_WARPS_E,
                    stream_dtype=dt,
                ))
        row_sig = {"n_rows": "i32", "V": "i32", "Dx1": "i32", "Dx2": "i32",
                   "sx0": "i64", "sx1": "i64", "sx2": "i64", "Dy1": "i32", "Dy2": "i32",
                   "sy0": "i64", "sy1": "i64", "sy2": "i64", "inv_temp_in": "fp64"}
        for partial in (False, True):
            specs.append(dict(
                name=f"full_kl_fwd[{dt}{',partial' if partial else ''}]",
                fn=_full_kl_fwd_kernel,
                signature={"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "kl_ptr": "*fp32",
                           "stats_ptr": "*fp32", **row_sig, "ACC": "constexpr",
                           "BLOCK_V": "constexpr", "PARTIAL": "constexpr"},
                streams=2, passes=("fwd read x2", "rare: q = 0 re-sweep (rows with y = -inf)"),
                constexprs={"ACC": tl.float32, "PARTIAL": partial,
                            "BLOCK_V": BLOCK_V if dt == "bf16" else BLOCK_V_FP32},
                aligned=["x_ptr", "y_ptr", "kl_ptr", "stats_ptr", "V", "sx0", "sx1", "sx2",
                         "sy0", "sy1", "sy2"],
                num_warps=NUM_WARPS_V,
                stream_dtype=dt,
            ))
        for need_dx, need_dy in ((True, False), (True, True)):
            specs.append(dict(
                name=f"full_kl_bwd[{dt},dx={need_dx},dy={need_dy}]",
                fn=_full_kl_bwd_kernel,
                signature={"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "g_ptr": "*fp32",
                           "kl_ptr": "*fp32", "stats_ptr": "*fp32", "dx_ptr": f"*{dt}",
                           "dy_ptr": f"*{dt}", **row_sig, "NEED_DX": "constexpr",
                           "NEED_DY": "constexpr", "ACC": "constexpr", "BLOCK_V": "constexpr"},
                streams=2, passes=("bwd read x2 + write" + (" x2" if need_dy else ""),),
                constexprs={"NEED_DX": need_dx, "NEED_DY": need_dy, "ACC": tl.float32,
                            "BLOCK_V": BLOCK_V_BWD if dt == "bf16" else BLOCK_V_BWD_FP32},
                aligned=["x_ptr", "y_ptr", "g_ptr", "kl_ptr", "stats_ptr", "dx_ptr", "dy_ptr",
                         "V", "sx0", "sx1", "sx2", "sy0", "sy1", "sy2"],
                num_warps=NUM_WARPS_V,
                stream_dtype=dt,
            ))
    return specs


AOT_SPECS = _aot_specs
