"""Reproducers of issue 16 ("one contract on every backend"), one test per item that lives
outside the op layer, each asserting the decided contract on every backend that runs the op here.

The contract text itself is in the docstrings of :mod:`fastrlhf.reference` (the spec).
"""

from __future__ import annotations

import math

import pytest
import torch

import fastrlhf as fr
from fastrlhf import config
from helpers import backends

NAN, INF = float("nan"), float("inf")
LOSS_BACKENDS = backends(native=True)


def _same(a: torch.Tensor, b, what: str) -> None:
    """Exact equality with NaN == NaN (the contract values below are exact)."""
    b = torch.as_tensor(b, dtype=a.dtype)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    ok = (a == b) | (a.isnan() & b.isnan())
    assert bool(ok.all()), f"{what}: got {a.tolist()}, expected {b.tolist()}"


# -- item 2: token-level approx_kl of a NaN log-prob is NaN (tl.minimum / maximum drop NaN) ----

@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_item2_approx_kl_nan_at_valid_position(backend):
    lp = torch.zeros(1, 3)
    lp[0, 1] = NAN
    x = lp.clone().requires_grad_()
    loss, st = fr.ppo_policy_loss(x, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3),
                                  backend=backend)
    assert math.isnan(st["approx_kl"].item()) and math.isnan(loss.item())
    loss.backward()
    assert x.grad[0, 1].isnan() and x.grad[0, [0, 2]].isfinite().all()


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_item2_inf_minus_inf_log_ratio_is_nan(backend):
    # logp = old_logp = +inf: d = inf - inf = NaN, which must not be clamped into a number.
    x = torch.tensor([[INF, -1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[INF, -1.0, -1.0]])
    loss, st = fr.ppo_policy_loss(x, old, torch.ones(1, 3), torch.ones(1, 3), backend=backend)
    assert math.isnan(loss.item()) and math.isnan(st["approx_kl"].item())
    loss.backward()
    assert x.grad[0, 0].isnan() and x.grad[0, 1:].isfinite().all()


# -- item 3: GSPO with a NaN at a valid position: the row's ratio is NaN, never 10 ----------------

@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
def test_item3_gspo_nan_row(backend, fused):
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, NAN, -0.7]])
    old = torch.tensor([[-1.1, -2.2, -0.4], [-1.2, -1.0, -0.5]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3)
    kw = dict(ratio_level="sequence", dual_clip=3.0, backend=backend)
    if fused:
        # logits [lp, log(1 - exp(lp))]: log-softmax at token 0 is lp (NaN stays NaN)
        lpd = lp.double()
        logits = torch.stack([lpd, torch.log1p(-lpd.exp())], -1)
        tok = torch.zeros(2, 3, dtype=torch.long)
        x = logits.requires_grad_()
        loss, st = fr.fused_ppo_loss(x, tok, old.double(), adv.double(), mask, **kw)
    else:
        x = lp.clone().requires_grad_()
        loss, st = fr.ppo_policy_loss(x, old, adv, mask, **kw)
    assert math.isnan(loss.item())
    # The NaN row counts in neither clip fraction; row 0's terms are unclipped here.
    assert st["clipfrac"].item() == 0.0 and st["clipfrac_lower"].item() == 0.0
    assert math.isnan(st["approx_kl"].item())
    loss.backward()
    g = x.grad if not fused else x.grad[..., 0]
    assert g[1].isnan().all(), f"the NaN row's gradient must be NaN, got {g[1].tolist()}"
    assert g[0].isfinite().all()


# -- item 4: empty batch, seq-mean-token-sum-norm (default loss_scale_factor 0) -> 0 -----------

@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("B", [0, 2])
def test_item4_empty_batch_is_zero(backend, B):
    mode = "seq-mean-token-sum-norm"
    z = torch.zeros(B, 0)
    x = z.clone().requires_grad_()
    out = fr.agg_loss(x, z, mode, backend=backend)
    _same(out, 0.0, "agg_loss")
    out.backward()
    assert x.grad.shape == (B, 0)
    loss, st = fr.ppo_policy_loss(x, z, z, z, agg=mode, backend=backend)
    _same(loss.detach(), 0.0, "ppo_policy_loss")
    assert all(v.item() == 0.0 for v in st.values())
    loss, st = fr.ppo_value_loss(x, z, z, z, agg=mode, backend=backend)
    _same(loss.detach(), 0.0, "ppo_value_loss")
    lg = torch.zeros(B, 0, 5, requires_grad=True)
    loss, st = fr.fused_ppo_loss(lg, torch.zeros(B, 0, dtype=torch.long), z, z, z, agg=mode,
                                 backend=backend)
    _same(loss.detach(), 0.0, "fused_ppo_loss")
    loss.backward()
    assert lg.grad is None or lg.grad.numel() == 0


# -- item 5: value-loss gradient at a masked NaN / inf is exactly 0 ---------------------------

@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("clip", [0.5, None])
def test_item5_value_loss_masked_special(backend, bad, clip):
    v = torch.tensor([[0.5, bad]], requires_grad=True)
    loss, st = fr.ppo_value_loss(v, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 0]]),
                                 clip=clip, backend=backend)
    loss.backward()
    _same(loss.detach(), 0.125, "loss")
    # The valid token: d/dv 0.5 (v - R)^2 = -0.5 without clip; with clip 0.5 and old = 0,
    # v = 0.5 sits on the clip bound and the terms tie (torch splits max and min 50/50):
    # 0.5 * (0.5 * 2 (v - R) + 0.5 * 2 (vc - R) * 0.5) = -0.375.  The masked token: exactly 0.
    _same(v.grad, [[-0.5 if clip is None else -0.375, 0.0]], "grad")


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_item5_policy_loss_masked_special(backend, bad, ratio_level):
    x = torch.tensor([[-1.0, bad, -2.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    loss, st = fr.ppo_policy_loss(x, torch.full((1, 3), -1.5), torch.ones(1, 3), mask,
                                  ratio_level=ratio_level, backend=backend)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(s.item()) for s in st.values())
    assert x.grad[0, 1].item() == 0.0 and x.grad[0, [0, 2]].isfinite().all()


# -- item 6: GSPO with an infinite logp at a valid position: finite value, zero gradient -------

@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("bad,expected", [(-INF, 0.0), (INF, -1.2)])
def test_item6_gspo_infinite_logp(backend, bad, expected):
    # s_b = -inf: ratio 0, L = max(-A*0, -A*0.8) = 0 (A = 1); s_b = +inf: ratio e^10,
    # L = max(-e^10, -1.2) = -1.2 per token.
    x = torch.tensor([[bad, -1.0, -2.0]], requires_grad=True)
    loss, st = fr.ppo_policy_loss(x, torch.full((1, 3), -1.0), torch.tensor([1.0]),
                                  torch.ones(1, 3), ratio_level="sequence", backend=backend)
    assert abs(loss.item() - expected) < 1e-6, loss.item()
    loss.backward()
    _same(x.grad.abs(), [[0.0, 0.0, 0.0]], "grad")
    _same(st["approx_kl"], -bad, "approx_kl")


# -- item 7: straight-through KL kinds with an infinite difference keep the base value ---------

KL_BACKENDS = backends()


@pytest.mark.parametrize("backend", KL_BACKENDS)
@pytest.mark.parametrize("kind,val0", [("k3+", 10.0), ("abs+", INF), ("k1+", -INF),
                                       ("k2+", INF), ("low_var_kl+", 10.0)])
def test_item7_kl_plus_infinite_difference(backend, kind, val0):
    x = torch.tensor([-INF, -1.0], requires_grad=True)
    y = torch.tensor([-1.0, -1.5], requires_grad=True)
    v = fr.kl_penalty(x, y, kind, backend=backend)
    _same(v[:1].detach(), [val0], f"{kind} value")
    v.sum().backward()
    _same(x.grad, [-INF, 0.5], f"{kind} dlogp")   # k2's gradient d = x - y
    _same(y.grad, [INF, -0.5], f"{kind} dref_logp")


@pytest.mark.parametrize("backend", KL_BACKENDS)
@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3", "k1+", "k3+"])
def test_item7_kl_nan_and_equal_infinities(backend, kind):
    x = torch.tensor([NAN, INF, 0.5], requires_grad=True)
    y = torch.tensor([0.0, INF, 0.0], requires_grad=True)
    v = fr.kl_penalty(x, y, kind, backend=backend)
    assert v[:2].isnan().all() and v[2].isfinite()
    v.sum().backward()
    assert x.grad[2].isfinite() and y.grad[2].isfinite()


# -- item 10 (reference side): out-of-range ids with the check off; float masks with grad ------

@pytest.fixture
def no_token_check():
    prev = config.check_tokens_enabled()
    config.set_check_tokens(False)
    yield
    config.set_check_tokens(prev)


@pytest.mark.parametrize("backend", backends(native=True))
def test_item10_out_of_range_id_is_nan(backend, no_token_check):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, dtype=torch.float64)
    tok = torch.tensor([7, 1, -100])
    x = logits.clone().requires_grad_()
    lp, ent = fr.token_logprobs(x, tok, return_entropy=True, backend=backend)
    assert lp[0].isnan() and lp[1].isfinite() and lp[2].item() == 0.0
    assert torch.allclose(ent.detach(), fr.token_entropy(logits, backend="reference"), rtol=0,
                          atol=1e-12)
    lp.backward(torch.ones_like(lp))  # dlogp = 1 everywhere, also at the NaN
    # an id that selects no logit: the gradient is the -p part of (onehot - p) only
    p = torch.softmax(logits, -1)
    assert torch.allclose(x.grad[0], -p[0], atol=1e-12, rtol=0)
    assert torch.allclose(x.grad[1], torch.nn.functional.one_hot(tok[1], 5) - p[1], atol=1e-12)
    assert x.grad[2].abs().max().item() == 0.0


def test_item10_out_of_range_id_raises_with_check_on():
    with pytest.raises(ValueError, match="tokens"):
        fr.token_logprobs(torch.randn(2, 5), torch.tensor([7, 1]), backend="reference")


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_item10_float_mask_gets_no_gradient(backend):
    torch.manual_seed(0)
    x = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 0.5, 0.0, 1.0], [0.0, 1.0, 1.0, 2.0]], requires_grad=True)
    outs = [fr.ppo_policy_loss(x, x.detach() - 0.1, torch.ones(2, 4), mask, backend=backend)[0],
            fr.ppo_value_loss(x, x.detach() * 0.5, torch.ones(2, 4), mask,
                              backend=backend)[0],
            fr.agg_loss(x, mask, "seq-mean-token-mean", backend=backend),
            fr.masked_mean(x, mask, backend=backend), fr.masked_sum(x, mask, backend=backend),
            fr.masked_var(x, mask, backend=backend),
            fr.masked_whiten(x, mask, backend=backend).sum()]
    for out in outs:
        out.backward()
    assert mask.grad is None, "the mask is a constant"
    assert x.grad is not None and x.grad.isfinite().all()


