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
# Compiled kernels form ``z = l c - rc`` with one FMA (exact product, one rounding); the
# interpreter has no fused multiply-add (numpy rounds the product), so there the same sums are
# formed as ``(l - r) c`` with raw-logit references instead.  Both are exact relative to the max.
FMA_REF = tl.constexpr(not INTERPRET_AT_IMPORT)


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


# Natural <-> base-2 logarithms: the kernels exponentiate with exp2 (one MUFU.EX2 each, no
# range fix-ups) and fold log2(e) into the scale they multiply by anyway.  Write such constants
# as literals *inside* the expression (``x * 1.4426950408889634``): a float bound to a name in a
# @triton.jit function (``LN2 = 0.69...``, or a module-level constant) becomes an fp32 constexpr,
# and multiplying a float64 scalar by it rounds the result to ~1e-8 (full_kl lost float64
# accuracy that way; tests/test_kl.py::test_full_kl_float64_accuracy guards it).
# Sub-blocks streamed per iteration of the statistics / gradient loops: every thread loads NSUB
# 128-bit vectors before it uses any (NSUB x 16 bytes of loads in flight per thread).
NSUB = 4


def vec_of(dtype: torch.dtype) -> int:
    """Elements per 128-bit access."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def stream_block(dtype: torch.dtype, num_warps: int, nsub: int = NSUB) -> int:
    """Elements of one loop iteration: every thread owns ``nsub`` 128-bit vectors."""
    return nsub * vec_of(dtype) * num_warps * 32


@triton.jit
def max_nan(a, b):
    """max that propagates NaN (one FMNMX.NAN; plain tl.maximum drops NaN on the GPU)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def sub_block_offsets(R: tl.constexpr, VEC: tl.constexpr):
    """Offsets ``[R, VEC]`` of one sub-block: thread ``i`` owns the 128-bit vector ``(i, :)``
    (a warp reads 512 contiguous bytes), so reductions over axis 1 never leave the thread."""
    return tl.arange(0, R)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@triton.jit
def exp2_(z, ACC: tl.constexpr):
    """``2 ** z``: one MUFU.EX2 (ex2.approx.ftz) in fp32; float64 goes through ``exp``."""
    if ACC == tl.float64:
        return tl.exp(z * 0.6931471805599453)
    else:
        return tl.exp2(z)


@triton.jit
def scaled_minus(l, inv_temp, r):
    """``l * inv_temp - r`` rounded once (an FMA: the product is exact).  With ``r`` the
    rounded product ``fl(l * inv_temp)`` this is that rounding's residual, exactly; for the row's
    own logits against their scaled max it is ``x / T - M`` as the statistics define it."""
    return tl.fma(l, inv_temp, -r)


@triton.jit
def finite_or_zero(v, ref):
    """``v`` where the row's reference ``ref`` is finite, else 0 (an all ``-inf`` row's max, or
    a NaN row's, has no residual)."""
    return tl.where((ref > float("-inf")) & (ref < float("inf")), v, 0.0)


@triton.jit
def scaled_max(m_raw, inv_temp):
    """``(M, res)``: the stored scaled max ``M = fl(m_raw / T)`` and its rounding residual
    ``res = m_raw / T - M``, exact (0 for a max that is not finite).

    A log-sum taken against the exact ``m_raw / T`` plus ``res`` is relative to ``M`` itself,
    so the stored pair ``(M, log S)`` sums to the exact logsumexp.  That is what lets a later
    pass that only has the pair form every ``log p`` exactly (:func:`raw_reference`,
    :func:`token_logp`): before, the largest logit's ``log p`` in the backward was off by up to
    half an ulp of ``M``, which the gradient multiplies by ``1 / T`` (~2 at T = 0.001 for a
    one-hot row).  At T = 1 the residual is 0."""
    M = m_raw * inv_temp
    return M, finite_or_zero(scaled_minus(m_raw, inv_temp, M), m_raw)


@triton.jit
def raw_reference(M, log_s, inv_temp):
    """``(Mr, ls)`` for a pass over raw logits from a stored pair ``(M, log S)``: the max in
    raw-logit units ``Mr = M * T`` (exact at T = 1) and ``log S`` relative to ``Mr / T``
    instead of ``M``, the difference formed exactly, so that ``log p = (x - Mr) / T - ls``
    holds to rounding although ``Mr / T != M`` at T != 1."""
    Mr = M / inv_temp
    return Mr, log_s - finite_or_zero(scaled_minus(Mr, inv_temp, M), M)


