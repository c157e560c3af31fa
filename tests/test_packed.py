"""Packed sequences (``cu_seqlens``): agg_loss, ppo_policy_loss (token ratio and GSPO),
ppo_value_loss, policy_loss_per_token and fused_ppo_loss on a ``[1, total]`` layout equal the
padded ``[S, Tmax]`` layout of the same data -- loss, stats and gradients, float64, on every
backend; the native backend's explicit refusal and the automatic fallback; bad ``cu_seqlens``."""

import pytest
import torch

from helpers import DEVICE, assert_close, backends

import fastrlhf.ops.losses as L
from fastrlhf import backend as _backend
from fastrlhf import reference
from fastrlhf.ops.fused_loss import fused_ppo_loss
from fastrlhf.ops.gae import gae

F64 = torch.float64
MODES = L.AGG_MODES
TOL = dict(atol=1e-12, rtol=1e-10)
# an empty segment, a one-token segment, the longest segment in the middle
LENGTHS = (7, 0, 23, 1, 16, 5)


# ---------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------

class Layout:
    """Segment lengths -> ``cu_seqlens`` and the maps between packed ``[1, total, ...]`` and
    padded ``[S, Tmax, ...]`` tensors."""

    def __init__(self, lengths=LENGTHS, cu_dtype=torch.int64):
        self.lengths = list(lengths)
        self.S, self.Tmax, self.total = len(lengths), max(lengths), sum(lengths)
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        self.cu = torch.tensor(cu, dtype=cu_dtype, device=DEVICE)
        self.valid = (torch.arange(self.Tmax)[None] < torch.tensor(lengths)[:, None]).to(DEVICE)

    def pack(self, x):
        """padded [S, Tmax, ...] -> packed [1, total, ...]"""
        return x[self.valid].unsqueeze(0)

    def pad(self, x, fill):
        """packed [1, total, ...] -> padded [S, Tmax, ...], ``fill`` outside the segments"""
        out = torch.full((self.S, self.Tmax) + tuple(x.shape[2:]), fill, dtype=x.dtype,
                         device=x.device)
        out[self.valid] = x[0]
        return out

    def mask(self):
        """Packed bool mask with holes: segment 0 partly masked (a prompt gap) and, where they
        exist, segment 3 fully valid (LENGTHS: a single token) and segment 4 fully masked."""
        m = torch.rand(1, self.total, device=DEVICE) > 0.25
        c = self.cu.tolist()
        m[0, c[0]:c[0] + 2] = False
        if self.S > 3:
            m[0, c[3]:c[4]] = True
        if self.S > 4:
            m[0, c[4]:c[5]] = False
        return m


def packed_policy_inputs(lay, adv_per_seq=False):
    lp = -torch.rand(1, lay.total, dtype=F64, device=DEVICE) * 3
    old = lp + torch.randn(1, lay.total, dtype=F64, device=DEVICE) * 0.3
    adv = (torch.randn(lay.S, dtype=F64, device=DEVICE) if adv_per_seq
           else torch.randn(1, lay.total, dtype=F64, device=DEVICE))
    return lp, old, adv, lay.mask()


def padded(lay, lp, old, adv, m):
    """The padded layout; NaN outside the segments (the mask is 0 there: must be ignored)."""
    nan = float("nan")
    return (lay.pad(lp, nan), lay.pad(old, nan), adv if adv.dim() == 1 else lay.pad(adv, nan),
            lay.pad(m, False))


def check_grad(lay, name, g_packed, g_padded):
    """The packed gradient equals the padded one on the segments; the padding gets zeros."""
    assert_close(name, g_packed, lay.pack(g_padded), **TOL)
    assert torch.all(g_padded[~lay.valid] == 0), f"{name}: nonzero gradient in the padding"


def check_stats(stats_packed, stats_padded):
    assert set(stats_packed) == set(stats_padded)
    for k, v in stats_padded.items():
        assert_close(f"stats[{k}]", stats_packed[k], v, **TOL)


# ---------------------------------------------------------------------------------------------
# agg_loss / agg_row_weights (plain PyTorch)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kwargs", [{}, {"dp_size": 4, "batch_num_tokens": 50,
                                         "global_batch_size": 9},
                                    {"loss_scale_factor": 3.5}])
