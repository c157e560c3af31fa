"""masked_sum / masked_mean / masked_var / masked_whiten: verl semantics, checked against
element-by-element loops in float64, plus the edge cases verl does not handle (empty masks)."""

import math

import pytest
import torch

from helpers import assert_close

import fastrlhf.ops.masked as M


def _masks(shape):
    """The same selection as bool, int and float masks (and a weighted float mask)."""
    b = torch.rand(shape) > 0.4
    b.view(-1)[0] = True
    return {"bool": b, "int32": b.to(torch.int32), "uint8": b.to(torch.uint8),
            "float32": b.to(torch.float32)}


def _loop_stats(x, mask):
    """(sum, count, mean, unbiased var) over the selected elements, plain Python floats."""
    xs, ws = x.reshape(-1).tolist(), mask.to(torch.float64).reshape(-1).tolist()
    s = sum(v * w for v, w in zip(xs, ws) if w != 0)
    n = sum(ws)
    mean = s / (n + 1e-8)
    var = sum(w * (v - mean) ** 2 for v, w in zip(xs, ws) if w != 0) / (n + 1e-8)
    if n > 1:
        var *= n / (n - 1)
    return s, n, mean, var


@pytest.mark.parametrize("kind", ["bool", "int32", "uint8", "float32"])
def test_sum_mean_all_dims_match_loops(kind):
    x = torch.randn(5, 13, dtype=torch.float64)
    mask = _masks(x.shape)[kind]
    s, n, mean, _ = _loop_stats(x, mask)
    assert_close("masked_sum", M.masked_sum(x, mask), torch.tensor(s, dtype=torch.float64),
                 atol=1e-12)
    assert_close("masked_mean", M.masked_mean(x, mask), torch.tensor(mean, dtype=torch.float64),
                 atol=1e-12)


@pytest.mark.parametrize("dim", [-1, 0, (0, 1), 1])
def test_sum_mean_along_dim(dim):
    x = torch.randn(4, 7, dtype=torch.float64)
    mask = torch.rand(4, 7) > 0.5
    mask[2] = False  # a fully masked row
    got_s, got_m = M.masked_sum(x, mask, dim=dim), M.masked_mean(x, mask, dim=dim)
    xs = torch.where(mask, x, torch.zeros_like(x))
    exp_s = xs.sum(dim=dim)
    exp_m = exp_s / (mask.to(torch.float64).sum(dim=dim) + 1e-8)
    assert_close("masked_sum", got_s, exp_s, atol=1e-12)
    assert_close("masked_mean", got_m, exp_m, atol=1e-12)
    if dim in (-1, 1):
        assert got_m[2].item() == 0.0 and got_s[2].item() == 0.0


def test_weighted_float_mask():
    x = torch.randn(3, 9, dtype=torch.float64)
    w = torch.rand(3, 9, dtype=torch.float64)
    w[w < 0.3] = 0
    s, n, mean, var = _loop_stats(x, w)
    assert_close("sum", M.masked_sum(x, w), torch.tensor(s, dtype=torch.float64), atol=1e-12)
    assert_close("mean", M.masked_mean(x, w), torch.tensor(mean, dtype=torch.float64), atol=1e-12)
    assert_close("var", M.masked_var(x, w), torch.tensor(var, dtype=torch.float64), atol=1e-12)


def test_nan_outside_mask_is_ignored():
    x = torch.randn(4, 11, dtype=torch.float64)
    mask = torch.rand(4, 11) > 0.5
    mask[0, 0] = True
    mask[0, 1] = False
    dirty = x.clone()
    dirty[~mask] = float("nan")
    dirty[0, 1] = float("inf")
    for fn in (M.masked_sum, M.masked_mean, M.masked_var):
        assert_close(fn.__name__, fn(dirty, mask), fn(x, mask), atol=1e-12)
    w_clean, w_dirty = M.masked_whiten(x, mask), M.masked_whiten(dirty, mask)
    assert_close("whiten (selected)", w_dirty[mask], w_clean[mask], atol=1e-12)
    # NaN inside the mask propagates.
    dirty[mask.nonzero()[0].tolist()[0], mask.nonzero()[0].tolist()[1]] = float("nan")
    assert M.masked_mean(dirty, mask).isnan()


def test_var_matches_torch_var():
    x = torch.randn(6, 10, dtype=torch.float64)
    mask = torch.rand(6, 10) > 0.3
    sel = x[mask]
    assert_close("unbiased", M.masked_var(x, mask), sel.var(unbiased=True), atol=1e-7, rtol=1e-7)
    n = sel.numel()
    assert_close("biased", M.masked_var(x, mask, unbiased=False),
                 sel.var(unbiased=False) * n / (n + 1e-8), atol=1e-12)


