"""agg_loss, ppo_policy_loss (token ratio and GSPO), ppo_value_loss: every backend against a
token-by-token float64 loop of verl 0.9's formulas, forward, backward and statistics; gradcheck;
hand-checked cases; masks with holes, empty rows and batches; bad input."""

import math

import pytest
import torch

from helpers import DEVICE, HAS_CUDA, assert_close, backends

import fastrlhf.ops.losses as L
from fastrlhf import reference

MODES = L.AGG_MODES
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def multi_turn_mask(B, T):
    """Alternating response / observation segments after a prompt gap; with B >= 3, row 1 fully
    masked and row 2 a single valid token."""
    m = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        t, on = int(torch.randint(0, 4, ())), True
        while t < T:
            n = int(torch.randint(1, 8, ()))
            if on:
                m[b, t:t + n] = True
            t, on = t + n, not on
    if B >= 3:
        m[1] = False
        m[2] = False
        m[2, T // 2] = True
    return m


def policy_inputs(B=5, T=37, dtype=F64, scale=0.3, adv_per_row=False):
    lp = -torch.rand(B, T, dtype=F64) * 3
    old = lp + torch.randn(B, T, dtype=F64) * scale
    adv = torch.randn(B, dtype=F64) if adv_per_row else torch.randn(B, T, dtype=F64)
    m = multi_turn_mask(B, T)
    return (lp.to(dtype).to(DEVICE), old.to(DEVICE), adv.to(DEVICE), m.to(DEVICE))


def value_inputs(B=5, T=37, dtype=F64):
    v = torch.randn(B, T, dtype=F64)
    old = v + torch.randn(B, T, dtype=F64) * 0.4
    ret = v + torch.randn(B, T, dtype=F64) * 0.6
    return v.to(dtype).to(DEVICE), old.to(DEVICE), ret.to(DEVICE), multi_turn_mask(B, T).to(DEVICE)


# ---------------------------------------------------------------------------------------------
# token-by-token float64 loops of verl 0.9 (independent of fastrlhf.reference)
# ---------------------------------------------------------------------------------------------

def loop_row_coef(mask, mode, dp=1, bnt=None, gbs=None, lsf=None):
    """agg_loss(L) = sum_b c_b sum_t m L: verl's agg_loss modes, one row at a time."""
    w = mask.double().cpu().tolist()
    n = [sum(r) for r in w]
    T = len(w[0]) if w else 0
    if mode == "token-mean":
        N = sum(n) if bnt is None else float(bnt)
        return [dp / N if N else 0.0 for _ in n]
    if mode == "token-sum":
        return [float(dp) for _ in n]
    G = sum(1 for x in n if x > 0) if gbs is None else float(gbs)
    c = [(dp / G if (G and x > 0) else 0.0) for x in n]
    if mode == "seq-mean-token-mean":
        c = [ci / (x + 1e-8) for ci, x in zip(c, n)]
    if mode == "seq-mean-token-sum-norm":
        c = [ci / (T if lsf is None else lsf) for ci in c]
    return c


def loop_policy(lp, old, adv, mask, clip_low, clip_high, dual, level, mode, **kw):
    """(loss, dloss/dlogp [B, T], clipfrac, clipfrac_lower, approx_kl) with Python floats."""
    lp, old, m = lp.double().cpu().tolist(), old.double().cpu().tolist(), mask.double().cpu().tolist()
    adv = adv.double().cpu()
    adv = (adv[:, None].expand(len(lp), len(lp[0])) if adv.dim() == 1 else adv).tolist()
    clip_high = clip_low if clip_high is None else clip_high
    lo, hi = 1 - clip_low, 1 + clip_high
    coef = loop_row_coef(mask, mode, **kw)
    loss, grads, nclip, nlow, kl, ntot = 0.0, [], 0.0, 0.0, 0.0, 0.0
    for b in range(len(lp)):
        row_g = []
        n_b = sum(m[b])
        s_b = sum(w * (x - y) for x, y, w in zip(lp[b], old[b], m[b]) if w) / max(n_b, 1.0)
        for t in range(len(lp[b])):
            w, A = m[b][t], adv[b][t]
            d = lp[b][t] - old[b][t]
            if level == "token":
                lr, ind, k = min(max(d, -20.0), 20.0), -20.0 <= d <= 20.0, None
            else:
                lr, ind, k = min(s_b, 10.0), s_b <= 10.0, -d
            r = math.exp(lr)
            l1, l2 = -A * r, -A * min(max(r, lo), hi)
            val, g = max(l1, l2), (-A * r if l1 >= l2 else 0.0)
            lower = False
            if dual is not None and A < 0 and val > -A * dual:
                val, g, lower = -A * dual, 0.0, True
            g = g if ind else 0.0
            if w:
                loss += coef[b] * w * val
                nclip += w * (l2 > l1)
                nlow += w * lower
                kl += w * (-lr if k is None else k)
            ntot += w
            row_g.append(coef[b] * w * g)
        grads.append(row_g)
    den = ntot + 1e-8
    return loss, torch.tensor(grads, dtype=F64), nclip / den, nlow / den, kl / den


def loop_value(v, old, ret, mask, clip, mode, **kw):
    v, old, ret, m = (t.double().cpu().tolist() for t in (v, old, ret, mask))
    coef = loop_row_coef(mask, mode, **kw)
    loss, grads, nclip, ntot = 0.0, [], 0.0, 0.0
    for b in range(len(v)):
        row = []
        for t in range(len(v[b])):
            w, x, R = m[b][t], v[b][t], ret[b][t]
            l1, g = (x - R) ** 2, 2 * (x - R)
            val, clipped = l1, False
            if clip is not None:
                vc = max(min(x, old[b][t] + clip), old[b][t] - clip)
                l2 = (vc - R) ** 2
                if l2 > l1:
                    val, clipped = l2, True
                    g = 2 * (vc - R) * (1.0 if old[b][t] - clip < x < old[b][t] + clip else 0.0)
            if w:
                loss += 0.5 * coef[b] * w * val
                nclip += w * clipped
            ntot += w
            row.append(0.5 * coef[b] * w * g)
        grads.append(row)
    return loss, torch.tensor(grads, dtype=F64), nclip / (ntot + 1e-8)


def run_policy(backend, lp, old, adv, mask, **kw):
    lp = lp.detach().clone().requires_grad_()
    loss, stats = L.ppo_policy_loss(lp, old, adv, mask, backend=backend, **kw)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), g, stats