def test_agg_loss_packed_equals_padded(mode, kwargs):
    lay = Layout()
    x = torch.randn(1, lay.total, dtype=F64, device=DEVICE)
    m = lay.mask().to(F64) * torch.rand(1, lay.total, dtype=F64, device=DEVICE)  # float weights
    xp = x.clone().requires_grad_()
    xq = lay.pad(x, float("nan")).requires_grad_()
    got = L.agg_loss(xp, m, mode, cu_seqlens=lay.cu, **kwargs)
    want = L.agg_loss(xq, lay.pad(m, 0.0), mode, **kwargs)
    assert_close(f"agg_loss[{mode}]", got, want, **TOL)
    got.backward()
    want.backward()
    check_grad(lay, "d agg_loss", xp.grad, xq.grad)
    # per-segment weights: loss = sum_s c_s sum_{t in s} m_t L_t
    c = L.agg_row_weights(m, mode, dtype=F64, cu_seqlens=lay.cu, **kwargs)
    assert c.shape == (lay.S,)
    assert_close("agg_row_weights", c,
                 L.agg_row_weights(lay.pad(m, 0.0), mode, dtype=F64, **kwargs), **TOL)
    seg = reference.segment_ids(lay.cu, lay.total)
    assert_close("sum_s c_s S_s", (c[seg] * m[0] * x[0]).sum(), got, **TOL)


def test_token_modes_ignore_the_segmentation():
    """token-mean / token-sum depend on the segments only through the token count."""
    lay = Layout()
    x = torch.randn(1, lay.total, dtype=F64, device=DEVICE)
    m = lay.mask()
    for mode in ("token-mean", "token-sum"):
        assert_close(mode, L.agg_loss(x, m, mode, cu_seqlens=lay.cu), L.agg_loss(x, m, mode),
                     **TOL)
    # ...while the seq modes do not (one row vs S segments)
    assert not torch.allclose(L.agg_loss(x, m, "seq-mean-token-mean", cu_seqlens=lay.cu),
                              L.agg_loss(x, m, "seq-mean-token-mean"))


def test_norm_mode_default_is_longest_segment():
    lay = Layout()
    x = torch.randn(1, lay.total, dtype=F64, device=DEVICE)
    m = lay.mask()
    norm = L.agg_loss(x, m, "seq-mean-token-sum-norm", cu_seqlens=lay.cu)
    plain = L.agg_loss(x, m, "seq-mean-token-sum", cu_seqlens=lay.cu)
    assert_close("norm = sum / Tmax", norm, plain / max(LENGTHS), **TOL)


# ---------------------------------------------------------------------------------------------
# ppo_policy_loss / ppo_value_loss / policy_loss_per_token
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("adv_per_seq", [False, True])
def test_policy_loss_packed_equals_padded(backend, ratio_level, adv_per_seq):
    lay = Layout(cu_dtype=torch.int32 if adv_per_seq else torch.int64)
    lp, old, adv, m = packed_policy_inputs(lay, adv_per_seq)
    qlp, qold, qadv, qm = padded(lay, lp, old, adv, m)
    for mode in MODES:
        kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg=mode,
                  ratio_level=ratio_level, backend=backend)
        a = lp.clone().requires_grad_()
        b = qlp.clone().requires_grad_()
        got, gs = L.ppo_policy_loss(a, old, adv, m, cu_seqlens=lay.cu, **kw)
        want, ws = L.ppo_policy_loss(b, qold, qadv, qm, **kw)
        assert_close(f"policy loss[{mode}]", got, want, **TOL)
        check_stats(gs, ws)
        got.backward()
        want.backward()
        check_grad(lay, f"d policy loss[{mode}]", a.grad, b.grad)
    if ratio_level == "token":
        assert float(ws["clipfrac"]) > 0  # the data exercises the clip


