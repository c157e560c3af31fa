"""Small helpers shared by the Triton kernels (no imports from fastrlhf)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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


def acc_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / output dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


# Whether the kernels in this process were decorated in interpreter mode (fixed at import time).
INTERPRET_AT_IMPORT = interpreting()


@triton.jit
def scalar_to(x, ACC: tl.constexpr):
    """Round a scalar kernel argument (declared ``tl.float64`` so float64 compute stays exact) to
    the accumulation dtype once.  Adding to a typed zero keeps this valid in the interpreter,
    where ``x`` is a Python float."""
    return (tl.zeros([], ACC) + x).to(ACC)