def run_value(backend, v, old, ret, mask, **kw):
    v = v.detach().clone().requires_grad_()
    loss, stats = L.ppo_value_loss(v, old, ret, mask, backend=backend, **kw)
    (g,) = torch.autograd.grad(loss, v)
    return loss.detach(), g, stats


def t64(x):
    return torch.tensor(x, dtype=F64)


# ---------------------------------------------------------------------------------------------
# policy loss vs the loop: every mode x every variant, forward, backward, stats
# ---------------------------------------------------------------------------------------------

POLICY_CONFIGS = {
    "ppo": dict(clip_low=0.2),
    "clip_higher": dict(clip_low=0.2, clip_high=0.28),
    "dual_clip": dict(clip_low=0.2, dual_clip=3.0),
    "adv_per_seq": dict(clip_low=0.1, clip_high=0.3, dual_clip=2.0),
    "gspo": dict(clip_low=3e-2, clip_high=4e-2, ratio_level="sequence"),
    "gspo_dual_adv_per_seq": dict(clip_low=0.05, dual_clip=1.5, ratio_level="sequence"),
}


@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", list(POLICY_CONFIGS))
def test_policy_matches_loop(backend, mode, cfg):
    kw = dict(POLICY_CONFIGS[cfg])
    lp, old, adv, m = policy_inputs(adv_per_row="adv_per_seq" in cfg,
                                    scale=0.02 if "gspo" in cfg else 0.3)
    if "dual" in cfg:
        old[0, :8] = lp[0, :8] - 1.5            # ratios e^1.5 > c: the dual clip engages
        m[0, :8] = True                           # (for A < 0)
        adv = adv.clone()
        adv[0] = -adv[0].abs()
    loss, g, st = run_policy(backend, lp, old, adv, m, agg=mode, **kw)
    level = kw.pop("ratio_level", "token")
    e_loss, e_g, e_cf, e_cfl, e_kl = loop_policy(lp, old, adv, m, kw.get("clip_low"),
                                                 kw.get("clip_high"), kw.get("dual_clip"),
                                                 level, mode)
    assert_close("loss", loss, t64(e_loss), atol=1e-12, rtol=1e-10)
    assert_close("dloss/dlogp", g, e_g, atol=1e-12, rtol=1e-10)
    assert_close("clipfrac", st["clipfrac"], t64(e_cf), atol=1e-12)
    assert_close("clipfrac_lower", st["clipfrac_lower"], t64(e_cfl), atol=1e-12)
    assert_close("approx_kl", st["approx_kl"], t64(e_kl), atol=1e-12)
    assert all(not v.requires_grad for v in st.values())
    if "dual" in cfg and level == "token":
        assert st["clipfrac_lower"].item() > 0
    assert torch.equal(g[~m], torch.zeros_like(g[~m]))


@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", [0.2, None])
def test_value_matches_loop(backend, mode, clip):
    v, old, ret, m = value_inputs()
    loss, g, st = run_value(backend, v, old, ret, m, clip=clip, agg=mode)
    e_loss, e_g, e_cf = loop_value(v, old, ret, m, clip, mode)
    assert_close("loss", loss, t64(e_loss), atol=1e-12, rtol=1e-10)
    assert_close("dloss/dv", g, e_g, atol=1e-12, rtol=1e-10)
    assert_close("clipfrac", st["clipfrac"], t64(e_cf), atol=1e-12)
    if clip is not None:
        assert 0 < st["clipfrac"].item() < 1