@pytest.mark.parametrize("backend", backends())
def test_policy_loss_packed_with_global_batch_kwargs(backend):
    lay = Layout()
    lp, old, adv, m = packed_policy_inputs(lay, adv_per_seq=True)
    qlp, qold, qadv, qm = padded(lay, lp, old, adv, m)
    for mode, kw in (("token-mean", dict(dp_size=2, batch_num_tokens=torch.tensor(80.0))),
                     ("seq-mean-token-mean", dict(dp_size=2, global_batch_size=11)),
                     ("seq-mean-token-sum-norm", dict(loss_scale_factor=64.0))):
        a = lp.clone().requires_grad_()
        b = qlp.clone().requires_grad_()
        got, _ = L.ppo_policy_loss(a, old, adv, m, agg=mode, ratio_level="sequence",
                                   cu_seqlens=lay.cu, backend=backend, **kw)
        want, _ = L.ppo_policy_loss(b, qold, qadv, qm, agg=mode, ratio_level="sequence",
                                    backend=backend, **kw)
        assert_close(f"policy loss[{mode}]", got, want, **TOL)
        got.backward()
        want.backward()
        check_grad(lay, f"d policy loss[{mode}]", a.grad, b.grad)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("clip", [0.5, None])
def test_value_loss_packed_equals_padded(backend, clip):
    lay = Layout()
    v = torch.randn(1, lay.total, dtype=F64, device=DEVICE)
    old = v + torch.randn_like(v) * 0.4
    ret = v + torch.randn_like(v) * 0.6
    m = lay.mask()
    junk = 7.0  # finite garbage in the padding (the eager reference turns NaN there into NaN grads)
    for mode in MODES:
        a = v.clone().requires_grad_()
        b = lay.pad(v, junk).requires_grad_()
        got, gs = L.ppo_value_loss(a, old, ret, m, clip=clip, agg=mode, cu_seqlens=lay.cu,
                                   backend=backend)
        want, ws = L.ppo_value_loss(b, lay.pad(old, -junk), lay.pad(ret, junk), lay.pad(m, False),
                                    clip=clip, agg=mode, backend=backend)
        assert_close(f"value loss[{mode}]", got, want, **TOL)
        check_stats(gs, ws)
        got.backward()
        want.backward()
        check_grad(lay, f"d value loss[{mode}]", a.grad, b.grad)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_policy_loss_per_token_packed(ratio_level):
    """The GSPO ratio is the segment's masked mean log-ratio: per-token terms equal padded."""
    lay = Layout()
    lp, old, adv, m = packed_policy_inputs(lay, adv_per_seq=True)
    qlp, qold, qadv, qm = padded(lay, lp, old, adv, m)
    got = L.policy_loss_per_token(lp, old, adv, m, dual_clip=2.5, ratio_level=ratio_level,
                                  cu_seqlens=lay.cu)
    want = L.policy_loss_per_token(qlp, qold, qadv, qm, dual_clip=2.5, ratio_level=ratio_level)
    for name in ("loss", "dloss_dlogp", "approx_kl"):
        assert_close(name, getattr(got, name), lay.pack(getattr(want, name)), **TOL)
    for name in ("clipped", "clipped_lower"):
        assert torch.equal(getattr(got, name), lay.pack(getattr(want, name))), name
    if ratio_level == "sequence":
        # one ratio (so, with per-sequence advantages, one loss) per segment
        c = lay.cu.tolist()
        for s in range(lay.S):
            seg = got.loss[0, c[s]:c[s + 1]]
            assert torch.equal(seg, seg[:1].expand_as(seg)), f"segment {s}"


