"""Test harness.

* Without CUDA the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set here,
  before anything imports triton.  With CUDA the same tests run natively (plus GPU-only cases).
* Every floating buffer created with ``torch.empty`` / ``torch.empty_like`` during a test is
  filled with NaN (``poison`` fixture, autouse), so an output element a kernel forgot to write
  shows up as NaN instead of passing by accident.
* ``assert_close`` compares against a reference computed in float64 and names what differed.
"""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns until this is set; 1 keeps its (and Triton 3.6's) default of FMA fusion on.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
# Backends whose kernels the suite exercises on this machine.
TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _poison(t):
    if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
        t.fill_(float("nan"))
    return t


def _poisoned_empty(*args, **kwargs):
    return _poison(_real_empty(*args, **kwargs))


def _poisoned_empty_like(*args, **kwargs):
    return _poison(_real_empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """NaN-fill every new floating buffer made with torch.empty / empty_like in this test."""
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", _poisoned_empty_like)
    yield


@pytest.fixture
def device():
    return DEVICE


def assert_close(name, actual, expected, *, atol, rtol=0.0, equal_nan=False):
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, compared in float64.

    NaN never passes unless ``equal_nan`` (then NaN must be at exactly the same places).
    """
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if equal_nan:
        assert torch.equal(a.isnan(), e.isnan()), f"{name}: NaN pattern differs"
        keep = ~e.isnan()
        a, e = a[keep], e[keep]
    assert not a.isnan().any(), f"{name}: {int(a.isnan().sum())} NaN element(s)"
    inf_e = e.isinf()
    if inf_e.any():
        assert torch.equal(a[inf_e], e[inf_e]), f"{name}: infinities differ"
        a, e = a[~inf_e], e[~inf_e]
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    if err.numel() and not bool((err <= tol).all()):
        i = int((err - tol).argmax())
        raise AssertionError(
            f"{name}: max error {float(err.max()):.3e} (tolerance atol={atol:g} rtol={rtol:g}); "
            f"worst at flat index {i}: got {float(a.reshape(-1)[i])!r}, "
            f"expected {float(e.reshape(-1)[i])!r}")


def backends(native: bool = False):
    """Backends the op tests parametrize over on this machine.  ``native=True`` (for the ops the
    C++ CPU backend implements) adds "native" when it builds here; the first call builds it,
    about a minute, then it is cached."""
    out = ["reference"]
    if TRITON_OK:
        out.append("triton")
    if native and not HAS_CUDA:
        from fastrlhf import _native
        if _native.available():
            out.append("native")
    return out
