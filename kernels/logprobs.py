"""Triton kernels: token log-probabilities and entropy from logits, forward and backward.

Layout handled here: ``logits`` is addressed as ``[D0, D1, D2, V]`` with arbitrary strides on the
three leading dims and unit stride on the vocab (``fastrlhf.ops`` collapses any leading shape to at
most three strided dims).  Row ``n`` of the flattened ``[N, V]`` view lives at
``(n // (D1*D2)) * s0 + ((n // D2) % D1) * s1 + (n % D2) * s2`` -- so ``logits[:, :-1]`` is read in
place, never copied.

Forward: one program per row, one streaming pass over the vocab
(:func:`.utils.row_softmax_stats`).  Every thread loads four 128-bit vectors per iteration, keeps
one running max of what it has seen and, relative to it in base-2 units (``exp2`` with
``log2 e / T`` folded into one FMA per element), the sums ``S`` and the entropy's ``T``; a NaN
shows up in the sums at the end instead of through a per-element flag.  With ``x = logits / T``:

    lse = M + log S,   logp = (x[token] - M) - log S,   H = log S - T_sum / S

Backward (:func:`.utils.grad_sweep`) recomputes ``p = exp(x - lse)`` from the saved pair and
writes

    dlogits = (dlogp * (onehot - p) - dH * p * (log p + H)) / T

with the one-hot term added afterwards by one store to the target entry (after a barrier; the
target logit is read before another barrier, so the in-place sweep cannot overwrite it first),
into a fresh buffer or into the logits buffer itself (in-place backward).  Nothing of size [N, V]
is allocated by these kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (acc_dtype_of, grad_sweep, interpreting, row_offset, row_softmax_stats,
                     scalar_to, stream_block, tl_dtype, token_logp)

__all__ = ["logprobs_fwd", "logprobs_bwd", "AOT_SPECS"]

# Block of the vocab streamed per iteration: 8 warps, every thread loads four 128-bit vectors
# (bf16: 32 elements, 8192 per block; fp32: 16, 4096 per block) before it uses any.
NUM_WARPS = 8
BLOCK_V = stream_block(torch.bfloat16, NUM_WARPS)
BLOCK_V_FP32 = stream_block(torch.float32, NUM_WARPS)
# The interpreter executes numpy ops per block: a smaller block keeps CPU tests fast and still
# exercises the multi-block path at small V.
BLOCK_V_INTERPRET = 64


@triton.jit(do_not_specialize=["n_rows", "D1", "D2"])
def _logprobs_fwd_kernel(
    logits_ptr, tokens_ptr, logp_ptr, ent_ptr, lse_ptr,
    n_rows, V, D1, D2, s0, s1, s2,
    inv_temp_in: tl.float64, ignore_index,
    HAS_TOKENS: tl.constexpr, WRITE_ENT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # 1/T arrives as float64 so that float64 logits keep full precision; fp32 math elsewhere.
    inv_temp = scalar_to(inv_temp_in, ACC)
    row = tl.program_id(0)
    if row >= n_rows:
        return
    base = logits_ptr + row_offset(row, D1, D2, s0, s1, s2)
    M, log_s, ent, bad = row_softmax_stats(base, V, inv_temp, ACC, BLOCK_V, WRITE_ENT)
    nan = float("nan")
    # The logsumexp is kept as the pair (M, log S): x - lse is then formed as (x - M) - log S,
    # which stays exact to fp32 rounding even when the logits sit at +1e4 (where M + log S alone
    # would already have lost ~1e-3).
    tl.store(lse_ptr + 2 * row, tl.where(bad, nan, M))
    tl.store(lse_ptr + 2 * row + 1, tl.where(bad, nan, log_s))
    if WRITE_ENT:
        ent = tl.where(bad, nan, ent)
        tl.store(ent_ptr + row, ent)
    if HAS_TOKENS:
        tok = tl.load(tokens_ptr + row).to(tl.int64)
        valid = (tok >= 0) & (tok < V)
        # Out-of-range ids never reach memory: they read nothing and give NaN (the host-side
        # check normally rejects them before launch; it can be disabled for graph capture).
        l_tok = tl.load(base + tl.where(valid, tok, 0)).to(ACC)
        logp = tl.where(valid, token_logp(l_tok, inv_temp, M, log_s), nan)
        logp = tl.where(bad, nan, logp)
        logp = tl.where(tok == ignore_index, 0.0, logp)
        tl.store(logp_ptr + row, logp)


@triton.jit(do_not_specialize=["n_rows", "D1", "D2"])
def _logprobs_bwd_kernel(
    logits_ptr, dlogits_ptr, tokens_ptr, dlogp_ptr, dent_ptr, lse_ptr, ent_ptr,
    n_rows, V, D1, D2, s0, s1, s2, o0, o1, o2,
    inv_temp_in: tl.float64, ignore_index,
    HAS_TOKENS: tl.constexpr, HAS_DENT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    inv_temp = scalar_to(inv_temp_in, ACC)
    row = tl.program_id(0)
    if row >= n_rows:
        return
    base = logits_ptr + row_offset(row, D1, D2, s0, s1, s2)
    obase = dlogits_ptr + row_offset(row, D1, D2, o0, o1, o2)
    M = tl.load(lse_ptr + 2 * row).to(ACC)
    log_s = tl.load(lse_ptr + 2 * row + 1).to(ACC)

    g_lp = tl.zeros([], ACC)
    tok = tl.full([], -1, tl.int64)
    x_tok = tl.zeros([], ACC)
    tok_ok = tok >= 0
    if HAS_TOKENS:
        tok = tl.load(tokens_ptr + row).to(tl.int64)
        g_lp = tl.load(dlogp_ptr + row).to(ACC)
        g_lp = tl.where(tok == ignore_index, 0.0, g_lp)
        tok_ok = (tok >= 0) & (tok < V)
        x_tok = tl.load(base + tl.where(tok_ok, tok, 0)).to(ACC)
    g_h = tl.zeros([], ACC)
    ent = tl.zeros([], ACC)
    if HAS_DENT:
        g_h = tl.load(dent_ptr + row).to(ACC)
        ent = tl.load(ent_ptr + row).to(ACC)
    # In place (dlogits aliases logits) no warp may store over the target logit before every
    # warp has read it above.
    tl.debug_barrier()
    grad_sweep(base, obase, V, tok, x_tok, tok_ok, M, log_s, g_lp, g_h, ent, inv_temp,
               HAS_DENT, False, ACC, BLOCK_V)


def _grid_rows(n_rows: int):
    return (max(n_rows, 1),)


def _block_v(V: int, dtype: torch.dtype) -> int:
    if interpreting():
        return min(BLOCK_V_INTERPRET, max(triton.next_power_of_2(max(V, 1)), 32))
    return min(stream_block(dtype, NUM_WARPS), max(triton.next_power_of_2(V), 128))


def logprobs_fwd(logits3, dims, strides, V, tokens, inv_temp, ignore_index, want_entropy):
    """Launch the forward kernel.

    logits3: the logits tensor (any view); ``dims`` = (D0, D1, D2) and ``strides`` = (s0, s1, s2)
    describe the rows, unit stride over the vocab.  tokens: contiguous int [N] or None.
    Returns (logp or None, entropy or None, lse), [N] in the accumulation dtype except lse, which
    is [N, 2]: the row max M and log S (so that logsumexp = M + log S).
    """
    D0, D1, D2 = dims
    n_rows = D0 * D1 * D2
    acc = acc_dtype_of(logits3.dtype)
    dev = logits3.device
    lse = torch.empty(n_rows, 2, dtype=acc, device=dev)  # (row max, log sum exp(x - max))
    logp = torch.empty(n_rows, dtype=acc, device=dev) if tokens is not None else None
    ent = torch.empty(n_rows, dtype=acc, device=dev) if want_entropy else None
    if n_rows == 0:
        return logp, ent, lse
    _logprobs_fwd_kernel[_grid_rows(n_rows)](
        logits3, tokens if tokens is not None else lse, logp if logp is not None else lse,
        ent if ent is not None else lse, lse,
        n_rows, V, D1, D2, strides[0], strides[1], strides[2],
        inv_temp, ignore_index,
        HAS_TOKENS=tokens is not None, WRITE_ENT=want_entropy,
        ACC=tl_dtype(acc), BLOCK_V=_block_v(V, logits3.dtype), num_warps=NUM_WARPS,
    )
    return logp, ent, lse


def logprobs_bwd(logits3, dlogits3, dims, strides, out_strides, V, tokens, dlogp, dent, lse, ent,
                 inv_temp, ignore_index):
    """Launch the backward kernel, writing dlogits into ``dlogits3`` (may alias ``logits3``)."""
    D0, D1, D2 = dims
    n_rows = D0 * D1 * D2
    if n_rows == 0:
        return dlogits3
    acc = acc_dtype_of(logits3.dtype)
    dummy = lse
    _logprobs_bwd_kernel[_grid_rows(n_rows)](
        logits3, dlogits3, tokens if tokens is not None else dummy,
        dlogp if dlogp is not None else dummy, dent if dent is not None else dummy,
        lse, ent if ent is not None else dummy,
        n_rows, V, D1, D2, strides[0], strides[1], strides[2],
        out_strides[0], out_strides[1], out_strides[2],
        inv_temp, ignore_index,
        HAS_TOKENS=tokens is not None, HAS_DENT=dent is not None,
        ACC=tl_dtype(acc), BLOCK_V=_block_v(V, logits3.dtype), num_warps=NUM_WARPS,
    )
    return dlogits3


# Ahead-of-time compilation specs (used by the tests to compile for sm_90 / sm_80 without a GPU
# and read registers, spills and the SASS).  Pointer args are 16-byte aligned, row strides
# divisible by 16: the production case for V in {32000, 128256, 151936}.
def _aot_specs():
    specs = []
    for dt in ("bf16", "fp32"):
        for has_tok, ent in ((True, True), (True, False), (False, True)):
            specs.append(dict(
                name=f"logprobs_fwd[{dt},tok={has_tok},ent={ent}]",
                fn=_logprobs_fwd_kernel, passes=("fwd read",),
                signature={"logits_ptr": f"*{dt}", "tokens_ptr": "*i64", "logp_ptr": "*fp32",
                           "ent_ptr": "*fp32", "lse_ptr": "*fp32",
                           "n_rows": "i32", "V": "i32", "D1": "i32", "D2": "i32",
                           "s0": "i64", "s1": "i64", "s2": "i64",
                           "inv_temp_in": "fp64", "ignore_index": "i64",
                           "HAS_TOKENS": "constexpr", "WRITE_ENT": "constexpr",
                           "ACC": "constexpr", "BLOCK_V": "constexpr"},
                constexprs={"HAS_TOKENS": has_tok, "WRITE_ENT": ent, "ACC": tl.float32,
                            "BLOCK_V": BLOCK_V if dt == "bf16" else BLOCK_V_FP32},
                aligned=["logits_ptr", "tokens_ptr", "logp_ptr", "ent_ptr", "lse_ptr", "V",
                         "s0", "s1", "s2"],
                num_warps=NUM_WARPS,
                stream_dtype=dt,
            ))
        for has_tok, dent in ((True, True), (True, False), (False, True)):
            specs.append(dict(
                name=f"logprobs_bwd[{dt},tok={has_tok},dent={dent}]",
                fn=_logprobs_bwd_kernel, passes=("bwd read+write",),
                signature={"logits_ptr": f"*{dt}", "dlogits_ptr": f"*{dt}", "tokens_ptr": "*i64",
                           "dlogp_ptr": "*fp32", "dent_ptr": "*fp32", "lse_ptr": "*fp32",
                           "ent_ptr": "*fp32",
                           "n_rows": "i32", "V": "i32", "D1": "i32", "D2": "i32",
                           "s0": "i64", "s1": "i64", "s2": "i64",
                           "o0": "i64", "o1": "i64", "o2": "i64",
                           "inv_temp_in": "fp64", "ignore_index": "i64",
                           "HAS_TOKENS": "constexpr", "HAS_DENT": "constexpr",
                           "ACC": "constexpr", "BLOCK_V": "constexpr"},
                constexprs={"HAS_TOKENS": has_tok, "HAS_DENT": dent, "ACC": tl.float32,
                            "BLOCK_V": BLOCK_V if dt == "bf16" else BLOCK_V_FP32},
                aligned=["logits_ptr", "dlogits_ptr", "tokens_ptr", "dlogp_ptr", "dent_ptr", "V",
                         "lse_ptr", "ent_ptr", "s0", "s1", "s2", "o0", "o1", "o2"],
                num_warps=NUM_WARPS,
                stream_dtype=dt,
            ))
    return specs


AOT_SPECS = _aot_specs