@triton.jit
def load_block(ptrs, cols, V, MASKED: tl.constexpr, EVICT: tl.constexpr):
    if MASKED:
        if EVICT:
            x = tl.load(ptrs, mask=cols < V, other=float("-inf"), eviction_policy="evict_first")
        else:
            x = tl.load(ptrs, mask=cols < V, other=float("-inf"))
    else:
        if EVICT:
            x = tl.load(ptrs, eviction_policy="evict_first")
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _stats_step(base, start, offs, V, c, m, rc, s, t, Q: tl.constexpr, MASKED: tl.constexpr,
                ENT: tl.constexpr, ACC: tl.constexpr):
    # four 128-bit vectors per thread, all loaded before any is used
    x0 = load_block(base + start + offs, start + offs, V, MASKED, False).to(ACC)
    x1 = load_block(base + (start + Q) + offs, start + Q + offs, V, MASKED, False).to(ACC)
    x2 = load_block(base + (start + 2 * Q) + offs, start + 2 * Q + offs, V, MASKED, False).to(ACC)
    x3 = load_block(base + (start + 3 * Q) + offs, start + 3 * Q + offs, V, MASKED, False).to(ACC)
    # one running max per thread; a NaN anywhere makes it NaN, and with it the sums (alpha)
    bm = max_nan(max_nan(tl.reduce(x0, 1, max_nan), tl.reduce(x1, 1, max_nan)),
                 max_nan(tl.reduce(x2, 1, max_nan), tl.reduce(x3, 1, max_nan)))
    m_new = max_nan(m, bm)
    r_new = tl.where(m_new == float("-inf"), 0.0, m_new)     # finite reference
    if FMA_REF:
        rc_new = r_new * c                                   # base-2 reference
        nr = -rc_new[:, None]
        # z = l c - rc: one FMA; its rounding of rc is the same for every element of the
        # thread (and is undone exactly at the end), so the sums stay exact relative to the max.
        z0 = tl.fma(x0, c, nr)
        z1 = tl.fma(x1, c, nr)
        z2 = tl.fma(x2, c, nr)
        z3 = tl.fma(x3, c, nr)
        dr = rc - rc_new                                     # <= 0 (NaN in a NaN row)
    else:
        rc_new = r_new
        nr = r_new[:, None]
        z0 = (x0 - nr) * c
        z1 = (x1 - nr) * c
        z2 = (x2 - nr) * c
        z3 = (x3 - nr) * c
        dr = (rc - rc_new) * c
    e0 = exp2_(z0, ACC)
    e1 = exp2_(z1, ACC)
    e2 = exp2_(z2, ACC)
    e3 = exp2_(z3, ACC)
    alpha = exp2_(tl.minimum(dr, 0.0), ACC)   # dr > 0 only from the placeholder 0 (s = 0)
    if ENT:
        # e z with e = 0 at z = -inf must be 0: the clamp leaves every term with e > 0 as is
        tv = e0 * tl.maximum(z0, -1e30)
        tv += e1 * tl.maximum(z1, -1e30)
        tv += e2 * tl.maximum(z2, -1e30)
        tv += e3 * tl.maximum(z3, -1e30)
        t = alpha * (t + dr * s) + tl.sum(tv, axis=1)
    s = alpha * s + tl.sum((e0 + e1) + (e2 + e3), axis=1)
    return m_new, rc_new, s, t


