"""[contract] reproducers that live in the op layer: the same answer on every backend.

1. in-place paths with self-overlapping (expanded) logits, or logits whose rows had to be copied
   (non-unit vocab stride): the gradient goes to a fresh buffer, never silently wrong;
10. argument validation: bool flags must be bools; meta tensors give shapes (reference path, no
    data-dependent check); a float mask never receives a gradient;
11. an unused entropy output costs no backward work (tests/test_architecture.py).
"""

from __future__ import annotations

import pytest
import torch

import fastrlhf as fr
from fastrlhf import reference
from helpers import DEVICE, assert_close, backends

INPLACE_BACKENDS = [b for b in backends(native=True) if b != "reference"]


@pytest.mark.parametrize("backend", INPLACE_BACKENDS)
def test_inplace_token_logprobs_on_expanded_logits(backend):
    """The issue's reproducer: three rows of the batch share one buffer."""
    dev = "cpu" if backend == "native" else DEVICE
    x = torch.randn(1, 2, 9, dtype=torch.float64, device=dev, requires_grad=True)
    tok = torch.tensor([[0, 1], [2, 3], [4, 5]], device=dev)
    fr.token_logprobs((x * 1).expand(3, 2, 9), tok, inplace_backward=True,
                      backend=backend).sum().backward()
    x64 = x.detach().clone().requires_grad_(True)
    reference.token_logprobs(x64.expand(3, 2, 9), tok).sum().backward()
    assert_close("dlogits", x.grad, x64.grad, atol=1e-12)


@pytest.mark.parametrize("backend", INPLACE_BACKENDS)
def test_inplace_token_logprobs_on_overlapping_as_strided(backend):
    dev = "cpu" if backend == "native" else DEVICE
    base = torch.randn(8, dtype=torch.float64, device=dev, requires_grad=True)
    tok = torch.tensor([0, 4, 2, 1], device=dev)
    fr.token_logprobs((base * 1).as_strided((4, 5), (1, 1)), tok, inplace_backward=True,
                      backend=backend).sum().backward()
    b64 = base.detach().clone().requires_grad_(True)
    reference.token_logprobs(b64.as_strided((4, 5), (1, 1)), tok).sum().backward()
    assert_close("dlogits", base.grad, b64.grad, atol=1e-12)


@pytest.mark.parametrize("backend", INPLACE_BACKENDS)
def test_inplace_fused_loss_on_expanded_logits(backend):
    dev = "cpu" if backend == "native" else DEVICE
    x = torch.randn(1, 2, 9, dtype=torch.float64, device=dev, requires_grad=True)
    tok = torch.tensor([[0, 1], [2, 3], [4, 5]], device=dev)
    old = -torch.rand(3, 2, dtype=torch.float64, device=dev)
    adv = torch.randn(3, 2, dtype=torch.float64, device=dev)
    m = torch.ones(3, 2, device=dev)
    loss, _ = fr.fused_ppo_loss((x * 1).expand(3, 2, 9), tok, old, adv, m,
                                inplace_backward=True, backend=backend)
    loss.backward()
    x64 = x.detach().clone().requires_grad_(True)
    want, _ = fr.fused_ppo_loss(x64.expand(3, 2, 9), tok, old, adv, m, backend="reference")
    want.backward()
    assert_close("loss", loss, want, atol=1e-12)
    assert_close("dlogits", x.grad, x64.grad, atol=1e-12)


