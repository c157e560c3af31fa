"""Triton kernels: clipped PPO policy loss (token ratio or GSPO sequence ratio) and clipped value
loss, fused with their masked aggregation and statistics.

Layout: every ``[B, T]`` input has unit stride along T and its own row stride (so
``logp[:, :-1]`` is read in place); ``advantages`` may instead be ``[B]`` (one value per row).
The mask may be bool (passed as uint8), integer or floating; a float mask is a per-token weight.

Forward, one program per row, one streaming pass over the row (two for GSPO: the first computes
the row's mean log-ratio).  Each program writes per-row partial sums into a ``[K, B]`` buffer:

    S_b = sum_t m L_t       n_b = sum_t m       (+ clip counts and the approx-KL sum)

where every ``m``-weighted term is taken as ``where(m != 0, x, 0) * m`` (NaN outside the mask is
ignored).  A single-program finalize kernel then combines the ``[B]`` partials in a fixed order
(deterministic, no atomics) into the loss and the stats, and writes the per-row aggregation
coefficient ``c_b`` (the loss is ``sum_b c_b S_b``, see ``fastrlhf.reference.agg_row_weights``).

``T`` is a runtime argument (never constexpr); Triton specializes it only on divisibility by 16,
which is what lets aligned rows stream with 128-bit loads, so at most a few variants compile.

Packed sequences (``PACKED``): the inputs are one ``[1, total]`` row and ``cu_seqlens`` ``[S+1]``;
program ``s`` handles the segment ``cu[s]:cu[s+1]`` exactly as it would handle a row (the launcher
passes row strides 0 and the kernel offsets its pointers by ``cu[s]`` and loops over the
segment's length), so the partials, the coefficients and the GSPO ratios are per segment and
nothing is copied into a padded layout.  Per-sequence advantages are ``[S]``.

Backward recomputes the per-token derivative and writes ``dL/dx = g * c_b * m * dL_t/dx`` into
the only input-sized buffer allocated.  Nothing else of size ``[B, T]`` is ever allocated.

``policy_token_terms`` / ``value_token_terms`` are the per-token formulas as ``@triton.jit``
helpers, for reuse by fused kernels that produce ``logp`` themselves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tables import AGG_MODE_IDS
from .utils import interpreting, tl_dtype

__all__ = ["AGG_MODE_IDS", "policy_fwd", "policy_bwd", "value_fwd", "value_bwd",
           "policy_token_terms", "value_token_terms", "AOT_SPECS"]

# Aggregation modes as the kernels see them: AGG_MODE_IDS, from fastrlhf.tables.

# 2048 lanes over 8 warps: 8 elements per thread per stream, i.e. two 128-bit loads for fp32.
BLOCK_T = 2048
NUM_WARPS = 8
BLOCK_T_INTERPRET = 16   # interpreter: small blocks so CPU tests exercise the multi-block loop
BLOCK_B = 1024           # finalize: rows per iteration
FIN_WARPS = 4
BLOCK_B_INTERPRET = 4

# partial-sum rows (policy: all five; value: the first three)
P_LOSS = tl.constexpr(0)
P_COUNT = tl.constexpr(1)
P_CLIP = tl.constexpr(2)
P_CLIP_LOWER = tl.constexpr(3)
P_KL = tl.constexpr(4)
N_POLICY_PARTS, N_VALUE_PARTS = 5, 3

EPS = 1e-8


@triton.jit
def to_acc(x, ACC: tl.constexpr):
    # Scalar kernel arguments are fp64 (exact for float64 compute); one rounding to ACC here.
    # (Adding to a typed zero keeps this valid in the interpreter, where x is a Python float.)
    return (tl.zeros([], ACC) + x).to(ACC)


@triton.jit
def _segment(cu_ptr, r64):
    """Packed layout: (first column as int64, length as int32) of segment ``r64``."""
    c0 = tl.load(cu_ptr + r64).to(tl.int64)
    n = (tl.load(cu_ptr + r64 + 1).to(tl.int64) - c0).to(tl.int32)
    return c0, n


@triton.jit
def policy_token_terms(lr, ind, adv, bad, lo, hi, dual_c, HAS_DUAL: tl.constexpr):
    """Per-token clipped policy loss from the (already clamped) log-ratio ``lr``.

    ``ind`` (bool): the clamp that produced ``lr`` passes the gradient (d lr / d logp = 1).
    ``bad`` (bool): a NaN input at this position; loss and derivative are then NaN (as torch).
    ``lo = 1 - clip_low``, ``hi = 1 + clip_high``, ``dual_c`` the dual-clip constant.
    Returns ``(loss, dloss_dlogp, clipped, clipped_lower)`` with torch's tie conventions:
    ``max``/``min`` split the gradient 50/50 on equality.
    """
    r = tl.exp(lr)
    l1 = -adv * r
    # where-based clamp: NaN stays NaN (tl.minimum / tl.maximum may drop it).
    rc = tl.where(r < lo, lo, tl.where(r > hi, hi, r))
    l2 = -adv * rc
    clipped = l2 > l1
    tie = l1 == l2
    c1 = tl.where(clipped, l2, l1)
    w1 = tl.where(l1 > l2, 1.0, tl.where(tie, 0.5, 0.0))
    w2 = tl.where(clipped, 1.0, tl.where(tie, 0.5, 0.0))
    in_rng = (r >= lo) & (r <= hi)
    dl_dr = -adv * (w1 + tl.where(in_rng, w2, 0.0))
    loss = c1
    lower = tl.zeros(lr.shape, tl.int1)
    if HAS_DUAL:
        l3 = -adv * dual_c
        neg = adv < 0
        lower = (c1 > l3) & neg
        loss = tl.where(lower, l3, c1)
        wd = tl.where(c1 < l3, 1.0, tl.where(c1 == l3, 0.5, 0.0))
        dl_dr = tl.where(neg, dl_dr * wd, dl_dr)
    grad = tl.where(ind, dl_dr * r, 0.0)
    nan = float("nan")
    loss = tl.where(bad, nan, loss)
    # The contract: the derivative is NaN exactly where the per-token loss is NaN (a NaN input
    # here, a NaN GSPO row ratio, or logp = old = +-inf).
    grad = tl.where(bad | (loss != loss), nan, grad)
    return loss, grad, clipped & (bad == 0), lower & (bad == 0)


@triton.jit
def value_token_terms(v, ov, ret, bad, clip, HAS_CLIP: tl.constexpr):
    """Per-token clipped value loss ``max((v - R)^2, (vc - R)^2)``, ``vc = max(min(v, ov + clip),
    ov - clip)`` (plain ``(v - R)^2`` without clip).  Returns ``(loss, dloss_dv, clipped)``."""
    e1 = v - ret
    l1 = e1 * e1
    loss = l1
    grad = 2.0 * e1
    clipped = l1 != l1
    if HAS_CLIP:
        top = ov + clip
        bot = ov - clip
        a = tl.minimum(v, top)
        da = tl.where(v < top, 1.0, tl.where(v == top, 0.5, 0.0))
        vc = tl.maximum(a, bot)
        dvc = da * tl.where(a > bot, 1.0, tl.where(a == bot, 0.5, 0.0))
        e2 = vc - ret
        l2 = e2 * e2
        clipped = l2 > l1
        tie = l1 == l2
        w1 = tl.where(l1 > l2, 1.0, tl.where(tie, 0.5, 0.0))
        w2 = tl.where(clipped, 1.0, tl.where(tie, 0.5, 0.0))
        loss = tl.where(clipped, l2, l1)
        grad = w1 * 2.0 * e1 + w2 * 2.0 * e2 * dvc
    nan = float("nan")
    loss = tl.where(bad, nan, loss)
    grad = tl.where(bad | (loss != loss), nan, grad)
    return loss, grad, clipped & (bad == 0)


@triton.jit
def _gspo_row_log_ratio(lp_base, old_base, m_base, T, ACC: tl.constexpr, BLOCK_T: tl.constexpr):
    """First pass of a GSPO row: sum_t m (lp - old) and sum_t m (NaN outside the mask ignored)."""
    offs = tl.arange(0, BLOCK_T)
    acc_d = tl.zeros([BLOCK_T], ACC)
    acc_n = tl.zeros([BLOCK_T], ACC)
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        cm = cols < T
        m = tl.load(m_base + cols, mask=cm, other=0).to(ACC)
        lp = tl.load(lp_base + cols, mask=cm, other=0).to(ACC)
        old = tl.load(old_base + cols, mask=cm, other=0).to(ACC)
        acc_d += tl.where(m != 0, lp - old, 0.0) * m
        acc_n += m
    return tl.sum(acc_d, axis=0), tl.sum(acc_n, axis=0)


@triton.jit(do_not_specialize=["n_rows"])
def _policy_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, m_ptr, part_ptr, seqlr_ptr, cu_ptr,
    n_rows, T, s_lp, s_old, s_adv, s_m,
    lo_arg: tl.float64, hi_arg: tl.float64, dual_arg: tl.float64,
    ADV_ROW: tl.constexpr, SEQ: tl.constexpr, HAS_DUAL: tl.constexpr, PACKED: tl.constexpr,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)
    if row >= n_rows:
        return
    r64 = row.to(tl.int64)
    lp_base = lp_ptr + r64 * s_lp
    old_base = old_ptr + r64 * s_old
    m_base = m_ptr + r64 * s_m
    adv_base = adv_ptr + r64 * s_adv
    if PACKED:  # segment `row` of the packed row (row strides are 0)
        c0, T = _segment(cu_ptr, r64)
        lp_base += c0
        old_base += c0
        m_base += c0
        if not ADV_ROW:
            adv_base += c0
    lo = to_acc(lo_arg, ACC)
    hi = to_acc(hi_arg, ACC)
    dual_c = to_acc(dual_arg, ACC)
    offs = tl.arange(0, BLOCK_T)

    seq_s = tl.zeros([], ACC)
    kl_row = tl.zeros([], ACC)
    if SEQ:
        # GSPO: the row's mean log-ratio, sum_t m (lp - old) / max(sum_t m, 1) (verl).
        d_sum, n_sum = _gspo_row_log_ratio(lp_base, old_base, m_base, T, ACC, BLOCK_T)
        seq_s = d_sum / tl.maximum(n_sum, 1.0)
        kl_row = -d_sum
    tl.store(seqlr_ptr + row, seq_s)  # saved for backward (0 for token level)
    adv_row = tl.zeros([], ACC)
    if ADV_ROW:
        adv_row = tl.load(adv_base).to(ACC)

    acc_l = tl.zeros([BLOCK_T], ACC)
    acc_n = tl.zeros([BLOCK_T], ACC)
    acc_c = tl.zeros([BLOCK_T], ACC)
    acc_cl = tl.zeros([BLOCK_T], ACC)
    acc_kl = tl.zeros([BLOCK_T], ACC)
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        cm = cols < T
        m = tl.load(m_base + cols, mask=cm, other=0).to(ACC)
        lp = tl.load(lp_base + cols, mask=cm, other=0).to(ACC)
        old = tl.load(old_base + cols, mask=cm, other=0).to(ACC)
        if ADV_ROW:
            adv = adv_row + tl.zeros([BLOCK_T], ACC)
        else:
            adv = tl.load(adv_base + cols, mask=cm, other=0).to(ACC)
        bad = (lp != lp) | (old != old) | (adv != adv)
        if SEQ:
            s_blk = seq_s + tl.zeros([BLOCK_T], ACC)
            ind = s_blk <= 10.0
            lr = tl.where(s_blk > 10.0, 10.0, s_blk)  # a NaN row ratio stays NaN
        else:
            d = lp - old
            lr = tl.where(d < -20.0, -20.0, tl.where(d > 20.0, 20.0, d))  # NaN stays NaN
            ind = (d >= -20.0) & (d <= 20.0)
            acc_kl += tl.where(m != 0, -lr, 0.0) * m
        loss, _g, clipped, lower = policy_token_terms(lr, ind, adv, bad, lo, hi, dual_c, HAS_DUAL)
        valid = m != 0
        acc_l += tl.where(valid, loss, 0.0) * m
        acc_n += m
        acc_c += tl.where(valid & clipped, m, 0.0)
        if HAS_DUAL:
            acc_cl += tl.where(valid & lower, m, 0.0)
    if not SEQ:
        kl_row = tl.sum(acc_kl, axis=0)
    tl.store(part_ptr + P_LOSS * n_rows + row, tl.sum(acc_l, axis=0))
    tl.store(part_ptr + P_COUNT * n_rows + row, tl.sum(acc_n, axis=0))
    tl.store(part_ptr + P_CLIP * n_rows + row, tl.sum(acc_c, axis=0))
    tl.store(part_ptr + P_CLIP_LOWER * n_rows + row, tl.sum(acc_cl, axis=0))
    tl.store(part_ptr + P_KL * n_rows + row, kl_row)


@triton.jit(do_not_specialize=["n_rows"])
def _policy_bwd_kernel(
    lp_ptr, old_ptr, adv_ptr, m_ptr, coef_ptr, seqlr_ptr, gout_ptr, dlp_ptr, cu_ptr,
    n_rows, T, s_lp, s_old, s_adv, s_m, s_dlp,
    lo_arg: tl.float64, hi_arg: tl.float64, dual_arg: tl.float64,
    ADV_ROW: tl.constexpr, SEQ: tl.constexpr, HAS_DUAL: tl.constexpr, PACKED: tl.constexpr,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)
    if row >= n_rows:
        return
    r64 = row.to(tl.int64)
    lp_base = lp_ptr + r64 * s_lp
    old_base = old_ptr + r64 * s_old
    m_base = m_ptr + r64 * s_m
    adv_base = adv_ptr + r64 * s_adv
    out_base = dlp_ptr + r64 * s_dlp
    if PACKED:  # segment `row` of the packed row (row strides are 0)
        c0, T = _segment(cu_ptr, r64)
        lp_base += c0
        old_base += c0
        m_base += c0
        out_base += c0
        if not ADV_ROW:
            adv_base += c0
    lo = to_acc(lo_arg, ACC)
    hi = to_acc(hi_arg, ACC)
    dual_c = to_acc(dual_arg, ACC)
    gc = tl.load(gout_ptr).to(ACC) * tl.load(coef_ptr + row).to(ACC)
    offs = tl.arange(0, BLOCK_T)

    seq_s = tl.zeros([], ACC)
    if SEQ:
        seq_s = tl.load(seqlr_ptr + row).to(ACC)
    adv_row = tl.zeros([], ACC)
    if ADV_ROW:
        adv_row = tl.load(adv_base).to(ACC)
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        cm = cols < T
        m = tl.load(m_base + cols, mask=cm, other=0).to(ACC)
        lp = tl.load(lp_base + cols, mask=cm, other=0).to(ACC)
        old = tl.load(old_base + cols, mask=cm, other=0).to(ACC)
        if ADV_ROW:
            adv = adv_row + tl.zeros([BLOCK_T], ACC)
        else:
            adv = tl.load(adv_base + cols, mask=cm, other=0).to(ACC)
        bad = (lp != lp) | (old != old) | (adv != adv)
        if SEQ:
            s_blk = seq_s + tl.zeros([BLOCK_T], ACC)
            ind = s_blk <= 10.0
            lr = tl.where(s_blk > 10.0, 10.0, s_blk)  # a NaN row ratio stays NaN
        else:
            d = lp - old
            lr = tl.where(d < -20.0, -20.0, tl.where(d > 20.0, 20.0, d))  # NaN stays NaN
            ind = (d >= -20.0) & (d <= 20.0)
        _l, g, _c, _cl = policy_token_terms(lr, ind, adv, bad, lo, hi, dual_c, HAS_DUAL)
        dx = tl.where(m != 0, gc * m * g, 0.0)
        tl.store(out_base + cols, dx.to(dlp_ptr.dtype.element_ty), mask=cm)


@triton.jit(do_not_specialize=["n_rows"])
def _value_fwd_kernel(
    v_ptr, ov_ptr, ret_ptr, m_ptr, part_ptr, cu_ptr,
    n_rows, T, s_v, s_ov, s_ret, s_m,
    clip_arg: tl.float64,
    HAS_CLIP: tl.constexpr, PACKED: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)
    if row >= n_rows:
        return
    r64 = row.to(tl.int64)
    v_base = v_ptr + r64 * s_v
    ov_base = ov_ptr + r64 * s_ov
    ret_base = ret_ptr + r64 * s_ret
    m_base = m_ptr + r64 * s_m
    if PACKED:  # segment `row` of the packed row (row strides are 0)
        c0, T = _segment(cu_ptr, r64)
        v_base += c0
        ov_base += c0
        ret_base += c0
        m_base += c0
    clip = to_acc(clip_arg, ACC)
    offs = tl.arange(0, BLOCK_T)
    acc_l = tl.zeros([BLOCK_T], ACC)
    acc_n = tl.zeros([BLOCK_T], ACC)
    acc_c = tl.zeros([BLOCK_T], ACC)
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        cm = cols < T
        m = tl.load(m_base + cols, mask=cm, other=0).to(ACC)
        v = tl.load(v_base + cols, mask=cm, other=0).to(ACC)
        ret = tl.load(ret_base + cols, mask=cm, other=0).to(ACC)
        bad = (v != v) | (ret != ret)
        ov = v
        if HAS_CLIP:
            ov = tl.load(ov_base + cols, mask=cm, other=0).to(ACC)
            bad = bad | (ov != ov)
        loss, _g, clipped = value_token_terms(v, ov, ret, bad, clip, HAS_CLIP)
        valid = m != 0
        acc_l += tl.where(valid, loss, 0.0) * m
        acc_n += m
        acc_c += tl.where(valid & clipped, m, 0.0)
    tl.store(part_ptr + P_LOSS * n_rows + row, tl.sum(acc_l, axis=0))
    tl.store(part_ptr + P_COUNT * n_rows + row, tl.sum(acc_n, axis=0))
    tl.store(part_ptr + P_CLIP * n_rows + row, tl.sum(acc_c, axis=0))


@triton.jit(do_not_specialize=["n_rows"])
def _value_bwd_kernel(
    v_ptr, ov_ptr, ret_ptr, m_ptr, coef_ptr, gout_ptr, dv_ptr, cu_ptr,
    n_rows, T, s_v, s_ov, s_ret, s_m, s_dv,
    clip_arg: tl.float64,
    HAS_CLIP: tl.constexpr, PACKED: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)
    if row >= n_rows:
        return
    r64 = row.to(tl.int64)
    v_base = v_ptr + r64 * s_v
    ov_base = ov_ptr + r64 * s_ov
    ret_base = ret_ptr + r64 * s_ret
    m_base = m_ptr + r64 * s_m
    out_base = dv_ptr + r64 * s_dv
    if PACKED:  # segment `row` of the packed row (row strides are 0)
        c0, T = _segment(cu_ptr, r64)
        v_base += c0
        ov_base += c0
        ret_base += c0
        m_base += c0
        out_base += c0
    clip = to_acc(clip_arg, ACC)
    gc = tl.load(gout_ptr).to(ACC) * tl.load(coef_ptr + row).to(ACC)
    offs = tl.arange(0, BLOCK_T)
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        cm = cols < T
        m = tl.load(m_base + cols, mask=cm, other=0).to(ACC)
        v = tl.load(v_base + cols, mask=cm, other=0).to(ACC)
        ret = tl.load(ret_base + cols, mask=cm, other=0).to(ACC)
        bad = (v != v) | (ret != ret)
        ov = v
        if HAS_CLIP:
            ov = tl.load(ov_base + cols, mask=cm, other=0).to(ACC)
            bad = bad | (ov != ov)
        _l, g, _c = value_token_terms(v, ov, ret, bad, clip, HAS_CLIP)
        dx = tl.where(m != 0, gc * m * g, 0.0)
        tl.store(out_base + cols, dx.to(dv_ptr.dtype.element_ty), mask=cm)


@triton.jit(do_not_specialize=["n_rows"])
def _finalize_kernel(
    part_ptr, loss_ptr, stats_ptr, coef_ptr, denom_ptr,
    n_rows, dp_arg: tl.float64, denom_arg: tl.float64, lsf_arg: tl.float64,
    scale_arg: tl.float64,
    MODE: tl.constexpr, DENOM: tl.constexpr, N_STATS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """One program: loss = scale * sum_b c_b S_b, stats[k] = P_{2+k} / (sum_b n_b + 1e-8)
    (verl's masked_mean), coef[b] = scale * c_b.
    DENOM: 0 = count from the mask, 1 = denom_arg, 2 = load *denom_ptr."""
    offs = tl.arange(0, BLOCK_B)
    dp = to_acc(dp_arg, ACC)
    scale = to_acc(scale_arg, ACC)
    n_acc = tl.zeros([BLOCK_B], ACC)
    g_acc = tl.zeros([BLOCK_B], ACC)
    st0 = tl.zeros([BLOCK_B], ACC)
    st1 = tl.zeros([BLOCK_B], ACC)
    st2 = tl.zeros([BLOCK_B], ACC)
    for start in range(0, n_rows, BLOCK_B):
        b = start + offs
        bm = b < n_rows
        n = tl.load(part_ptr + P_COUNT * n_rows + b, mask=bm, other=0)
        n_acc += n
        g_acc += tl.where(n > 0, 1.0, 0.0)
        st0 += tl.load(part_ptr + 2 * n_rows + b, mask=bm, other=0)
        if N_STATS > 1:
            st1 += tl.load(part_ptr + 3 * n_rows + b, mask=bm, other=0)
        if N_STATS > 2:
            st2 += tl.load(part_ptr + 4 * n_rows + b, mask=bm, other=0)
    n_tot = tl.sum(n_acc, axis=0)
    g_tot = tl.sum(g_acc, axis=0)
    if DENOM == 1:
        den = to_acc(denom_arg, ACC)
    elif DENOM == 2:
        den = tl.load(denom_ptr).to(ACC)
    elif MODE == 0:
        den = n_tot
    else:
        den = g_tot
    inv = tl.where(den == 0, 0.0, dp / tl.where(den == 0, 1.0, den))
    if MODE == 4:
        inv = inv / to_acc(lsf_arg, ACC)

    loss_acc = tl.zeros([BLOCK_B], ACC)
    for start in range(0, n_rows, BLOCK_B):
        b = start + offs
        bm = b < n_rows
        s = tl.load(part_ptr + P_LOSS * n_rows + b, mask=bm, other=0)
        n = tl.load(part_ptr + P_COUNT * n_rows + b, mask=bm, other=0)
        if MODE == 0:
            c = inv + tl.zeros([BLOCK_B], ACC)
        elif MODE == 1:
            c = dp + tl.zeros([BLOCK_B], ACC)
        elif MODE == 3:
            c = tl.where(n > 0, inv / (n + 1e-8), 0.0)
        else:
            c = tl.where(n > 0, inv, 0.0)
        loss_acc += tl.where(c != 0, c * s, 0.0)
        tl.store(coef_ptr + b, c * scale, mask=bm)
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) * scale)
    den_stats = n_tot + 1e-8
    tl.store(stats_ptr, tl.sum(st0, axis=0) / den_stats)
    if N_STATS > 1:
        tl.store(stats_ptr + 1, tl.sum(st1, axis=0) / den_stats)
    if N_STATS > 2:
        tl.store(stats_ptr + 2, tl.sum(st2, axis=0) / den_stats)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _block_t(T: int) -> int:
    if interpreting():
        return BLOCK_T_INTERPRET
    return min(BLOCK_T, max(triton.next_power_of_2(max(T, 1)), 128))


def _rows(x, cu):
    """(rows, row length used to size the block, cu pointer argument, packed) of a launch:
    the ``[B, T]`` rows of ``x``, or the ``S`` segments of a packed ``[1, total]`` ``x`` (block
    sized for the mean segment length; no host sync)."""
    B, T = x.shape
    if cu is None:
        return B, T, x, False
    S = cu.numel() - 1
    return S, triton.cdiv(T, max(S, 1)), cu, True


def _rs(t, packed):
    """Row stride as the kernels take it: 0 for the single row of a packed layout."""
    return 0 if packed else t.stride(0)


def _num_warps(block: int) -> int:
    return min(NUM_WARPS, max(1, block // 256))


def _block_b() -> int:
    return BLOCK_B_INTERPRET if interpreting() else BLOCK_B


def _finalize(part, n_rows, mode, dp, denom_val, denom_t, lsf, scale, n_stats, acc, dev):
    loss = torch.empty((), dtype=acc, device=dev)
    stats = torch.empty(n_stats, dtype=acc, device=dev)
    coef = torch.empty(n_rows, dtype=acc, device=dev)
    if denom_t is not None:
        denom_kind, denom_ptr = 2, denom_t
    elif denom_val is not None:
        denom_kind, denom_ptr = 1, loss
    else:
        denom_kind, denom_ptr = 0, loss
    _finalize_kernel[(1,)](
        part, loss, stats, coef, denom_ptr, n_rows, float(dp),
        float(denom_val) if denom_val is not None else 0.0,
        float(lsf) if lsf is not None else 1.0, float(scale),
        MODE=AGG_MODE_IDS[mode], DENOM=denom_kind, N_STATS=n_stats,
        ACC=tl_dtype(acc), BLOCK_B=_block_b(), num_warps=FIN_WARPS,
    )
    return loss, stats, coef


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def policy_fwd(logp, old_logp, adv, mask, lo, hi, dual, seq, mode, dp, denom_val, denom_t, lsf,
               acc, cu=None):
    """Launch the fused policy forward + finalize.

    All tensors ``[B, T]`` with unit stride on T (``adv`` may be ``[B]``); ``lo``/``hi`` the ratio
    clip bounds, ``dual`` the dual-clip constant or None, ``seq`` GSPO.  With ``cu`` (a validated
    ``cu_seqlens`` ``[S+1]``) the inputs are the packed ``[1, total]`` layout, ``adv`` may be
    ``[S]``, and the rows below are its ``S`` segments.  Returns
    ``(loss [], stats [3] = clipfrac, clipfrac_lower, approx_kl; coef [B]; seq_log_ratio [B])``.
    """
    B, t_blk, cu_arg, packed = _rows(logp, cu)
    T = logp.shape[1]
    dev = logp.device
    part = torch.empty((N_POLICY_PARTS, B), dtype=acc, device=dev)
    seqlr = torch.empty(B, dtype=acc, device=dev)
    blk = _block_t(t_blk)
    m = _mask_arg(mask)
    adv_row = adv.dim() == 1
    if B > 0:
        _policy_fwd_kernel[(B,)](
            logp, old_logp, adv, m, part, seqlr, cu_arg,
            B, T, _rs(logp, packed), _rs(old_logp, packed),
            adv.stride(0) if adv_row else _rs(adv, packed), _rs(m, packed),
            float(lo), float(hi), float(dual) if dual is not None else 0.0,
            ADV_ROW=adv_row, SEQ=seq, HAS_DUAL=dual is not None, PACKED=packed,
            ACC=tl_dtype(acc), BLOCK_T=blk, num_warps=_num_warps(blk),
        )
    loss, stats, coef = _finalize(part, B, mode, dp, denom_val, denom_t, lsf, 1.0, 3, acc, dev)
    return loss, stats, coef, seqlr


def policy_bwd(grad_out, logp, old_logp, adv, mask, coef, seqlr, lo, hi, dual, seq, cu=None):
    """d loss / d logp into a fresh contiguous ``[B, T]`` buffer of logp's dtype (``cu``: the
    packed layout, as :func:`policy_fwd`; the segments cover every column)."""
    dlogp = torch.empty(tuple(logp.shape), dtype=logp.dtype, device=logp.device)
    B, t_blk, cu_arg, packed = _rows(logp, cu)
    T = logp.shape[1]
    if B == 0 or T == 0:
        return dlogp
    acc = coef.dtype
    blk = _block_t(t_blk)
    m = _mask_arg(mask)
    adv_row = adv.dim() == 1
    _policy_bwd_kernel[(B,)](
        logp, old_logp, adv, m, coef, seqlr, grad_out, dlogp, cu_arg,
        B, T, _rs(logp, packed), _rs(old_logp, packed),
        adv.stride(0) if adv_row else _rs(adv, packed), _rs(m, packed), _rs(dlogp, packed),
        float(lo), float(hi), float(dual) if dual is not None else 0.0,
        ADV_ROW=adv_row, SEQ=seq, HAS_DUAL=dual is not None, PACKED=packed,
        ACC=tl_dtype(acc), BLOCK_T=blk, num_warps=_num_warps(blk),
    )
    return dlogp


def value_fwd(values, old_values, returns, mask, clip, mode, dp, denom_val, denom_t, lsf, acc,
              cu=None):
    """Launch the fused value-loss forward + finalize.  Returns ``(loss [], stats [1] =
    clipfrac, coef [B])``; the loss includes verl's factor 0.5 (and so does ``coef``).
    ``cu``: the packed layout, as :func:`policy_fwd` (``coef`` is then ``[S]``)."""
    B, t_blk, cu_arg, packed = _rows(values, cu)
    T = values.shape[1]
    dev = values.device
    part = torch.empty((N_VALUE_PARTS, B), dtype=acc, device=dev)
    blk = _block_t(t_blk)
    m = _mask_arg(mask)
    if B > 0:
        _value_fwd_kernel[(B,)](
            values, old_values, returns, m, part, cu_arg,
            B, T, _rs(values, packed), _rs(old_values, packed), _rs(returns, packed),
            _rs(m, packed), float(clip) if clip is not None else 0.0,
            HAS_CLIP=clip is not None, PACKED=packed, ACC=tl_dtype(acc), BLOCK_T=blk,
            num_warps=_num_warps(blk),
        )
    return _finalize(part, B, mode, dp, denom_val, denom_t, lsf, 0.5, 1, acc, dev)


def value_bwd(grad_out, values, old_values, returns, mask, coef, clip, cu=None):
    """d loss / d values into a fresh contiguous ``[B, T]`` buffer of values' dtype (``cu``: the
    packed layout, as :func:`policy_fwd`)."""
    dv = torch.empty(tuple(values.shape), dtype=values.dtype, device=values.device)
    B, t_blk, cu_arg, packed = _rows(values, cu)
    T = values.shape[1]
    if B == 0 or T == 0:
        return dv
    blk = _block_t(t_blk)
    m = _mask_arg(mask)
    _value_bwd_kernel[(B,)](
        values, old_values, returns, m, coef, grad_out, dv, cu_arg,
        B, T, _rs(values, packed), _rs(old_values, packed), _rs(returns, packed),
        _rs(m, packed), _rs(dv, packed), float(clip) if clip is not None else 0.0,
        HAS_CLIP=clip is not None, PACKED=packed, ACC=tl_dtype(coef.dtype), BLOCK_T=blk,
        num_warps=_num_warps(blk),
    )
    return dv


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (tests compile these for sm_90 / sm_80 without a GPU).
# Production case: 16-byte aligned rows (T a multiple of 16), fp32 old logp / advantages /
# returns, bool masks (uint8), logp / values streamed in bf16 or fp32.
# ---------------------------------------------------------------------------------------------

def _aot_specs():
    specs = []
    common = {"n_rows": "i32", "T": "i32"}
    for dt in ("bf16", "fp32"):
        for seq, dual, adv_row in ((False, True, False), (False, False, False),
                                   (True, False, True)):
            tag = f"{dt},seq={seq},dual={dual},adv_row={adv_row}"
            sig = {"lp_ptr": f"*{dt}", "old_ptr": "*fp32", "adv_ptr": "*fp32", "m_ptr": "*u8",
                   "part_ptr": "*fp32", "seqlr_ptr": "*fp32", "cu_ptr": "*i64", **common,
                   "s_lp": "i64", "s_old": "i64", "s_adv": "i64", "s_m": "i64",
                   "lo_arg": "fp64", "hi_arg": "fp64", "dual_arg": "fp64",
                   "ADV_ROW": "constexpr", "SEQ": "constexpr", "HAS_DUAL": "constexpr",
                   "PACKED": "constexpr", "ACC": "constexpr", "BLOCK_T": "constexpr"}
            cx = {"ADV_ROW": adv_row, "SEQ": seq, "HAS_DUAL": dual, "PACKED": False,
                  "ACC": tl.float32, "BLOCK_T": BLOCK_T}
            aligned = ["lp_ptr", "old_ptr", "adv_ptr", "m_ptr", "s_lp", "s_old", "s_adv", "s_m",
                       "T"]
            specs.append(dict(name=f"policy_fwd[{tag}]", fn=_policy_fwd_kernel, signature=sig,
                              constexprs=cx, aligned=aligned + ["part_ptr", "seqlr_ptr"],
                              num_warps=NUM_WARPS, stream_dtype=dt))
            bsig = {"lp_ptr": f"*{dt}", "old_ptr": "*fp32", "adv_ptr": "*fp32", "m_ptr": "*u8",
                    "coef_ptr": "*fp32", "seqlr_ptr": "*fp32", "gout_ptr": "*fp32",
                    "dlp_ptr": f"*{dt}", "cu_ptr": "*i64", **common,
                    "s_lp": "i64", "s_old": "i64", "s_adv": "i64", "s_m": "i64", "s_dlp": "i64",
                    "lo_arg": "fp64", "hi_arg": "fp64", "dual_arg": "fp64",
                    "ADV_ROW": "constexpr", "SEQ": "constexpr", "HAS_DUAL": "constexpr",
                    "PACKED": "constexpr", "ACC": "constexpr", "BLOCK_T": "constexpr"}
            specs.append(dict(name=f"policy_bwd[{tag}]", fn=_policy_bwd_kernel, signature=bsig,
                              constexprs=cx, aligned=aligned + ["dlp_ptr", "s_dlp", "coef_ptr",
                                                                "seqlr_ptr", "gout_ptr"],
                              num_warps=NUM_WARPS, stream_dtype=dt))
        for clip in (True, False):
            tag = f"{dt},clip={clip}"
            sig = {"v_ptr": f"*{dt}", "ov_ptr": "*fp32", "ret_ptr": "*fp32", "m_ptr": "*u8",
                   "part_ptr": "*fp32", "cu_ptr": "*i64", **common,
                   "s_v": "i64", "s_ov": "i64", "s_ret": "i64", "s_m": "i64", "clip_arg": "fp64",
                   "HAS_CLIP": "constexpr", "PACKED": "constexpr", "ACC": "constexpr",
                   "BLOCK_T": "constexpr"}
            cx = {"HAS_CLIP": clip, "PACKED": False, "ACC": tl.float32, "BLOCK_T": BLOCK_T}
            aligned = ["v_ptr", "ov_ptr", "ret_ptr", "m_ptr", "s_v", "s_ov", "s_ret", "s_m", "T"]
            specs.append(dict(name=f"value_fwd[{tag}]", fn=_value_fwd_kernel, signature=sig,
                              constexprs=cx, aligned=aligned + ["part_ptr"],
                              num_warps=NUM_WARPS, stream_dtype=dt))
            bsig = {"v_ptr": f"*{dt}", "ov_ptr": "*fp32", "ret_ptr": "*fp32", "m_ptr": "*u8",
                    "coef_ptr": "*fp32", "gout_ptr": "*fp32", "dv_ptr": f"*{dt}",
                    "cu_ptr": "*i64", **common,
                    "s_v": "i64", "s_ov": "i64", "s_ret": "i64", "s_m": "i64", "s_dv": "i64",
                    "clip_arg": "fp64",
                    "HAS_CLIP": "constexpr", "PACKED": "constexpr", "ACC": "constexpr",
                    "BLOCK_T": "constexpr"}
            specs.append(dict(name=f"value_bwd[{tag}]", fn=_value_bwd_kernel, signature=bsig,
                              constexprs=cx, aligned=aligned + ["dv_ptr", "s_dv", "coef_ptr",
                                                                "gout_ptr"],
                              num_warps=NUM_WARPS, stream_dtype=dt))
    # Packed sequences (cu_seqlens): segments start anywhere, so no alignment is assumed and
    # no 128-bit loads are required of these variants (no stream_dtype).
    fp32_rows = ("policy_fwd[fp32", "policy_bwd[fp32", "value_fwd[fp32", "value_bwd[fp32")
    for spec in [sp for sp in specs if sp["name"].startswith(fp32_rows)]:
        specs.append(dict(name=spec["name"].replace("[", "[packed,", 1), fn=spec["fn"],
                          signature=spec["signature"],
                          constexprs={**spec["constexprs"], "PACKED": True},
                          aligned=[a for a in spec["aligned"]
                                   if a in ("part_ptr", "seqlr_ptr", "coef_ptr", "gout_ptr")],
                          num_warps=NUM_WARPS))
    for mode, mid in AGG_MODE_IDS.items():
        for n_stats, denom in ((3, 0), (1, 2)):
            specs.append(dict(
                name=f"loss_finalize[{mode},stats={n_stats},denom={denom}]", fn=_finalize_kernel,
                signature={"part_ptr": "*fp32", "loss_ptr": "*fp32", "stats_ptr": "*fp32",
                           "coef_ptr": "*fp32",
                           "denom_ptr": "*fp32", "n_rows": "i32", "dp_arg": "fp64",
                           "denom_arg": "fp64", "lsf_arg": "fp64", "scale_arg": "fp64",
                           "MODE": "constexpr", "DENOM": "constexpr", "N_STATS": "constexpr",
                           "ACC": "constexpr", "BLOCK_B": "constexpr"},
                constexprs={"MODE": mid, "DENOM": denom, "N_STATS": n_stats, "ACC": tl.float32,
                            "BLOCK_B": BLOCK_B},
                aligned=["part_ptr", "loss_ptr", "stats_ptr", "coef_ptr", "denom_ptr"],
                num_warps=FIN_WARPS,
            ))
    return specs


AOT_SPECS = _aot_specs
