"""Masked statistics with verl semantics: masked_sum / masked_mean / masked_var / masked_whiten.

Plain PyTorch (these are a few reductions; no kernel earns its place), differentiable, checked
arguments.  The formulas live in :mod:`fastrlhf.reference`; this module validates and dispatches.

Conventions shared by all four (and by :func:`fastrlhf.agg_loss` and the losses):

* ``mask`` has exactly the shape of ``x`` and dtype bool, integer or floating; a float mask is a
  per-element weight.  Masked reductions use ``where(mask != 0, x, 0) * mask``, so NaN / inf
  *outside* the mask is ignored (verl does the same); NaN inside the mask propagates.
* Results are float32 for float16 / bfloat16 / float32 ``x`` and float64 for float64 ``x``.
* A fully masked input never gives NaN: sums, means, variances and whitened values are 0.
* ``backend=`` is accepted (and its name checked) for uniformity with the other ops; these few
  reductions are plain PyTorch on every backend and device.
"""

from __future__ import annotations

from torch import Tensor

from .. import reference
from ..tables import FLOAT_DTYPES
from .common import with_contract, check_backend_name, check_bool, check_mask, check_same_device, check_tensor

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten"]


def _check_dim(op: str, dim, ndim: int):
    if dim is None:
        return None
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"{op}: dim must be None, an int or a tuple of ints, got {dim!r}")
        if not -max(ndim, 1) <= d < max(ndim, 1):
            raise ValueError(f"{op}: dim {d} is out of range for a tensor with {ndim} dim(s)")
    return tuple(dims) if isinstance(dim, (tuple, list)) else dim


def _check(op: str, x, mask, backend) -> Tensor:
    """Validate; returns the mask detached (a mask is never differentiated)."""
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    mask = check_mask(op, mask, x.shape)
    check_same_device(op, "x", x, mask=mask)
    check_backend_name(op, backend)
    return mask


@with_contract(reference.masked_sum)
def masked_sum(x: Tensor, mask: Tensor, dim=None, *, backend: str = "auto") -> Tensor:
    """Sum of ``x`` over the mask: ``sum(where(mask != 0, x, 0) * mask, dim)``.

    Args:
        x: any shape, float16 / bfloat16 / float32 / float64.
        mask: same shape as ``x``; bool, integer or floating (a float mask weights each element).
        dim: None (all elements, a 0-dim result), an int or a tuple of ints.

    Returns the reduced tensor in float32 (float64 for float64 ``x``); 0 where nothing is
    selected.  NaN outside the mask is ignored.  Differentiable w.r.t. ``x``.
    """
    op = "masked_sum"
    mask = _check(op, x, mask, backend)
    return reference.masked_sum(x, mask, _check_dim(op, dim, x.dim()))


@with_contract(reference.masked_sum)
def masked_mean(x: Tensor, mask: Tensor, dim=None, *, backend: str = "auto"
                ) -> Tensor:
    """Mean of ``x`` over the mask, as verl: ``masked_sum(x, mask, dim) / (sum(mask, dim) + 1e-8)``.

    Same arguments and dtypes as :func:`masked_sum`.  A fully masked input (or row, with
    ``dim``) gives exactly 0, never NaN.  Differentiable w.r.t. ``x``.
    """
    op = "masked_mean"
    mask = _check(op, x, mask, backend)
    return reference.masked_mean(x, mask, _check_dim(op, dim, x.dim()))


@with_contract(reference.masked_sum)
def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, *, backend: str = "auto"
               ) -> Tensor:
    """Variance of ``x`` over all masked elements (a 0-dim tensor), as verl:

        mean = masked_mean(x, mask);  var = masked_mean((x - mean)^2, mask)
        unbiased: var * n / (n - 1)   with n = sum(mask), applied when n > 1

    Differs from verl only where verl raises (``n <= 1`` with ``unbiased``): here the value is
    returned without the Bessel factor: 0 for an empty mask, and for a single selected element
    the (tiny, exactly 0 in float32) variance left by verl's ``+ 1e-8`` in the mean.
    Float32 result (float64 for float64 ``x``).  Differentiable w.r.t. ``x``.
    """
    op = "masked_var"
    mask = _check(op, x, mask, backend)
    check_bool(op, "unbiased", unbiased)
    return reference.masked_var(x, mask, unbiased)


@with_contract(reference.masked_sum)
def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True,
                  backend: str = "auto") -> Tensor:
    """Whiten ``x`` with statistics over the mask, as verl's ``masked_whiten``:

        out = (x - mean) * rsqrt(var + 1e-8)        (+ mean when shift_mean=False)

    with ``mean = masked_mean(x, mask)`` and ``var = masked_var(x, mask, unbiased=True)``.
    Every position is transformed (also those outside the mask, as verl); a fully masked input
    gives all zeros.  Returns a tensor of ``x``'s shape in float32 (float64 for float64 ``x``).
    Differentiable w.r.t. ``x``.
    """
    op = "masked_whiten"
    mask = _check(op, x, mask, backend)
    check_bool(op, "shift_mean", shift_mean)
    return reference.masked_whiten(x, mask, shift_mean)
