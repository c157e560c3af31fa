"""kl_penalty (per-token estimators) and full_kl (exact KL over the vocabulary) against the
float64 references, on every backend this machine runs."""

import math

import pytest
import torch

import fastrlhf.reference as R
from fastrlhf.ops.kl import KL_KINDS, full_kl, kl_penalty
from helpers import DEVICE, assert_close, backends

BASE_OF = {"k1": "k1", "kl": "k1", "abs": "abs", "k2": "k2", "mse": "k2", "k3": "k3",
           "low_var_kl": "k3"}


def _leaf(t, dtype=None):
    t = t.detach().clone()
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(True)


def _ref_grads(fn, inputs, grad_out):
    """Reference value and gradients in float64 (inputs upcast from the very same values)."""
    leaves = [_leaf(t, torch.float64) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(torch.float64))
    return out.detach(), [t.grad for t in leaves]


# ---------------------------------------------------------------------------------------------
# kl_penalty
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_penalty_matches_reference(kind, backend):
    torch.manual_seed(1)
    shape = (3, 1001)  # odd size: two full 1024-blocks and a masked tail
    # Wide spread so that k3's clamps (|d| > 20 and exp(k) - k - 1 > 10) are exercised.
    x = (torch.randn(shape) * 6).to(DEVICE)
    y = (torch.randn(shape) * 6).to(DEVICE)
    if BASE_OF[kind.rstrip("+")] == "k3":
        raw = y - x
        assert (raw.abs() > 20).any() and ((raw > 2.6) & (raw < 20)).any()
    g = torch.randn(shape, device=DEVICE)
    xl, yl = _leaf(x), _leaf(y)
    out = kl_penalty(xl, yl, kind, backend=backend)
    out.backward(g)
    assert out.dtype == torch.float32 and out.shape == shape
    ref, (rdx, rdy) = _ref_grads(lambda a, b: R.kl_penalty(a, b, kind), (x, y), g)
    assert_close("value", out, ref, atol=2e-6, rtol=2e-6)
    assert_close("dlogp", xl.grad, rdx, atol=2e-6, rtol=2e-6)
    assert_close("dref_logp", yl.grad, rdy, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3"])
def test_kl_penalty_gradcheck(kind, backend):
    torch.manual_seed(2)
    x = torch.randn(13, dtype=torch.float64, device=DEVICE) * 2
    y = torch.randn(13, dtype=torch.float64, device=DEVICE) * 2
    # Points well inside / outside k3's clamps (never on a kink): d = ref - logp of 25 and -30
    # (outer clamp), 3 (value clamp at 10), -2.5 and 1.5 (interior).
    x[:5] = torch.tensor([0.0, 0.0, 0.0, 0.5, -0.5], dtype=torch.float64)
    y[:5] = torch.tensor([25.0, -30.0, 3.0, -2.0, 1.0], dtype=torch.float64)
    assert ((x - y).abs() > 1e-3).all()
    x.requires_grad_(True)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: kl_penalty(a, b, kind, backend=backend), (x, y))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("kind", ["k1+", "abs+", "k3+", "low_var_kl+", "k2+"])
def test_kl_penalty_straight_through(kind, backend):
    """'+' kinds: the forward value of the base estimator, the gradient of k2 (= d)."""
    torch.manual_seed(3)
    x = _leaf(torch.randn(40, device=DEVICE) * 3)
    y = _leaf(torch.randn(40, device=DEVICE) * 3)
    out = kl_penalty(x, y, kind, backend=backend)
    base = kl_penalty(x.detach(), y.detach(), kind[:-1], backend=backend)
    assert torch.equal(out.detach(), base)
    out.sum().backward()
    d = (x - y).detach()
    assert_close("dlogp", x.grad, d, atol=1e-6)
    assert_close("dref_logp", y.grad, -d, atol=1e-6)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3"])
