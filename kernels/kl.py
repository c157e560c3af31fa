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
``y = ref_logits / T`` every lane keeps, for both rows, a running max and sum of exponentials, and

    t = sum_j exp(x_j - m_x) * ((x_j - m_x) - (y_j - m_y))

relative to its running maxima (so a +1e4 offset on either row loses nothing), updated with one
``exp`` per element per tensor.  After merging the lanes::

    KL = T / S_x - log S_x + log S_y      (= sum_j p_j (log p_j - log q_j))

Entries with ``x_j = -inf`` (p_j = 0) contribute nothing; ``y_j = -inf`` where ``x_j > -inf``
makes the KL ``+inf``; a row that is entirely ``-inf`` in either tensor, or holds a NaN / +inf,
gives NaN.  The kernel saves ``(M_x, log S_x, M_y, log S_y)`` per row; the backward recomputes
``log p_j = (x_j - M_x) - log S_x`` and ``log q_j`` from them and writes

    dKL/dlogits_j     = g * p_j * (log p_j - log q_j - KL) / T     (0 where p_j = 0)
    dKL/dref_logits_j = g * (q_j - p_j) / T

into fresh contiguous buffers.  Nothing of size [N, V] besides the gradients is allocated.

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
from ._utils import interpreting, row_offset, tl_dtype

__all__ = ["KINDS", "kl_penalty_fwd", "kl_penalty_bwd", "full_kl_fwd", "full_kl_bwd", "AOT_SPECS"]

# Kind codes of the elementwise estimators (the ops module maps names and aliases onto these).
KINDS = KL_CODES  # {"k1": 0, "abs": 1, "k2": 2, "k3": 3}, defined once in fastrlhf.tables

# Elementwise kernels: 1024 elements over 4 warps = 8 per thread (two 128-bit fp32 accesses).
BLOCK_E = 1024
NUM_WARPS_E = 4
# full_kl: two rows streamed at once and five running vectors per lane; 2048 lanes over 8 warps
# = 8 elements per thread keeps it well inside the register file (no spills).
BLOCK_V = 2048
NUM_WARPS_V = 8
BLOCK_V_INTERPRET = 64


# ---------------------------------------------------------------------------------------------
# kl_penalty (elementwise)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _klp_value(x, y, KIND: tl.constexpr):
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
def _klp_dvdx(x, y, KIND: tl.constexpr):
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
        v = _klp_value(x, y, KIND)
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty))
    else:
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
        y = tl.load(y_ptr + offs, mask=m, other=0.0).to(ACC)
        v = _klp_value(x, y, KIND)
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
        dx = g * _klp_dvdx(x, y, KIND)
        if NEED_DX:
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty))
        if NEED_DY:
            tl.store(dy_ptr + offs, (-dx).to(dy_ptr.dtype.element_ty))
    else:
        m = offs < n
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
        y = tl.load(y_ptr + offs, mask=m, other=0.0).to(ACC)
        dx = g * _klp_dvdx(x, y, KIND)
        if NEED_DX:
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if NEED_DY:
            tl.store(dy_ptr + offs, (-dx).to(dy_ptr.dtype.element_ty), mask=m)


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

# rows addressed with kernels/_utils.py row_offset (shared with every logits kernel)


@triton.jit(do_not_specialize=["n_rows", "Dx1", "Dx2", "Dy1", "Dy2"])
def _full_kl_fwd_kernel(
    x_ptr, y_ptr, kl_ptr, stats_ptr,
    n_rows, V, Dx1, Dx2, sx0, sx1, sx2, Dy1, Dy2, sy0, sy1, sy2,
    inv_temp,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr, PARTIAL: tl.constexpr,
):
    row = tl.program_id(0)
    if row >= n_rows:
        return
    xb = x_ptr + row_offset(row, Dx1, Dx2, sx0, sx1, sx2)
    yb = y_ptr + row_offset(row, Dy1, Dy2, sy0, sy1, sy2)
    offs = tl.arange(0, BLOCK_V)
    ninf = float("-inf")
    pinf = float("inf")

    mx = tl.full([BLOCK_V], ninf, ACC)
    my = tl.full([BLOCK_V], ninf, ACC)
    sx = tl.zeros([BLOCK_V], ACC)
    sy = tl.zeros([BLOCK_V], ACC)
    t = tl.zeros([BLOCK_V], ACC)
    bad = tl.zeros([BLOCK_V], tl.int1)     # NaN or +inf seen in either row
    qzero = tl.zeros([BLOCK_V], tl.int1)   # some q_j = 0 where p_j > 0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        cm = cols < V
        x = tl.load(xb + cols, mask=cm, other=ninf).to(ACC) * inv_temp
        y = tl.load(yb + cols, mask=cm, other=ninf).to(ACC) * inv_temp
        bad = bad | (x != x) | (y != y) | (x == pinf) | (y == pinf)
        xlive = x > ninf
        ydead = y == ninf
        qzero = qzero | (xlive & ydead)
        # policy row: one exp per element (the larger of x, m_x becomes the new max).
        gx = x > mx
        ex = tl.exp(-tl.abs(x - mx))
        ex = tl.where(xlive, ex, 0.0)
        ax = tl.where(gx, ex, 1.0)
        wx = tl.where(gx, 1.0, ex)
        mx_new = tl.where(gx, x, mx)
        # reference row: same update.
        gy = y > my
        ey = tl.exp(-tl.abs(y - my))
        ey = tl.where(ydead, 0.0, ey)
        ay = tl.where(gy, ey, 1.0)
        wy = tl.where(gy, 1.0, ey)
        my_new = tl.where(gy, y, my)
        # t is kept relative to (m_x, m_y): re-base it on the new maxima, then add the element.
        shift = tl.where(sx > 0, (mx - mx_new) - (my - my_new), 0.0)
        r = (x - mx_new) - (y - my_new)
        add = tl.where(xlive & (~ydead), wx * r, 0.0)
        t = ax * (t + shift * sx) + add
        sx = sx * ax + wx
        sy = sy * ay + wy
        mx = mx_new
        my = my_new

    Mx = tl.max(mx, axis=0)
    My = tl.max(my, axis=0)
    lx = tl.where(sx > 0, tl.exp(mx - Mx), 0.0)
    ly = tl.where(sy > 0, tl.exp(my - My), 0.0)
    Sx = tl.sum(sx * lx, axis=0)
    Sy = tl.sum(sy * ly, axis=0)
    Tsum = tl.sum(tl.where(sx > 0, lx * (t + sx * ((mx - Mx) - (my - My))), 0.0), axis=0)
    lsx = tl.log(Sx)
    lsy = tl.log(Sy)
    any_qzero = tl.max(qzero.to(tl.int32), axis=0) > 0
    any_bad = tl.max(bad.to(tl.int32), axis=0) > 0
    srow = stats_ptr + row.to(tl.int64)
    if PARTIAL:
        # Vocab-parallel slice partials: E = T / S_x (0 for a slice without p mass) and the two
        # flags; an all -inf slice is not an error here (other slices may hold the mass).
        tl.store(kl_ptr + row, tl.where(Sx > 0, Tsum / Sx, 0.0))
        tl.store(srow + 4 * n_rows, any_qzero.to(ACC))
        tl.store(srow + 5 * n_rows, any_bad.to(ACC))
    else:
        kl = Tsum / Sx - lsx + lsy
        kl = tl.where(any_qzero, pinf, kl)
        kl = tl.where(any_bad | (Mx == ninf) | (My == ninf), float("nan"), kl)
        tl.store(kl_ptr + row, kl)
    tl.store(srow, Mx)
    tl.store(srow + n_rows, lsx)
    tl.store(srow + 2 * n_rows, My)
    tl.store(srow + 3 * n_rows, lsy)


