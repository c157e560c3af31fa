"""Float atomics make CUDA results vary from run to run; the segment sums of the packed layout,
the GSPO sequence ratios and the group advantages use :func:`fastrlhf.reference.segment_sum`
(one ordered reduction per segment) instead of ``index_add_``.  On the CPU the atomics cannot
be observed, so these tests check the construction: no ``index_add`` / ``scatter_add`` runs, and
the sums are right (empty segments included) and differentiable."""

from __future__ import annotations

import pytest
import torch

import fastrlhf as fr
from fastrlhf import reference
from helpers import DEVICE, TRITON_OK, assert_close


@pytest.fixture
def no_atomics(monkeypatch):
    calls = []
    for name in ("index_add", "index_add_", "scatter_add", "scatter_add_", "index_put_"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            if self.is_floating_point():
                calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    yield calls
    assert calls == [], f"float scatter / index_add used: {calls}"


def test_segment_sum_matches_a_loop_and_is_differentiable():
    x = torch.randn(12, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 3, 3, 10, 12])
    got = reference.segment_sum(x, cu)
    want = torch.stack([x[a:b].sum() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert_close("segment sums", got, want, atol=1e-15)
    assert got[1].item() == 0.0
    assert torch.autograd.gradcheck(lambda v: reference.segment_sum(v, cu), (x,))
    # repeat determinism: bitwise the same
    assert torch.equal(reference.segment_sum(x, cu), got)


def test_group_advantages_use_no_atomics(no_atomics):
    scores = torch.randn(10, device=DEVICE)
    ids = torch.tensor([5, 2, 5, 9, 2, 2, 7, 5, 9, 2], device=DEVICE)
    for kind in fr.GROUP_ADV_KINDS:
        got = fr.group_advantages(scores, ids, kind=kind)
        want = fr.group_advantages(scores.double(), ids, kind=kind, backend="reference")
        assert_close(kind, got.double(), want, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if TRITON_OK else []))
def test_packed_fused_loss_uses_no_atomics(backend, no_atomics):
    V = 9
    cu = torch.tensor([0, 3, 7, 7, 12], device=DEVICE)
    total = 12
    x = torch.randn(1, total, V, device=DEVICE, requires_grad=True)
    t = torch.randint(0, V, (1, total), device=DEVICE)
    old = -torch.rand(1, total, device=DEVICE)
    adv = torch.randn(4, device=DEVICE)
    m = torch.rand(1, total, device=DEVICE) > 0.2
    for level in ("token", "sequence"):
        loss, _ = fr.fused_ppo_loss(x, t, old, adv, m, ratio_level=level, cu_seqlens=cu,
                                    agg="seq-mean-token-mean", backend=backend)
        loss.backward()


def test_segment_broadcast_backward_is_the_segment_sum():
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 2, 2, 5, 6])
    y = reference.segment_broadcast(x, cu, 6)
    assert torch.equal(y.detach(), x.detach()[torch.tensor([0, 0, 2, 2, 2, 3])])
    assert torch.autograd.gradcheck(lambda v: reference.segment_broadcast(v, cu, 6), (x,))


def test_reference_gspo_packed_gradient_is_repeatable():
    cu = torch.tensor([0, 4, 9])
    lp = -torch.rand(1, 9, dtype=torch.float64, requires_grad=True)
    old, m = -torch.rand(1, 9, dtype=torch.float64), torch.ones(1, 9)
    adv = torch.randn(2, dtype=torch.float64)
    grads = []
    for _ in range(2):
        loss, _ = fr.ppo_policy_loss(lp, old, adv, m, ratio_level="sequence", cu_seqlens=cu,
                                     backend="reference")
        grads.append(torch.autograd.grad(loss, lp)[0])
    assert torch.equal(grads[0], grads[1])