@triton.jit
def row_softmax_stats(base, V, inv_temp, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
                      ENT: tl.constexpr = True):
    """One streaming sweep over a row: ``(M, log S, H, bad)`` of ``softmax(x)``, ``x = row *
    inv_temp``, with ``M = max x``, ``S = sum exp(x - M)``, ``H`` the entropy and ``bad`` = the
    row holds a NaN or +inf (its statistics are then NaN).

    Base-2 units: ``c = inv_temp * log2(e)``, ``z = l c - rc`` for the raw logits ``l``.  Every
    thread keeps one running max ``m`` of the raw logits it has seen, its reference
    ``rc = fl(m c)`` (0 while ``m = -inf``), ``s = sum 2^z`` and the entropy's
    ``t = sum 2^z z`` (interpreter: ``z = (l - r) c``); per element a max, an FMA, ``exp2``, an add (a max
    and an FMA for ``t``).  The sums are rescaled by ``2^(rc_old - rc_new)`` once per thread
    per iteration and merged across threads once at the end.  All of them are relative to the
    same rounded references, so nothing is lost to offsets like +1e4: the rounding of the
    final reference, ``delta = M_raw c - fl(M_raw c)``, is formed exactly with an FMA and
    removed from ``log S``.  The returned ``log S`` is relative to the returned (rounded) ``M``:
    ``M + log S`` is the exact logsumexp, which is what lets a later pass that only has the pair
    recover every ``log p`` exactly (:func:`grad_sweep`, :func:`token_logp`).  ``H = ln S - ln2
    T / S``.  ``l = -inf`` (masked vocab, padding)
    contributes nothing.  ``ENT=False`` skips ``t`` (``H`` is then 0).
    """
    VEC: tl.constexpr = 128 // base.dtype.element_ty.primitive_bitwidth
    R: tl.constexpr = BLOCK_V // (4 * VEC)
    Q: tl.constexpr = R * VEC
    offs = sub_block_offsets(R, VEC)
    c = inv_temp * 1.4426950408889634
    m = tl.full([R], float("-inf"), ACC)
    rc = tl.zeros([R], ACC)
    s = tl.zeros([R], ACC)
    t = tl.zeros([R], ACC)
    v_full = V - V % BLOCK_V
    for start in range(0, v_full, BLOCK_V):
        m, rc, s, t = _stats_step(base, start, offs, V, c, m, rc, s, t, Q, False, ENT, ACC)
    if v_full < V:
        m, rc, s, t = _stats_step(base, v_full, offs, V, c, m, rc, s, t, Q, True, ENT, ACC)
    M_raw = tl.reduce(m, 0, max_nan)
    Rg = tl.where(M_raw == float("-inf"), 0.0, M_raw)
    if FMA_REF:
        RC = Rg * c
        delta = tl.fma(Rg, c, -RC)   # exact: the rounding of the reference
        dr = rc - RC
    else:
        delta = tl.zeros([], ACC)
        dr = (rc - Rg) * c
    w = tl.where(s == 0, 0.0, exp2_(dr, ACC))   # NaN sums stay NaN
    S = tl.sum(s * w, axis=0)
    ln_s = tl.log(S)
    log_s = ln_s - delta * 0.6931471805599453
    if ENT:
        Tsum = tl.sum(tl.where(s == 0, 0.0, w * (t + dr * s)), axis=0)
        ent = ln_s - (Tsum / S) * 0.6931471805599453
    else:
        ent = tl.zeros([], ACC)
    bad = (S != S) | (M_raw != M_raw)
    M, res = scaled_max(M_raw, inv_temp)   # log S relative to the stored M
    return M, log_s + res, ent, bad


@triton.jit
def token_logp(l_tok, inv_temp, M, log_s):
    """``log p`` of the raw logit ``l_tok`` from the pair of :func:`row_softmax_stats`:
    ``(l / T - M) - log S`` with ``l / T - M`` rounded once, as the pair defines it (exactly
    0 - log S for the row's largest logit)."""
    return scaled_minus(l_tok, inv_temp, M) - log_s


@triton.jit
def grad_value(x, Mr, c, L2, A, B, HAS_ENT: tl.constexpr, ACC: tl.constexpr):
    """``p (A max(d, -1e18) + B)`` (``HAS_ENT``) or ``p B`` for raw logits ``x`` (in ``ACC``),
    ``d = x - Mr``, ``p = 2^(d c - L2)``.  The clamp makes ``p = 0`` entries (``x = -inf``)
    give exactly 0 and never touches an entry with ``p > 0``."""
    d = x - Mr
    p = exp2_(d * c - L2, ACC)
    if HAS_ENT:
        g = p * (A * tl.maximum(d, -1e18) + B)
    else:
        g = p * B
    return g


