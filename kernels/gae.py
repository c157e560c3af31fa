"""Triton kernels: GAE (generalized advantage estimation) as a blocked reverse scan.

Recurrence (verl's multi-turn aware GAE, not whitened).  Per row, for t = T-1 .. 0, with
``nv`` / ``A`` = value / advantage of the next *valid* position (both 0 past the end)::

    valid t (mask != 0):  adv_t = A_t = r_t + gamma * nv - V_t + gamma * lam * A,  ret_t = A_t + V_t
    masked t:             skipped (nv, A carry across unchanged);  adv_t = ret_t = 0

Scan formulation.  Everything a valid position needs from its right is one number,

    W_t = gamma * nv + gamma * lam * A      ("W entering t": the bootstrap from the next valid
                                              position), so  A_t = (r_t - V_t) + W_t.

W obeys a first-order affine recurrence right to left: crossing position t maps
``W -> a_t W + b_t`` with

    valid t:  a_t = gamma * lam,  b_t = gamma * V_t + gamma * lam * (r_t - V_t)
    masked t: a_t = 1,            b_t = 0                     (the identity)

and W = 0 past the end.  Affine maps compose associatively, ``(a2, b2) o (a1, b1) =
(a2 a1, a2 b1 + b2)``, so W entering every column of a block is one ``tl.associative_scan`` over
the maps of the columns to its right (O(log BLOCK_T) depth, in registers), applied to the W
carried in from the previously processed block.  The lane of column t holds the map of column
t + 1: it is loaded with a second, one-element-shifted load of the same cache lines (no extra DRAM
traffic).  Inputs at masked positions never enter the arithmetic (they select the identity), so
NaN / garbage under the mask is ignored; a NaN at a valid position spreads to the earlier valid
positions of its row only, as in the sequential loop.

Why this shape (the memory-traffic argument).  GAE does ~10 flops per element: it is purely
bandwidth bound, and the floor is reading r, V, mask once and writing adv, ret once
(8192 x 4096 fp32 + bool mask: 4 + 4 + 1 + 4 + 4 = 17 B/elem = 570 MB, ~0.19 ms at an H100's
~3 TB/s copy rate).  A per-timestep loop (one program per row walking t, or verl's loop over
columns) touches a different cache line per row per step and serialises T dependent steps; this
kernel reads [BLOCK_B, BLOCK_T] tiles of each row in contiguous 128-bit vectors (every element
read once from DRAM, every output written once), keeps the tile's recurrence in registers, and
carries one scalar per row between blocks, so any T (tens of thousands) streams through the same
tile, while rows (or packed segments) run in parallel programs.  Blocks start at multiples of
BLOCK_T from the row start, so with 16-byte aligned rows the aligned loads and all stores are full
128-bit vectors; only the rightmost (first processed) block of a row can be ragged (masked; masked
lanes are the identity).  A two-component scan costs 2 shuffles + 2 flops per level.

Scan direction.  ``REVERSE_SCAN=True`` (the default) loads lanes in memory order and runs
``tl.associative_scan(..., reverse=True)``; ``REVERSE_SCAN=False`` loads each block with reversed
addresses (lane j holds column ``block_end - j``) and runs a forward scan: the same combine, the
same result, but 32-bit instead of 128-bit accesses.  Triton's reverse scan with a
non-commutative combine has a history of bugs (triton-lang/triton#4362), so on CUDA the launcher
checks once per (device, configuration) that both variants agree on a small random problem and
falls back to the forward variant, with a warning, if they do not.

Packed sequences (``VARLEN``): program rows are the segments ``[cu[s], cu[s+1])`` of the single
packed row; each is scanned independently (no state crosses a segment boundary).
"""

from __future__ import annotations

import struct
import warnings

import torch
import triton
import triton.language as tl

from .utils import interpreting, tl_dtype

__all__ = ["gae_fwd", "AOT_SPECS"]

