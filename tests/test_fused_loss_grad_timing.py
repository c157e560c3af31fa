"""fused_ppo_loss(grad_timing="backward"): the gradient sweep moved to the backward, with the
upstream gradient folded in (issue 15, item 2 / bug 3).  The values equal the composition of the
separate ops (float64) exactly as grad_timing="forward" does; the backward makes one sweep over
the logits whatever the upstream gradient, and no scaling pass at all."""

import pytest
import torch

import fastrlhf.ops.fused_loss as mod
from fastrlhf.ops.fused_loss import GRAD_TIMINGS, fused_ppo_loss
from helpers import TRITON_OK, assert_close, backends
from test_fused_loss import CASES, TOL, check_equal, composition, make_inputs, run_both

pytestmark = pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")

# (the grad_timing="forward" path runs every case in test_fused_loss.py; these cover each
# branch of the deferred one: KL, entropy, temperature, GSPO, dual clip, seq aggregation)
DEFERRED_CASES = ["default", "entropy-temperature", "gspo-dual-token-adv", "global-seq-norm"]
# the backends with a deferred path: Triton, and the native C++ one where it builds
DEFERRING = [b for b in backends(native=True) if b != "reference"]


@pytest.mark.parametrize("backend", DEFERRING)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", DEFERRED_CASES)
def test_matches_composition(case, inplace, backend):
    cfg = dict(CASES[case], grad_timing="backward")
    cfg.setdefault("upstream", 0.25)  # a scaled loss: the case this mode exists for
    got, want, _ = run_both(backend, cfg, inplace=inplace)
    check_equal(got, want)


class _Calls:
    """Counts the fused-loss launchers' calls (the logits sweeps of the forward and backward)."""

    def __init__(self, monkeypatch):
        import fastrlhf.kernels.fused_loss as k
        import fastrlhf.kernels.logprobs as kl
        self.calls = []
        for module, name in ((k, "fused_loss_fwd"), (k, "fused_loss_grad"), (k, "scale_rows"),
                             (kl, "logprobs_fwd"), (kl, "logprobs_bwd")):
            real = getattr(module, name)

            def spy(*a, _real=real, _name=name, **kw):
                if _name == "fused_loss_fwd":
                    self.calls.append(f"fused_loss_fwd(write_grad={kw['write_grad']})")
                else:
                    self.calls.append(_name)
                return _real(*a, **kw)

            monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("upstream", [1.0, 0.125])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_one_sweep_each_way_for_any_upstream_gradient(monkeypatch, upstream, level):
    """The forward reads the logits once (the log-prob statistics sweep; the fused kernel then
    touches only O(B T) data), the backward sweeps them once with the upstream gradient folded
    in; nothing else runs, whatever the upstream gradient is -- no scaling pass, no launch that
    only checks it."""
    inp = make_inputs(B=3, T=5, V=23, seed=5)
    args = (inp["tokens"], inp["old"], inp["adv"], inp["mask"])
    calls = _Calls(monkeypatch).calls
    leaf = inp["base"].clone().requires_grad_(True)
    loss, _ = fused_ppo_loss(leaf[:, :-1] * 1.0, *args, ref_logp=inp["ref"], kl_coef=0.1,
                             entropy_coef=0.01, ratio_level=level, backend="triton",
                             grad_timing="backward")
    assert calls == ["logprobs_fwd", "fused_loss_fwd(write_grad=False)"], calls
    (loss * upstream).backward()
    assert calls[2:] == ["fused_loss_grad"], calls


class _NativeCalls:
    """Counts the native launchers' calls (fastrlhf.native, the C++ binding layer)."""

    def __init__(self, monkeypatch):
        from fastrlhf import native
        self.calls = []
        for name in ("fused_loss_call", "fused_loss_grad", "scale_rows", "logprobs_call",
                     "logprobs_bwd"):
            real = getattr(native, name)

            def spy(*a, _real=real, _name=name, **kw):
                if _name == "fused_loss_call":
                    self.calls.append(f"fused_loss_call(write_grad={kw['write_grad']}, "
                                      f"defer={kw.get('defer', False)})")
                else:
                    self.calls.append(_name)
                return _real(*a, **kw)

            monkeypatch.setattr(native, name, spy)


