"""Triton kernels: the whole per-token PPO / GRPO policy loss straight from the logits, with the
gradient w.r.t. the logits produced in the same launch.

Layout: ``logits`` is addressed as ``[D0, D1, D2, V]`` rows with arbitrary strides on the leading
dims and unit stride on the vocab (as in :mod:`.logprobs`, so ``logits[:, :-1]`` is read in place);
row ``n`` of the flattened ``[N, V]`` view is token ``(b, t) = (n // T, n % T)`` of the ``[B, T]``
per-token inputs, which come in as contiguous ``[N]`` vectors (``advantages`` may be ``[B]``).

Each row (token) is handled by one program, in two sweeps over its vocab row:

1. **statistics** -- :func:`.utils.row_softmax_stats`: every thread keeps one running max and,
   relative to it, ``S`` and the entropy's ``T`` in base-2 units (one FMA, one ``exp2`` per
   element; the scheme of :mod:`.logprobs`); after merging the threads
   ``logp = (x_tok - M) - log S`` and ``H = log S - T_sum / S`` (``x = logits / T``).
2. **per-token loss** (scalars): ``pg`` and ``d pg / d logp`` from
   :func:`.losses.policy_token_terms` (token ratio ``clamp(logp - old, -20, 20)``, or the GSPO
   sequence ratio passed in), the KL estimator and its derivative (:mod:`.kl`), and

       L   = pg + kl_coef * kl - entropy_coef * H
       g_lp = w * (d pg / d logp + kl_coef * d kl / d logp)        g_H = -w * entropy_coef

   with ``w = c_b * m_bt`` the aggregation weight of the token (``c`` from
   ``fastrlhf.reference.agg_row_weights``: the aggregated loss is ``sum_bt w L``), 0 for masked
   tokens, whose gradient row is then written as zeros without reading the logits again.
3. **gradient** -- :func:`.utils.grad_sweep`: the row is swept again and
   ``dlogits = (g_lp (onehot - p) - g_H p (log p + H)) / T`` written (into a fresh buffer, or
   over the logits themselves: each element is read before it is overwritten, by the same
   thread).  The target logit is read by every thread *before* a barrier that precedes the
   sweep (in place, another warp's store could otherwise land on it first), and the one-hot
   term is one store to the target entry after a second barrier.

DRAM traffic: the second sweep re-reads the row it just streamed, so it should be served by L2.
What decides that is the bytes brought into L2 between a row's first and second read, i.e. the
rows in flight at the same time.  Their number is fixed by the launch, not left to occupancy:
when rows are long (``#SMs x 4 x row bytes`` above half the L2) exactly one program per SM is
launched and each loops over rows ``pid, pid + #SMs, ...`` -- ``#SMs`` rows in flight whatever
the register count.  On an H100 (132 SMs, 50 MB L2) with bf16 V = 128256 rows (256 KB) that is
33 MB (V = 151936: 39 MB); on an A100 (108 SMs, 40 MB) 27 MB -- under the L2 size, so the logits
cost about one DRAM read and the gradient one write.  Short rows get one program per row (at
most 4 resident per SM: 512 threads each, 2048 per SM), which by construction stays under half the
L2.  The second sweep's loads and the gradient stores are ``evict_first`` so that they do not
push rows still awaiting their second sweep out of L2.  (A design argument, not a measurement:
bench/bench_fused_loss.py measures it.)

``ratio_level="sequence"`` (GSPO) needs the whole row's mean log-ratio before any token's loss:
the logits are first swept by :func:`.logprobs.logprobs_fwd` (logp, entropy and the logsumexp as
``(M, log S)``), the host forms the sequence log-ratios, and this kernel then runs with
``HAS_LSE`` -- no statistics sweep, only the gradient sweep: two reads and one write.

``fused_loss_grad`` is the gradient sweep alone, from saved per-row statistics (``lse``, entropy,
the per-token coefficients ``g_lp`` / ``g_h`` that the fused kernel leaves in ``aux``) with the
upstream gradient read from a device scalar: one read and one write of the logits, the backward
of ``fused_ppo_loss(grad_timing="backward")``.

``scale_rows`` multiplies the stored gradient by a factor in place (the upstream gradient, in
backward); it returns without touching memory when the factor is exactly 1 (``loss.backward()``),
checked on the device (no host synchronization) by a persistent launch of at most 4 programs per
SM.  ``fused_loss_grad`` is the backward of ``grad_timing="backward"``, which has no such pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tables import FUSED_AUX, FUSED_AUX_ROWS
from .utils import (acc_dtype_of, grad_sweep, interpreting, row_offset, row_softmax_stats,
                     stream_block, tl_dtype, token_logp, zero_row)
from .kl import KINDS as KL_KINDS
from .kl import klp_dvdx, klp_value
from .losses import to_acc, policy_token_terms

__all__ = ["fused_loss_fwd", "fused_loss_grad", "scale_rows", "N_AUX", "AUX_ROWS", "KL_KINDS", "AOT_SPECS"]

# 16 warps, every thread loads four 128-bit vectors per sweep iteration (bf16: 32 elements,
# 16384 per block; fp32: 16, 8192 per block) and keeps one running max / sum / entropy sum.
NUM_WARPS = 16
BLOCK_V = stream_block(torch.bfloat16, NUM_WARPS)
BLOCK_V_FP32 = stream_block(torch.float32, NUM_WARPS)
BLOCK_V_INTERPRET = 64
# scale kernel: a plain elementwise stream
BLOCK_S = 4096
NUM_WARPS_S = 8

# Rows of the per-token output buffer aux[N_AUX, N].
# ``g_lp`` / ``g_h`` (d loss / d logp, d loss / d H per token) are written only without
# ``write_grad``: the inputs of a deferred gradient sweep (``fused_loss_grad``).
AUX_ROWS = FUSED_AUX_ROWS[:FUSED_AUX["g_h"] + 1]  # the layout of fastrlhf.tables
N_AUX = len(AUX_ROWS)


# Row addressing and the streaming softmax statistics are shared with token_logprobs:
# kernels/utils.py row_offset / row_softmax_stats.


@triton.jit(do_not_specialize=["n_rows", "T", "D1", "D2", "ignore_index"])
def _fused_loss_kernel(
    logits_ptr, dlogits_ptr, tokens_ptr, old_ptr, adv_ptr, ref_ptr, w_ptr, seq_ptr,
    lse_ptr, lp_in_ptr, ent_in_ptr, aux_ptr,
    n_rows, T, V, D1, D2, s0, s1, s2, o0, o1, o2,
    inv_temp_arg: tl.float64, ignore_index,
    lo_arg: tl.float64, hi_arg: tl.float64, dual_arg: tl.float64,
    kl_coef_arg: tl.float64, ent_coef_arg: tl.float64,
    ADV_ROW: tl.constexpr, SEQ: tl.constexpr, HAS_LSE: tl.constexpr, HAS_DUAL: tl.constexpr,
    HAS_REF: tl.constexpr, KL_VAL: tl.constexpr, KL_GRAD: tl.constexpr,
    HAS_ENT: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    inv_temp = to_acc(inv_temp_arg, ACC)
    lo = to_acc(lo_arg, ACC)
    hi = to_acc(hi_arg, ACC)
    dual_c = to_acc(dual_arg, ACC)
    kl_coef = to_acc(kl_coef_arg, ACC)
    ent_coef = to_acc(ent_coef_arg, ACC)
    nan = float("nan")
    # Rows pid, pid + P, pid + 2P, ...: the launcher picks the number of programs P so that the
    # rows in flight (P, or what fits on the GPU if fewer) keep the second sweep inside L2.
    for row in tl.range(tl.program_id(0), n_rows, tl.num_programs(0)):
        r64 = row + tl.zeros([], tl.int64)  # (the interpreter yields Python ints here)
        b = r64 // T
        base = logits_ptr + row_offset(r64, D1, D2, s0, s1, s2)

        tok = tl.load(tokens_ptr + r64).to(tl.int64)
        valid_tok = (tok >= 0) & (tok < V)
        ignored = tok == ignore_index

        # ---- 1. statistics of the row (or those of a previous logprobs pass) ---------------
        if HAS_LSE:
            M = tl.load(lse_ptr + 2 * r64).to(ACC)
            log_s = tl.load(lse_ptr + 2 * r64 + 1).to(ACC)
            ent = tl.load(ent_in_ptr + r64).to(ACC)
            logp = tl.load(lp_in_ptr + r64).to(ACC)
        else:
            M, log_s, ent, bad_row = row_softmax_stats(base, V, inv_temp, ACC, BLOCK_V, True)
            # Out-of-range ids read nothing and give NaN (the host check normally rejects them).
            l_tok = tl.load(base + tl.where(valid_tok, tok, 0)).to(ACC)
            logp = tl.where(valid_tok, token_logp(l_tok, inv_temp, M, log_s), nan)
            logp = tl.where(bad_row, nan, logp)
            logp = tl.where(ignored, 0.0, logp)
            ent = tl.where(bad_row, nan, ent)
            M = tl.where(bad_row, nan, M)

        # ---- 2. the per-token loss and its derivatives w.r.t. logp and the entropy ---------
        old = tl.load(old_ptr + r64).to(ACC)
        if ADV_ROW:
            adv = tl.load(adv_ptr + b).to(ACC)
        else:
            adv = tl.load(adv_ptr + r64).to(ACC)
        w = tl.load(w_ptr + r64).to(ACC)
        if SEQ:
            seq_s = tl.load(seq_ptr + b).to(ACC)
            ind = seq_s <= 10.0
            lr = tl.where(seq_s > 10.0, 10.0, seq_s)  # a NaN row ratio stays NaN
            approx_kl = old - logp
        else:
            d = logp - old
            ind = (d >= -20.0) & (d <= 20.0)
            lr = tl.where(d < -20.0, -20.0, tl.where(d > 20.0, 20.0, d))
            approx_kl = -lr
        bad = (logp != logp) | (old != old) | (adv != adv)
        pg, dpg, clipped, lower = policy_token_terms(lr, ind, adv, bad, lo, hi, dual_c, HAS_DUAL)
        kl = tl.zeros([], ACC)
        dkl = tl.zeros([], ACC)
        if HAS_REF:
            ref = tl.load(ref_ptr + r64).to(ACC)
            kl = klp_value(logp, ref, KL_VAL)
            dkl = klp_dvdx(logp, ref, KL_GRAD)
        loss = pg + kl_coef * kl - ent_coef * ent

        aux = aux_ptr + r64
        tl.store(aux + 0 * n_rows, loss)
        tl.store(aux + 1 * n_rows, logp)
        tl.store(aux + 2 * n_rows, ent)
        tl.store(aux + 3 * n_rows, kl)
        tl.store(aux + 4 * n_rows, clipped.to(ACC))
        tl.store(aux + 5 * n_rows, lower.to(ACC))
        tl.store(aux + 6 * n_rows, approx_kl)
        # d loss / d logp and d loss / d H of the aggregated loss (0 for tokens that do not
        # count): the coefficients of the gradient sweep, here or in a deferred backward
        live = w != 0
        g_lp = tl.where(live & (ignored == 0), w * (dpg + kl_coef * dkl), 0.0)
        g_h = tl.where(live, -w * ent_coef, 0.0)

        # ---- 3. the gradient sweep (or its coefficients, for a deferred backward) ---------
        if not WRITE_GRAD:
            tl.store(aux + 7 * n_rows, g_lp)
            tl.store(aux + 8 * n_rows, g_h)
        else:
            obase = dlogits_ptr + row_offset(r64, D1, D2, o0, o1, o2)
            # The target logit for the one-hot term, read by every thread *before* the barrier:
            # with an in-place gradient another warp's sweep may otherwise overwrite it first.
            x_tok2 = tl.load(base + tl.where(valid_tok, tok, 0)).to(ACC)
            tl.debug_barrier()
            if live:
                # HAS_LSE: the row comes from DRAM again, no L2 reuse to protect
                grad_sweep(base, obase, V, tok, x_tok2, valid_tok, M, log_s, g_lp, g_h, ent,
                           inv_temp, HAS_ENT, not HAS_LSE, ACC, BLOCK_V)
            else:
                # masked tokens (w = 0) read nothing: their gradient row is zeros
                zero_row(obase, V, ACC, BLOCK_V)
            # the next row's statistics must not start while this row's stores are pending
            # in other warps (rows never overlap, but the in-place fix-up store is per row)
            tl.debug_barrier()


@triton.jit(do_not_specialize=["n_rows", "D1", "D2", "ignore_index"])
def _fused_loss_grad_kernel(
    logits_ptr, dlogits_ptr, tokens_ptr, lse_ptr, ent_ptr, glp_ptr, gh_ptr, up_ptr,
    n_rows, V, D1, D2, s0, s1, s2, o0, o1, o2,
    inv_temp_arg: tl.float64, ignore_index,
    HAS_ENT: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Gradient sweep only, from saved per-row statistics: ``dlogits = u (g_lp (onehot - p) -
    g_h p (log p + H)) / T`` with the upstream gradient ``u`` read from a device scalar.  One
    read and one write of the row (none of the read for rows with ``g_lp = g_h = 0``)."""
    inv_temp = to_acc(inv_temp_arg, ACC)
    row = tl.program_id(0)
    if row >= n_rows:
        return
    r64 = row.to(tl.int64)
    base = logits_ptr + row_offset(r64, D1, D2, s0, s1, s2)
    obase = dlogits_ptr + row_offset(r64, D1, D2, o0, o1, o2)
    u = tl.load(up_ptr).to(ACC)
    tok = tl.load(tokens_ptr + r64).to(tl.int64)
    valid_tok = (tok >= 0) & (tok < V)
    g_lp = tl.load(glp_ptr + r64).to(ACC)
    g_lp = tl.where(tok == ignore_index, 0.0, g_lp)
    g_h = tl.zeros([], ACC)
    ent = tl.zeros([], ACC)
    if HAS_ENT:
        g_h = tl.load(gh_ptr + r64).to(ACC)
        ent = tl.load(ent_ptr + r64).to(ACC)
    live = (g_lp != 0) | (g_h != 0)
    M = tl.load(lse_ptr + 2 * r64).to(ACC)
    log_s = tl.load(lse_ptr + 2 * r64 + 1).to(ACC)
    x_tok = tl.load(base + tl.where(valid_tok, tok, 0)).to(ACC)
    tl.debug_barrier()   # in place: the target logit is read by every thread before any store
    if live:
        grad_sweep(base, obase, V, tok, x_tok, valid_tok, M, log_s, g_lp * u, g_h * u, ent,
                   inv_temp, HAS_ENT, False, ACC, BLOCK_V)
    else:
        zero_row(obase, V, ACC, BLOCK_V)