@pytest.mark.parametrize("backend", INPLACE_BACKENDS)
def test_inplace_with_a_non_unit_vocab_stride_falls_back(backend):
    """Forward and backward both succeed (the rows are copied, the gradient goes to a fresh
    buffer) on every backend."""
    dev = "cpu" if backend == "native" else DEVICE
    w = torch.randn(2, 3, 14, dtype=torch.float64, device=dev, requires_grad=True)
    tok = torch.randint(0, 7, (2, 3), device=dev)
    lp, ent = fr.token_logprobs((w * 1)[:, :, ::2], tok, return_entropy=True,
                                inplace_backward=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    w64 = w.detach().clone().requires_grad_(True)
    rl, re = reference.token_logprobs(w64[:, :, ::2], tok, 1.0, True)
    (rl.sum() + re.sum()).backward()
    assert_close("dlogits", w.grad, w64.grad, atol=1e-12)


@pytest.mark.parametrize("flag", ["return_entropy", "inplace_backward"])
def test_bool_flags_must_be_bools(flag):
    x = torch.randn(2, 5)
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        fr.token_logprobs(x, t, **{flag: "no"})
    h, w = torch.randn(2, 4), torch.randn(5, 4)
    if flag == "return_entropy":
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            fr.linear_token_logprobs(h, w, t, return_entropy="yes")


def test_meta_tensors_give_shapes():
    x = torch.empty(2, 3, 11, device="meta")
    t = torch.empty(2, 3, dtype=torch.long, device="meta")
    lp, ent = fr.token_logprobs(x, t, return_entropy=True)
    assert lp.device.type == "meta" and lp.shape == (2, 3) and lp.dtype == torch.float32
    assert ent.shape == (2, 3)
    old, adv, m = (torch.empty(2, 3, device="meta") for _ in range(3))
    loss, stats = fr.fused_ppo_loss(x, t, old, adv, m)
    assert loss.device.type == "meta" and loss.shape == ()
    for name, b in (("native", "native"), ("triton", "triton")):
        with pytest.raises(ValueError, match="meta"):
            fr.token_logprobs(x, t, backend=b)


@pytest.mark.parametrize("backend", backends(native=True))
def test_a_float_mask_gets_no_gradient(backend):
    lp = (-torch.rand(2, 5, dtype=torch.float64)).requires_grad_(True)
    old, adv = -torch.rand(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    m = torch.rand(2, 5, dtype=torch.float64).requires_grad_(True)
    loss, _ = fr.ppo_policy_loss(lp, old, adv, m, backend=backend)
    v, _ = fr.ppo_value_loss(lp, old, adv, m, backend=backend)
    total = loss + v + fr.agg_loss(lp, m, "seq-mean-token-mean", backend=backend) \
        + fr.masked_mean(lp, m) + fr.masked_whiten(lp, m).sum()
    total.backward()
    assert m.grad is None
    assert lp.grad is not None


# Found by the property-based suite's long profile (tests/test_properties.py):

@pytest.mark.parametrize("backend", backends())
def test_full_kl_where_p_underflows_against_q_zero(backend):
    """A term with p_j = 0 contributes 0 even where q_j = 0 (also when p_j underflows at a tiny
    temperature): KL 0, gradient [0, 0], as the reference."""
    x = torch.tensor([[0.0, -1.0]], requires_grad=True)
    kl = fr.full_kl(x, torch.tensor([[0.0, float("-inf")]]), temperature=1e-3, backend=backend)
    kl.sum().backward()
    assert kl.item() == 0.0
    assert x.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("backend", backends())
def test_full_kl_backward_of_a_nan_row(backend):
    """A row whose KL is NaN gets a NaN gradient on every backend; the other rows are finite."""
    x = torch.tensor([[float("inf"), 0.0], [0.5, 0.0]], requires_grad=True)
    kl = fr.full_kl(x, torch.zeros(2, 2), backend=backend)
    kl.backward(torch.ones_like(kl))
    assert kl[0].isnan() and x.grad[0].isnan().all()
    assert x.grad[1].isfinite().all()


@pytest.mark.parametrize("backend", INPLACE_BACKENDS)
def test_inplace_with_column_major_logits(backend):
    """[N, V] logits stored column-major (vocab stride N): same gradient as out of place."""
    base = torch.randn(2, 5)
    tok = torch.tensor([0, 1, 1, 0, 1])
    grads = []
    for inplace in (True, False):
        x = base.clone().requires_grad_(True)
        fr.token_logprobs(x.transpose(0, 1) * 1, tok, inplace_backward=inplace,
                          backend=backend).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_meta_tensors_policy_loss():
    bt = torch.empty(2, 3, device="meta")
    loss, _ = fr.ppo_policy_loss(bt, bt, bt, torch.ones(2, 3, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()


@pytest.mark.parametrize("backend", ["auto", "reference"] + INPLACE_BACKENDS)
def test_group_advantages_singleton_group_gradient(backend):
    """A group of size 1 has mean 0 and std 1 (verl): grpo gives x / (1 + eps), gradient
    1 / (1 + eps), on the vectorized path as in the reference loop (no sqrt(0) behind a where)."""
    x = torch.tensor([0.3, 1.0, 2.0], requires_grad=True)
    fr.group_advantages(x, torch.tensor([0, 1, 1]), kind="grpo", backend=backend).sum().backward()
    xr = x.detach().clone().requires_grad_()
    fr.group_advantages(xr, torch.tensor([0, 1, 1]), kind="grpo",
                        backend="reference").sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