@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("mode", MODES)
def test_global_batch_arguments(backend, mode):
    """dp_size / batch_num_tokens / global_batch_size / loss_scale_factor, numbers and tensors."""
    lp, old, adv, m = policy_inputs(B=4, T=21)
    v, vold, ret, _ = value_inputs(B=4, T=21)
    for bnt, gbs in ((53, 7), (torch.tensor(53.0), torch.tensor(7))):
        kw = dict(dp_size=4, batch_num_tokens=bnt, global_batch_size=gbs, loss_scale_factor=64)
        loss, g, _ = run_policy(backend, lp, old, adv, m, agg=mode, clip_low=0.2, **kw)
        e_loss, e_g, *_ = loop_policy(lp, old, adv, m, 0.2, None, None, "token", mode, dp=4,
                                      bnt=53, gbs=7, lsf=64)
        assert_close("policy loss", loss, t64(e_loss), atol=1e-12, rtol=1e-10)
        assert_close("policy grad", g, e_g, atol=1e-12, rtol=1e-10)
        vloss, vg, _ = run_value(backend, v, vold, ret, m, clip=0.3, agg=mode, **kw)
        e_vl, e_vg, _ = loop_value(v, vold, ret, m, 0.3, mode, dp=4, bnt=53, gbs=7, lsf=64)
        assert_close("value loss", vloss, t64(e_vl), atol=1e-12, rtol=1e-10)
        assert_close("value grad", vg, e_vg, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# triton vs reference in float32 / bfloat16, strided views, advantages [B] vs [B, T]
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in backends(native=True) if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_low_precision_vs_reference(backend, dtype, level):
    lp, old, adv, m = policy_inputs(B=4, T=29, dtype=dtype, scale=0.05)
    old, adv = old.float(), adv.float()
    kw = dict(clip_low=0.1, clip_high=0.15, dual_clip=3.0, agg="seq-mean-token-mean",
              ratio_level=level)
    loss, g, st = run_policy(backend, lp, old, adv, m, **kw)
    r_loss, r_g, r_st = run_policy("reference", lp, old, adv, m, **kw)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    assert_close("loss", loss, r_loss, atol=1e-6, rtol=1e-5)
    assert_close("grad", g, r_g, atol=1e-6 if dtype == torch.float32 else 2e-3, rtol=1e-2)
    for k in st:
        assert_close(k, st[k], r_st[k], atol=1e-6)
    v, vo, ret, vm = value_inputs(B=4, T=29, dtype=dtype)
    vl, vg, vst = run_value(backend, v, vo.float(), ret.float(), vm, clip=0.2)
    rl, rg, rst = run_value("reference", v, vo.float(), ret.float(), vm, clip=0.2)
    assert_close("value loss", vl, rl, atol=1e-6, rtol=1e-5)
    assert_close("value grad", vg, rg, atol=1e-6 if dtype == torch.float32 else 2e-3, rtol=1e-2)


@pytest.mark.parametrize("backend", backends(native=True))
def test_strided_views_and_per_sequence_advantages(backend):
    B, T = 4, 19
    big = -torch.rand(B, T + 1, dtype=F64, device=DEVICE) * 2
    lp = big[:, :-1]                                 # row stride T + 1, read in place
    assert not lp.is_contiguous()
    old = (lp + torch.randn(B, T, dtype=F64, device=DEVICE) * 0.3).detach()
    adv_row = torch.randn(B, dtype=F64, device=DEVICE)
    adv_full = adv_row[:, None].expand(B, T)         # row stride 0
    m = multi_turn_mask(B, T).to(DEVICE)
    a = run_policy(backend, lp, old, adv_row, m, dual_clip=2.5)
    b = run_policy(backend, lp.contiguous(), old, adv_full.contiguous(), m, dual_clip=2.5)
    c = run_policy(backend, lp, old, adv_full, m, dual_clip=2.5)
    for x in (b, c):
        assert_close("loss", a[0], x[0], atol=1e-14)
        assert_close("grad", a[1], x[1], atol=1e-14)
    v = torch.randn(B, T + 3, dtype=F64, device=DEVICE)[:, 2:-1]
    vr = run_value(backend, v, v.detach() + 0.3, v.detach() - 0.5, m)
    vc = run_value(backend, v.contiguous(), v.detach() + 0.3, v.detach() - 0.5, m)
    assert_close("value loss", vr[0], vc[0], atol=1e-14)
    assert_close("value grad", vr[1], vc[1], atol=1e-14)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64) on both backends
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_gradcheck(backend, mode):
    lp, old, adv, m = policy_inputs(B=3, T=5)
    m[0] = True
    lp = lp.detach().requires_grad_()

    def policy(x):
        return L.ppo_policy_loss(x, old, adv, m, clip_low=0.2, clip_high=0.25, dual_clip=3.0,
                                 agg=mode, backend=backend)[0]

    assert torch.autograd.gradcheck(policy, (lp,))
    v, vo, ret, vm = value_inputs(B=3, T=5)
    vm[0] = True
    v = v.detach().requires_grad_()
    for clip in (0.3, None):
        assert torch.autograd.gradcheck(
            lambda x: L.ppo_value_loss(x, vo, ret, vm, clip=clip, agg=mode, backend=backend)[0],
            (v,))