@pytest.mark.skipif("native" not in DEFERRING, reason="the native backend does not build here")
@pytest.mark.parametrize("upstream", [1.0, 0.125])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_native_one_sweep_each_way(monkeypatch, upstream, level):
    """Native: the forward is one extension call that reads the logits and writes no gradient;
    the backward is one gradient sweep with the upstream gradient folded in -- no scaling
    pass.  The default timing writes the gradient in the forward and scales it only for an
    upstream gradient other than 1."""
    inp = make_inputs(B=3, T=5, V=23, seed=5)
    args = (inp["tokens"], inp["old"], inp["adv"], inp["mask"])
    kw = dict(ref_logp=inp["ref"], kl_coef=0.1, entropy_coef=0.01, ratio_level=level,
              backend="native")
    calls = _NativeCalls(monkeypatch).calls
    leaf = inp["base"].clone().requires_grad_(True)
    loss, _ = fused_ppo_loss(leaf[:, :-1] * 1.0, *args, grad_timing="backward", **kw)
    assert calls == ["fused_loss_call(write_grad=False, defer=True)"], calls
    (loss * upstream).backward()
    assert calls[1:] == ["fused_loss_grad"], calls
    del calls[:]
    loss, _ = fused_ppo_loss(leaf[:, :-1] * 1.0, *args, **kw)
    assert calls == ["fused_loss_call(write_grad=True, defer=False)"], calls
    (loss * upstream).backward()
    assert calls[1:] == ([] if upstream == 1.0 else ["scale_rows"]), calls


def test_forward_timing_scales_only_for_a_non_unit_upstream_gradient(monkeypatch):
    """The default keeps the gradient in the forward launch; its backward has the scaling
    launch (a persistent grid that returns at once when the factor is 1)."""
    inp = make_inputs(B=3, T=5, V=23, seed=5)
    args = (inp["tokens"], inp["old"], inp["adv"], inp["mask"])
    calls = _Calls(monkeypatch).calls
    leaf = inp["base"].clone().requires_grad_(True)
    loss, _ = fused_ppo_loss(leaf[:, :-1] * 1.0, *args, backend="triton")
    assert calls == ["fused_loss_fwd(write_grad=True)"], calls
    (loss * 0.5).backward()
    assert calls[1:] == ["scale_rows"], calls