# Tile of TILE elements (BLOCK_B rows x BLOCK_T columns).  1024 fp32 lanes over 4 warps = 8 per
# thread: two 128-bit loads per aligned input stream; ~76 registers on sm_90, no spills.
TILE = 1024
MAX_BLOCK_T = 1024
NUM_WARPS = 4
NUM_WARPS_F64 = 8
# Under the interpreter the per-block overhead dominates (T = 20000 runs in ~3 s with these);
# rows longer than 128 still take several blocks (tests also force tiny tiles).
TILE_INTERPRET = 256
MAX_BLOCK_T_INTERPRET = 128


@triton.jit
def _compose(a1, b1, a2, b2):
    # (a1, b1): composed map of the LATER positions (applied first to the state coming from the
    # right); (a2, b2): the map of the EARLIER position(s).  Returns F2 o F1.
    return a2 * a1, a2 * b1 + b2


@triton.jit
def _gae_block(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, r_base, v_base, m_base, o_base, col, inb,
               inb1, sr1, sv1, sm1, w_c, gamma, glam, take,
               REVERSE_SCAN: tl.constexpr, ACC: tl.constexpr):
    """Solve one [BLOCK_B, BLOCK_T] block given W entering it from the right; store adv / ret
    and return W entering the block to its left.  ``inb`` masks the columns ``col``, ``inb1``
    the columns ``col + 1``."""
    col = col.to(tl.int64)  # col * stride may pass 2^31 for column-major inputs
    r = tl.load(r_ptr + r_base[:, None] + col * sr1, mask=inb, other=0).to(ACC)
    v = tl.load(v_ptr + v_base[:, None] + col * sv1, mask=inb, other=0).to(ACC)
    m = tl.load(m_ptr + m_base[:, None] + col * sm1, mask=inb, other=0)
    # The map of column t + 1, held by the lane of column t (the same cache lines: no extra DRAM
    # traffic).
    col1 = col + 1
    r1 = tl.load(r_ptr + r_base[:, None] + col1 * sr1, mask=inb1, other=0).to(ACC)
    v1 = tl.load(v_ptr + v_base[:, None] + col1 * sv1, mask=inb1, other=0).to(ACC)
    m1 = tl.load(m_ptr + m_base[:, None] + col1 * sm1, mask=inb1, other=0)
    valid = inb & (m != 0)
    valid1 = inb1 & (m1 != 0)
    zero = tl.zeros(r.shape, ACC)
    a = tl.where(valid1, glam, zero + 1.0)
    b = tl.where(valid1, gamma * v1 + glam * (r1 - v1), zero)
    a, b = tl.associative_scan((a, b), axis=1, combine_fn=_compose, reverse=REVERSE_SCAN)
    w = a * w_c[:, None] + b            # W entering column t from the right
    adv = (r - v) + w
    ret = adv + v
    o = o_base[:, None] + col
    tl.store(adv_ptr + o, tl.where(valid, adv, zero), mask=inb)
    tl.store(ret_ptr + o, tl.where(valid, ret, zero), mask=inb)
    # W entering the block to the left = W entering this block's leftmost column.
    return tl.sum(tl.where(take, w, zero), axis=1)


