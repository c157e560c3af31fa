"""fastrlhf.integrations.verl against verl 0.9 itself: same numbers, gradients, signatures, and a
patch() that reaches every place verl's trainer calls through.  Skipped when verl (or what its
loss modules import) is not installed; CI installs the [integrations] extra."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from helpers import assert_close
from integration_helpers import (_reference_unless_parametrized, assert_same_params,  # noqa: F401
                                 backend, import_or_skip)

C = import_or_skip("verl.trainer.ppo.core_algos", "verl (with ray, tensordict, omegaconf)")
F = import_or_skip("verl.utils.torch_functional", "verl")

import fastrlhf.integrations.verl as V  # noqa: E402
from fastrlhf.integrations import UntestedVersionWarning  # noqa: E402

# verl's own functions, captured before any test patches anything.
ORIG = {n: getattr(C, n) for n in V._CORE}
ORIG.update({n: getattr(F, n) for n in V._TF})
ORIG_POLICY = {k: C.POLICY_LOSS_REGISTRY[k] for k in V._POLICY_REGISTRY}
ORIG_ADV = {k: C.ADV_ESTIMATOR_REGISTRY[k] for k in V._ADV_REGISTRY}

MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
         "seq-mean-token-sum-norm")


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # verl's deprecation notices


@pytest.fixture(autouse=True)
def _unpatched():
    V.unpatch()
    yield
    V.unpatch()


def actor_config(**kw):
    from verl.workers.config import ActorConfig
    return ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, **kw)


def masks(B=5, T=11, seed=0):
    """A mask with holes (multi-turn), a fully masked row, a single-token row, a full row."""
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(B, T, generator=g) > 0.35).float()
    m[0] = 1.0
    m[1] = 0.0
    m[2] = 0.0
    m[2, T // 2] = 1.0
    m[3, :3] = 0.0
    m[3, -2:] = 0.0
    return m


def policy_inputs(B=5, T=11, spread=0.3, seed=0, extreme=False):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 3
    old = lp + spread * torch.randn(B, T, generator=g)
    if extreme:  # ratios far outside any clip range, and past verl's +-20 log-ratio clamp
        old[0, :4] = lp[0, :4] + torch.tensor([30.0, -30.0, 8.0, -8.0])
        old[4, -3:] = lp[4, -3:] + torch.tensor([25.0, -25.0, 0.0])
    adv = torch.randn(B, T, generator=g)
    return lp.requires_grad_(), old, adv


def loss_and_grad(fn, lp, *args, **kw):
    out = fn(*args, **kw)
    loss = out[0]
    (g,) = torch.autograd.grad(loss, lp)
    return out, g


# --------------------------------------------------------------------------------------------
# signatures
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", V._CORE + V._TF)
def test_signature_matches_verl(name):
    assert_same_params(getattr(V, name), ORIG[name])


# --------------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64])
@pytest.mark.usefixtures("backend")
def test_gae_matches_verl(gamma, lam, mask_dtype):
    m = masks(T=13).to(mask_dtype)
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(m.shape, generator=g)
    values = torch.randn(m.shape, generator=g)
    adv, ret = V.compute_gae_advantage_return(rewards, values, m, gamma, lam)
    adv_v, ret_v = ORIG["compute_gae_advantage_return"](rewards, values, m, gamma, lam)
    # verl's values at masked positions (the carried advantage) included: every position compared.
    assert_close("advantages", adv, adv_v, atol=2e-5, rtol=1e-5)
    assert_close("returns", ret, ret_v, atol=2e-5, rtol=1e-5)


def test_gae_registry_function_and_edge_cases():
    # all-masked batch: verl raises in its whitening; ours gives zeros (documented difference)
    z = torch.zeros(2, 5)
    adv, ret = V.compute_gae_advantage_return(torch.randn(2, 5), torch.randn(2, 5), z, 1.0, 0.95)
    assert torch.equal(adv, torch.zeros(2, 5))
    with pytest.raises(ValueError):
        ORIG["compute_gae_advantage_return"](torch.randn(2, 5), torch.randn(2, 5), z, 1.0, 0.95)
    # NaN at a masked position: verl propagates it through the whole row, ours ignores it
    m = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    v = torch.tensor([[0.5, float("nan"), 0.2, 0.1]])
    adv, ret = V.compute_gae_advantage_return(torch.ones(1, 4), v, m, 1.0, 0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret[m != 0]).all()
    # a fractional mask is refused (verl blends it linearly)
    with pytest.raises(ValueError, match="0 and 1"):
        V.compute_gae_advantage_return(torch.ones(1, 4), torch.ones(1, 4),
                                       torch.tensor([[1.0, 0.5, 1.0, 1.0]]), 1.0, 0.95)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clips", [(0.2, None, None), (None, 0.2, 0.28), (0.1, 0.3, 0.25)])
@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.usefixtures("backend")
def test_compute_policy_loss_tuple_matches_verl(mode, clips, extreme):
    lp, old, adv = policy_inputs(extreme=extreme)
    m = masks()
    cliprange, low, high = clips
    kw = dict(cliprange=cliprange, cliprange_low=low, cliprange_high=high, clip_ratio_c=3.0,
              loss_agg_mode=mode)
    ours, g = loss_and_grad(V.compute_policy_loss, lp, old, lp, adv, m, **kw)
    theirs, g_v = loss_and_grad(ORIG["compute_policy_loss"], lp, old, lp, adv, m, **kw)
    assert isinstance(ours, tuple) and len(ours) == 4
    for name, a, b in zip(("pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"), ours, theirs):
        assert_close(name, a, b, atol=1e-5, rtol=1e-5)
    assert_close("d pg_loss / d log_prob", g, g_v, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.usefixtures("backend")
def test_registered_policy_losses_match_verl(loss_mode, mode, weighted, global_info):
    lp, old, adv = policy_inputs(seed=3, spread=0.5)
    m = masks(seed=3)
    cfg = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5)
    if global_info:
        cfg.global_batch_info.update(dp_size=2, batch_num_tokens=70, global_batch_size=9,
                                     loss_scale_factor=16)
    w = torch.rand(m.shape, generator=torch.Generator().manual_seed(4)) * 2 if weighted else None
    ours_fn = getattr(V, f"compute_policy_loss_{loss_mode}")
    (loss, met), g = loss_and_grad(ours_fn, lp, old, lp, adv, m, mode, cfg, w)
    (loss_v, met_v), g_v = loss_and_grad(ORIG_POLICY[loss_mode], lp, old, lp, adv, m, mode, cfg, w)
    assert_close("pg_loss", loss, loss_v, atol=1e-5, rtol=2e-6)
    assert_close("d pg_loss / d log_prob", g, g_v, atol=1e-7, rtol=1e-5)
    assert set(met) == set(met_v)
    for k in met:
        assert isinstance(met[k], float)
        assert met[k] == pytest.approx(met_v[k], abs=1e-6), k


def test_gspo_stop_gradient_form_at_large_sequence_ratio():
    # verl clamps the sequence log-ratio at 10 and then passes no gradient; weighted and
    # unweighted paths must agree with that.
    lp, old, adv = policy_inputs(seed=5)
    old = old.clone()
    old[0] -= 12.0  # row 0: mean log-ratio ~ +12 > 10
    m = masks(seed=5)
    cfg = actor_config()
    w = torch.full(m.shape, 0.5)
    for weights in (None, w):
        (loss, _), g = loss_and_grad(V.compute_policy_loss_gspo, lp, old, lp, adv, m,
                                     "token-mean", cfg, weights)
        (loss_v, _), g_v = loss_and_grad(ORIG_POLICY["gspo"], lp, old, lp, adv, m,
                                         "token-mean", cfg, weights)
        assert_close("gspo loss", loss, loss_v, atol=1e-5, rtol=1e-6)
        assert_close("gspo grad", g, g_v, atol=1e-7, rtol=1e-5)
        assert torch.all(g[0] == 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dp", [1, 2])
@pytest.mark.usefixtures("backend")
def test_value_loss_matches_verl(mode, dp):
    g = torch.Generator().manual_seed(7)
    m = masks(seed=7)
    vpreds = torch.randn(m.shape, generator=g).requires_grad_()
    old = vpreds.detach() + 0.8 * torch.randn(m.shape, generator=g)
    ret = torch.randn(m.shape, generator=g)
    kw = dict(loss_agg_mode=mode, dp_size=dp,
              batch_num_tokens=40 if dp > 1 else None, global_batch_size=7 if dp > 1 else None,
              loss_scale_factor=12 if mode.endswith("norm") else None)
    (loss, cf), gr = loss_and_grad(V.compute_value_loss, vpreds, vpreds, ret, old, m, 0.5, **kw)
    (loss_v, cf_v), gr_v = loss_and_grad(ORIG["compute_value_loss"], vpreds, vpreds, ret, old, m,
                                         0.5, **kw)
    assert_close("vf_loss", loss, loss_v, atol=1e-5, rtol=1e-6)
    assert_close("vf_clipfrac", cf, cf_v, atol=1e-7)
    assert_close("d vf_loss / d vpreds", gr, gr_v, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3",
                                  "kl+", "k1+", "abs+", "mse+", "k2+", "low_var_kl+", "k3+"])
@pytest.mark.usefixtures("backend")
def test_kl_penalty_matches_verl(kind):
    g = torch.Generator().manual_seed(8)
    lp = (-torch.rand(4, 9, generator=g) * 4).requires_grad_()
    ref = (-torch.rand(4, 9, generator=g) * 4)
    ref[0, :4] = lp.detach()[0, :4] + torch.tensor([30.0, -30.0, 5.0, 0.0])  # clamps, zero diff
    ref = ref.requires_grad_()
    ours = V.kl_penalty(lp, ref, kind)
    theirs = ORIG["kl_penalty"](lp, ref, kind)
    assert_close(kind, ours, theirs, atol=1e-6, rtol=1e-6)
    up = torch.randn(4, 9, generator=g)
    ga = torch.autograd.grad(ours, (lp, ref), up)
    gb = torch.autograd.grad(theirs, (lp, ref), up)
    assert_close(f"{kind} d/dlogprob", ga[0], gb[0], atol=1e-6, rtol=1e-6)
    assert_close(f"{kind} d/dref", ga[1], gb[1], atol=1e-6, rtol=1e-6)


def test_kl_penalty_unknown_kinds_raise_like_verl():
    x = torch.zeros(2, 3)
    for kind in ("full", "k4"):
        with pytest.raises(NotImplementedError):
            ORIG["kl_penalty"](x, x, kind)
        with pytest.raises(NotImplementedError):
            V.kl_penalty(x, x, kind)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dp", [1, 4])
def test_agg_loss_matches_verl(mode, dp):
    g = torch.Generator().manual_seed(9)
    m = masks(seed=9)
    x = torch.randn(m.shape, generator=g).requires_grad_()
    kw = dict(dp_size=dp, batch_num_tokens=33 if dp > 1 else None,
              global_batch_size=6 if dp > 1 else None, loss_scale_factor=None)
    a = V.agg_loss(x, m, mode, **kw)
    b = ORIG["agg_loss"](x, m, mode, **kw)
    assert_close(mode, a, b, atol=1e-5, rtol=1e-6)
    assert_close(mode + " grad", torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0],
                 atol=1e-7, rtol=1e-6)
    if dp > 1 and mode != "token-sum":  # verl's error for missing global counts, kept
        for f in (V.agg_loss, ORIG["agg_loss"]):
            with pytest.raises(ValueError):
                f(x, m, mode, dp_size=dp)
    with pytest.raises(ValueError):
        V.agg_loss(x, m, "token-median")
    # a zero-length response at rank 3 (rows of [-1, 0]): 0, not a reshape error
    e = torch.zeros(2, 3, 0)
    assert V.agg_loss(e, e, mode, **kw).item() == 0
    # other ranks: verl treats the last dim as the sequence
    flat = x.detach().reshape(-1)[:9]
    for t, mk in ((flat, m.reshape(-1)[:9]), (x.detach().reshape(5, 1, -1), m.reshape(5, 1, -1))):
        if dp == 1:
            assert_close(f"{mode} rank {t.dim()}", V.agg_loss(t, mk, mode),
                         ORIG["agg_loss"](t, mk, mode), atol=1e-5, rtol=1e-6)


@pytest.mark.usefixtures("backend")
def test_logprobs_and_entropy_match_verl():
    g = torch.Generator().manual_seed(10)
    logits = (torch.randn(3, 7, 61, generator=g) * 4)
    logits[0, 0, 5] = 60.0  # one dominant logit
    logits[1, 2] = -1e4     # a flat row far from 0
    labels = torch.randint(0, 61, (3, 7), generator=g)
    # verl evaluated in float64 is the oracle: in float32 its x - logsumexp(x) loses ~1e-3 at the
    # -1e4 row, where ours (max-shifted) stays exact.
    x = logits.clone().requires_grad_()
    y = logits.double().requires_grad_()
    up = torch.randn(3, 7, generator=g)
    a = V.logprobs_from_logits(x, labels, inplace_backward=False)
    b = ORIG["logprobs_from_logits"](y, labels)
    assert_close("logprobs", a, b, atol=2e-5, rtol=1e-5)
    assert_close("d logprobs", torch.autograd.grad(a, x, up)[0], torch.autograd.grad(b, y, up)[0],
                 atol=1e-6, rtol=1e-5)
    x = logits.clone().requires_grad_()
    y = logits.double().requires_grad_()
    a = V.entropy_from_logits(x)
    b = ORIG["entropy_from_logits"](y)
    assert_close("entropy", a, b, atol=2e-5, rtol=1e-5)
    assert_close("d entropy", torch.autograd.grad(a, x, up)[0], torch.autograd.grad(b, y, up)[0],
                 atol=1e-5, rtol=1e-4)


def test_masked_mean_and_whiten_match_verl():
    g = torch.Generator().manual_seed(11)
    m = masks(seed=11)
    x = torch.randn(m.shape, generator=g)
    for axis in (None, -1, 0, (0, 1)):
        assert_close(f"masked_mean axis={axis}", V.masked_mean(x, m, axis=axis),
                     ORIG["masked_mean"](x, m, axis=axis), atol=1e-6)
    # broadcasting (a per-sequence value against a token mask) and boolean values, as verl allows
    row = torch.randn(m.shape[0], 1, generator=g)
    assert_close("masked_mean broadcast", V.masked_mean(row, m), ORIG["masked_mean"](row, m),
                 atol=1e-6)
    flags = x > 0
    assert_close("masked_mean bool", V.masked_mean(flags, m.bool()),
                 ORIG["masked_mean"](flags, m.bool()), atol=1e-6)
    for shift in (True, False):
        assert_close(f"masked_whiten shift_mean={shift}", V.masked_whiten(x, m, shift),
                     ORIG["masked_whiten"](x, m, shift), atol=2e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------

def _fake_consumer():
    """A module that imported verl's functions by name before patch() (as verl's own do)."""
    mod = types.ModuleType("fastrlhf_test_fake_verl_consumer")
    mod.agg_loss = ORIG["agg_loss"]
    mod.my_kl = ORIG["kl_penalty"]
    mod.logprobs_from_logits = ORIG["logprobs_from_logits"]
    return mod


def test_patch_reaches_modules_and_registries_and_unpatch_restores(monkeypatch):
    import verl.workers.utils.losses as VL  # binds agg_loss, kl_penalty, ... by name

    fake = _fake_consumer()
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    locations = V.patch()
    assert V.is_patched()
    for n in V._CORE:
        assert getattr(C, n) is getattr(V, n), n
    for n in V._TF:
        assert getattr(F, n) is getattr(V, n), n
    assert VL.agg_loss is V.agg_loss and VL.kl_penalty is V.kl_penalty
    assert VL.compute_value_loss is V.compute_value_loss and VL.masked_mean is V.masked_mean
    assert fake.agg_loss is V.agg_loss and fake.my_kl is V.kl_penalty
    assert fake.logprobs_from_logits is V.logprobs_from_logits
    assert C.get_policy_loss_fn("vanilla") is V.compute_policy_loss_vanilla
    assert C.get_policy_loss_fn("gspo") is V.compute_policy_loss_gspo
    assert C.get_adv_estimator_fn("gae") is V.compute_gae_advantage_return
    assert C.get_adv_estimator_fn(C.AdvantageEstimator.GAE) is V.compute_gae_advantage_return
    assert C.get_policy_loss_fn("dppo_tv") is not None  # other losses untouched
    assert "verl.trainer.ppo.core_algos.agg_loss" in locations

    # idempotent: a second call changes nothing
    assert V.patch() == locations
    assert C.agg_loss is V.agg_loss

    restored = V.unpatch()
    assert restored == len(locations)
    assert not V.is_patched()
    for n in V._CORE:
        assert getattr(C, n) is ORIG[n], n
    for n in V._TF:
        assert getattr(F, n) is ORIG[n], n
    assert VL.agg_loss is ORIG["agg_loss"] and VL.kl_penalty is ORIG["kl_penalty"]
    assert fake.agg_loss is ORIG["agg_loss"] and fake.my_kl is ORIG["kl_penalty"]
    assert C.get_policy_loss_fn("vanilla") is ORIG_POLICY["vanilla"]
    assert C.get_policy_loss_fn("gspo") is ORIG_POLICY["gspo"]
    assert C.get_adv_estimator_fn("gae") is ORIG_ADV["gae"]
    assert V.unpatch() == 0  # idempotent


def test_unpatch_leaves_later_patches_alone():
    V.patch()
    sentinel = lambda *a, **k: None  # noqa: E731
    C.agg_loss = sentinel  # someone else patches after us
    try:
        V.unpatch()
        assert C.agg_loss is sentinel
        assert C.kl_penalty is ORIG["kl_penalty"]
    finally:
        C.agg_loss = ORIG["agg_loss"]


def test_patch_warns_on_untested_version(monkeypatch):
    monkeypatch.setattr(V._patcher, "version", lambda: "0.8.5")
    with pytest.warns(UntestedVersionWarning, match="0.8.5.*tested with verl 0.9.1"):
        V.patch()
    V.unpatch()
    monkeypatch.setattr(V._patcher, "version", lambda: V.TESTED_VERSIONS[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntestedVersionWarning)
        V.patch()


def test_patch_without_verl_raises_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", None)
    monkeypatch.setattr(V._patcher, "version", lambda: None)
    with pytest.raises(ImportError, match=r"needs verl .*not installed: pip install"):
        V.patch()
    monkeypatch.setattr(V._patcher, "version", lambda: "0.9.1")
    with pytest.raises(ImportError, match="is installed but verl.trainer.ppo.core_algos failed"):
        V.patch()
    assert not V.is_patched()


# --------------------------------------------------------------------------------------------
# verl's own actor / critic loss path, with and without patch()
# --------------------------------------------------------------------------------------------

def _verl_batch(seed=12):
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    B, P, R = 4, 3, 7
    resp_len = torch.tensor([7, 3, 5, 1])
    attn = torch.cat([torch.ones(B, P, dtype=torch.long),
                      (torch.arange(R)[None] < resp_len[:, None]).long()], 1)
    data = TensorDict({
        "prompts": torch.randint(0, 50, (B, P), generator=g),
        "responses": torch.randint(0, 50, (B, R), generator=g),
        "attention_mask": attn, "response_mask": attn[:, P:].clone(),
        "old_log_probs": -torch.rand(B, R, generator=g) * 2,
        "ref_log_prob": -torch.rand(B, R, generator=g) * 2,
        "advantages": torch.randn(B, R, generator=g),
        "values": torch.randn(B, R, generator=g), "returns": torch.randn(B, R, generator=g),
    }, batch_size=[B])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    total = int(attn.sum())
    return data, (-torch.rand(total, generator=g) * 2), torch.rand(total, generator=g) * 3


@pytest.mark.parametrize("kl_type", ["low_var_kl", "k3+", "k1"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_verl_actor_and_critic_losses_same_with_patch(kl_type, agg, monkeypatch):
    import verl.workers.utils.losses as VL
    from verl.workers.config import CriticConfig

    data, lp0, ent = _verl_batch()

    def run():
        cfg = actor_config(use_kl_loss=True, kl_loss_type=kl_type, kl_loss_coef=0.1,
                           entropy_coeff=0.01, loss_agg_mode=agg, clip_ratio_high=0.28)
        lp = lp0.clone().requires_grad_()
        loss, metrics = VL.ppo_loss(cfg, {"log_probs": lp, "entropy": ent}, data)
        (g,) = torch.autograd.grad(loss, lp)
        vals = {k: float(v.values[0]) if hasattr(v, "values") else v for k, v in metrics.items()}
        ccfg = CriticConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1,
                            loss_agg_mode=agg)
        vpred = (torch.randn(lp0.shape, generator=torch.Generator().manual_seed(1))
                 .requires_grad_())
        vloss, _ = VL.value_loss(ccfg, {"values": vpred}, data)
        (gv,) = torch.autograd.grad(vloss, vpred)
        return loss.detach(), g, vals, vloss.detach(), gv

    ref = run()
    V.patch()
    calls = []
    real = V.ops.ppo_policy_loss
    monkeypatch.setattr(V.ops, "ppo_policy_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    new = run()
    assert calls, "verl's ppo_loss did not go through fastrlhf after patch()"
    assert_close("actor loss", new[0], ref[0], atol=1e-6, rtol=1e-6)
    assert_close("actor grad", new[1], ref[1], atol=1e-7, rtol=1e-5)
    assert set(new[2]) == set(ref[2])
    for k in ref[2]:
        assert new[2][k] == pytest.approx(ref[2][k], rel=1e-5, abs=1e-6), k
    assert_close("critic loss", new[3], ref[3], atol=1e-6, rtol=1e-6)
    assert_close("critic grad", new[4], ref[4], atol=1e-7, rtol=1e-5)
