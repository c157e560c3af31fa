"""Argument checks and layout helpers shared by the ops."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


def check_tensor(op: str, name: str, t, *, dtypes: Sequence[torch.dtype] | None = None,
                 min_dim: int = 0) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dim(s), got shape {tuple(t.shape)}")
    return t


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_shape(op: str, name: str, t: torch.Tensor, shape, what: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}{extra}, got {tuple(t.shape)}")


def check_positive_float(op: str, name: str, v) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{op}: {name} must be a scalar, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {v}")
    return v


def check_finite_float(op: str, name: str, v) -> float:
    """A finite real scalar (a Python number or a one-element tensor), e.g. a loss coefficient."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{op}: {name} must be a scalar, got a tensor of shape "
                             f"{tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be finite, got {v}")
    return v


def check_int(op: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    return v


def rows_layout(t: torch.Tensor, max_dims: int = 3):
    """Describe the leading dims of ``t`` ([..., V], unit stride on V) as at most ``max_dims``
    strided dims, without copying.

    Returns ``(t, dims, strides)`` with ``len(dims) == max_dims`` (padded with size 1 in front).
    Adjacent dims that are contiguous with each other are merged and size-1 dims dropped; only if
    more than ``max_dims`` non-mergeable dims remain, or the vocab dim is not unit-stride, is a
    contiguous copy made.
    """
    V = t.shape[-1]
    if V > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    sizes = [s for s in t.shape[:-1]]
    strides = [st for st in t.stride()[:-1]]
    dims: list[list[int]] = []  # [size, stride] pairs, outermost first
    for sz, st in zip(sizes, strides):
        if sz == 1:
            continue
        if dims and dims[-1][1] == st * sz:
            dims[-1] = [dims[-1][0] * sz, st]
        else:
            dims.append([sz, st])
    if any(sz == 0 for sz in sizes):
        dims = [[0, 0]]
    if len(dims) > max_dims:
        t = t.contiguous()
        n = t.numel() // max(V, 1) if V else 0
        dims = [[n, V]]
    while len(dims) < max_dims:
        dims.insert(0, [1, 0])
    return t, tuple(d[0] for d in dims), tuple(d[1] for d in dims)


def contiguous_row_strides(dims, V: int):
    """Strides of a fresh contiguous [D0, D1, D2, V] buffer in the rows_layout convention."""
    D0, D1, D2 = dims
    return (D1 * D2 * V, D2 * V, V)


def check_cu_seqlens(op: str, cu, ref_name: str, ref: torch.Tensor) -> int:
    """Validate ``cu_seqlens`` for the packed layout of ``ref`` (``[1, total, ...]``); returns the
    longest segment.

    ``cu`` must be an int32 / int64 ``[S+1]`` tensor on ``ref``'s device with ``cu[0] = 0``,
    ``cu[s] <= cu[s+1]`` and ``cu[S] = total = ref.shape[1]``; ``ref`` must have ``B = 1``.
    Checked on the host (one device sync).  Raises TypeError / ValueError naming the problem.
    """
    check_tensor(op, "cu_seqlens", cu, dtypes=INT_DTYPES)
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens must be 1-D [S+1] with at least one entry, got shape "
                         f"{tuple(cu.shape)}")
    check_same_device(op, ref_name, ref, cu_seqlens=cu)
    if ref.dim() < 2 or ref.shape[0] != 1:
        b = ref.shape[0] if ref.dim() else None
        raise ValueError(f"{op}: with cu_seqlens the inputs must be packed as [1, total], got "
                         f"{ref_name} of shape {tuple(ref.shape)} (B={b} != 1)")
    total = ref.shape[1]
    b = [int(x) for x in cu.tolist()]
    if b[0] != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0, got cu_seqlens[0]={b[0]}")
    for s in range(len(b) - 1):
        if b[s + 1] < b[s]:
            raise ValueError(f"{op}: cu_seqlens must be nondecreasing, got cu_seqlens[{s}]={b[s]} "
                             f"> cu_seqlens[{s + 1}]={b[s + 1]}")
    if b[-1] != total:
        raise ValueError(f"{op}: cu_seqlens must end at total={total} ({ref_name}.shape[1]), got "
                         f"cu_seqlens[-1]={b[-1]}")
    return max((b[s + 1] - b[s] for s in range(len(b) - 1)), default=0)