@triton.jit(do_not_specialize=["n_rows", "T"])
def _gae_kernel(
    r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, cu_ptr,
    n_rows, T,
    sr0, sr1, sv0, sv1, sm0, sm1, so0,
    g_hi, g_lo, gl_hi, gl_lo,
    VARLEN: tl.constexpr, EVEN_T: tl.constexpr, REVERSE_SCAN: tl.constexpr,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < n_rows
    if VARLEN:
        # Row = packed segment [cu[s], cu[s+1]) of the single row of a [1, total] tensor.
        start = tl.load(cu_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        end = tl.load(cu_ptr + rows + 1, mask=row_ok, other=0).to(tl.int64)
        length = end - start
        r_base = start * sr1
        v_base = start * sv1
        m_base = start * sm1
        o_base = start
    else:
        rows64 = rows.to(tl.int64)
        r_base = rows64 * sr0
        v_base = rows64 * sv0
        m_base = rows64 * sm0
        o_base = rows64 * so0

    # gamma and gamma*lam arrive as fp32 (hi, lo) pairs: exact to ~2^-48 in float64 compute,
    # without a device tensor or a recompile per value.
    zero_s = tl.zeros([], ACC)
    gamma = (zero_s + g_hi) + g_lo
    glam = (zero_s + gl_hi) + gl_lo

    j = tl.arange(0, BLOCK_T)
    if REVERSE_SCAN:
        lane = j                    # lane j holds column blk + j
        take = (j == 0)[None, :]
    else:
        lane = BLOCK_T - 1 - j      # lane j holds column blk + BLOCK_T - 1 - j
        take = (j == BLOCK_T - 1)[None, :]

    w_c = tl.zeros([BLOCK_B], ACC)
    if VARLEN:
        # Rows of one tile have different lengths: every block fully masked.  A row with fewer
        # blocks than the tile's longest sees negative columns: masked lanes = identity maps.
        nblk = (length + BLOCK_T - 1) // BLOCK_T
        n_iter = tl.max(nblk, axis=0)
        for k in range(0, n_iter):
            blk = (nblk - 1 - k) * BLOCK_T
            col = blk[:, None] + lane[None, :]
            inb = (col >= 0) & (col < length[:, None])
            inb1 = (col >= -1) & (col + 1 < length[:, None])
            w_c = _gae_block(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, r_base, v_base, m_base,
                             o_base, col, inb, inb1, sr1, sv1, sm1, w_c, gamma, glam, take,
                             REVERSE_SCAN, ACC)
    else:
        # Blocks start at multiples of BLOCK_T and are processed right to left.  Only the first
        # (rightmost) one can be ragged; the others run with the row mask alone, constant along
        # T, which keeps the aligned accesses full 128-bit vectors (EVEN_T: no ragged block).
        n_iter = (T + BLOCK_T - 1) // BLOCK_T
        rmask = tl.broadcast_to(row_ok[:, None], [BLOCK_B, BLOCK_T])
        col = ((n_iter - 1) * BLOCK_T + lane)[None, :]
        if EVEN_T:
            inb = rmask
        else:
            inb = rmask & (col < T)
        inb1 = rmask & (col + 1 < T)
        w_c = _gae_block(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, r_base, v_base, m_base, o_base,
                         col, inb, inb1, sr1, sv1, sm1, w_c, gamma, glam, take, REVERSE_SCAN, ACC)
        for k in range(1, n_iter):
            col = ((n_iter - 1 - k) * BLOCK_T + lane)[None, :]
            w_c = _gae_block(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, r_base, v_base, m_base,
                             o_base, col, rmask, rmask, sr1, sv1, sm1, w_c, gamma, glam, take,
                             REVERSE_SCAN, ACC)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _split(x: float):
    """x as an fp32 pair (hi, lo) with hi + lo == x to ~2^-48 relative."""
    hi = _f32(x)
    return hi, _f32(x - hi)


def _blocks(max_len: int, f64: bool):
    if interpreting():
        tile, max_bt, warps = TILE_INTERPRET, MAX_BLOCK_T_INTERPRET, 1
    else:
        tile, max_bt = TILE, MAX_BLOCK_T
        warps = NUM_WARPS_F64 if f64 else NUM_WARPS
    block_t = min(max_bt, triton.next_power_of_2(max(int(max_len), 1)))
    block_t = max(block_t, 2)
    block_b = max(1, tile // block_t)
    return block_b, block_t, warps


def _launch(r, v, m, adv, ret, cu, n_rows, T, gamma, lam, acc, reverse_scan, blocks):
    block_b, block_t, warps = blocks
    g_hi, g_lo = _split(gamma)
    gl_hi, gl_lo = _split(gamma * lam)
    varlen = cu is not None
    _gae_kernel[(triton.cdiv(n_rows, block_b),)](
        r, v, m, adv, ret, cu if varlen else adv,
        n_rows, T,
        r.stride(0), r.stride(1), v.stride(0), v.stride(1), m.stride(0), m.stride(1),
        adv.stride(0),
        g_hi, g_lo, gl_hi, gl_lo,
        VARLEN=varlen, EVEN_T=(not varlen and T % block_t == 0), REVERSE_SCAN=reverse_scan,
        ACC=tl_dtype(acc), BLOCK_B=block_b, BLOCK_T=block_t, num_warps=warps,
    )


# (device index, dtypes, varlen, block config) -> whether the reverse=True scan was verified.
_REVERSE_OK: dict = {}
# Set to False to force the forward-scan (reversed-address) variant everywhere.
USE_REVERSE_SCAN = True


def _reverse_scan_ok(r, v, m, cu, blocks, acc) -> bool:
    """Whether the reverse-scan variant may be used for this configuration (see module doc)."""
    if not USE_REVERSE_SCAN:
        return False
    if r.device.type != "cuda":
        return True  # the interpreter's reverse scan is flip / scan / flip, checked by the tests
    key = (r.device.index, r.dtype, v.dtype, m.dtype, acc, cu is not None, blocks)
    ok = _REVERSE_OK.get(key)
    if ok is not None:
        return ok
    if torch.cuda.is_current_stream_capturing():
        return False  # cannot verify during graph capture: use the variant that needs no check
    block_b, block_t, _ = blocks
    gen = torch.Generator(device="cpu").manual_seed(1234)
    # Several tiles, several blocks per row, a ragged block; for varlen an empty segment too.
    shape = (2 * block_b + 1, 2 * block_t + 3) if cu is None else (1, 3 * block_t + 5)
    pr = torch.randn(shape, generator=gen).to(device=r.device, dtype=r.dtype)
    pv = torch.randn(shape, generator=gen).to(device=r.device, dtype=v.dtype)
    pm = (torch.rand(shape, generator=gen) < 0.7).to(device=r.device)
    pm = pm.view(torch.uint8) if m.dtype == torch.uint8 else pm.to(m.dtype)
    pcu, n_rows = None, shape[0]
    if cu is not None:
        pcu = torch.tensor([0, block_t + 1, block_t + 1, shape[1]], dtype=cu.dtype,
                           device=r.device)
        n_rows = 3
    outs = []
    for rev in (True, False):
        a = torch.empty(shape, dtype=acc, device=r.device)
        b = torch.empty(shape, dtype=acc, device=r.device)
        _launch(pr, pv, pm, a, b, pcu, n_rows, shape[1], 0.99, 0.9, acc, rev, blocks)
        outs.append((a, b))
    ok = all(torch.allclose(x, y, rtol=1e-4, atol=1e-4) for x, y in zip(outs[0], outs[1]))
    if not ok:
        warnings.warn("fastrlhf.gae: Triton's reverse associative scan disagrees with the forward "
                      "scan on this device/Triton version; using the forward-scan variant "
                      "(32-bit accesses)", RuntimeWarning, stacklevel=3)
    _REVERSE_OK[key] = ok
    return ok


def gae_fwd(rewards, values, mask, gamma: float, lam: float, cu_seqlens, max_len: int,
            acc_dtype: torch.dtype, reverse_scan: bool | None = None):
    """Launch the GAE kernel.

    rewards, values, mask: 2-D ``[B, T]`` tensors with any strides (mask: uint8 / int / float;
    a bool mask must be passed as ``mask.view(torch.uint8)``).  With ``cu_seqlens`` (int32/int64
    ``[S+1]`` on the same device) B must be 1 and every segment is an independent row.
    ``max_len``: the longest row (T, or the longest segment), used to size the tile.
    Returns ``(advantages, returns)``, fresh contiguous ``[B, T]`` tensors of ``acc_dtype``.
    ``reverse_scan``: force a scan variant (None: the verified default).
    """
    B, T = rewards.shape
    dev = rewards.device
    adv = torch.empty((B, T), dtype=acc_dtype, device=dev)
    ret = torch.empty((B, T), dtype=acc_dtype, device=dev)
    n_rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if B * T == 0 or n_rows == 0:
        return adv, ret
    blocks = _blocks(max_len, acc_dtype == torch.float64)
    if reverse_scan is None:
        reverse_scan = _reverse_scan_ok(rewards, values, mask, cu_seqlens, blocks, acc_dtype)
    _launch(rewards, values, mask, adv, ret, cu_seqlens, n_rows, T, float(gamma), float(lam),
            acc_dtype, bool(reverse_scan), blocks)
    return adv, ret


# Ahead-of-time compilation specs (compiled for sm_90 / sm_80 by the tests, no GPU needed).
# Production case: 16-byte aligned pointers and row strides, unit column strides (Triton
# specializes an int argument equal to 1 into a constant, mirrored here by constexpr 1).
def _aot_specs():
    specs = []
    cases = [
        # (name, r/v dtype, mask dtype, acc, varlen, reverse_scan, num_warps, streaming)
        ("fp32,mask=u8", "fp32", "u8", tl.float32, False, True, NUM_WARPS, True),
        ("fp32,mask=fp32", "fp32", "fp32", tl.float32, False, True, NUM_WARPS, True),
        ("bf16,mask=u8", "bf16", "u8", tl.float32, False, True, NUM_WARPS, True),
        ("fp64,mask=u8", "fp64", "u8", tl.float64, False, True, NUM_WARPS_F64, True),
        ("fp32,mask=u8,fwdscan", "fp32", "u8", tl.float32, False, False, NUM_WARPS, False),
        ("fp32,mask=u8,varlen", "fp32", "u8", tl.float32, True, True, NUM_WARPS, False),
    ]
    for name, dt, mdt, acc, varlen, rev, warps, streaming in cases:
        acc_s = "fp64" if acc == tl.float64 else "fp32"
        specs.append(dict(
            name=f"gae[{name}]",
            fn=_gae_kernel,
            signature={"r_ptr": f"*{dt}", "v_ptr": f"*{dt}", "m_ptr": f"*{mdt}",
                       "adv_ptr": f"*{acc_s}", "ret_ptr": f"*{acc_s}", "cu_ptr": "*i32",
                       "n_rows": "i32", "T": "i32",
                       "sr0": "i64", "sr1": "constexpr", "sv0": "i64", "sv1": "constexpr",
                       "sm0": "i64", "sm1": "constexpr", "so0": "i64",
                       "g_hi": "fp32", "g_lo": "fp32", "gl_hi": "fp32", "gl_lo": "fp32",
                       "VARLEN": "constexpr", "EVEN_T": "constexpr", "REVERSE_SCAN": "constexpr",
                       "ACC": "constexpr",
                       "BLOCK_B": "constexpr", "BLOCK_T": "constexpr"},
            constexprs={"sr1": 1, "sv1": 1, "sm1": 1, "VARLEN": varlen, "EVEN_T": False,
                        "REVERSE_SCAN": rev,
                        "ACC": acc, "BLOCK_B": 1, "BLOCK_T": MAX_BLOCK_T},
            aligned=["r_ptr", "v_ptr", "m_ptr", "adv_ptr", "ret_ptr", "cu_ptr",
                     "sr0", "sv0", "sm0", "so0"],
            num_warps=warps,
            stream_dtype=dt if streaming else None,
        ))
    return specs


AOT_SPECS = _aot_specs