@triton.jit(do_not_specialize=["n_rows", "D1", "D2"])
def _scale_rows_kernel(x_ptr, g_ptr, n_rows, V, D1, D2, s0, s1, s2,
                       ACC: tl.constexpr, BLOCK: tl.constexpr):
    """x[row, :] *= g in place, rows ``pid, pid + P, ...``; nothing is read or written when
    g == 1 (the launch is then a few programs per SM that load one scalar each)."""
    g = tl.load(g_ptr).to(ACC)
    if g != 1.0:
        offs = tl.arange(0, BLOCK)
        for row in tl.range(tl.program_id(0), n_rows, tl.num_programs(0)):
            base = x_ptr + row_offset(row + tl.zeros([], tl.int64), D1, D2, s0, s1, s2)
            for start in range(0, V, BLOCK):
                cols = start + offs
                cm = cols < V
                x = tl.load(base + cols, mask=cm, other=0.0).to(ACC)
                tl.store(base + cols, (x * g).to(x_ptr.dtype.element_ty), mask=cm)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _block_v(V: int, dtype) -> int:
    if interpreting():
        return min(BLOCK_V_INTERPRET, max(triton.next_power_of_2(max(V, 1)), 32))
    return min(stream_block(dtype, NUM_WARPS), max(triton.next_power_of_2(V), 512))