@pytest.mark.parametrize("backend", [b for b in backends(native=True) if b != "reference"])
def test_gspo_backward_matches_reference_autograd(backend):
    """GSPO's gradient is verl's stop-gradient form (not the derivative of the forward value, so
    no gradcheck): per token, r * d(per-token loss)/dr with r the sequence ratio."""
    lp, old, adv, m = policy_inputs(B=4, T=23, scale=0.02, adv_per_row=True)
    for mode in MODES:
        kw = dict(clip_low=0.01, clip_high=0.02, agg=mode, ratio_level="sequence")
        t = run_policy(backend, lp, old, adv, m, **kw)
        r = run_policy("reference", lp, old, adv, m, **kw)
        assert_close("loss", t[0], r[0], atol=1e-13, rtol=1e-12)
        assert_close("grad", t[1], r[1], atol=1e-13, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# hand-checked cases
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends(native=True))
def test_policy_hand_checked(backend):
    # ratios 1.5, 0.5, 4.0, 1.1 (old = 0); advantages +1, -1, -1, +2; clip 0.2, dual clip 3.
    lp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(4.0), math.log(1.1)]],
                      dtype=F64, device=DEVICE)
    old = torch.zeros_like(lp)
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]], dtype=F64, device=DEVICE)
    m = torch.ones(1, 4, dtype=torch.bool, device=DEVICE)
    # per token: max(-1.5, -1.2) = -1.2 (clipped); max(0.5, 0.8) = 0.8 (clipped);
    # max(4, 1.2) = 4 -> min(4, 3) = 3 (dual); max(-2.2, -2.2) = -2.2 (inside the clip range).
    loss, g, st = run_policy(backend, lp, old, adv, m, clip_low=0.2, dual_clip=3.0)
    assert_close("loss", loss, t64((-1.2 + 0.8 + 3.0 - 2.2) / 4), atol=1e-14)
    assert_close("grad", g, t64([[0.0, 0.0, 0.0, -2.0 * 1.1 / 4]]), atol=1e-14)
    assert_close("clipfrac", st["clipfrac"], t64(2 / 4), atol=1e-8)
    assert_close("clipfrac_lower", st["clipfrac_lower"], t64(1 / 4), atol=1e-8)
    assert_close("approx_kl", st["approx_kl"], t64(-math.log(1.5 * 0.5 * 4.0 * 1.1) / 4), atol=1e-8)
    # clip-higher 0.6 lets token 0 through unclipped: -1.5, gradient -1.5 / 4.
    loss, g, st = run_policy(backend, lp, old, adv, m, clip_low=0.2, clip_high=0.6)
    assert_close("loss (clip-higher)", loss, t64((-1.5 + 0.8 + 4.0 - 2.2) / 4), atol=1e-14)
    assert_close("grad (clip-higher)", g[0, 0], t64(-1.5 / 4), atol=1e-14)
    # seq-mean-token-sum over two rows, the second fully masked: the sum of row 0.
    lp2, old2, adv2 = (torch.cat([x, x]) for x in (lp, old, adv))
    m2 = torch.cat([m, torch.zeros_like(m)])
    loss, g, _ = run_policy(backend, lp2, old2, adv2, m2, dual_clip=3.0, agg="seq-mean-token-sum")
    assert_close("loss (seq sum)", loss, t64(-1.2 + 0.8 + 3.0 - 2.2), atol=1e-14)
    assert torch.equal(g[1], torch.zeros_like(g[1]))


@pytest.mark.parametrize("backend", backends(native=True))
def test_gspo_hand_checked(backend):
    # row 0: log-ratios 0.1, 0.3 (valid), 5.0 (masked) -> s = 0.2, r = e^0.2 = 1.2214 > 1.1.
    lp = torch.tensor([[0.1, 0.3, 5.0], [0.0, -0.02, 0.0]], dtype=F64, device=DEVICE) - 1
    old = torch.full_like(lp, -1.0)
    m = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.int32, device=DEVICE)
    adv = torch.tensor([1.0, -0.5], dtype=F64, device=DEVICE)
    loss, g, st = run_policy(backend, lp, old, adv, m, clip_low=0.1, ratio_level="sequence",
                             agg="seq-mean-token-mean")
    r1 = math.exp(-0.02 / 3)                         # row 1: inside [0.9, 1.1]: 0.5 r1
    # seq-mean-token-mean divides the row sum by (n_b + 1e-8), as verl.
    exp_loss = (-1.1 * 2 / (2 + 1e-8) + 0.5 * r1 * 3 / (3 + 1e-8)) / 2
    assert_close("loss", loss, t64(exp_loss), atol=1e-14)
    exp_g = [[0.0, 0.0, 0.0], [0.5 * r1 / (3 + 1e-8) / 2] * 3]  # row 0 clipped -> 0
    assert_close("grad", g, t64(exp_g), atol=1e-14)
    assert_close("clipfrac", st["clipfrac"], t64(2 / 5), atol=1e-8)
    assert_close("approx_kl", st["approx_kl"], t64(-(0.1 + 0.3 - 0.02) / 5), atol=1e-8)


