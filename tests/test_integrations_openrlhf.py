"""fastrlhf.integrations.openrlhf against OpenRLHF 0.11 itself: PolicyLoss / ValueLoss modules,
compute_approx_kl, log-probs, entropy and the zeroing GAE; signatures; patch() / unpatch().

OpenRLHF's loss modules import flash-attn (and its Ray trainer modules vLLM) at module level; on a
CPU machine those are replaced by inert placeholders while OpenRLHF is imported
(integration_helpers.gpu_only_stubs), which is enough for the loss code compared here.  Skipped
when OpenRLHF or the rest of what it imports (deepspeed, peft, ray, ...) is missing."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from helpers import assert_close
from integration_helpers import (_reference_unless_parametrized, assert_same_params,  # noqa: F401
                                 backend, gpu_only_stubs)

try:
    with gpu_only_stubs(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import openrlhf.models.loss as L
        import openrlhf.models.utils as U
        import openrlhf.trainer.ppo_utils.experience_maker as EM
        import openrlhf.trainer.ray.ppo_actor as PA
        import openrlhf.trainer.ray.ppo_critic as PC
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"OpenRLHF (with deepspeed, peft, ray, aiohttp, torchdata) not importable "
                f"({type(e).__name__}: {e}); CI installs the [integrations] extra",
                allow_module_level=True)

import fastrlhf  # noqa: E402
import fastrlhf.integrations.openrlhf as O  # noqa: E402
from fastrlhf.integrations import UntestedVersionWarning  # noqa: E402

ORIG = {n: getattr(L, n) for n in O._LOSS}
ORIG.update({n: getattr(U, n) for n in O._UTILS})
ORIG_GAE = EM.RemoteExperienceMaker.__dict__["get_advantages_and_returns"]


@pytest.fixture(autouse=True)
def _unpatched():
    O.unpatch()
    yield
    O.unpatch()


def batch(B=5, T=10, seed=0, spread=0.4, extreme=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = True
    mask[1] = False          # a fully masked row
    mask[2, :] = False
    mask[2, 4] = True        # a single token
    lp = -torch.rand(B, T, generator=g) * 3
    old = lp + spread * torch.randn(B, T, generator=g)
    if extreme:
        old[0, :4] = lp[0, :4] + torch.tensor([30.0, -30.0, 6.0, -6.0])
    rollout = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    return lp.requires_grad_(), old, adv, mask, rollout


def grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


# --------------------------------------------------------------------------------------------
# signatures
# --------------------------------------------------------------------------------------------

def test_signatures_match_openrlhf():
    for cls in ("PolicyLoss", "ValueLoss"):
        assert_same_params(getattr(O, cls).__init__, ORIG[cls].__init__)
        assert_same_params(getattr(O, cls).forward, ORIG[cls].forward)
        assert issubclass(getattr(O, cls), torch.nn.Module)
    for fn in O._UTILS:
        assert_same_params(getattr(O, fn), ORIG[fn])
    assert_same_params(O._get_advantages_and_returns_method, ORIG_GAE)
    assert O.get_advantages_and_returns.__name__ == ORIG_GAE.__name__


# --------------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------------

POLICY_CONFIGS = [
    dict(),
    dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0),
    dict(token_level_loss=False),
    dict(policy_loss_type="gspo"),
    dict(policy_loss_type="gspo", is_correction_level="seq"),
    dict(is_correction_level="token"),
    dict(is_correction_level="seq", is_correction_threshold=(0.8, 1.2)),
    dict(is_correction_level="token", is_correction_mode="clip",
         is_correction_threshold=(0.9, 1.1)),
    dict(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=(0, 0.05)),
    dict(is_correction_level="seq", is_correction_gating="binary_kl",
         is_correction_threshold=(0, 0.02), token_level_loss=False),
]


@pytest.mark.parametrize("cfg", POLICY_CONFIGS,
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("global_counts", [False, True])
@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.usefixtures("backend")
def test_policy_loss_matches_openrlhf(cfg, global_counts, extreme):
    lp, old, adv, mask, rollout = batch(extreme=extreme)
    kw = dict(dp_size=4, batch_num_tokens=60.0, global_batch_size=9.0) if global_counts else {}
    ours = O.PolicyLoss(**cfg)(lp, old, adv, mask, rollout, **kw)
    theirs = ORIG["PolicyLoss"](**cfg)(lp, old, adv, mask, rollout, **kw)
    assert len(ours) == len(theirs) == 5
    names = ("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio")
    for name, a, b in zip(names, ours, theirs):
        if b is None:
            assert a is None, name
        else:
            assert_close(name, a, b, atol=1e-5, rtol=1e-5)
    assert_close("d loss / d log_probs", grad(ours[0], lp), grad(theirs[0], lp), atol=1e-7,
                 rtol=1e-5)


def test_gspo_gradient_goes_through_the_sequence_mean():
    # OpenRLHF's GSPO differentiates exp(mean log-ratio): a token's gradient depends on the whole
    # row (not only on itself, as in verl's stop-gradient form).
    lp, old, adv, mask, _ = batch(seed=3)
    mask[:] = True
    adv = torch.ones_like(adv)  # per-token advantages equal: verl's form would give r/n per token
    loss, *_ = O.PolicyLoss(policy_loss_type="gspo")(lp, old, adv, mask)
    g = grad(loss, lp)
    loss_v, *_ = ORIG["PolicyLoss"](policy_loss_type="gspo")(lp, old, adv, mask)
    g_v = grad(loss_v, lp)
    assert_close("gspo grad", g, g_v, atol=1e-7, rtol=1e-5)
    # through the mean: every token of a row gets the same gradient
    assert torch.allclose(g, g[:, :1].expand_as(g))


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("global_counts", [False, True])
@pytest.mark.usefixtures("backend")
def test_value_loss_matches_openrlhf(clip_eps, token_level_loss, global_counts):
    g = torch.Generator().manual_seed(4)
    _, _, _, mask, _ = batch(seed=4)
    v = torch.randn(mask.shape, generator=g).requires_grad_()
    old = v.detach() + 0.5 * torch.randn(mask.shape, generator=g)
    ret = torch.randn(mask.shape, generator=g)
    kw = dict(dp_size=2, batch_num_tokens=50.0, global_batch_size=8.0) if global_counts else {}
    a = O.ValueLoss(clip_eps, token_level_loss)(v, old, ret, mask, **kw)
    b = ORIG["ValueLoss"](clip_eps, token_level_loss)(v, old, ret, mask, **kw)
    assert a.dim() == 0
    assert_close("value loss", a, b, atol=1e-6, rtol=1e-5)
    assert_close("d value loss", grad(a, v), grad(b, v), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("with_old", [False, True])
@pytest.mark.usefixtures("backend")
def test_compute_approx_kl_matches_openrlhf(estimator, unbiased, with_old):
    lp, old, _, _, _ = batch(seed=5)
    g = torch.Generator().manual_seed(5)
    base = (lp.detach() + 2.0 * torch.randn(lp.shape, generator=g))
    base[0, :3] = lp.detach()[0, :3] + torch.tensor([25.0, -25.0, 11.0])  # past every clamp
    args = (lp, base, old if with_old else None, estimator, unbiased)
    a, b = O.compute_approx_kl(*args), ORIG["compute_approx_kl"](*args)
    assert_close(f"kl {estimator}", a, b, atol=2e-6, rtol=1e-5)
    up = torch.randn(lp.shape, generator=g)
    assert_close("d kl", torch.autograd.grad(a, lp, up)[0], torch.autograd.grad(b, lp, up)[0],
                 atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="Unknown kl_estimator"):
        O.compute_approx_kl(lp, base, kl_estimator="k4")


@pytest.mark.parametrize("gamma,lambd", [(1.0, 0.95), (0.99, 0.9)])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.usefixtures("backend")
def test_gae_zeroes_like_openrlhf(gamma, lambd, masked):
    _, _, _, mask, _ = batch(seed=6, T=12)
    g = torch.Generator().manual_seed(6)
    values, rewards = torch.randn(mask.shape, generator=g), torch.randn(mask.shape, generator=g)
    m = mask if masked else None
    adv, ret = O.get_advantages_and_returns(values, rewards, m, gamma, lambd)
    adv_o, ret_o = ORIG_GAE(None, values, rewards, m, gamma, lambd)
    assert_close("advantages", adv, adv_o, atol=2e-6, rtol=1e-5)
    assert_close("returns", ret, ret_o, atol=2e-6, rtol=1e-5)
    if masked:
        # zeroing is not skipping: verl-style GAE (fastrlhf.gae with the mask) differs at valid
        # tokens that precede a hole
        skip, _ = fastrlhf.gae(rewards, values, mask, gamma=gamma, lam=lambd)
        assert not torch.allclose(adv[mask], skip[mask])


@pytest.mark.usefixtures("backend")
def test_log_probs_and_entropy_match_openrlhf():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 6, 53, generator=g) * 3
    logits[0, 1, 7] = 50.0
    labels = torch.randint(0, 53, (3, 6), generator=g)
    for temperature in (1.0, 0.7):
        x = logits.clone().requires_grad_()
        a = O.log_probs_from_logits(x, labels, temperature)
        assert torch.equal(x.detach(), logits), "our log_probs_from_logits must not modify logits"
        y = logits.double().clone().requires_grad_()
        b = ORIG["log_probs_from_logits"](y * 1.0, labels, temperature)  # theirs divides in place
        assert_close(f"log_probs T={temperature}", a, b, atol=2e-5, rtol=1e-5)
        up = torch.randn(3, 6, generator=g)
        assert_close("d log_probs", torch.autograd.grad(a, x, up)[0],
                     torch.autograd.grad(b, y, up)[0], atol=1e-6, rtol=1e-5)
    x = logits.clone().requires_grad_()
    # upstream is wrapped in torch.compile; its eager body is the reference (no compiler needed)
    eager = getattr(ORIG["compute_entropy"], "_torchdynamo_orig_callable", ORIG["compute_entropy"])
    b = eager(logits.double())
    assert_close("entropy", O.compute_entropy(x), b, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------

def test_patch_reaches_trainer_modules_and_unpatch_restores(monkeypatch):
    import openrlhf.models as M

    fake = types.ModuleType("fastrlhf_test_fake_openrlhf_consumer")
    fake.PolicyLoss, fake.kl = ORIG["PolicyLoss"], ORIG["compute_approx_kl"]
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    with gpu_only_stubs():
        locations = O.patch()
    assert O.is_patched()
    assert L.PolicyLoss is O.PolicyLoss and L.ValueLoss is O.ValueLoss
    assert M.PolicyLoss is O.PolicyLoss and M.ValueLoss is O.ValueLoss
    assert PA.PolicyLoss is O.PolicyLoss and PC.ValueLoss is O.ValueLoss
    assert PA.compute_approx_kl is O.compute_approx_kl
    assert EM.compute_approx_kl is O.compute_approx_kl
    assert U.log_probs_from_logits is O.log_probs_from_logits
    assert U.compute_entropy is O.compute_entropy
    import openrlhf.models.actor as A
    assert A.log_probs_from_logits is O.log_probs_from_logits
    assert A.compute_entropy is O.compute_entropy
    assert fake.PolicyLoss is O.PolicyLoss and fake.kl is O.compute_approx_kl
    assert (EM.RemoteExperienceMaker.__dict__["get_advantages_and_returns"]
            is O._get_advantages_and_returns_method)
    # the method really is used through the class, with OpenRLHF's call convention
    maker = EM.RemoteExperienceMaker.__new__(EM.RemoteExperienceMaker)
    _, _, _, mask, _ = batch(seed=8)
    v, r = torch.randn(mask.shape), torch.randn(mask.shape)
    adv, ret = maker.get_advantages_and_returns(v, r, mask, 1.0, 0.95)
    adv_o, ret_o = ORIG_GAE(maker, v, r, mask, 1.0, 0.95)
    assert_close("patched method", adv, adv_o, atol=2e-6, rtol=1e-5)

    assert O.patch() == locations  # idempotent
    assert O.unpatch() == len(locations)
    assert L.PolicyLoss is ORIG["PolicyLoss"] and M.PolicyLoss is ORIG["PolicyLoss"]
    assert PA.PolicyLoss is ORIG["PolicyLoss"] and PC.ValueLoss is ORIG["ValueLoss"]
    assert EM.compute_approx_kl is ORIG["compute_approx_kl"]
    assert A.log_probs_from_logits is ORIG["log_probs_from_logits"]
    assert fake.PolicyLoss is ORIG["PolicyLoss"] and fake.kl is ORIG["compute_approx_kl"]
    assert EM.RemoteExperienceMaker.__dict__["get_advantages_and_returns"] is ORIG_GAE
    assert O.unpatch() == 0


def test_patch_warns_on_untested_version(monkeypatch):
    monkeypatch.setattr(O._patcher, "version", lambda: "0.10.0")
    with pytest.warns(UntestedVersionWarning, match="tested with openrlhf 0.11.2"):
        O.patch()


def test_patch_without_openrlhf_raises_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "openrlhf.models.loss", None)
    monkeypatch.setattr(O._patcher, "version", lambda: None)
    with pytest.raises(ImportError, match=r"needs openrlhf .*not installed"):
        O.patch()
    assert not O.is_patched()