def _num_warps(block: int, dtype) -> int:
    """Warps such that every thread owns four 128-bit vectors of the block."""
    return max(1, min(NUM_WARPS, block // stream_block(dtype, 1)))


# Rows whose second sweep must still find them in L2 may occupy at most this fraction of it.
L2_FRACTION = 0.5
# Programs of NUM_WARPS warps that can be resident on one SM at most (2048 threads per SM).
MAX_PROGRAMS_PER_SM = 4
INTERPRET_PROGRAMS = 3   # interpreter: few programs, so the tests exercise the row loop
_DEVICE_INFO: dict = {}


def _device_info(device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_INFO:
        props = torch.cuda.get_device_properties(idx)
        l2 = int(getattr(props, "L2_cache_size", 0) or (40 << 20))
        _DEVICE_INFO[idx] = (props.multi_processor_count, l2)
    return _DEVICE_INFO[idx]


def num_programs(n_rows: int, row_bytes: int, device) -> int:
    """Programs to launch (each loops over rows ``pid, pid + P, ...``).

    Rows in flight = resident programs.  When even ``MAX_PROGRAMS_PER_SM`` per SM would keep
    under ``L2_FRACTION`` of the L2 (short rows), launch one program per row and let the hardware
    fill the SMs; otherwise launch exactly one program per SM, so that ``#SMs`` rows are in
    flight whatever the occupancy (bf16 V = 128256 on an H100: 132 x 256 KB = 33 MB of 50 MB).
    """
    if n_rows == 0:
        return 0
    if interpreting() or device.type != "cuda":
        return min(n_rows, INTERPRET_PROGRAMS)
    n_sm, l2 = _device_info(device)
    if n_sm * MAX_PROGRAMS_PER_SM * row_bytes <= L2_FRACTION * l2:
        return n_rows
    return min(n_rows, n_sm)


def fused_loss_fwd(logits, dlogits, dims, strides, out_strides, V, T, tokens, old_logp, adv,
                   ref_logp, w, seq_lr, lse, logp_in, ent_in, *, inv_temp, ignore_index, lo, hi,
                   dual, kl_coef, kl_val, kl_grad, ent_coef, write_grad, adv_row):
    """Launch the fused kernel.

    ``logits`` rows as ``dims`` / ``strides`` (see :mod:`.logprobs`); ``dlogits`` the gradient
    buffer (rows at ``out_strides``; may be ``logits`` itself; ignored unless ``write_grad``).
    Per-token inputs are contiguous ``[N]`` in the accumulation dtype (``adv`` ``[B]`` for
    per-sequence advantages, ``adv_row=True``), ``w = c_b * m_bt`` the aggregation weights,
    ``ref_logp`` or None.
    ``seq_lr`` ``[B]`` (GSPO) or None; ``lse`` ``[N, 2]`` / ``logp_in`` / ``ent_in`` from a
    previous logprobs pass (GSPO) or None.  ``kl_val`` / ``kl_grad``: codes of :data:`KL_KINDS`
    for the KL value and its gradient (they differ for the straight-through kinds).
    Returns ``aux`` ``[N_AUX, N]`` (rows :data:`AUX_ROWS`).
    """
    D0, D1, D2 = dims
    n_rows = D0 * D1 * D2
    acc = w.dtype
    aux = torch.empty((N_AUX, n_rows), dtype=acc, device=w.device)
    if n_rows == 0:
        return aux
    seq = seq_lr is not None
    has_lse = lse is not None
    dummy = w
    blk = _block_v(V, logits.dtype)
    grid = (num_programs(n_rows, V * logits.element_size(), logits.device),)
    _fused_loss_kernel[grid](
        logits, dlogits if write_grad else logits, tokens, old_logp, adv,
        ref_logp if ref_logp is not None else dummy, w, seq_lr if seq else dummy,
        lse if has_lse else dummy, logp_in if has_lse else dummy, ent_in if has_lse else dummy,
        aux,
        n_rows, T, V, D1, D2, strides[0], strides[1], strides[2],
        out_strides[0], out_strides[1], out_strides[2],
        float(inv_temp), int(ignore_index), float(lo), float(hi),
        float(dual) if dual is not None else 0.0, float(kl_coef), float(ent_coef),
        ADV_ROW=bool(adv_row),
        SEQ=seq, HAS_LSE=has_lse, HAS_DUAL=dual is not None,
        HAS_REF=ref_logp is not None, KL_VAL=int(kl_val), KL_GRAD=int(kl_grad),
        HAS_ENT=float(ent_coef) != 0.0, WRITE_GRAD=bool(write_grad),
        ACC=tl_dtype(acc), BLOCK_V=blk, num_warps=_num_warps(blk, logits.dtype),
    )
    return aux


def scale_rows(x, dims, strides, V, g):
    """``x *= g`` in place over rows ``dims`` / ``strides`` (unit stride over ``V``); ``g`` a
    one-element tensor.  No memory is touched when ``g == 1``."""
    D0, D1, D2 = dims
    n_rows = D0 * D1 * D2
    if n_rows == 0 or V == 0:
        return x
    acc = acc_dtype_of(x.dtype)
    blk = min(BLOCK_S_INTERPRET if interpreting() else BLOCK_S,
              triton.next_power_of_2(max(V, 1)))
    # a persistent launch: its size does not grow with the logits (g == 1 costs one tiny launch)
    grid = (min(n_rows, INTERPRET_PROGRAMS if interpreting() or x.device.type != "cuda"
                else _device_info(x.device)[0] * MAX_PROGRAMS_PER_SM),)
    _scale_rows_kernel[grid](
        x, g.to(acc).reshape(1), n_rows, V, D1, D2, strides[0], strides[1], strides[2],
        ACC=tl_dtype(acc), BLOCK=blk, num_warps=max(1, min(NUM_WARPS_S, blk // 256)),
    )
    return x


def fused_loss_grad(logits, dlogits, dims, strides, out_strides, V, tokens, lse, ent, g_lp,
                    g_h, upstream, *, inv_temp, ignore_index, has_ent):
    """Write the fused loss's gradient w.r.t. the logits from saved per-row statistics.

    ``lse`` ``[N, 2]`` (row max M, log S) and ``ent`` ``[N]`` as :func:`.logprobs.logprobs_fwd`
    returns them; ``g_lp`` / ``g_h`` ``[N]`` the per-token coefficients of ``logp`` and of the
    entropy in the loss (aggregation weight included, 0 for tokens that do not count: their row
    is written as zeros without being read); ``upstream`` a one-element device tensor (the
    upstream gradient, no host sync).  ``dlogits`` may be ``logits`` itself (in place).
    Returns ``dlogits``.  This is backward's single read + write of the logits with the upstream
    gradient folded in (the existing :func:`fused_loss_fwd` is unchanged)."""
    D0, D1, D2 = dims
    n_rows = D0 * D1 * D2
    if n_rows == 0 or V == 0:
        return dlogits
    acc = g_lp.dtype
    blk = _block_v(V, logits.dtype)
    _fused_loss_grad_kernel[(n_rows,)](
        logits, dlogits, tokens, lse, ent if ent is not None else lse, g_lp,
        g_h if g_h is not None else g_lp, upstream.reshape(1).to(acc),
        n_rows, V, D1, D2, strides[0], strides[1], strides[2],
        out_strides[0], out_strides[1], out_strides[2],
        float(inv_temp), int(ignore_index),
        HAS_ENT=bool(has_ent), ACC=tl_dtype(acc), BLOCK_V=blk,
        num_warps=_num_warps(blk, logits.dtype))
    return dlogits


BLOCK_S_INTERPRET = 64


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (the tests compile these for sm_90 / sm_80 without a GPU):
# 16-byte aligned rows (V a multiple of 16, as 128256 and 151936 are), fp32 per-token inputs.
# ---------------------------------------------------------------------------------------------

def _aot_specs():
    specs = []
    for dt in ("bf16", "fp32"):
        for seq, dual, ref, ent, adv_row in ((False, True, True, True, False),
                                             (False, False, False, False, True),
                                             (True, False, True, True, True)):
            tag = f"{dt},seq={seq},dual={dual},ref={ref},ent={ent},adv_row={adv_row}"
            sig = {"logits_ptr": f"*{dt}", "dlogits_ptr": f"*{dt}", "tokens_ptr": "*i64",
                   "old_ptr": "*fp32", "adv_ptr": "*fp32", "ref_ptr": "*fp32", "w_ptr": "*fp32",
                   "seq_ptr": "*fp32", "lse_ptr": "*fp32", "lp_in_ptr": "*fp32",
                   "ent_in_ptr": "*fp32", "aux_ptr": "*fp32",
                   "n_rows": "i32", "T": "i32", "V": "i32", "D1": "i32", "D2": "i32",
                   "s0": "i64", "s1": "i64", "s2": "i64", "o0": "i64", "o1": "i64", "o2": "i64",
                   "inv_temp_arg": "fp64", "ignore_index": "i64",
                   "lo_arg": "fp64", "hi_arg": "fp64", "dual_arg": "fp64",
                   "kl_coef_arg": "fp64", "ent_coef_arg": "fp64",
                   "ADV_ROW": "constexpr", "SEQ": "constexpr", "HAS_LSE": "constexpr",
                   "HAS_DUAL": "constexpr", "HAS_REF": "constexpr", "KL_VAL": "constexpr",
                   "KL_GRAD": "constexpr", "HAS_ENT": "constexpr", "WRITE_GRAD": "constexpr",
                   "ACC": "constexpr", "BLOCK_V": "constexpr"}
            cx = {"ADV_ROW": adv_row, "SEQ": seq, "HAS_LSE": seq, "HAS_DUAL": dual,
                  "HAS_REF": ref, "KL_VAL": KL_KINDS["k3"], "KL_GRAD": KL_KINDS["k3"],
                  "HAS_ENT": ent, "WRITE_GRAD": True, "ACC": tl.float32,
                  "BLOCK_V": BLOCK_V if dt == "bf16" else BLOCK_V_FP32}
            specs.append(dict(
                name=f"fused_ppo_loss[{tag}]", fn=_fused_loss_kernel, signature=sig,
                passes=(("fwd read+write (grad, stats from logprobs)",) if seq else
                        ("fwd read (stats)", "fwd read+write (grad)")),
                constexprs=cx,
                aligned=["logits_ptr", "dlogits_ptr", "tokens_ptr", "old_ptr", "adv_ptr",
                         "ref_ptr", "w_ptr", "seq_ptr", "lse_ptr", "lp_in_ptr", "ent_in_ptr",
                         "aux_ptr", "V", "s0", "s1", "s2", "o0", "o1", "o2"],
                num_warps=NUM_WARPS, stream_dtype=dt))
        for has_ent in (True, False):
            specs.append(dict(
                name=f"fused_ppo_loss_grad[{dt},ent={has_ent}]", fn=_fused_loss_grad_kernel,
                signature={"logits_ptr": f"*{dt}", "dlogits_ptr": f"*{dt}", "tokens_ptr": "*i64",
                           "lse_ptr": "*fp32", "ent_ptr": "*fp32", "glp_ptr": "*fp32",
                           "gh_ptr": "*fp32", "up_ptr": "*fp32",
                           "n_rows": "i32", "V": "i32", "D1": "i32", "D2": "i32",
                           "s0": "i64", "s1": "i64", "s2": "i64", "o0": "i64", "o1": "i64",
                           "o2": "i64", "inv_temp_arg": "fp64", "ignore_index": "i64",
                           "HAS_ENT": "constexpr", "ACC": "constexpr", "BLOCK_V": "constexpr"},
                constexprs={"HAS_ENT": has_ent, "ACC": tl.float32,
                            "BLOCK_V": BLOCK_V if dt == "bf16" else BLOCK_V_FP32},
                aligned=["logits_ptr", "dlogits_ptr", "tokens_ptr", "lse_ptr", "ent_ptr",
                         "glp_ptr", "gh_ptr", "up_ptr", "V", "s0", "s1", "s2", "o0", "o1", "o2"],
                num_warps=NUM_WARPS, stream_dtype=dt, passes=("bwd read+write (grad)",)))
        specs.append(dict(
            name=f"fused_ppo_loss_scale[{dt}]", fn=_scale_rows_kernel,
            signature={"x_ptr": f"*{dt}", "g_ptr": "*fp32", "n_rows": "i32", "V": "i32",
                       "D1": "i32", "D2": "i32", "s0": "i64", "s1": "i64", "s2": "i64",
                       "ACC": "constexpr", "BLOCK": "constexpr"},
            constexprs={"ACC": tl.float32, "BLOCK": BLOCK_S},
            aligned=["x_ptr", "g_ptr", "V", "s0", "s1", "s2"],
            num_warps=NUM_WARPS_S, stream_dtype=dt, passes=("bwd read+write (scale)",)))
    return specs


AOT_SPECS = _aot_specs