@pytest.mark.parametrize("backend", backends(native=True))
def test_value_hand_checked(backend):
    # token 0: v=1, old=0, R=0, clip .5 -> vc=.5, max(1, .25)=1, grad 0.5*2*1 / 2 tokens
    # token 1: v=.2, old=0, R=1, clip .5 -> vc=.2 (inside), loss .64, grad 0.5*2*(-.8)/2
    # token 2: v=.9, old=0, R=1, clip .5 -> vc=.5, max(.01, .25) = .25 clipped, grad 0 (masked
    # weight 1), token 3 masked.
    v = torch.tensor([[1.0, 0.2, 0.9, 7.0]], dtype=F64, device=DEVICE)
    old = torch.zeros_like(v)
    ret = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=F64, device=DEVICE)
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=F64, device=DEVICE)
    loss, g, st = run_value(backend, v, old, ret, m, clip=0.5)
    assert_close("loss", loss, t64(0.5 * (1.0 + 0.64 + 0.25) / 3), atol=1e-14)
    assert_close("grad", g, t64([[1.0 / 3, -0.8 / 3, 0.0, 0.0]]), atol=1e-14)
    assert_close("clipfrac", st["clipfrac"], t64(1 / 3), atol=1e-8)
    loss, g, st = run_value(backend, v, old, ret, m, clip=None, agg="token-sum")
    assert_close("loss (mse)", loss, t64(0.5 * (1.0 + 0.64 + 0.01)), atol=1e-14)
    assert st["clipfrac"].item() == 0.0


# ---------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("mode", MODES)
def test_fully_masked_batch_is_zero(backend, mode):
    lp, old, adv, m = policy_inputs(B=3, T=6)
    old[0, 0] = float("nan")                          # NaN outside the mask: ignored
    m = torch.zeros_like(m)
    for level in ("token", "sequence"):
        loss, g, st = run_policy(backend, lp, old, adv, m, agg=mode, ratio_level=level,
                                 dual_clip=3.0)
        assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g))
        assert all(x.item() == 0.0 for x in st.values())
    v, vo, ret, _ = value_inputs(B=3, T=6)
    loss, g, st = run_value(backend, v, vo, ret, m, agg=mode)
    assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g))
    assert st["clipfrac"].item() == 0.0
    assert L.agg_loss(lp, m, mode).item() == 0.0


@pytest.mark.parametrize("backend", backends(native=True))
def test_nan_outside_mask_and_single_token_and_T1(backend):
    lp, old, adv, m = policy_inputs(B=4, T=13)
    dirty_lp, dirty_adv = lp.clone(), adv.clone()
    dirty_lp[~m] = float("nan")
    dirty_adv[~m] = float("inf")
    for level in ("token", "sequence"):
        for mode in MODES:
            kw = dict(agg=mode, ratio_level=level, dual_clip=3.0)
            clean = run_policy(backend, lp, old, adv, m, **kw)
            dirty = run_policy(backend, dirty_lp, old, dirty_adv, m, **kw)
            assert_close("loss", dirty[0], clean[0], atol=1e-14)
            assert_close("grad", dirty[1], clean[1], atol=1e-14)
    # NaN inside the mask comes out as NaN.
    bad = lp.clone()
    bad[m.nonzero()[0, 0], m.nonzero()[0, 1]] = float("nan")
    assert run_policy(backend, bad, old, adv, m)[0].isnan()
    # T = 1 and a single valid token.
    one = torch.zeros(3, 1, dtype=torch.bool, device=DEVICE)
    one[1, 0] = True
    x = torch.tensor([[0.5], [math.log(1.1)], [9.0]], dtype=F64, device=DEVICE)
    for mode in MODES:
        loss, g, st = run_policy(backend, x, torch.zeros_like(x), torch.ones_like(x), one,
                                 agg=mode)
        e = loop_policy(x, torch.zeros_like(x), torch.ones_like(x), one, 0.2, None, None, "token",
                        mode)
        assert_close("T=1 loss", loss, t64(e[0]), atol=1e-14)
        assert_close("T=1 grad", g, e[1], atol=1e-14)


