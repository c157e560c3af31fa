"""gae: generalized advantage estimation as a blocked reverse scan (verl semantics, not whitened).

The public entry point checks its arguments, picks a backend and calls either the eager reference
(:func:`fastrlhf.reference.gae`, a Python loop over T) or the custom op ``fastrlhf::gae``, whose
implementation calls the ``gae_fwd`` launcher of the chosen backend: the Triton kernel of
:mod:`fastrlhf.kernels.gae` (one pass: every input element read once, every output written once)
or the C++ one (:mod:`fastrlhf.native`, ``csrc/gae.cpp``).  GAE is not differentiable: the op has
no autograd formula and its outputs are detached.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ..backend import resolve as resolve_backend
from ..tables import FLOAT_DTYPES, MASK_DTYPES, acc_dtype
from .common import with_contract, check_cu_seqlens, check_same_device, check_shape, check_tensor
from .registry import Op, launchers

__all__ = ["gae"]


# ---------------------------------------------------------------------------------------------
# custom op (Triton and native launchers underneath)
# ---------------------------------------------------------------------------------------------

def _gae_impl(rewards: Tensor, values: Tensor, mask: Tensor, cu_seqlens: Optional[Tensor],
              gamma: float, lam: float, max_len: int, f64: bool, backend: str
              ) -> Tuple[Tensor, Tensor]:
    acc = torch.float64 if f64 else torch.float32
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return launchers(backend, "gae").gae_fwd(rewards, values, m, gamma, lam, cu_seqlens, max_len,
                                             acc)


def _gae_fake(rewards, values, mask, cu_seqlens, gamma, lam, max_len, f64, backend):
    acc = torch.float64 if f64 else torch.float32
    return rewards.new_empty(rewards.shape, dtype=acc), rewards.new_empty(rewards.shape, dtype=acc)


_gae = Op("gae", _gae_impl, _gae_fake, fast_eager=True)


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------

def _check_unit(op: str, name: str, v) -> float:
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"{op}: {name} must be a scalar, got a tensor of shape "
                             f"{tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {name} must be a float in [0, 1], got {type(v).__name__}")
    v = float(v)
    if not (0.0 <= v <= 1.0):  # also rejects NaN
        raise ValueError(f"{op}: {name} must lie in [0, 1], got {v}")
    return v


def _check_compute_dtype(op: str, compute_dtype, rewards: Tensor, values: Tensor) -> torch.dtype:
    if compute_dtype is None:
        return acc_dtype(rewards, values)
    if not isinstance(compute_dtype, torch.dtype):
        raise TypeError(f"{op}: compute_dtype must be None, torch.float32 or torch.float64, got "
                        f"{type(compute_dtype).__name__}")
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: compute_dtype must be None, torch.float32 or torch.float64, got "
                         f"{compute_dtype}")
    return compute_dtype


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

@with_contract(reference.gae)
def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95,
        cu_seqlens: Optional[Tensor] = None, compute_dtype: Optional[torch.dtype] = None,
        backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Generalized advantage estimation with multi-turn masks: ``(advantages, returns)``.

    Semantics of verl 0.9 ``compute_gae_advantage_return`` before its whitening (call
    :func:`fastrlhf.masked_whiten` on the advantages for that).  Per row, for t = T-1 .. 0,
    with ``nv = A = 0`` past the end of the row (no bootstrap)::

        valid t:  delta_t = r_t + gamma * nv - V_t
                  A = delta_t + gamma * lam * A;   nv = V_t
                  adv_t = A,  ret_t = A + V_t
        masked t: nv and A carry across unchanged;  adv_t = ret_t = 0

    i.e. masked positions (observation tokens of a multi-turn rollout, padding) are skipped: a
    valid token's "next value" and "next advantage" are those of the next *valid* token.  Inputs
    at masked positions are never read into the arithmetic (NaN there is ignored); a NaN at a
    valid position makes that position and the earlier valid positions of its row NaN.  A fully
    masked row gives zeros.

    Differences from verl: verl writes the carried advantage (and ``carried + V_t`` as the
    return) at masked positions, we write 0 there (every consumer masks them out); verl mixes a
    fractional float mask in linearly, here any nonzero mask value means valid.  At valid
    positions the numbers are verl's (pre-whitening).

    Args:
        rewards: ``[B, T]`` float16 / bfloat16 / float32 / float64 token-level rewards, any
            strides (or ``[1, total]`` packed, with ``cu_seqlens``).
        values: same shape, float, the critic's values.
        mask: same shape, bool / integer / floating; ``mask != 0`` marks the valid (action)
            tokens.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].
        cu_seqlens: optional int32 / int64 ``[S+1]`` on the inputs' device: 0 =
            ``cu[0] <= cu[1] <= ... <= cu[S] = total``; columns ``cu[s]:cu[s+1]`` of the single
            packed row form independent sequences (results equal per-sequence GAE).  Checked on
            the host (one device sync).
        compute_dtype: ``None`` (float64 if rewards or values is float64, else float32),
            ``torch.float32`` or ``torch.float64`` (the float64 option for any input dtype).
        backend: ``"auto" | "triton" | "native" | "reference"`` (see :mod:`fastrlhf.backend`).

    Returns:
        ``(advantages, returns)``: two fresh contiguous ``[B, T]`` tensors of ``compute_dtype``,
        detached (GAE is not differentiable; gradients never flow to rewards or values).
    """
    op = "gae"
    check_tensor(op, "rewards", rewards, dtypes=FLOAT_DTYPES)
    check_tensor(op, "values", values, dtypes=FLOAT_DTYPES)
    check_tensor(op, "mask", mask, dtypes=MASK_DTYPES)
    if rewards.dim() != 2:
        raise ValueError(f"{op}: rewards must be 2-D [B, T] (or [1, total] with cu_seqlens), got "
                         f"shape {tuple(rewards.shape)}")
    check_shape(op, "values", values, rewards.shape, "the shape of rewards")
    check_shape(op, "mask", mask, rewards.shape, "the shape of rewards")
    check_same_device(op, "rewards", rewards, values=values, mask=mask)
    gamma = _check_unit(op, "gamma", gamma)
    lam = _check_unit(op, "lam", lam)
    acc = _check_compute_dtype(op, compute_dtype, rewards, values)
    if cu_seqlens is not None:
        max_len = check_cu_seqlens(op, cu_seqlens, "rewards", rewards)
    else:
        max_len = rewards.shape[1]
    which = resolve_backend(backend, rewards.device, op=op, native_ok=True)
    rewards, values, mask = rewards.detach(), values.detach(), mask.detach()
    if which == "reference":
        return reference.gae(rewards, values, mask, gamma, lam, cu_seqlens, acc)
    cu = cu_seqlens.detach() if cu_seqlens is not None else None
    return _gae(rewards, values, mask, cu, gamma, lam, max_len, acc == torch.float64, which)

