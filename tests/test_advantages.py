"""group_advantages: the vectorized op against the per-group loop reference (verl 0.9 semantics)."""

import math

import pytest
import torch

import fastrlhf.reference as R
from fastrlhf.ops import advantages as adv_mod
from fastrlhf.ops.advantages import GROUP_ADV_KINDS, group_advantages
from helpers import DEVICE, assert_close

BACKENDS = ("auto", "reference")


def _random_groups(B, n_groups, seed):
    """Arbitrary ids (negative, sparse, unsorted), a mix of group sizes incl. singletons."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(10_000, generator=g)[:n_groups] * 7 - 20_000
    sizes = torch.randint(1, 6, (n_groups,), generator=g)
    sizes[: max(1, n_groups // 4)] = 1  # guaranteed singletons
    ids = torch.repeat_interleave(pool, sizes)[:B]
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    scores = torch.randn(ids.numel(), generator=g) * 3
    # Binary-reward groups too (common in GRPO): all-equal groups have std 0.
    scores[::3] = (scores[::3] > 0).float()
    return scores.to(DEVICE), ids.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,norm", [("grpo", True), ("grpo", False), ("dr_grpo", True),
                                       ("rloo", True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_reference(kind, norm, seed, backend):
    scores, ids = _random_groups(200, 70, seed)
    counts = torch.unique(ids, return_counts=True)[1]
    assert (counts == 1).any() and (counts > 2).any()
    out = group_advantages(scores, ids, kind=kind, norm_by_std=norm, backend=backend)
    ref = R.group_advantages(scores.double(), ids, kind, 1e-6, norm)
    assert out.shape == scores.shape and out.dtype == torch.float32
    assert_close(f"{kind}", out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_checked(backend):
    # group 7: [1, 2, 3] (mean 2, std 1); group -1: [5] (singleton); group 3: [4, 4] (std 0)
    s = torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0, 4.0], device=DEVICE)
    g = torch.tensor([7, -1, 7, 3, 7, 3], device=DEVICE)
    eps = 1e-6
    grpo = group_advantages(s, g, kind="grpo", backend=backend)
    exp = torch.tensor([-1 / (1 + eps), 5 / (1 + eps), 0.0, 0.0, 1 / (1 + eps), 0.0])
    assert_close("grpo", grpo, exp, atol=1e-7)
    dr = group_advantages(s, g, kind="dr_grpo", backend=backend)
    assert_close("dr_grpo", dr, torch.tensor([-1.0, 5.0, 0.0, 0.0, 1.0, 0.0]), atol=1e-7)
    assert torch.equal(group_advantages(s, g, kind="grpo", norm_by_std=False, backend=backend), dr)
    rloo = group_advantages(s, g, kind="rloo", backend=backend)
    # n = 3: x * 3/2 - 2 * 3/2; singleton unchanged; n = 2: 4*2 - 4*2 = 0
    assert_close("rloo", rloo, torch.tensor([-1.5, 5.0, 0.0, 0.0, 1.5, 0.0]), atol=1e-6)
    big_eps = group_advantages(s, g, kind="grpo", eps=1.0, backend=backend)
    assert_close("eps", big_eps, torch.tensor([-0.5, 2.5, 0.0, 0.0, 0.5, 0.0]), atol=1e-7)


def test_float32_matches_torch_std_per_group():
    """In float32 the vectorized op agrees with torch.mean / torch.std per group (verl's own
    float32 computation) to float32 rounding."""
    scores, ids = _random_groups(300, 90, 5)
    out = group_advantages(scores, ids, kind="grpo")
    for gid in torch.unique(ids).tolist():
        sel = ids == gid
        v = scores[sel]
        if v.numel() == 1:
            want = v / (1 + 1e-6)
        else:
            want = (v - v.mean()) / (v.std() + 1e-6)
        assert_close(f"group {gid}", out[sel], want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_empty_and_nan(backend):
    s = torch.tensor([1.0, 2.0, 4.0, 8.0], device=DEVICE)
    for id_dtype in (torch.int32, torch.int64, torch.uint8, torch.int16):
        g = torch.tensor([2, 2, 9, 9], dtype=id_dtype, device=DEVICE)
        out = group_advantages(s, g, kind="dr_grpo", backend=backend)
        assert torch.equal(out, torch.tensor([-0.5, 0.5, -2.0, 2.0], device=DEVICE))
    g = torch.tensor([0, 0, 1, 1], device=DEVICE)
    o16 = group_advantages(s.to(torch.bfloat16), g, backend=backend)
    assert o16.dtype == torch.float32
    o64 = group_advantages(s.double(), g, backend=backend)
    assert o64.dtype == torch.float64
    assert_close("bf16", o16, o64, atol=1e-6)
    e = group_advantages(torch.zeros(0, device=DEVICE), torch.zeros(0, dtype=torch.long,
                                                                    device=DEVICE),
                         backend=backend)
    assert e.shape == (0,) and e.dtype == torch.float32
    # A NaN score poisons its own group only.
    sn = torch.tensor([1.0, math.nan, 4.0, 8.0], device=DEVICE)
    for kind in GROUP_ADV_KINDS:
        out = group_advantages(sn, g, kind=kind, backend=backend)
        assert out[:2].isnan().all() and out[2:].isfinite().all()


def test_all_singletons_and_one_group():
    s = torch.randn(9, dtype=torch.float64, device=DEVICE)
    ids = torch.arange(9, device=DEVICE) * 3
    assert torch.equal(group_advantages(s, ids, kind="rloo"), s)
    assert torch.equal(group_advantages(s, ids, kind="dr_grpo"), s)
    assert_close("grpo", group_advantages(s, ids), s / (1 + 1e-6), atol=1e-15)
    one = group_advantages(s, torch.zeros(9, dtype=torch.long, device=DEVICE))
    assert_close("one group", one, (s - s.mean()) / (s.std() + 1e-6), atol=1e-12)


def test_env_backend_reference_dispatch(monkeypatch):
    calls = []
    real = R.group_advantages

    def spy(*a):
        calls.append(a[2])
        return real(*a)

    monkeypatch.setattr(adv_mod.reference, "group_advantages", spy)
    s = torch.randn(6, device=DEVICE)
    g = torch.tensor([0, 0, 1, 1, 1, 2], device=DEVICE)
    vec = group_advantages(s, g, kind="rloo")
    assert calls == []
    monkeypatch.setenv("FASTRLHF_BACKEND", "reference")
    viaenv = group_advantages(s, g, kind="rloo")
    assert calls == ["rloo"]
    assert_close("env", viaenv, vec, atol=1e-6)
    monkeypatch.setenv("FASTRLHF_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTRLHF_BACKEND must be one of.*'gpu'"):
        group_advantages(s, g)


def test_bad_inputs():
    s = torch.randn(4)
    g = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"scores must be 1-D \[B\], got shape \(2, 2\)"):
        group_advantages(s.view(2, 2), g.view(2, 2))
    with pytest.raises(TypeError, match="scores must have dtype.*got int64"):
        group_advantages(g, g)
    with pytest.raises(TypeError, match="group_ids must have dtype.*got float32"):
        group_advantages(s, s)
    with pytest.raises(TypeError, match="group_ids must be a torch.Tensor, got list"):
        group_advantages(s, [0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"group_ids must have shape \(4,\).*got \(3,\)"):
        group_advantages(s, g[:3])
    with pytest.raises(ValueError,
                       match=r"unknown kind 'ppo'; valid kinds are grpo, dr_grpo, rloo"):
        group_advantages(s, g, kind="ppo")
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1"):
        group_advantages(s, g, eps=-1e-6)
    with pytest.raises(TypeError, match="eps must be a float, got str"):
        group_advantages(s, g, eps="1e-6")
    with pytest.raises(TypeError, match="norm_by_std must be a bool, got int"):
        group_advantages(s, g, norm_by_std=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        group_advantages(s, g, backend="numpy")
    with pytest.raises(ValueError, match="group_ids is on meta but scores is on"):
        group_advantages(s, torch.empty(4, dtype=torch.long, device="meta"))