@pytest.mark.parametrize("backend", backends(native=True))
def test_huge_log_ratios_are_clamped(backend):
    lp, old, adv, m = policy_inputs(B=3, T=11)
    old = old.clone()
    old[0] = lp[0] - 1e4                              # ratio exp(20) after the clamp
    old[2] = lp[2] + 1e4                              # ratio exp(-20)
    for mode in MODES:
        for level in ("token", "sequence"):
            loss, g, st = run_policy(backend, lp, old, adv, m, agg=mode, ratio_level=level)
            assert torch.isfinite(loss) and torch.isfinite(g).all()
            assert all(torch.isfinite(v) for v in st.values())
            if level == "token":
                assert torch.equal(g[0], torch.zeros_like(g[0]))   # outside the clamp
            ref = run_policy("reference", lp, old, adv, m, agg=mode, ratio_level=level)
            assert_close("loss", loss, ref[0], atol=1e-9, rtol=1e-12)
            assert_close("grad", g, ref[1], atol=1e-9, rtol=1e-12)
            assert_close("approx_kl", st["approx_kl"], ref[2]["approx_kl"], atol=1e-9)


@pytest.mark.parametrize("backend", backends(native=True))
def test_mask_dtypes_agree(backend):
    lp, old, adv, m = policy_inputs(B=4, T=17)
    v, vo, ret, _ = value_inputs(B=4, T=17)
    base = run_policy(backend, lp, old, adv, m, agg="seq-mean-token-mean", dual_clip=3.0)
    vbase = run_value(backend, v, vo, ret, m)
    for dt in (torch.int32, torch.int64, torch.uint8, torch.float32, torch.float64):
        got = run_policy(backend, lp, old, adv, m.to(dt), agg="seq-mean-token-mean",
                         dual_clip=3.0)
        assert_close(f"loss {dt}", got[0], base[0], atol=1e-14)
        assert_close(f"grad {dt}", got[1], base[1], atol=1e-14)
        vgot = run_value(backend, v, vo, ret, m.to(dt))
        assert_close(f"value loss {dt}", vgot[0], vbase[0], atol=1e-14)
    # weighted float mask
    w = torch.rand(4, 17, dtype=F64, device=DEVICE) * m
    got = run_policy(backend, lp, old, adv, w, agg="token-mean")
    e = loop_policy(lp, old, adv, w, 0.2, None, None, "token", "token-mean")
    assert_close("weighted loss", got[0], t64(e[0]), atol=1e-12)
    assert_close("weighted grad", got[1], e[1], atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in backends(native=True) if b != "reference"])
def test_deterministic(backend):
    lp, old, adv, m = policy_inputs(B=6, T=40, dtype=torch.float32)
    a = run_policy(backend, lp, old, adv, m, agg="token-sum")
    b = run_policy(backend, lp, old, adv, m, agg="token-sum")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_batch():
    for backend in backends(native=True):
        z = torch.zeros(0, 5, dtype=F64, device=DEVICE)
        loss, g, st = run_policy(backend, z, z, z, z.bool())
        assert loss.item() == 0.0 and g.shape == (0, 5)
        z = torch.zeros(3, 0, dtype=F64, device=DEVICE)
        loss, g, st = run_value(backend, z, z, z, z.bool(), agg="seq-mean-token-mean")
        assert loss.item() == 0.0 and g.shape == (3, 0)