@triton.jit(do_not_specialize=["n_rows", "Dx1", "Dx2", "Dy1", "Dy2"])
def _full_kl_bwd_kernel(
    x_ptr, y_ptr, g_ptr, kl_ptr, stats_ptr, dx_ptr, dy_ptr,
    n_rows, V, Dx1, Dx2, sx0, sx1, sx2, Dy1, Dy2, sy0, sy1, sy2,
    inv_temp,
    NEED_DX: tl.constexpr, NEED_DY: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    if row >= n_rows:
        return
    xb = x_ptr + row_offset(row, Dx1, Dx2, sx0, sx1, sx2)
    yb = y_ptr + row_offset(row, Dy1, Dy2, sy0, sy1, sy2)
    obase = row.to(tl.int64) * V  # the gradients are fresh contiguous [N, V] buffers
    offs = tl.arange(0, BLOCK_V)
    srow = stats_ptr + row.to(tl.int64)
    Mx = tl.load(srow).to(ACC)
    lsx = tl.load(srow + n_rows).to(ACC)
    My = tl.load(srow + 2 * n_rows).to(ACC)
    lsy = tl.load(srow + 3 * n_rows).to(ACC)
    kl = tl.load(kl_ptr + row).to(ACC)
    g = tl.load(g_ptr + row).to(ACC) * inv_temp
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        cm = cols < V
        x = tl.load(xb + cols, mask=cm, other=float("-inf")).to(ACC) * inv_temp
        y = tl.load(yb + cols, mask=cm, other=float("-inf")).to(ACC) * inv_temp
        a = (x - Mx) - lsx   # log p_j
        b = (y - My) - lsy   # log q_j
        p = tl.exp(a)
        if NEED_DX:
            dx = tl.where(p > 0, p * ((a - b) - kl), 0.0) * g
            tl.store(dx_ptr + obase + cols, dx.to(dx_ptr.dtype.element_ty), mask=cm)
        if NEED_DY:
            dy = (tl.exp(b) - p) * g
            tl.store(dy_ptr + obase + cols, dy.to(dy_ptr.dtype.element_ty), mask=cm)


def _block_v(V: int) -> int:
    if interpreting():
        return min(BLOCK_V_INTERPRET, triton.next_power_of_2(max(V, 1)))
    return min(BLOCK_V, max(triton.next_power_of_2(V), 128))


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
        inv_temp, ACC=tl_dtype(acc), BLOCK_V=_block_v(V), PARTIAL=partial,
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
        BLOCK_V=_block_v(V), num_warps=NUM_WARPS_V)
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
                   "sy0": "i64", "sy1": "i64", "sy2": "i64", "inv_temp": "fp32"}
        for partial in (False, True):
            specs.append(dict(
                name=f"full_kl_fwd[{dt}{',partial' if partial else ''}]",
                fn=_full_kl_fwd_kernel,
                signature={"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "kl_ptr": "*fp32",
                           "stats_ptr": "*fp32", **row_sig, "ACC": "constexpr",
                           "BLOCK_V": "constexpr", "PARTIAL": "constexpr"},
                constexprs={"ACC": tl.float32, "BLOCK_V": BLOCK_V, "PARTIAL": partial},
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
                constexprs={"NEED_DX": need_dx, "NEED_DY": need_dy, "ACC": tl.float32,
                            "BLOCK_V": BLOCK_V},
                aligned=["x_ptr", "y_ptr", "g_ptr", "kl_ptr", "stats_ptr", "dx_ptr", "dy_ptr",
                         "V", "sx0", "sx1", "sx2", "sy0", "sy1", "sy2"],
                num_warps=NUM_WARPS_V,
                stream_dtype=dt,
            ))
    return specs


AOT_SPECS = _aot_specs
