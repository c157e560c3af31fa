"""Hypothesis strategies and helpers of the property-based suite (tests/test_properties.py).

Profiles (``FASTRLHF_HYPOTHESIS_PROFILE``): ``ci`` (default; the whole file in about two minutes
on 2 cores) and ``long`` (many more examples, no deadline: run on demand).  Both are
derandomized, so a run is reproducible and a failure is the same failure on every machine.
``explore`` draws as many examples as ``long`` at random (``--hypothesis-seed=N`` picks them):
to look for disagreements the fixed examples never reach; a failure it finds prints its
``@reproduce_failure`` blob.

Inputs are drawn as a few small integers / choices (shape, dtype, layout, special values, a
seed) and materialized with a seeded ``torch.Generator``: cheap to draw, and every example is a
complete description of its tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

# No shrinking (each example already names its whole input, and shrinking a Triton-interpreter
# failure takes minutes); no example database or patch files written into the checkout.
_COMMON = dict(derandomize=True, deadline=None, print_blob=True, database=None,
               phases=(Phase.explicit, Phase.generate),
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=12, **_COMMON)
settings.register_profile("long", max_examples=600, **_COMMON)
# as long, but random: each --hypothesis-seed=N draws examples the derandomized runs never see
settings.register_profile("explore", max_examples=600, **{**_COMMON, "derandomize": False})
PROFILE = os.environ.get("FASTRLHF_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
LONG = PROFILE in ("long", "explore")


def examples(ci: int, long: Optional[int] = None):
    """Per-test example count: ``ci`` under the ci profile, ``long`` (default 50x) under long."""
    return settings(max_examples=(long or 50 * ci) if LONG else ci)


# ------------------------------------------------------------------------------------------------
# scalars
# ------------------------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
dtypes = st.sampled_from(DTYPES)
temperatures = st.sampled_from([1.0, 0.7, 2.0, 1e-3, 37.5])
seeds = st.integers(0, 2**31 - 1)

# Special values injected into a float input.  "offset" adds a huge common offset (+-1e4).
SPECIALS = ("none", "none", "neg_inf", "neg_inf_row", "nan", "pos_inf", "offset", "huge")
specials = st.sampled_from(SPECIALS)
MASKS = ("ones", "bool", "int", "float", "zeros", "row_zero")
masks = st.sampled_from(MASKS)


# ------------------------------------------------------------------------------------------------
# layouts: the same logical values in another memory layout, reached by differentiable views
# ------------------------------------------------------------------------------------------------

LAYOUTS = ("contig", "strided", "offset", "transposed", "expanded", "last_strided")
layouts = st.sampled_from(LAYOUTS)


@dataclass
class Laid:
    """``view(leaf)`` has the logical values (``values``, possibly changed by ``expanded``)."""
    leaf: torch.Tensor
    view: Callable[[torch.Tensor], torch.Tensor]
    values: torch.Tensor

    def make(self, requires_grad: bool = False, dtype=None):
        """(leaf, viewed tensor): a fresh leaf (optionally of another dtype) and its view."""
        leaf = self.leaf.detach().clone()
        if dtype is not None:
            leaf = leaf.to(dtype)
        leaf.requires_grad_(requires_grad)
        return leaf, self.view(leaf)


def lay_out(t: torch.Tensor, layout: str, *, last_ok: bool = True) -> Laid:
    """Lay ``t`` out as ``layout``.  Gaps in the storage hold NaN (for floats; -1 for ints) so
    that a kernel reading outside the view shows up.  Layouts that need more dims than ``t``
    has, or that ``last_ok=False`` excludes (a non-unit last-dim stride), fall back to
    ``contig``."""
    fill = float("nan") if t.is_floating_point() else -1
    if layout == "strided" and t.dim() >= 1:
        leaf = torch.full((2 * t.shape[0], *t.shape[1:]), fill, dtype=t.dtype)
        leaf[::2] = t
        return Laid(leaf, lambda x: x[::2], t)
    if layout == "offset":
        leaf = torch.full((t.numel() + 3,), fill, dtype=t.dtype)
        leaf[3:] = t.reshape(-1)
        shape = t.shape
        return Laid(leaf, lambda x: x[3:].view(shape), t)
    if layout == "transposed" and t.dim() >= 2:
        leaf = t.transpose(0, 1).contiguous()
        return Laid(leaf, lambda x: x.transpose(0, 1), t)
    if layout == "expanded" and t.dim() >= 1 and t.shape[0] >= 1:
        leaf = t[:1].clone()
        shape = t.shape
        return Laid(leaf, lambda x: x.expand(shape), leaf.expand(shape))
    if layout == "last_strided" and last_ok and t.dim() >= 1:
        leaf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), fill, dtype=t.dtype)
        leaf[..., ::2] = t
        return Laid(leaf, lambda x: x[..., ::2], t)
    return Laid(t.clone(), lambda x: x, t)


# ------------------------------------------------------------------------------------------------
# value generators (seeded)
# ------------------------------------------------------------------------------------------------

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def floats(g: torch.Generator, shape, special: str = "none", scale: float = 3.0,
           shift: float = 0.0) -> torch.Tensor:
    """float64 values ~ N(shift, scale) with ``special`` injected (rows = last dim)."""
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift
    n = x.numel()
    if n == 0 or special == "none":
        return x
    flat = x.view(-1)
    pick = lambda k: torch.randint(0, n, (k,), generator=g)  # noqa: E731
    if special == "neg_inf":
        flat[pick(max(1, n // 4))] = float("-inf")
    elif special == "neg_inf_row" and x.dim() >= 1:
        rows = x.view(-1, x.shape[-1]) if x.shape[-1] else x.view(-1, 1)
        rows[int(torch.randint(0, rows.shape[0], (1,), generator=g))] = float("-inf")
    elif special == "nan":
        flat[pick(1)] = float("nan")
    elif special == "pos_inf":
        flat[pick(1)] = float("inf")
    elif special == "offset":
        x += 1e4 if int(torch.randint(0, 2, (1,), generator=g)) else -1e4
    elif special == "huge":
        x *= 1e3
    return x


def logprob_like(g: torch.Generator, shape, special: str = "none") -> torch.Tensor:
    """Negative values like sampled-token log-probs, with ``special`` injected."""
    x = -torch.rand(shape, generator=g, dtype=torch.float64) * 4.0
    if special in ("offset", "huge"):
        return x * (50.0 if special == "huge" else 1.0) - (0.0 if special == "huge" else 30.0)
    if special == "neg_inf_row":
        special = "neg_inf"
    return floats(g, shape, special, 0.0) + x if special != "none" else x


def make_mask(g: torch.Generator, shape, kind: str) -> torch.Tensor:
    if kind == "ones":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.float32)
    b = torch.rand(shape, generator=g) < 0.7
    if kind == "row_zero" and len(shape) == 2 and shape[0] > 0:
        b[int(torch.randint(0, shape[0], (1,), generator=g))] = False
        return b.to(torch.int64)
    if kind == "int":
        return b.to(torch.int32)
    if kind == "float":
        return b.to(torch.float32) * torch.rand(shape, generator=g) * 2.0
    return b


# ------------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------------

ATOL = {torch.float64: 1e-9, torch.float32: 3e-5, torch.bfloat16: 3e-5, torch.float16: 3e-5}
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1.6e-2,
             torch.float16: 2e-3}


def close(name: str, got, exp, *, atol: float, rtol: float = 0.0, what: str = "",
          round_to: Optional[torch.dtype] = None) -> None:
    """``got`` equals ``exp`` (float64 reference): NaN exactly where ``exp`` is NaN, the same
    infinities, finite values within ``atol + rtol * |exp|``.  ``round_to``: ``got`` is
    returned in that dtype, so ``exp`` is rounded to it first (overflow to inf included)."""
    if exp is not None and round_to is not None:
        exp = exp.detach().to(round_to)
    if got is None or exp is None:
        other = got if exp is None else exp
        assert other is None or not bool(other.detach().ne(0).any()), \
            f"{name}: one side has no gradient, the other a nonzero one ({what})"
        return
    a = got.detach().to(torch.float64)
    e = exp.detach().to(torch.float64)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)} ({what})"
    an, en = a.isnan(), e.isnan()
    if not torch.equal(an, en):
        i = int((an != en).reshape(-1).nonzero()[0, 0])
        raise AssertionError(
            f"{name}: NaN pattern differs at flat index {i}: got {a.reshape(-1)[i].item()!r}, "
            f"expected {e.reshape(-1)[i].item()!r} ({what})")
    a, e = a[~en], e[~en]
    ai, ei = a.isinf(), e.isinf()
    if not (torch.equal(ai, ei) and torch.equal(a[ei], e[ei])):
        i = int(((ai != ei) | (ei & (a != e))).reshape(-1).nonzero()[0, 0])
        raise AssertionError(f"{name}: infinities differ: got {a[i].item()!r}, expected "
                             f"{e[i].item()!r} ({what})")
    a, e = a[~ei], e[~ei]
    if a.numel():
        err = (a - e).abs()
        tol = atol + rtol * e.abs()
        if not bool((err <= tol).all()):
            i = int((err - tol).argmax())
            raise AssertionError(f"{name}: error {err[i].item():.3e} > tol {tol[i].item():.3e}: "
                                 f"got {a[i].item()!r}, expected {e[i].item()!r} ({what})")


def grad_tol(dtype: torch.dtype, ref_grad: Optional[torch.Tensor], scale: float = 1.0) -> dict:
    """Tolerance for a gradient returned in ``dtype``: relative to its largest finite entry."""
    big = 0.0
    if ref_grad is not None and ref_grad.numel():
        fin = ref_grad.detach().double()
        fin = fin[fin.isfinite()]
        big = float(fin.abs().max()) if fin.numel() else 0.0
    r = GRAD_RTOL[dtype] * scale
    return dict(atol=r * big + ATOL[dtype] * scale, rtol=r, round_to=dtype)


def bitwise(name: str, a, b) -> None:
    """Bit-for-bit equality (NaN == NaN), for the invariants."""
    if a is None or b is None:
        assert a is None and b is None, f"{name}: one side is None"
        return
    assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: shape / dtype differ"
    same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
    if a.is_floating_point():
        # -0.0 == 0.0 but differs in bits: compare signs too
        same &= (torch.signbit(a) == torch.signbit(b)) | a.isnan()
    assert bool(same.all()), f"{name}: not bitwise identical"