# ---------------------------------------------------------------------------------------------
# agg_loss, agg_row_weights, policy_loss_per_token
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_agg_loss_matches_loop_and_row_weights(mode):
    x = torch.randn(5, 23, dtype=F64, requires_grad=True)
    m = multi_turn_mask(5, 23)
    dirty = x.detach().clone()
    dirty[~m] = float("nan")
    for kw, lkw in ((dict(), dict()),
                    (dict(dp_size=2, batch_num_tokens=40, global_batch_size=9,
                          loss_scale_factor=32), dict(dp=2, bnt=40, gbs=9, lsf=32))):
        c = loop_row_coef(m, mode, **lkw)
        exp = sum(ci * sum(v for v, w in zip(row, mr) if w)
                  for ci, row, mr in zip(c, x.tolist(), m.tolist()))
        got = L.agg_loss(x, m, mode, **kw)
        assert_close("agg_loss", got, t64(exp), atol=1e-12, rtol=1e-12)
        assert_close("agg_loss (NaN outside mask)", L.agg_loss(dirty, m, mode, **kw), got,
                     atol=1e-14)
        assert_close("agg_row_weights", L.agg_row_weights(m, mode, dtype=F64, **kw), t64(c),
                     atol=1e-14)
        (g,) = torch.autograd.grad(got, x)
        assert_close("d agg / d L", g, t64(c)[:, None] * m, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: L.agg_loss(t, m, mode), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_agg_row_weights_token_mean_host_path_is_the_tensor_division(dtype):
    """On the CPU token-mean reads N on the host (one read instead of five small tensor ops; a
    bool mask's N as one integer count):
    bitwise the tensor formula dp / N rounded once to dtype, 0 for N = 0, NaN for a NaN N, and
    batch_num_tokens rounded to dtype before dividing, whatever its type."""
    g = torch.Generator().manual_seed(3)
    masks = [torch.rand(4, 7, generator=g) < 0.6, torch.zeros(3, 5, dtype=torch.bool),
             torch.rand(2, 9, generator=g, dtype=F64) * 3]  # a float (weighting) mask
    bnts = [None, 3, 7.1, 0, torch.tensor(1e8 + 1.0, dtype=F64), torch.tensor(float("nan"))]
    for m in masks:
        for dp in (1, 3):
            for bnt in bnts:
                if dp > 1 and bnt is None:
                    continue  # required with dp_size > 1
                got = L.agg_row_weights(m, "token-mean", dp_size=dp, batch_num_tokens=bnt,
                                        dtype=dtype)
                n = m.to(dtype).sum(-1).sum() if bnt is None else torch.as_tensor(bnt, dtype=dtype)
                want = reference._div_or_zero(torch.full((m.shape[0],), float(dp), dtype=dtype), n)
                assert got.dtype == dtype and got.shape == (m.shape[0],)
                assert torch.equal(got, want) or (bool(want.isnan().all()) and
                                                  bool(got.isnan().all())), (m, dp, bnt)
    # packed [1, total] bool masks: one coefficient per segment, the same value
    cu = torch.tensor([0, 3, 3, 10])
    for m in (torch.rand(1, 10, generator=g) < 0.5, torch.zeros(1, 10, dtype=torch.bool)):
        got = L.agg_row_weights(m, "token-mean", dtype=dtype, cu_seqlens=cu)
        want = reference._div_or_zero(torch.ones(3, dtype=dtype), m.to(dtype).sum())
        assert got.dtype == dtype and torch.equal(got, want), m


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dual", [None, 2.0])
def test_policy_loss_per_token_is_autograd_of_reference(level, dual):
    lp, old, adv, m = policy_inputs(B=4, T=15, scale=0.05 if level == "sequence" else 0.4)
    kw = dict(clip_low=0.05, clip_high=0.08, dual_clip=dual, ratio_level=level)
    terms = L.policy_loss_per_token(lp, old, adv, m, **kw)
    for mode in MODES:
        loss, g, st = run_policy("reference", lp, old, adv, m, agg=mode, **kw)
        c = L.agg_row_weights(m, mode, dtype=F64)
        assert_close("loss", (c * reference.masked_sum(terms.loss, m, -1)).sum(), loss,
                     atol=1e-13)
        assert_close("grad", c[:, None] * m * terms.dloss_dlogp, g, atol=1e-13)
    assert_close("clipfrac", reference.masked_mean(terms.clipped.double(), m), st["clipfrac"],
                 atol=1e-14)
    assert_close("approx_kl", reference.masked_mean(terms.approx_kl, m), st["approx_kl"],
                 atol=1e-14)


def test_custom_ops_opcheck():
    if "triton" not in backends(native=True):
        pytest.skip("no Triton backend on this machine")
    lp, old, adv, m = policy_inputs(B=2, T=3)
    lp = lp.requires_grad_()
    torch.library.opcheck(L._policy.op, (lp, old, adv, m, 0.8, 1.2, 3.0, False, "token-mean",
                                          1, None, None, 3.0, None, "triton"))
    torch.library.opcheck(L._policy.op, (lp, old, adv[:, 0].contiguous(), m, 0.9, 1.1, None,
                                          True, "seq-mean-token-mean", 2, 4.0, None, 3.0, None,
                                          "triton"))
    v, vo, ret, vm = value_inputs(B=2, T=3)
    torch.library.opcheck(L._value.op, (v.requires_grad_(), vo, ret, vm, 0.2, "token-sum", 1,
                                         None, None, 3.0, None, "triton"))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def test_bad_inputs():
    lp, old, adv, m = policy_inputs(B=3, T=4)
    P = L.ppo_policy_loss
    with pytest.raises(ValueError, match=r"ppo_policy_loss: old_logp must have shape \(3, 4\)"):
        P(lp, old[:, :3], adv, m)
    with pytest.raises(ValueError, match=r"advantages must have shape \(3, 4\).*or \(3,\).*\(4,\)"):
        P(lp, old, adv[0], m)
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 4\).*got \(3, 5\)"):
        P(lp, old, adv, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"logp must be 2-D \[B, T\], got shape \(12,\)"):
        P(lp.reshape(-1), old.reshape(-1), adv.reshape(-1), m.reshape(-1))
    with pytest.raises(ValueError, match="unknown aggregation mode 'token-avg'"):
        P(lp, old, adv, m, agg="token-avg")
    with pytest.raises(ValueError, match="clip_low must be a finite number > 0, got 0.0"):
        P(lp, old, adv, m, clip_low=0.0)
    with pytest.raises(ValueError, match="clip_high must be a finite number > 0, got -0.1"):
        P(lp, old, adv, m, clip_high=-0.1)
    with pytest.raises(ValueError, match="dual_clip must be a finite number > 1.*got 1.0"):
        P(lp, old, adv, m, dual_clip=1.0)
    with pytest.raises(ValueError, match="ratio_level must be one of.*'seq'"):
        P(lp, old, adv, m, ratio_level="seq")
    with pytest.raises(TypeError, match="unexpected keyword argument.*dp_sizee"):
        P(lp, old, adv, m, dp_sizee=2)
    with pytest.raises(ValueError, match="batch_num_tokens is required when dp_size > 1"):
        P(lp, old, adv, m, dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size is required when dp_size > 1"):
        P(lp, old, adv, m, dp_size=2, agg="seq-mean-token-sum")
    with pytest.raises(ValueError, match="dp_size must be >= 1, got 0"):
        P(lp, old, adv, m, dp_size=0)
    with pytest.raises(ValueError, match="batch_num_tokens must be a finite number >= 0, got -3"):
        P(lp, old, adv, m, batch_num_tokens=-3)
    with pytest.raises(ValueError, match="loss_scale_factor must be a finite number > 0"):
        P(lp, old, adv, m, agg="seq-mean-token-sum-norm", loss_scale_factor=0)
    with pytest.raises(TypeError, match="mask must have dtype"):
        P(lp, old, adv, m.to(torch.complex64))
    with pytest.raises(TypeError, match="logp must have dtype"):
        P(lp.long(), old, adv, m)
    with pytest.raises(ValueError, match="backend must be one of"):
        P(lp, old, adv, m, backend="cuda")
    V = L.ppo_value_loss
    with pytest.raises(ValueError, match="ppo_value_loss: clip must be a finite number > 0, got"):
        V(lp, old, adv, m, clip=0)
    with pytest.raises(ValueError, match=r"ppo_value_loss: returns must have shape \(3, 4\)"):
        V(lp, old, adv[:2], m)
    with pytest.raises(ValueError, match="ppo_value_loss: unknown aggregation mode 'mean'"):
        V(lp, old, adv, m, agg="mean")
    with pytest.raises(ValueError, match="agg_loss: unknown aggregation mode 'sum'"):
        L.agg_loss(lp, m, "sum")
    with pytest.raises(ValueError, match=r"agg_loss: mask must have shape \(3, 4\)"):
        L.agg_loss(lp, m[:, :2])
    with pytest.raises(ValueError, match="policy_loss_per_token: ratio_level='sequence' needs"):
        L.policy_loss_per_token(lp, old, adv, None, ratio_level="sequence")


# ---------------------------------------------------------------------------------------------
# GPU: full-size shapes against the float64 reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_full_size(dtype):
    B, T = 64, 8192
    lp = (-torch.rand(B, T, device="cuda") * 3).to(dtype)
    old = lp.float() + torch.randn(B, T, device="cuda") * 0.2
    adv = torch.randn(B, T, device="cuda")
    m = torch.rand(B, T, device="cuda") > 0.2
    for mode in MODES:
        t = run_policy("triton", lp, old, adv, m, agg=mode, clip_high=0.28, dual_clip=3.0)
        r = run_policy("reference", lp.double(), old.double(), adv.double(), m, agg=mode,
                       clip_high=0.28, dual_clip=3.0)
        assert_close("loss", t[0], r[0], atol=1e-5, rtol=1e-4)
        assert_close("grad", t[1], r[1].to(dtype), atol=1e-6, rtol=1e-2)


def test_torch_compile_fullgraph():
    if "triton" not in backends(native=True):
        pytest.skip("no Triton backend on this machine")
    lp, old, adv, m = policy_inputs(B=3, T=9)
    v, vo, ret, _ = value_inputs(B=3, T=9)

    def step(x, y):
        pl, st = L.ppo_policy_loss(x, old, adv, m, dual_clip=3.0, agg="seq-mean-token-mean",
                                   backend="triton")
        vl, vst = L.ppo_value_loss(y, vo, ret, m, backend="triton")
        return pl + vl, st["clipfrac"] + vst["clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, y = lp.clone().requires_grad_(), v.clone().requires_grad_()
    out, cf = compiled(x, y)
    out.backward()
    x2, y2 = lp.clone().requires_grad_(), v.clone().requires_grad_()
    e_out, e_cf = step(x2, y2)
    e_out.backward()
    assert_close("loss", out, e_out, atol=1e-14)
    assert_close("clipfrac", cf, e_cf, atol=1e-14)
    assert_close("grad logp", x.grad, x2.grad, atol=1e-14)
    assert_close("grad values", y.grad, y2.grad, atol=1e-14)