def test_var_degenerate_counts_give_zero():
    x = torch.randn(8, dtype=torch.float64)
    one = torch.zeros(8, dtype=torch.bool)
    one[3] = True
    # verl raises here; the mean is x / (1 + 1e-8), so the variance is ~1e-16 x^2 (0 in fp32).
    assert abs(M.masked_var(x, one).item()) <= 1e-15 * (1 + x[3].item() ** 2)
    assert M.masked_var(x.float(), one).item() == 0.0
    assert M.masked_var(x, torch.zeros(8, dtype=torch.bool)).item() == 0.0
    assert M.masked_mean(x, torch.zeros(8)).item() == 0.0
    assert M.masked_sum(x, torch.zeros(8, dtype=torch.int64)).item() == 0.0


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_formula(shift_mean):
    x = torch.randn(5, 12, dtype=torch.float64) * 3 + 1
    mask = torch.rand(5, 12) > 0.3
    _, n, mean, var = _loop_stats(x, mask)
    exp = (x - mean) / math.sqrt(var + 1e-8)
    if not shift_mean:
        exp = exp + mean
    got = M.masked_whiten(x, mask, shift_mean=shift_mean)
    assert_close("masked_whiten", got, exp, atol=1e-10)
    if shift_mean:
        # Not exactly 0: verl's +1e-8 in the mean's denominator leaves
        # mean(whitened) = mean * 1e-8 / ((n + 1e-8) * sqrt(var + 1e-8)) (about 1e-10 here).
        residue = abs(mean) * 1e-8 / ((n + 1e-8) * math.sqrt(var + 1e-8))
        assert abs(M.masked_mean(got, mask).item()) < 1.01 * residue + 1e-14
        assert abs(M.masked_var(got, mask).item() - 1.0) < 1e-6


def test_whiten_fully_masked_and_single_element():
    x = torch.randn(3, 4, dtype=torch.float64)
    out = M.masked_whiten(x, torch.zeros(3, 4, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))
    one = torch.zeros(3, 4, dtype=torch.bool)
    one[1, 2] = True
    out = M.masked_whiten(x, one)
    assert torch.isfinite(out).all()
    assert abs(out[1, 2].item()) < 1e-3  # the only selected element sits at the mean
    assert M.masked_whiten(x.float(), one)[1, 2].item() == 0.0


def test_dtypes():
    x = torch.randn(4, 6).to(torch.bfloat16)
    mask = torch.rand(4, 6) > 0.5
    for fn in (M.masked_sum, M.masked_mean, M.masked_var):
        assert fn(x, mask).dtype == torch.float32
    assert M.masked_whiten(x, mask).dtype == torch.float32
    assert M.masked_mean(x.double(), mask).dtype == torch.float64
    assert_close("bf16 mean", M.masked_mean(x, mask), M.masked_mean(x.double(), mask), atol=1e-6)


def test_gradcheck():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) > 0.3
    mask[0, :2] = True
    for fn in (lambda t: M.masked_sum(t, mask, dim=-1), lambda t: M.masked_mean(t, mask, dim=0),
               lambda t: M.masked_var(t, mask), lambda t: M.masked_whiten(t, mask),
               lambda t: M.masked_whiten(t, mask, shift_mean=False)):
        assert torch.autograd.gradcheck(fn, (x,))
    # Empty mask: zero gradient, not NaN.
    empty = torch.zeros(3, 5, dtype=torch.bool)
    for fn in (M.masked_mean, M.masked_var, M.masked_whiten):
        out = fn(x, empty)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(g, torch.zeros_like(g)), fn.__name__


def test_bad_inputs():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"masked_mean: mask must have shape \(3, 4\).*\(3, 5\)"):
        M.masked_mean(x, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="masked_sum: x must have dtype"):
        M.masked_sum(torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4))
    with pytest.raises(TypeError, match="masked_var: mask must have dtype"):
        M.masked_var(x, torch.ones(3, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="masked_whiten: x must be a torch.Tensor"):
        M.masked_whiten([1.0, 2.0], torch.ones(2))
    with pytest.raises(ValueError, match="masked_sum: dim 2 is out of range"):
        M.masked_sum(x, torch.ones(3, 4), dim=2)
    with pytest.raises(TypeError, match="masked_mean: dim must be None, an int"):
        M.masked_mean(x, torch.ones(3, 4), dim=1.5)
    with pytest.raises(TypeError, match="masked_whiten: shift_mean must be a bool"):
        M.masked_whiten(x, torch.ones(3, 4), shift_mean=None)
    with pytest.raises(ValueError, match="masked_whiten: backend must be one of.*'cuda'"):
        M.masked_whiten(x, torch.ones(3, 4), backend="cuda")


def test_backend_keyword_is_accepted():
    x, m = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4) > 0.5
    for be in ("auto", "triton", "reference", None):
        assert torch.equal(M.masked_whiten(x, m, backend=be), M.masked_whiten(x, m))
        assert torch.equal(M.masked_mean(x, m, -1, backend=be), M.masked_mean(x, m, -1))