@triton.jit
def grad_step(base, obase, start, offs, V, Mr, c, L2, A, B, Q: tl.constexpr,
              MASKED: tl.constexpr, HAS_ENT: tl.constexpr, EVICT: tl.constexpr,
              ACC: tl.constexpr):
    """One iteration of a gradient sweep: four 128-bit vectors per thread loaded, then
    ``grad_value`` of each stored (unmasked unless ``MASKED``, the tail)."""
    OT = obase.dtype.element_ty
    c0 = start + offs
    c1 = start + Q + offs
    c2 = start + 2 * Q + offs
    c3 = start + 3 * Q + offs
    x0 = load_block(base + c0, c0, V, MASKED, EVICT).to(ACC)
    x1 = load_block(base + c1, c1, V, MASKED, EVICT).to(ACC)
    x2 = load_block(base + c2, c2, V, MASKED, EVICT).to(ACC)
    x3 = load_block(base + c3, c3, V, MASKED, EVICT).to(ACC)
    g0 = grad_value(x0, Mr, c, L2, A, B, HAS_ENT, ACC).to(OT)
    g1 = grad_value(x1, Mr, c, L2, A, B, HAS_ENT, ACC).to(OT)
    g2 = grad_value(x2, Mr, c, L2, A, B, HAS_ENT, ACC).to(OT)
    g3 = grad_value(x3, Mr, c, L2, A, B, HAS_ENT, ACC).to(OT)
    if MASKED:
        tl.store(obase + c0, g0, mask=c0 < V, eviction_policy="evict_first")
        tl.store(obase + c1, g1, mask=c1 < V, eviction_policy="evict_first")
        tl.store(obase + c2, g2, mask=c2 < V, eviction_policy="evict_first")
        tl.store(obase + c3, g3, mask=c3 < V, eviction_policy="evict_first")
    else:
        tl.store(obase + c0, g0, eviction_policy="evict_first")
        tl.store(obase + c1, g1, eviction_policy="evict_first")
        tl.store(obase + c2, g2, eviction_policy="evict_first")
        tl.store(obase + c3, g3, eviction_policy="evict_first")


@triton.jit
def grad_sweep(base, obase, V, tok, x_tok, tok_ok, M, log_s, g_lp, g_h, ent, inv_temp,
               HAS_ENT: tl.constexpr, EVICT: tl.constexpr, ACC: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """Write ``dlogits = (g_lp (onehot(tok) - p) - g_h p (log p + H)) / T`` over a row, with
    ``p = exp(x - M - log S)``, ``x = l / T``.

    The caller loads ``x_tok`` (the raw target logit) *and* places a barrier before calling, so
    that with an in-place gradient no warp can overwrite the target logit before every warp has
    read it.  The sweep writes ``-g_lp p + ...`` everywhere; after a barrier (all sweep stores
    done) one thread rewrites the target entry with ``+ g_lp / T``: no per-element one-hot
    compare.  Per element: subtract, FMA, exp2, multiply (+ max and FMA for the entropy)."""
    VEC: tl.constexpr = 128 // base.dtype.element_ty.primitive_bitwidth
    R: tl.constexpr = BLOCK_V // (4 * VEC)
    Q: tl.constexpr = R * VEC
    offs = sub_block_offsets(R, VEC)
    c = inv_temp * 1.4426950408889634
    Mr, ls = raw_reference(M, log_s, inv_temp)
    L2 = ls * 1.4426950408889634
    # g = p (A d + B):  d / T - ls = log p,  -g_h / T (log p + H) - g_lp / T
    A = -g_h * inv_temp * inv_temp
    if HAS_ENT:
        B = -g_h * inv_temp * (ent - ls) - g_lp * inv_temp
    else:
        B = -g_lp * inv_temp
    v_full = V - V % BLOCK_V
    for start in range(0, v_full, BLOCK_V):
        grad_step(base, obase, start, offs, V, Mr, c, L2, A, B, Q, False, HAS_ENT, EVICT, ACC)
    if v_full < V:
        grad_step(base, obase, v_full, offs, V, Mr, c, L2, A, B, Q, True, HAS_ENT, EVICT, ACC)
    g_tok = grad_value(x_tok, Mr, c, L2, A, B, HAS_ENT, ACC) + g_lp * inv_temp
    tl.debug_barrier()   # every sweep store lands before the target entry is rewritten
    tl.store(obase + tl.where(tok_ok, tok, 0), g_tok.to(obase.dtype.element_ty), mask=tok_ok)


@triton.jit
def zero_row(obase, V, ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    """Store zeros over a row (the gradient of a token that does not count)."""
    offs = tl.arange(0, BLOCK_V)
    z = tl.zeros([BLOCK_V], ACC).to(obase.dtype.element_ty)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        tl.store(obase + cols, z, mask=cols < V, eviction_policy="evict_first")