@pytest.mark.parametrize("backend", backends())
def test_value_loss_packed_gradcheck(backend):
    lay = Layout((3, 0, 5, 1))
    old = torch.randn(1, lay.total, dtype=F64, device=DEVICE)
    ret = torch.randn(1, lay.total, dtype=F64, device=DEVICE)
    m = lay.mask()
    v = (old + 0.1 * torch.randn_like(old)).requires_grad_()
    fn = lambda x: L.ppo_value_loss(x, old, ret, m, clip=None,  # noqa: E731
                                    agg="seq-mean-token-mean", cu_seqlens=lay.cu,
                                    backend=backend)[0]
    assert torch.autograd.gradcheck(fn, (v,), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# fused_ppo_loss from the logits
# ---------------------------------------------------------------------------------------------

FUSED_CASES = [  # (ratio_level, adv_per_seq, agg, with_ref, inplace_backward)
    ("token", False, "token-mean", True, False),
    ("token", True, "seq-mean-token-mean", False, True),
    ("sequence", True, "seq-mean-token-sum-norm", True, False),
    ("sequence", False, "seq-mean-token-sum", False, False),
]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_loss_packed_equals_padded(backend, case):
    ratio_level, adv_per_seq, agg, with_ref, inplace = case
    lay = Layout((5, 0, 9, 1, 6))
    V = 37
    lp_old = -torch.rand(1, lay.total, dtype=F64, device=DEVICE) * 3
    _, _, adv, m = packed_policy_inputs(lay, adv_per_seq)
    logits = torch.randn(1, lay.total, V, dtype=F64, device=DEVICE) * 2
    tokens = torch.randint(0, V, (1, lay.total), device=DEVICE)
    tokens[0, 3] = -100  # ignore_index
    ref = (lp_old + 0.1 * torch.randn_like(lp_old)) if with_ref else None
    kw = dict(kl_coef=0.05 if with_ref else 0.0, kl_kind="k3", entropy_coef=0.01,
              clip_low=0.2, clip_high=0.3, dual_clip=3.0, temperature=0.9, agg=agg,
              ratio_level=ratio_level, backend=backend)
    # padded copy: arbitrary finite logits and NaN per-token inputs in the padding (masked)
    nan = float("nan")
    q_logits = lay.pad(logits, 0.0)
    q_logits[~lay.valid] = torch.randn_like(q_logits[~lay.valid])
    q_tokens = lay.pad(tokens, 0)
    q_old, q_adv = lay.pad(lp_old, nan), adv if adv_per_seq else lay.pad(adv, nan)
    q_ref = None if ref is None else lay.pad(ref, nan)
    q_m = lay.pad(m, False)

    a = logits.clone().requires_grad_()
    b = q_logits.clone().requires_grad_()
    got, gs = fused_ppo_loss(a * 1.0 if inplace else a, tokens, lp_old, adv, m, ref_logp=ref,
                             inplace_backward=inplace, cu_seqlens=lay.cu, **kw)
    want, ws = fused_ppo_loss(b, q_tokens, q_old, q_adv, q_m, ref_logp=q_ref, **kw)
    assert_close("fused loss", got, want, **TOL)
    for k, v in ws.items():
        if v.dim() == 2:  # per-token stats: compare on the segments
            assert gs[k].shape == (1, lay.total), k
            assert_close(f"stats[{k}]", gs[k], lay.pack(v), **TOL)
        else:
            assert_close(f"stats[{k}]", gs[k], v, **TOL)
    got.backward()
    want.backward()
    check_grad(lay, "d fused loss / d logits", a.grad, b.grad)
    # the composition of the separate ops, on the packed layout
    pg, _ = L.ppo_policy_loss(gs["logp"], lp_old, adv, m, clip_low=0.2, clip_high=0.3,
                              dual_clip=3.0, agg=agg, ratio_level=ratio_level, cu_seqlens=lay.cu,
                              backend="reference")
    comp = (pg - 0.01 * L.agg_loss(gs["entropy"], m, agg, cu_seqlens=lay.cu)
            + kw["kl_coef"] * L.agg_loss(gs["kl"], m, agg, cu_seqlens=lay.cu))
    assert_close("fused = composition", got, comp, **TOL)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", FUSED_CASES[:3], ids=lambda c: "-".join(map(str, c[:4])))
def test_fused_linear_loss_packed_equals_padded(backend, case):
    """fused_linear_ppo_loss from packed hidden states [1, total, H] equals the padded layout:
    loss, stats and the gradients of hidden (on the segments), weight and bias."""
    from fastrlhf.ops.fused_linear import fused_linear_ppo_loss
    ratio_level, adv_per_seq, agg, with_ref, _ = case
    lay = Layout((4, 0, 7, 1, 5))
    H, V = 12, 29
    lp_old = -torch.rand(1, lay.total, dtype=F64, device=DEVICE) * 3
    _, _, adv, m = packed_policy_inputs(lay, adv_per_seq)
    hidden = torch.randn(1, lay.total, H, dtype=F64, device=DEVICE)
    weight = torch.randn(V, H, dtype=F64, device=DEVICE) * 0.5
    bias = torch.randn(V, dtype=F64, device=DEVICE) * 0.1
    tokens = torch.randint(0, V, (1, lay.total), device=DEVICE)
    ref = (lp_old + 0.1 * torch.randn_like(lp_old)) if with_ref else None
    kw = dict(kl_coef=0.05 if with_ref else 0.0, kl_kind="k3", entropy_coef=0.01, clip_low=0.2,
              clip_high=0.3, dual_clip=3.0, temperature=0.9, agg=agg, ratio_level=ratio_level,
              backend=backend)
    nan = float("nan")
    q_hidden = lay.pad(hidden, 0.0)
    q_hidden[~lay.valid] = torch.randn_like(q_hidden[~lay.valid])
    q_old, q_adv = lay.pad(lp_old, nan), adv if adv_per_seq else lay.pad(adv, nan)
    q_ref = None if ref is None else lay.pad(ref, nan)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    q_leaves = [t.clone().requires_grad_() for t in (q_hidden, weight, bias)]
    got, gs = fused_linear_ppo_loss(leaves[0], leaves[1], tokens, lp_old, adv, m, bias=leaves[2],
                                    ref_logp=ref, cu_seqlens=lay.cu, **kw)
    want, ws = fused_linear_ppo_loss(q_leaves[0], q_leaves[1], lay.pad(tokens, 0), q_old, q_adv,
                                     lay.pad(m, False), bias=q_leaves[2], ref_logp=q_ref, **kw)
    assert_close("fused linear loss", got, want, **TOL)
    for k, v in ws.items():
        assert_close(f"stats[{k}]", gs[k], lay.pack(v) if v.dim() == 2 else v, **TOL)
    got.backward()
    want.backward()
    check_grad(lay, "d loss / d hidden", leaves[0].grad, q_leaves[0].grad)
    assert_close("d loss / d weight", leaves[1].grad, q_leaves[1].grad, **TOL)
    assert_close("d loss / d bias", leaves[2].grad, q_leaves[2].grad, **TOL)


# ---------------------------------------------------------------------------------------------
# backends: the native backend has no packed path
# ---------------------------------------------------------------------------------------------

def _calls(lay):
    lp, old, adv, m = packed_policy_inputs(lay, adv_per_seq=True)
    logits = torch.randn(1, lay.total, 7, dtype=F64, device=DEVICE)
    tokens = torch.randint(0, 7, (1, lay.total), device=DEVICE)
    return {
        "ppo_policy_loss": lambda **k: L.ppo_policy_loss(lp, old, adv, m, agg="seq-mean-token-mean",
                                                         cu_seqlens=lay.cu, **k)[0],
        "ppo_value_loss": lambda **k: L.ppo_value_loss(lp, old, old, m, agg="seq-mean-token-sum",
                                                       cu_seqlens=lay.cu, **k)[0],
        "fused_ppo_loss": lambda **k: fused_ppo_loss(logits, tokens, old, adv, m,
                                                     agg="seq-mean-token-mean",
                                                     cu_seqlens=lay.cu, **k)[0],
    }


@pytest.mark.skipif(DEVICE != "cpu", reason="the native backend is the CPU backend")
@pytest.mark.parametrize("op", ["ppo_policy_loss", "ppo_value_loss", "fused_ppo_loss"])
def test_native_backend_refuses_cu_seqlens_and_auto_falls_back(op, monkeypatch):
    lay = Layout((4, 0, 6))
    call = _calls(lay)[op]
    with pytest.raises(ValueError, match=rf"{op}: cu_seqlens .* not supported by the native"):
        call(backend="native")
    want = call(backend="reference")
    assert_close(f"{op} auto", call(backend="auto"), want, **TOL)
    # a process-wide preference for native does not break packed calls either
    monkeypatch.setenv("FASTRLHF_BACKEND", "native")
    assert_close(f"{op} FASTRLHF_BACKEND=native", call(), want, **TOL)


@pytest.mark.skipif(DEVICE != "cpu" or not _backend.native_available(),
                    reason="needs the native (C++) backend")
def test_auto_uses_native_without_cu_seqlens(monkeypatch):
    """Guard: the packed fallback only applies to packed calls (auto still picks native)."""
    seen = []
    from fastrlhf import native
    real = native.value_fwd
    monkeypatch.setattr(native, "value_fwd", lambda *a: seen.append(1) or real(*a))
    x = torch.randn(2, 5, dtype=F64)
    L.ppo_value_loss(x, x, x, x > 0)
    assert seen, "backend='auto' did not use the native backend for padded input"
    lay = Layout((5, 5))
    L.ppo_value_loss(lay.pack(x), lay.pack(x), lay.pack(x), lay.pack(x) > 0, cu_seqlens=lay.cu)
    assert len(seen) == 1


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["agg_loss", "ppo_policy_loss", "ppo_value_loss",
                                "fused_ppo_loss", "gae"])