# ---------------------------------------------------------------------------------------------
# the contract is stated where users read it: on every public op
# ---------------------------------------------------------------------------------------------

CONTRACT_SPECS = {
    "token_logprobs": "token_logprobs", "token_entropy": "token_entropy",
    "kl_penalty": "kl_penalty", "full_kl": "full_kl", "group_advantages": "group_advantages",
    "masked_sum": "masked_sum", "masked_mean": "masked_sum", "masked_var": "masked_sum",
    "masked_whiten": "masked_sum", "agg_loss": "agg_loss", "ppo_policy_loss": "ppo_policy_loss",
    "ppo_value_loss": "ppo_value_loss", "gae": "gae", "fused_ppo_loss": "fused_ppo_loss",
    "linear_token_logprobs": "token_logprobs", "fused_linear_ppo_loss": "fused_ppo_loss",
}


@pytest.mark.parametrize("name", sorted(CONTRACT_SPECS))
def test_public_op_docstring_states_the_edge_case_contract(name):
    import inspect

    import fastrlhf.reference as spec_module
    doc = getattr(fr, name).__doc__
    spec = inspect.cleandoc(getattr(spec_module, CONTRACT_SPECS[name]).__doc__)
    contract = spec[spec.index("Edge"):]
    flat = " ".join(doc.split())
    assert " ".join(contract.split()) in flat, f"fr.{name}'s docstring lacks its contract"
    assert f"fastrlhf.reference.{CONTRACT_SPECS[name]}" in doc


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("kind,norm", [("grpo", True), ("dr_grpo", False), ("rloo", True)])
def test_group_of_one_with_nan_score_keeps_its_gradient(backend, kind, norm):
    """Found by the long property profile: a size-1 group's NaN score leaked NaN into its own
    gradient through the unused group statistics (0 * NaN behind a where); the spec's gradient
    is the closed form, 1 / (1 + eps) for grpo."""
    x = torch.tensor([float("nan"), 1.0, 3.0, 2.0], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([-2, 0, 0, 5])
    out = fr.group_advantages(x, ids, kind=kind, eps=0.1, norm_by_std=norm, backend=backend)
    out.backward(torch.full_like(out, 0.7))
    assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all()
    want0 = 0.7 / 1.1 if kind == "grpo" else 0.7
    assert abs(float(x.grad[0]) - want0) < 1e-12, x.grad
    assert abs(float(x.grad[3]) - want0) < 1e-12 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_group_of_equal_scores_has_a_finite_gradient(backend, dtype):
    """Found by the long property profile (bf16 scores near 1e4, where the rounding makes a
    group's scores equal): a zero std made the vectorized gradient NaN (sqrt'(0) = inf times
    0).  The spec is torch.std's backward, which passes no gradient through a zero std, so
    grpo's gradient is the mean-centering's, (onehot - 1/n) / eps."""
    x = torch.tensor([3.0, 3.0, 3.0, 1.0, 2.0], dtype=dtype, requires_grad=True)
    ids = torch.tensor([0, 0, 0, 1, 1])
    up = torch.tensor([0.5, -1.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    out = fr.group_advantages(x, ids, kind="grpo", eps=0.1, backend=backend)
    (out.double() * up).sum().backward()
    assert torch.equal(out[:3].double(), torch.zeros(3, dtype=torch.float64))
    g = x.grad.double()
    want = (up[:3] - up[:3].mean()) / 0.1
    assert torch.isfinite(g).all(), g
    assert torch.allclose(g[:3], want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6), (g, want)