@pytest.mark.parametrize("backend", DEFERRING)
@pytest.mark.parametrize("inplace", [False, True])
def test_logits_untouched_by_the_forward(inplace, backend):
    inp = make_inputs(B=3, T=5, V=23, seed=6)
    args = (inp["tokens"], inp["old"], inp["adv"], inp["mask"])
    leaf = inp["base"].clone().requires_grad_(True)
    logits = leaf * 1.0
    loss, _ = fused_ppo_loss(logits[:, :-1], *args, backend=backend, grad_timing="backward",
                             inplace_backward=inplace)
    assert torch.equal(logits.detach(), inp["base"]), "the forward wrote over the logits"
    (loss * 3.0).backward()
    want_leaf = inp["base"].clone().requires_grad_(True)
    want, _ = composition(want_leaf[:, :-1], *args)
    (want * 3.0).backward()
    assert_close("dlogits", leaf.grad, want_leaf.grad, atol=TOL, rtol=TOL)
    if inplace:  # the backward wrote the gradient over the logits buffer itself
        assert_close("buffer", logits[:, :-1], want_leaf.grad[:, :-1], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("backend", DEFERRING)
def test_repeated_backward(backend):
    """Out of place, every backward re-sweeps the saved logits: retain_graph works with any mix
    of upstream gradients.  In place the first backward overwrote them, and autograd says so."""
    inp = make_inputs(B=3, T=5, V=23, seed=7)
    args = (inp["tokens"], inp["old"], inp["adv"], inp["mask"])
    kw = dict(ref_logp=inp["ref"], kl_coef=0.1, entropy_coef=0.01, backend=backend,
              grad_timing="backward")
    leaf = inp["base"].clone().requires_grad_(True)
    loss, _ = fused_ppo_loss(leaf[:, :-1] * 1.0, *args, **kw)
    (g1,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    (loss * 2.0).backward(retain_graph=True)
    (loss * -0.5).backward()
    assert_close("sum of backwards", leaf.grad, 1.5 * g1, atol=TOL, rtol=TOL)

    leaf = inp["base"].clone().requires_grad_(True)
    loss, _ = fused_ppo_loss(leaf[:, :-1] * 1.0, *args, inplace_backward=True, **kw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", DEFERRING)
def test_nan_outside_the_mask_gets_zero_gradient(backend):
    inp = make_inputs(B=3, T=5, V=23, seed=8)
    base = inp["base"].clone()
    mask = inp["mask"]
    b, t = (~mask).nonzero()[0].tolist()
    base[b, t, 3] = float("nan")
    leaf = base.requires_grad_(True)
    loss, _ = fused_ppo_loss(leaf[:, :-1] * 1.0, inp["tokens"], inp["old"], inp["adv"], mask,
                             entropy_coef=0.02, backend=backend, grad_timing="backward")
    (loss * 0.5).backward()
    assert torch.isfinite(loss)
    assert torch.all(leaf.grad[b, t] == 0), "a masked NaN row got a gradient"
    assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("backend", backends(native=True))
def test_every_backend_accepts_it_with_equal_values(backend):
    """grad_timing changes where the gradient is computed, never the values: every backend
    accepts it and returns the same loss and gradient (the reference differentiates the
    composition either way)."""
    got, want, _ = run_both(backend, dict(CASES["default"], grad_timing="backward",
                                          upstream=0.5))
    check_equal(got, want)


def test_bad_grad_timing():
    inp = make_inputs(B=2, T=3, V=5)
    with pytest.raises(ValueError, match="grad_timing must be one of"):
        fused_ppo_loss(inp["base"][:, :-1], inp["tokens"], inp["old"], inp["adv"], inp["mask"],
                       grad_timing="later")
    assert GRAD_TIMINGS == ("forward", "backward")


def test_scale_rows_persistent_grid():
    """The scaling kernel loops over rows (fewer programs than rows) and leaves the buffer
    bitwise untouched for a factor of exactly 1."""
    import fastrlhf.kernels.fused_loss as k
    x = torch.randn(2, 7, 131, dtype=torch.float64)
    v = x[:, :5]  # a strided row layout
    want = x.clone()
    dims, strides = (1, 2, 5), (0, x.stride(0), x.stride(1))
    k.scale_rows(v, dims, strides, 131, torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(x, want)
    k.scale_rows(v, dims, strides, 131, torch.tensor(-0.75, dtype=torch.float64))
    want[:, :5] *= -0.75
    assert torch.equal(x, want)


@pytest.mark.parametrize("backend", DEFERRING)
def test_deferred_ops_pass_opcheck(backend):
    inp = make_inputs(B=2, T=3, V=11)
    x = inp["base"][:, :-1].contiguous().requires_grad_(True)
    coef = torch.ones(2, dtype=torch.float64)
    args = (x, inp["tokens"], inp["old"], inp["adv"], inp["mask"].to(torch.float64), None, coef,
            0.0, "k3", 0.01, 0.8, 1.2, None, 1.0, False, -100, None, backend)
    torch.library.opcheck(mod._deferred.op, args, test_utils=("test_schema", "test_faketensor"))