def test_kl_penalty_edge_values_match_torch_autograd(kind, backend):
    """NaN, +-inf, d == 0 and d exactly on the +-20 clamp bounds: values and gradients are
    exactly what torch autograd gives the reference (clamp passes the gradient on its closed
    interval, sign(0) = 0, NaN through abs / clamp gives a 0 gradient)."""
    inf, nan = math.inf, math.nan
    xs = [0.0, 1.0, nan, 0.0, -inf, 0.0, 3.0, 0.0, 0.0, -1.0]
    ys = [0.0, nan, 1.0, -inf, 0.0, 20.0, -17.0, -20.0, 2.0, -inf]
    x = torch.tensor(xs, dtype=torch.float64, device=DEVICE)
    y = torch.tensor(ys, dtype=torch.float64, device=DEVICE)
    xl, yl = _leaf(x), _leaf(y)
    out = kl_penalty(xl, yl, kind, backend=backend)
    out.backward(torch.ones_like(out))
    ref, (rdx, rdy) = _ref_grads(lambda a, b: R.kl_penalty(a, b, kind), (x, y), torch.ones(10))
    assert_close("value", out, ref, atol=1e-12, equal_nan=True)
    assert_close("dlogp", xl.grad, rdx, atol=1e-12, equal_nan=True)
    assert_close("dref_logp", yl.grad, rdy, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("backend", backends())
def test_kl_penalty_dtypes_shapes_and_grad_targets(backend):
    torch.manual_seed(4)
    # bf16 inputs: float32 output, bf16 gradients; values from the bf16 inputs, upcast.
    x = _leaf(torch.randn(5, 7, device=DEVICE).to(torch.bfloat16))
    y = torch.randn(5, 7, device=DEVICE).to(torch.bfloat16)  # no grad wanted for ref
    out = kl_penalty(x, y, "k3", backend=backend)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and y.grad is None
    ref, (rdx, _) = _ref_grads(lambda a, b: R.kl_penalty(a, b, "k3"), (x, y), torch.ones(5, 7))
    assert_close("value", out, ref, atol=1e-5)
    assert_close("dlogp", x.grad, rdx, atol=1e-2, rtol=1e-2)
    # mixed float32 / float64: float64 out.
    a = torch.randn(4, device=DEVICE)
    b = torch.randn(4, dtype=torch.float64, device=DEVICE)
    out = kl_penalty(a, b, "k2", backend=backend)
    assert out.dtype == torch.float64
    assert_close("mixed", out, 0.5 * (a.double() - b) ** 2, atol=1e-15)
    # 0-d, empty, and non-contiguous inputs.
    s = kl_penalty(torch.tensor(0.5, device=DEVICE), torch.tensor(-0.5, device=DEVICE), "k1",
                   backend=backend)
    assert s.shape == () and float(s) == 1.0
    e = kl_penalty(torch.zeros(0, 3, device=DEVICE), torch.zeros(0, 3, device=DEVICE), "abs",
                   backend=backend)
    assert e.shape == (0, 3)
    xt = torch.randn(6, 9, device=DEVICE).t()
    yt = torch.randn(9, 6, device=DEVICE)
    assert not xt.is_contiguous()
    assert_close("strided", kl_penalty(xt, yt, "abs", backend=backend),
                 (xt.double() - yt.double()).abs(), atol=1e-6)


@pytest.mark.parametrize("backend", backends())
def test_kl_penalty_expanded_upstream_grad(backend):
    """The upstream gradient of a mean() is an expanded (stride-0) tensor."""
    torch.manual_seed(5)
    x = _leaf(torch.randn(2, 300, device=DEVICE))
    y = _leaf(torch.randn(2, 300, device=DEVICE))
    kl_penalty(x, y, "k2", backend=backend).mean().backward()
    d = (x - y).detach() / 600
    assert_close("dlogp", x.grad, d, atol=1e-8)
    assert_close("dref_logp", y.grad, -d, atol=1e-8)


def test_kl_penalty_bad_inputs():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError,
                       match=r"unknown kind 'k4'.*k1, kl, abs, k2, mse, k3, low_var_kl"):
        kl_penalty(x, x, "k4")
    with pytest.raises(ValueError, match="unknown kind 'full'"):
        kl_penalty(x, x, "full")
    with pytest.raises(ValueError, match=r"unknown kind 'k3\+\+'"):
        kl_penalty(x, x, "k3++")
    with pytest.raises(TypeError, match="kind must be a str"):
        kl_penalty(x, x, 3)
    with pytest.raises(ValueError, match=r"ref_logp must have shape \(3, 4\).*got \(4, 3\)"):
        kl_penalty(x, x.t(), "k1")
    with pytest.raises(TypeError, match="logp must have dtype.*got int64"):
        kl_penalty(torch.zeros(3, 4, dtype=torch.long), x)
    with pytest.raises(TypeError, match="ref_logp must be a torch.Tensor, got list"):
        kl_penalty(x, [1.0, 2.0])
    with pytest.raises(ValueError, match="ref_logp is on meta but logp is on"):
        kl_penalty(x, torch.empty(3, 4, device="meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        kl_penalty(x, x, backend="cuda")


# ---------------------------------------------------------------------------------------------
# full_kl
# ---------------------------------------------------------------------------------------------

def _logits(*shape, scale=2.0, dtype=torch.float32):
    return (torch.randn(*shape) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("V,temperature", [(67, 1.0), (1, 1.0), (130, 0.7)])
def test_full_kl_matches_reference(V, temperature, backend):
    torch.manual_seed(10 + V)
    full = _logits(2, 5, V)
    logits = full[:, :-1]          # strided view, read in place
    ref_logits = _logits(2, 4, V)  # a different (contiguous) layout
    g = torch.randn(2, 4, device=DEVICE)
    xl = logits.detach().requires_grad_(True)
    yl = ref_logits.detach().requires_grad_(True)
    out = full_kl(xl, yl, temperature=temperature, backend=backend)
    assert out.shape == (2, 4) and out.dtype == torch.float32
    out.backward(g)
    ref, (rdx, rdy) = _ref_grads(lambda a, b: R.full_kl(a, b, temperature),
                                 (logits, ref_logits), g)
    assert_close("kl", out, ref, atol=2e-6, rtol=1e-5)
    assert_close("dlogits", xl.grad, rdx, atol=2e-6, rtol=1e-5)
    assert_close("dref_logits", yl.grad, rdy, atol=2e-6, rtol=1e-5)
    assert (ref >= 0).all() if V > 1 else torch.equal(ref, torch.zeros_like(ref))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_kl_float64_accuracy(backend, temperature):
    """float64 in, float64 accuracy out (value and both gradients at 1e-12 of the reference,
    with logits of magnitude ~30).  A float constant bound to a name inside a Triton kernel is
    an fp32 constexpr: ``kl = T * LN2`` lost 8 digits that way (2e-8 on the value, 3e-7 on the
    gradient)."""
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(4, 37, generator=g, dtype=torch.float64) * 10).to(DEVICE)
    y = (torch.randn(4, 37, generator=g, dtype=torch.float64) * 10).to(DEVICE)
    up = torch.randn(4, generator=g, dtype=torch.float64).to(DEVICE)
    xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    out = full_kl(xl, yl, temperature=temperature, backend=backend)
    out.backward(up)
    ref, (rdx, rdy) = _ref_grads(lambda a, b: R.full_kl(a, b, temperature), (x, y), up)
    assert_close("kl", out, ref, atol=1e-12, rtol=1e-12)
    assert_close("dlogits", xl.grad, rdx, atol=1e-12, rtol=1e-12)
    assert_close("dref_logits", yl.grad, rdy, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", backends())
def test_full_kl_gradcheck(backend):
    torch.manual_seed(11)
    x = torch.randn(3, 5, dtype=torch.float64, device=DEVICE).requires_grad_(True)
    y = torch.randn(3, 5, dtype=torch.float64, device=DEVICE).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: full_kl(a, b, temperature=1.3, backend=backend), (x, y))


@pytest.mark.parametrize("backend", backends())
def test_full_kl_bf16_upcast(backend):
    torch.manual_seed(12)
    x = _logits(3, 70, dtype=torch.bfloat16).requires_grad_(True)
    y = _logits(3, 70, dtype=torch.bfloat16)
    out = full_kl(x, y, backend=backend)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and y.grad is None
    ref, (rdx,) = _ref_grads(lambda a: R.full_kl(a, y.double()), (x,), torch.ones(3))
    assert_close("kl", out, ref, atol=1e-5, rtol=1e-5)
    assert_close("dlogits", x.grad, rdx, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("backend", backends())
def test_full_kl_large_offsets(backend):
    """+1e4 on the policy row only: everything is kept relative to the running maxima."""
    torch.manual_seed(13)
    x = (_logits(4, 100) + 1e4).requires_grad_(True)
    y = _logits(4, 100)
    out = full_kl(x, y, backend=backend)
    out.sum().backward()
    ref, (rdx,) = _ref_grads(lambda a: R.full_kl(a, y.double()), (x.detach(),), torch.ones(4))
    assert_close("kl", out, ref, atol=5e-6, rtol=1e-5)
    assert_close("dlogits", x.grad, rdx, atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", backends())
def test_full_kl_inf_and_nan_rows(backend):
    torch.manual_seed(14)
    inf = math.inf
    x = _logits(7, 70)
    y = _logits(7, 70)
    x[0, :10] = -inf               # p_j = 0: those terms vanish
    x[1, 5:9] = -inf
    y[1, 5:9] = -inf               # p_j = q_j = 0: still finite
    y[2, 3] = -inf                 # q_j = 0 where p_j > 0: +inf
    x[3] = -inf                    # fully masked policy row: NaN
    y[4] = -inf                    # fully masked reference row: NaN
    x[5, 60] = math.nan            # NaN stays in its row
    x[6, 0] = inf                  # +inf logit: NaN (as log_softmax gives)
    out = full_kl(x, y, backend=backend)
    ref = R.full_kl(x.double(), y.double())
    assert math.isinf(float(ref[2])) and ref[3:].isnan().all() and ref[:2].isfinite().all()
    assert_close("kl", out, ref, atol=2e-6, rtol=1e-5, equal_nan=True)
    # gradients of the finite rows, through the -inf entries
    xl = x[:2].clone().requires_grad_(True)
    full_kl(xl, y[:2], backend=backend).sum().backward()
    _, (rdx,) = _ref_grads(lambda a: R.full_kl(a, y[:2].double()), (x[:2],), torch.ones(2))
    assert_close("dlogits", xl.grad, rdx, atol=2e-6, rtol=1e-5)
    assert (xl.grad[0, :10] == 0).all() and (xl.grad[1, 5:9] == 0).all()


@pytest.mark.parametrize("backend", backends())
def test_full_kl_layouts(backend):
    torch.manual_seed(15)
    # Four non-mergeable leading dims (falls back to one contiguous copy) and a transposed
    # vocab dim (non-unit stride: copied), against the reference; N = 1 and N = 0.
    base = _logits(3, 4, 3, 4, 20)
    x = base[:, :, :-1, :-1]
    y = _logits(3, 4, 2, 3, 20)
    assert_close("4d", full_kl(x, y, backend=backend), R.full_kl(x.double(), y.double()),
                 atol=2e-6, rtol=1e-5)
    xt = _logits(20, 3).t()
    yt = _logits(3, 20)
    assert xt.stride(-1) != 1
    assert_close("vocab-strided", full_kl(xt, yt, backend=backend),
                 R.full_kl(xt.double(), yt.double()), atol=2e-6, rtol=1e-5)
    one = full_kl(_logits(1, 33), _logits(1, 33), backend=backend)
    assert one.shape == (1,) and bool(one.isfinite().all())
    x0 = torch.zeros(0, 5, 8, device=DEVICE, requires_grad=True)
    e = full_kl(x0, torch.zeros(0, 5, 8, device=DEVICE), backend=backend)
    assert e.shape == (0, 5)
    e.sum().backward()
    assert x0.grad.shape == (0, 5, 8)


def test_full_kl_identical_rows_are_zero():
    x = _logits(3, 50)
    for backend in backends():
        out = full_kl(x, x.clone(), temperature=0.5, backend=backend)
        assert_close(backend, out, torch.zeros(3), atol=1e-6)


def test_full_kl_bad_inputs():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"ref_logits must have shape \(2, 5\).*got \(2, 6\)"):
        full_kl(x, torch.randn(2, 6))
    with pytest.raises(ValueError, match="non-empty vocab"):
        full_kl(torch.zeros(2, 0), torch.zeros(2, 0))
    with pytest.raises(ValueError, match=r"logits must have at least 1 dim\(s\), got shape \(\)"):
        full_kl(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0.0"):
        full_kl(x, x, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got nan"):
        full_kl(x, x, temperature=math.nan)
    with pytest.raises(TypeError, match="temperature must be a float, got bool"):
        full_kl(x, x, temperature=True)
    with pytest.raises(TypeError, match="ref_logits must have dtype.*got int32"):
        full_kl(x, torch.zeros(2, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="ref_logits is on meta but logits is on"):
        full_kl(x, torch.empty(2, 5, device="meta"))


# ---------------------------------------------------------------------------------------------
# torch.library registration (fake impls, schemas, autograd) of the Triton-path ops
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif("triton" not in backends(), reason="Triton backend not runnable here")
def test_registered_ops_opcheck():
    torch.manual_seed(16)
    x = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    y = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fastrlhf.kl_penalty.default, (x, y, "k3", "triton"),
                          test_utils=tests)
    lx = torch.randn(2, 3, 9, device=DEVICE, requires_grad=True)
    ly = torch.randn(2, 3, 9, device=DEVICE)
    torch.library.opcheck(torch.ops.fastrlhf.full_kl.default, (lx, ly, 1.0, "triton"),
                          test_utils=tests)


@pytest.mark.skipif("triton" not in backends(), reason="Triton backend not runnable here")
def test_compile_fullgraph():
    torch.manual_seed(17)

    def loss(lg, rlg, lp, rlp):
        return (full_kl(lg, rlg, backend="triton").mean()
                + kl_penalty(lp, rlp, "k3", backend="triton").mean())

    lg = torch.randn(2, 3, 11, device=DEVICE, requires_grad=True)
    rlg = torch.randn(2, 3, 11, device=DEVICE)
    lp = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    rlp = torch.randn(2, 3, device=DEVICE)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out = compiled(lg, rlg, lp, rlp)
    out.backward()
    g1, g2 = lg.grad.clone(), lp.grad.clone()
    lg.grad = lp.grad = None
    ref = loss(lg, rlg, lp, rlp)
    ref.backward()
    assert_close("loss", out, ref, atol=1e-6)
    assert_close("dlogits", g1, lg.grad, atol=1e-7)
    assert_close("dlogp", g2, lp.grad, atol=1e-7)