def test_bad_cu_seqlens(op):
    total = 10
    x = torch.randn(1, total, dtype=F64, device=DEVICE)
    m = x > 0
    logits = torch.randn(1, total, 5, dtype=F64, device=DEVICE)
    tok = torch.randint(0, 5, (1, total), device=DEVICE)

    def call(cu, xx=x, mm=m, adv=None):
        if op == "agg_loss":
            return L.agg_loss(xx, mm, "seq-mean-token-mean", cu_seqlens=cu)
        if op == "ppo_policy_loss":
            return L.ppo_policy_loss(xx, xx, xx if adv is None else adv, mm, cu_seqlens=cu,
                                     backend="reference")
        if op == "ppo_value_loss":
            return L.ppo_value_loss(xx, xx, xx, mm, cu_seqlens=cu, backend="reference")
        if op == "fused_ppo_loss":
            lg = logits if xx is x else torch.randn(*xx.shape, 5, dtype=F64, device=DEVICE)
            tk = tok if xx is x else torch.zeros(xx.shape, dtype=torch.long, device=DEVICE)
            return fused_ppo_loss(lg, tk, xx, xx if adv is None else adv, mm, cu_seqlens=cu,
                                  backend="reference")
        return gae(xx, xx, mm, cu_seqlens=cu, backend="reference")

    def cu(*v):
        return torch.tensor(v, dtype=torch.int64, device=DEVICE)

    with pytest.raises(ValueError, match=rf"{op}: cu_seqlens must start at 0, got "
                                         r"cu_seqlens\[0\]=1"):
        call(cu(1, 4, 10))
    with pytest.raises(ValueError,
                       match=r"nondecreasing, got cu_seqlens\[1\]=6 > cu_seqlens\[2\]=4"):
        call(cu(0, 6, 4, 10))
    with pytest.raises(ValueError, match=r"must end at total=10 .*got cu_seqlens\[-1\]=9"):
        call(cu(0, 4, 9))
    with pytest.raises(ValueError, match=r"must end at total=10 .*got cu_seqlens\[-1\]=12"):
        call(cu(0, 4, 12))
    x2 = x.reshape(2, 5)
    with pytest.raises(ValueError, match=r"packed as \[1, total\].*\(B=2 != 1\)"):
        call(cu(0, 5), xx=x2, mm=x2 > 0)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype .* got float32"):
        call(cu(0, 10).float())
    with pytest.raises(ValueError, match=r"cu_seqlens must be 1-D \[S\+1\].*got shape \(1, 2\)"):
        call(cu(0, 10)[None])
    with pytest.raises(ValueError, match=r"cu_seqlens must be 1-D \[S\+1\].*got shape \(0,\)"):
        call(cu(0, 10)[:0])
    if op in ("ppo_policy_loss", "fused_ppo_loss"):
        # per-sequence advantages have one value per segment
        with pytest.raises(ValueError, match=r"advantages must have shape \(1, 10\) \(per "
                                             r"token\) or \(3,\) \(per sequence\), got \(1,\)"):
            call(cu(0, 4, 4, 10), adv=torch.randn(1, dtype=F64, device=DEVICE))
        call(cu(0, 4, 4, 10), adv=torch.randn(3, dtype=F64, device=DEVICE))  # accepted


def test_padded_results_unchanged_without_cu_seqlens():
    """No cu_seqlens: per-row ([B]) advantages keep their meaning on a [B, T] batch."""
    lp = -torch.rand(3, 8, dtype=F64, device=DEVICE)
    old = lp + 0.2 * torch.randn_like(lp)
    adv = torch.randn(3, dtype=F64, device=DEVICE)
    m = torch.rand(3, 8, device=DEVICE) > 0.3
    got, _ = L.ppo_policy_loss(lp, old, adv, m, agg="seq-mean-token-mean", backend="reference")
    lay = Layout((8, 8, 8))
    packed, _ = L.ppo_policy_loss(lay.pack(lp), lay.pack(old), adv, lay.pack(m),
                                  agg="seq-mean-token-mean", cu_seqlens=lay.cu,
                                  backend="reference")
    assert_close("equal-length segments == rows", packed, got, **TOL)
