"""fused_ppo_loss: equal (float64, loss, dlogits and stats) to the composition of the separate
public ops -- token_logprobs, ppo_policy_loss, kl_penalty, agg_loss -- on every backend; in-place
vs out-of-place; gradcheck; torch.compile; autocast; a tiny transformers model; bad input."""

import pytest
import torch

import fastrlhf as fr
import fastrlhf.ops.losses as L
from fastrlhf import reference as ref
from fastrlhf.ops.fused_loss import FUSED_STATS, fused_ppo_loss
from fastrlhf.ops.masked import masked_mean
from helpers import DEVICE, HAS_CUDA, TRITON_OK, assert_close, backends

F64 = torch.float64
TOL = 1e-10  # float64 everywhere


# ---------------------------------------------------------------------------------------------
# inputs and the unfused composition
# ---------------------------------------------------------------------------------------------

def make_inputs(B=4, T=9, V=67, *, dtype=F64, seed=0, adv_per_row=False, float_mask=False):
    """Logits [B, T+1, V] (the loss reads the [:, :-1] view), old / ref log-probs near the
    current ones (so ratios both inside and outside the clip range), a few tokens with a large
    ratio and negative advantage (dual clip), and a mask with holes, one fully masked row and one
    single-token row."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T + 1, V, generator=g, dtype=F64) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    lp = ref.token_logprobs(base[:, :-1], tokens)
    old = lp + torch.randn(B, T, generator=g, dtype=F64) * 0.3
    old[0, :3] = lp[0, :3] - 3.0                    # ratio ~e^3 > dual clip 3
    ref_lp = lp + torch.randn(B, T, generator=g, dtype=F64) * 0.4
    if adv_per_row:
        adv = torch.randn(B, generator=g, dtype=F64)
        adv[0] = -1.0
    else:
        adv = torch.randn(B, T, generator=g, dtype=F64)
        adv[0, :3] = -1.0
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[0, :3] = True
    if B >= 3:
        mask[1] = False
        mask[2] = False
        mask[2, T // 2] = True
    if float_mask:
        mask = mask.to(F64) * (0.5 + torch.rand(B, T, generator=g, dtype=F64))
    d = lambda t: t.to(DEVICE)  # noqa: E731
    return dict(base=d(base.to(dtype)), tokens=d(tokens), old=d(old), adv=d(adv), mask=d(mask),
                ref=d(ref_lp))


def composition(x, tokens, old, adv, mask, *, ref_logp=None, kl_coef=0.0, kl_kind="k3",
                entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None, temperature=1.0,
                agg="token-mean", ratio_level="token", backend="reference", **kw):
    """The separate public ops, composed as fused_ppo_loss's docstring defines it."""
    logp, ent = fr.token_logprobs(x, tokens, temperature=temperature, return_entropy=True,
                                  backend=backend)
    loss, st = L.ppo_policy_loss(logp, old, adv, mask, clip_low=clip_low, clip_high=clip_high,
                                 dual_clip=dual_clip, agg=agg, ratio_level=ratio_level,
                                 backend=backend, **kw)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = fr.kl_penalty(logp, ref_logp, kl_kind, backend=backend)
        loss = loss + kl_coef * L.agg_loss(kl, mask, agg, **kw)
    loss = loss - entropy_coef * L.agg_loss(ent, mask, agg, **kw)
    stats = {"logp": logp, "entropy": ent, "kl": kl, **st,
             "entropy_mean": masked_mean(ent, mask), "kl_mean": masked_mean(kl, mask)}
    return loss, {k: v.detach() for k, v in stats.items()}


def _split(cfg):
    cfg = dict(cfg)
    opts = {k: cfg.pop(k) for k in ("adv_per_row", "float_mask", "seed") if k in cfg}
    use_ref = cfg.pop("ref", False)
    scale = cfg.pop("upstream", 1.0)
    return cfg, opts, use_ref, scale


def run_both(backend, cfg, *, inplace=False, composition_backend="reference"):
    """(fused loss, stats, dlogits of the base) and the same from the composition."""
    cfg, opts, use_ref, scale = _split(cfg)
    inp = make_inputs(**opts)
    args = (inp["tokens"], inp["old"], inp["adv"], inp["mask"])
    r = inp["ref"] if use_ref else None

    leaf = inp["base"].clone().requires_grad_(True)
    logits = leaf * 1.0  # an activation, as the lm_head output is (in-place needs a non-leaf)
    loss, stats = fused_ppo_loss(logits[:, :-1], *args, ref_logp=r, backend=backend,
                                 inplace_backward=inplace, **cfg)
    (loss * scale).backward()

    leaf2 = inp["base"].clone().requires_grad_(True)
    cfg.pop("grad_timing", None)  # where the fused op computes its gradient; not a loss option
    loss2, stats2 = composition(leaf2[:, :-1], *args, ref_logp=r, backend=composition_backend,
                                **cfg)
    (loss2 * scale).backward()
    return (loss, stats, leaf.grad), (loss2, stats2, leaf2.grad), inp


def check_equal(got, want, tol=TOL):
    (loss, stats, grad), (loss2, stats2, grad2) = got, want
    assert loss.dim() == 0 and loss.dtype == loss2.dtype
    assert_close("loss", loss, loss2, atol=tol, rtol=tol)
    assert_close("dlogits", grad, grad2, atol=tol, rtol=tol)
    assert torch.all(grad[:, -1] == 0), "the sliced-off position got a gradient"
    assert set(stats) == set(FUSED_STATS)
    for k in FUSED_STATS:
        assert not stats[k].requires_grad, f"stats[{k!r}] is not detached"
        assert_close(f"stats[{k!r}]", stats[k], stats2[k], atol=tol, rtol=tol)


CASES = {
    "default": dict(ref=True, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0, temperature=0.9),
    "plain": dict(),
    "clip-higher": dict(clip_low=0.2, clip_high=0.28, ref=True, kl_coef=0.05, upstream=2.5),
    "k1": dict(ref=True, kl_coef=0.1, kl_kind="k1"),
    "k2": dict(ref=True, kl_coef=0.2, kl_kind="k2", entropy_coef=0.02),
    "abs": dict(ref=True, kl_coef=0.1, kl_kind="abs"),
    "k3+-straight-through": dict(ref=True, kl_coef=0.1, kl_kind="low_var_kl+"),
    "kl-stats-only": dict(ref=True, kl_coef=0.0),
    "entropy-temperature": dict(entropy_coef=0.05, temperature=0.7, upstream=-0.5),
    "adv-per-row-dual": dict(adv_per_row=True, dual_clip=2.0, ref=True, kl_coef=0.1),
    "float-mask": dict(float_mask=True, entropy_coef=0.01, dual_clip=3.0),
    "gspo": dict(ratio_level="sequence", adv_per_row=True, ref=True, kl_coef=0.1,
                 entropy_coef=0.01, agg="seq-mean-token-mean"),
    "gspo-dual-token-adv": dict(ratio_level="sequence", dual_clip=3.0, clip_high=0.3,
                                upstream=3.0),
    "global-token-mean": dict(dp_size=2, batch_num_tokens=50, entropy_coef=0.01),
    "global-seq-norm": dict(agg="seq-mean-token-sum-norm", dp_size=4, global_batch_size=8,
                            loss_scale_factor=3.0, ref=True, kl_coef=0.1),
}


# ---------------------------------------------------------------------------------------------
# equality with the composition
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_composition(backend, case):
    got, want, _ = run_both(backend, CASES[case])
    check_equal(got, want)
    stats = got[1]
    if case == "default":  # the inputs do exercise the clip and the dual clip
        assert 0 < float(stats["clipfrac"]) < 1 and float(stats["clipfrac_lower"]) > 0
    if "ref" not in CASES[case]:
        assert torch.all(stats["kl"] == 0) and float(stats["kl_mean"]) == 0


@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("agg", L.AGG_MODES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_every_agg_mode(backend, agg, level):
    cfg = dict(agg=agg, ratio_level=level, ref=True, kl_coef=0.1, entropy_coef=0.01,
               dual_clip=3.0, seed=1)
    got, want, _ = run_both(backend, cfg)
    check_equal(got, want)


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_matches_composition_of_triton_ops(level):
    """The same against the separate ops' own Triton kernels."""
    cfg = dict(CASES["default"], ratio_level=level, agg="seq-mean-token-mean")
    got, want, _ = run_both("triton", cfg, composition_backend="triton")
    check_equal(got, want)


# ---------------------------------------------------------------------------------------------
# in-place gradient, upstream scaling, repeated backward, no-grad
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inplace_equals_out_of_place_without_new_buffers(level, monkeypatch):
    cfg = dict(CASES["default"], ratio_level=level, upstream=1.5)
    cfg, opts, _, scale = _split(cfg)
    inp = make_inputs(**opts)
    B, T1, V = inp["base"].shape
    args = (inp["tokens"], inp["old"], inp["adv"], inp["mask"])
    import fastrlhf.ops.fused_loss as mod
    real_empty = torch.empty
    grads, bufs = [], []
    for inplace in (False, True):
        big = []

        def spy(*a, **k):
            t = real_empty(*a, **k)
            if t.numel() >= B * (T1 - 1) * V:
                big.append(tuple(t.shape))
            return t

        leaf = inp["base"].clone().requires_grad_(True)
        logits = leaf * 1.0
        view = logits[:, :-1]
        copies = []
        real_contig = torch.Tensor.contiguous

        def contig_spy(self, *a, **k):
            if self.numel() >= view.numel():
                copies.append(tuple(self.shape))
            return real_contig(self, *a, **k)

        monkeypatch.setattr(mod.torch, "empty", spy)
        monkeypatch.setattr(torch.Tensor, "contiguous", contig_spy)
        loss, _ = fused_ppo_loss(view, *args, ref_logp=inp["ref"], backend="triton",
                                 inplace_backward=inplace, **cfg)
        (loss * scale).backward()
        monkeypatch.undo()
        assert copies == [], f"the logits were copied: {copies}"
        assert big == ([] if inplace else [(B, T1 - 1, V)]), f"[N, V] allocations: {big}"
        grads.append(leaf.grad)
        bufs.append(logits)
    assert_close("in-place dlogits", grads[1], grads[0], atol=TOL, rtol=TOL)
    # the gradient was written over the logits buffer itself (scaled by the upstream grad)
    assert_close("buffer holds the gradient", bufs[1][:, :-1], grads[0][:, :-1], atol=TOL,
                 rtol=TOL)
    assert_close("last position untouched", bufs[1][:, -1], inp["base"][:, -1], atol=0)


@pytest.mark.parametrize("backend", [b for b in backends(native=True) if b != "reference"])
@pytest.mark.parametrize("timing", ["forward", "backward"])
def test_inplace_path_is_the_dispatcher_path(backend, timing):
    """The in-place variants run eagerly without the dispatcher (registry.Op fast_eager), as the
    others: the same loss, stats and gradient as the registered op, and autograd still sees the
    logits overwritten -- another op that saved them for its backward raises, not a silently
    wrong gradient."""
    import fastrlhf.ops.fused_loss as mod
    inp = make_inputs(seed=11)
    args = (inp["tokens"], inp["old"], inp["adv"], inp["mask"])
    kw = dict(ref_logp=inp["ref"], kl_coef=0.1, entropy_coef=0.01, backend=backend,
              inplace_backward=True, grad_timing=timing)
    outs = []
    for fast in (True, False):
        leaf = inp["base"].clone().requires_grad_(True)
        if not fast:  # force the registered torch.library op
            for op in (mod._fused_ib, mod._deferred_ib):
                op.fast_eager = False
        try:
            loss, st = fused_ppo_loss(leaf[:, :-1] * 1.0, *args, **kw)
            (loss * 0.5).backward()
        finally:
            for op in (mod._fused_ib, mod._deferred_ib):
                op.fast_eager = True
        outs.append((loss.detach(), st["entropy_mean"], leaf.grad))
    for a, b, what in zip(outs[0], outs[1], ("loss", "entropy_mean", "dlogits")):
        assert_close(what, a, b, atol=0, rtol=0)
    leaf = inp["base"].clone().requires_grad_(True)
    logits = leaf[:, :-1] * 1.0
    other = (logits * logits).sum()  # saves logits for its backward
    loss, _ = fused_ppo_loss(logits, *args, **kw)
    if timing == "forward":  # the forward already wrote the gradient over the logits
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            other.backward()
    else:  # the logits are overwritten by the loss's backward
        loss.backward()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            other.backward()


@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("inplace", [False, True])
def test_repeated_backward_and_upstream_grad(backend, inplace):
    inp = make_inputs(seed=3)
    args = (inp["tokens"], inp["old"], inp["adv"], inp["mask"])
    kw = dict(ref_logp=inp["ref"], kl_coef=0.1, entropy_coef=0.01, backend=backend)
    leaf = inp["base"].clone().requires_grad_(True)
    loss, _ = fused_ppo_loss(leaf[:, :-1] * 1.0, *args, inplace_backward=inplace, **kw)
    (g1,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    g1 = g1.clone()
    (loss * 2.0).backward(retain_graph=True)
    (loss * -0.5).backward(retain_graph=True)
    loss.backward()
    assert_close("sum of three backwards", leaf.grad, 2.5 * g1, atol=TOL, rtol=TOL)
    leaf2 = inp["base"].clone().requires_grad_(True)
    want, _ = composition(leaf2[:, :-1], *args, ref_logp=inp["ref"], kl_coef=0.1,
                          entropy_coef=0.01)
    want.backward()
    assert_close("first backward", g1, leaf2.grad, atol=TOL, rtol=TOL)


@pytest.mark.skipif("native" not in backends(native=True), reason="needs the native backend")
@pytest.mark.parametrize("inplace", [False, True])
def test_bf16_gradient_scaled_by_the_unrounded_upstream(inplace):
    """Native: the bf16 gradient written in the forward, then scaled in the backward by an
    upstream gradient of 1/3, is round(g * float32(1/3)) element by element -- the factor is
    not first rounded to bf16 (0.33398, which would bias every element by +0.2%).  (The
    reference differentiates in fp32 and rounds once; the Triton path on CPU does not store a
    bf16 gradient first, so neither has this double rounding to check.)"""
    inp = make_inputs(seed=5)
    args = (inp["tokens"], inp["old"], inp["adv"], inp["mask"])
    x = inp["base"][:, :-1].contiguous().to(torch.bfloat16).requires_grad_(True)
    loss, _ = fused_ppo_loss(x * 1 if inplace else x, *args, ref_logp=inp["ref"],
                             kl_coef=0.1, inplace_backward=inplace, backend="native")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1 = g1.clone()
    third = torch.tensor(1 / 3, dtype=loss.dtype)
    (g3,) = torch.autograd.grad(loss * third, x)
    want = (g1.float() * third).to(torch.bfloat16)
    assert g3.dtype == torch.bfloat16 and torch.count_nonzero(g1) > 0
    assert torch.equal(g3, want), f"{int((g3 != want).sum())} of {g3.numel()} elements differ"


@pytest.mark.parametrize("backend", backends(native=True))
def test_no_grad_and_no_requires_grad_leave_logits_untouched(backend):
    inp = make_inputs(seed=4)
    args = (inp["tokens"], inp["old"], inp["adv"], inp["mask"])
    x = inp["base"].clone()
    want, wst = composition(x[:, :-1], *args, ref_logp=inp["ref"], kl_coef=0.1)
    with torch.no_grad():
        y = x.clone().requires_grad_(True)
        loss, st = fused_ppo_loss(y[:, :-1], *args, ref_logp=inp["ref"], kl_coef=0.1,
                                  inplace_backward=True, backend=backend)
    assert torch.equal(y.detach(), x), "logits were overwritten under no_grad"
    assert not loss.requires_grad
    assert_close("no-grad loss", loss, want, atol=TOL, rtol=TOL)
    assert_close("no-grad approx_kl", st["approx_kl"], wst["approx_kl"], atol=TOL, rtol=TOL)
    loss, _ = fused_ppo_loss(x[:, :-1], *args, ref_logp=inp["ref"], kl_coef=0.1,
                             inplace_backward=True, backend=backend)
    assert torch.equal(x, inp["base"]) and not loss.requires_grad
    assert_close("loss without grad", loss, want, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_inputs_are_constants_even_when_they_require_grad(backend, level):
    """old_logp, advantages and ref_logp are constants of the loss: inputs that require grad
    (e.g. a value head's advantages left attached) get no gradient, change nothing, and the
    logits' gradient is the one for detached inputs."""
    inp = make_inputs(seed=6)
    kw = dict(ref_logp=inp["ref"], kl_coef=0.1, ratio_level=level, backend=backend)
    x = inp["base"][:, :-1].clone().requires_grad_(True)
    loss, st = fused_ppo_loss(x, inp["tokens"], inp["old"], inp["adv"], inp["mask"], **kw)
    (want,) = torch.autograd.grad(loss, x)
    old, adv, rl = (inp[k].clone().requires_grad_(True) for k in ("old", "adv", "ref"))
    loss2, st2 = fused_ppo_loss(x, inp["tokens"], old, adv, inp["mask"],
                                **{**kw, "ref_logp": rl})
    assert torch.equal(loss2.detach(), loss.detach())
    loss2.backward()
    assert old.grad is None and adv.grad is None and rl.grad is None
    assert torch.equal(x.grad, want)
    assert all(not v.requires_grad for v in st2.values())


@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("inplace", [False, True])
def test_non_unit_vocab_stride(backend, inplace):
    """A transposed [B, T, V] view (vocab not contiguous) is copied once and still correct (the
    in-place request then falls back to a fresh gradient buffer)."""
    inp = make_inputs(seed=10)
    B, T1, V = inp["base"].shape
    store = inp["base"].permute(2, 0, 1).contiguous().requires_grad_(True)   # [V, B, T + 1]
    x = store.permute(1, 2, 0)
    assert x.stride(-1) != 1
    args = (inp["tokens"], inp["old"], inp["adv"], inp["mask"])
    loss, st = fused_ppo_loss(x[:, :-1], *args, entropy_coef=0.01, inplace_backward=inplace,
                              backend=backend)
    loss.backward()
    leaf2 = inp["base"].clone().requires_grad_(True)
    want, wst = composition(leaf2[:, :-1], *args, entropy_coef=0.01)
    want.backward()
    assert_close("loss", loss, want, atol=TOL, rtol=TOL)
    assert_close("dlogits", store.grad.permute(1, 2, 0), leaf2.grad, atol=TOL, rtol=TOL)
    assert torch.equal(store.detach().permute(1, 2, 0), inp["base"]), "the input was modified"


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
def test_custom_ops_opcheck():
    import fastrlhf.ops.fused_loss as F
    B, T, V = 2, 3, 13
    x = torch.randn(B, T, V, device=DEVICE, requires_grad=True)
    tok = torch.randint(0, V, (B, T), device=DEVICE)
    old, r = -torch.rand(B, T, device=DEVICE) * 3, -torch.rand(B, T, device=DEVICE) * 3
    adv = torch.randn(B, T, device=DEVICE)
    mask = torch.rand(B, T, device=DEVICE) < 0.7
    coef = torch.full((B,), 0.25, device=DEVICE)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for write_grad in (True, False):
        args = (x, tok, old, adv, mask, r, coef, 0.1, "k3", 0.01, 0.8, 1.2, 3.0, 1.0, False,
                -100, write_grad, None, "triton")
        torch.library.opcheck(F._fused.op, args, test_utils=utils)
    torch.library.opcheck(F._scale_.op, (torch.randn(B, T, V, device=DEVICE),
                                         torch.ones((), device=DEVICE),
                                         torch.full((), 2.0, device=DEVICE), "triton"))


# ---------------------------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------------------------

# (the reference differentiates the composition: it has one timing)
@pytest.mark.parametrize("backend,timing", [(b, t) for b in backends(native=True)
                                            for t in ("forward", "backward")
                                            if b != "reference" or t == "forward"])
def test_gradcheck_float64(backend, timing):
    # Token level only: GSPO's gradient is verl's stop-gradient form (d ratio / d logp_t = ratio,
    # not ratio / n), by design not the derivative of its value; the composition tests hold it
    # against the reference's autograd instead.
    g = torch.Generator().manual_seed(5)
    B, T, V = 2, 3, 11
    x = torch.randn(B, T + 1, V, generator=g, dtype=F64).to(DEVICE).requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    lp = ref.token_logprobs(x.detach()[:, :-1], tokens)
    old = (lp + torch.randn(B, T, generator=g, dtype=F64) * 0.3).to(DEVICE)
    r = (lp + torch.randn(B, T, generator=g, dtype=F64) * 0.3).to(DEVICE)
    adv = torch.randn(B, T, generator=g, dtype=F64).to(DEVICE)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool, device=DEVICE)

    def f(x, inplace):
        loss, _ = fused_ppo_loss(x[:, :-1] * 1.0, tokens, old, adv, mask, ref_logp=r,
                                 kl_coef=0.2, entropy_coef=0.05, temperature=0.8, clip_low=0.25,
                                 dual_clip=3.0, agg="seq-mean-token-mean", inplace_backward=inplace,
                                 backend=backend, grad_timing=timing)
        return loss

    fast = backend == "triton"  # a random directional derivative: few interpreted launches
    assert torch.autograd.gradcheck(lambda x: f(x, False), (x,), eps=1e-6, atol=1e-7,
                                    fast_mode=fast)
    # in place, the deferred backward writes over the logits it reads: gradcheck's repeated
    # backward of one graph raises there (test_fused_loss_grad_timing.test_repeated_backward)
    if timing == "forward":
        assert torch.autograd.gradcheck(lambda x: f(x, True), (x,), eps=1e-6, atol=1e-7,
                                        fast_mode=fast)


# ---------------------------------------------------------------------------------------------
# masking, NaN, ignored tokens, low precision, empty inputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("agg", L.AGG_MODES)
def test_fully_masked_batch_is_zero(backend, agg):
    inp = make_inputs(B=2, T=4, V=40, seed=6)
    leaf = inp["base"].clone().requires_grad_(True)
    mask = torch.zeros(2, 4, dtype=torch.bool, device=DEVICE)
    loss, st = fused_ppo_loss(leaf[:, :-1], inp["tokens"], inp["old"], inp["adv"], mask,
                              ref_logp=inp["ref"], kl_coef=0.1, entropy_coef=0.1, agg=agg,
                              backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.all(leaf.grad == 0)
    for k in ("clipfrac", "clipfrac_lower", "approx_kl", "entropy_mean", "kl_mean"):
        assert float(st[k]) == 0.0, k


@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_nan_outside_the_mask_is_ignored(backend, level):
    inp = make_inputs(seed=7)
    base = inp["base"].clone()
    base[1, 2, 5] = float("nan")          # row 1 is fully masked
    old, adv, r = inp["old"].clone(), inp["adv"].clone(), inp["ref"].clone()
    off = ~inp["mask"]
    old[off] = float("nan")
    adv[off] = float("nan")
    r[off] = float("nan")
    tokens = inp["tokens"].clone()
    tokens[off] = -100                     # padding ids at masked positions
    leaf = base.clone().requires_grad_(True)
    loss, st = fused_ppo_loss(leaf[:, :-1], tokens, old, adv, inp["mask"], ref_logp=r,
                              kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0, ratio_level=level,
                              backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    for k in ("clipfrac", "clipfrac_lower", "approx_kl", "entropy_mean", "kl_mean"):
        assert torch.isfinite(st[k]), k
    assert torch.isfinite(leaf.grad).all()
    assert torch.all(leaf.grad[:, :-1][off] == 0), "masked positions got a gradient"
    # equal to the same batch with clean values at the masked positions
    clean = make_inputs(seed=7)
    leaf2 = clean["base"].clone().requires_grad_(True)
    want, _ = composition(leaf2[:, :-1], clean["tokens"], clean["old"], clean["adv"],
                          clean["mask"], ref_logp=clean["ref"], kl_coef=0.1, entropy_coef=0.01,
                          dual_clip=3.0, ratio_level=level)
    want.backward()
    assert_close("loss", loss, want, atol=TOL, rtol=TOL)
    assert_close("dlogits", leaf.grad, leaf2.grad, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("backend", backends(native=True))
def test_nan_inside_the_mask_stays_in_its_row(backend):
    inp = make_inputs(seed=8)
    base = inp["base"].clone()
    base[0, 4, 3] = float("nan")
    assert inp["mask"][0, 4]
    leaf = base.requires_grad_(True)
    loss, st = fused_ppo_loss(leaf[:, :-1], inp["tokens"], inp["old"], inp["adv"], inp["mask"],
                              backend=backend)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(st["logp"][0, 4]) and torch.isnan(st["entropy"][0, 4])
    assert torch.isnan(leaf.grad[0, 4]).all()
    others = torch.ones(base.shape[:2], dtype=torch.bool)
    others[0, 4] = False
    assert torch.isfinite(leaf.grad[others]).all()


@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_logits_vs_float64(backend, dtype):
    inp = make_inputs(dtype=dtype, seed=9, V=150)
    args = (inp["tokens"], inp["old"].float(), inp["adv"].float(), inp["mask"])
    cfg = dict(ref_logp=inp["ref"].float(), kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    leaf = inp["base"].clone().requires_grad_(True)
    loss, st = fused_ppo_loss(leaf[:, :-1], *args, backend=backend, **cfg)
    loss.backward()
    assert loss.dtype == torch.float32 and st["logp"].dtype == torch.float32
    assert leaf.grad.dtype == dtype
    leaf64 = inp["base"].to(F64).requires_grad_(True)   # the same (rounded) values
    want, wst = composition(leaf64[:, :-1], inp["tokens"], inp["old"], inp["adv"], inp["mask"],
                            ref_logp=inp["ref"], kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    want.backward()
    assert_close("loss", loss, want, atol=1e-5, rtol=1e-5)
    assert_close("logp", st["logp"], wst["logp"], atol=2e-5, rtol=2e-5)
    tol = 2e-6 if dtype == torch.float32 else 1e-3  # gradient storage rounding
    assert_close("dlogits", leaf.grad, leaf64.grad, atol=tol, rtol=1e-2)


@pytest.mark.parametrize("backend", backends(native=True))
def test_empty_batch(backend):
    for B, T in ((0, 5), (3, 0)):
        x = torch.randn(B, T, 13, device=DEVICE, requires_grad=True)
        z = torch.zeros(B, T, device=DEVICE)
        loss, st = fused_ppo_loss(x, torch.zeros(B, T, dtype=torch.long, device=DEVICE), z, z,
                                  z.bool(), backend=backend)
        loss.backward()
        assert float(loss.detach()) == 0.0 and x.grad.shape == x.shape
        assert st["logp"].shape == (B, T)


# ---------------------------------------------------------------------------------------------
# torch.compile, autocast, a real (tiny) model
# ---------------------------------------------------------------------------------------------

class _Tiny(torch.nn.Module):
    def __init__(self, H, V, **kw):
        super().__init__()
        self.lm_head = torch.nn.Linear(H, V)
        self.kw = kw

    def forward(self, h, tokens, old, adv, mask, ref_logp):
        logits = self.lm_head(h)[:, :-1]
        loss, st = fused_ppo_loss(logits, tokens, old, adv, mask, ref_logp=ref_logp, **self.kw)
        return loss, st["clipfrac"], st["entropy"]


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
@pytest.mark.parametrize("inplace,level,timing", [
    (False, "token", "forward"), (True, "token", "forward"), (False, "sequence", "forward"),
    (True, "sequence", "forward"), (True, "token", "backward"), (False, "sequence", "backward")])
def test_torch_compile_fullgraph(inplace, level, timing):
    torch._dynamo.reset()
    H, V, B, T = 8, 29, 2, 5
    torch.manual_seed(0)
    m = _Tiny(H, V, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0, ratio_level=level,
              backend="triton", inplace_backward=inplace, grad_timing=timing).to(DEVICE)
    h = torch.randn(B, T + 1, H, device=DEVICE)
    tokens = torch.randint(0, V, (B, T), device=DEVICE)
    old = -torch.rand(B, T, device=DEVICE) * 3
    adv = torch.randn(B, T, device=DEVICE)
    mask = torch.rand(B, T, device=DEVICE) < 0.8
    r = -torch.rand(B, T, device=DEVICE) * 3
    eager = m(h, tokens, old, adv, mask, r)
    (eager[0] * 2.0).backward()
    g_eager = m.lm_head.weight.grad.clone()
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(h, tokens, old, adv, mask, r)
    (out[0] * 2.0).backward()
    for name, a, e in zip(("loss", "clipfrac", "entropy"), out, eager):
        assert_close(f"compiled {name}", a, e, atol=1e-6)
    assert_close("compiled lm_head grad", m.lm_head.weight.grad, g_eager, atol=1e-6)


@pytest.mark.parametrize("backend", backends(native=True))
def test_autocast(backend):
    H, V, B, T = 16, 37, 2, 6
    torch.manual_seed(1)
    lin = torch.nn.Linear(H, V).to(DEVICE)
    h = torch.randn(B, T + 1, H, device=DEVICE)
    tokens = torch.randint(0, V, (B, T), device=DEVICE)
    old = -torch.rand(B, T, device=DEVICE) * 4
    adv = torch.randn(B, device=DEVICE)
    mask = torch.rand(B, T, device=DEVICE) < 0.8
    grads, losses = [], []
    for fused in (True, False):
        lin.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            logits = lin(h)[:, :-1]
            assert logits.dtype == torch.bfloat16
            if fused:
                loss, _ = fused_ppo_loss(logits, tokens, old, adv, mask, entropy_coef=0.01,
                                         backend=backend)
            else:
                loss, _ = composition(logits, tokens, old, adv, mask, entropy_coef=0.01)
        assert loss.dtype == torch.float32
        loss.backward()
        losses.append(loss.detach())
        grads.append(lin.weight.grad.clone())
    assert_close("autocast loss", losses[0], losses[1], atol=1e-5, rtol=1e-5)
    assert_close("autocast weight grad", grads[0], grads[1], atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("inplace", [False, True])
def test_tiny_llama_parameter_grads(backend, inplace):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(2)
    model = transformers.LlamaForCausalLM(cfg).to(DEVICE, F64)
    B, T1 = 3, 10
    ids = torch.randint(0, cfg.vocab_size, (B, T1), device=DEVICE)
    tokens = ids[:, 1:]
    with torch.no_grad():
        lp = ref.token_logprobs(model(ids).logits[:, :-1], tokens)
    old = lp + 0.3 * torch.randn_like(lp)
    r = lp + 0.3 * torch.randn_like(lp)
    adv = torch.randn(B, device=DEVICE, dtype=F64)
    mask = torch.ones(B, T1 - 1, dtype=torch.bool, device=DEVICE)
    mask[0, :3] = False
    mask[2, 6:] = False
    kw = dict(ref_logp=r, kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0,
              agg="seq-mean-token-mean", temperature=0.9)
    grads = []
    for fused in (True, False):
        model.zero_grad()
        logits = model(ids).logits[:, :-1]
        if fused:
            loss, _ = fused_ppo_loss(logits, tokens, old, adv, mask, backend=backend,
                                     inplace_backward=inplace, **kw)
        else:
            loss, _ = composition(logits, tokens, old, adv, mask, **kw)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert_close(f"grad {n}", grads[0][n], grads[1][n], atol=1e-10, rtol=1e-8)
    assert any(float(g.abs().max()) > 0 for g in grads[0].values())


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends(native=True))
def test_bad_inputs(backend):
    inp = make_inputs(B=2, T=3, V=10, dtype=torch.float32)
    x = inp["base"][:, :-1]
    tok, old, adv, mask, r = inp["tokens"], inp["old"], inp["adv"], inp["mask"], inp["ref"]

    def call(**over):
        a = dict(logits=x, tokens=tok, old_logp=old, advantages=adv, mask=mask)
        kw = {k: over.pop(k) for k in list(over) if k not in a}
        a.update(over)
        return fused_ppo_loss(a["logits"], a["tokens"], a["old_logp"], a["advantages"],
                              a["mask"], backend=backend, **kw)

    with pytest.raises(ValueError, match=r"logits must be 3-D \[B, T, V\]"):
        call(logits=x.reshape(6, 10))
    with pytest.raises(TypeError, match="logits must have dtype"):
        call(logits=x.long())
    with pytest.raises(ValueError, match="non-empty vocab"):
        call(logits=x[..., :0])
    with pytest.raises(ValueError, match=r"tokens must have shape \(2, 3\)"):
        call(tokens=tok[:, :2])
    with pytest.raises(TypeError, match="tokens must have dtype"):
        call(tokens=tok.float())
    with pytest.raises(ValueError, match=r"old_logp must have shape \(2, 3\)"):
        call(old_logp=old[:, :2])
    with pytest.raises(ValueError, match="advantages must have shape"):
        call(advantages=adv[:, :2])
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\)"):
        call(mask=mask[:1])
    with pytest.raises(ValueError, match=r"ref_logp must have shape \(2, 3\)"):
        call(ref_logp=r.t())
    with pytest.raises(ValueError, match="unknown aggregation mode 'seq-mean'"):
        call(agg="seq-mean")
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        call(batch_size=4)
    with pytest.raises(ValueError, match="unknown kind 'k4'"):
        call(ref_logp=r, kl_kind="k4")
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logp"):
        call(kl_coef=0.1)
    for v in (0.0, -0.1):
        with pytest.raises(ValueError, match="clip_low must be a finite number > 0"):
            call(clip_low=v)
    with pytest.raises(ValueError, match="clip_high must be a finite number > 0"):
        call(clip_high=0.0)
    for v in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip must be a finite number > 1"):
            call(dual_clip=v)
    for v in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            call(temperature=v)
    with pytest.raises(ValueError, match="ratio_level must be one of"):
        call(ratio_level="seq")
    with pytest.raises(ValueError, match="entropy_coef must be finite"):
        call(entropy_coef=float("inf"))
    with pytest.raises(TypeError, match="kl_coef must be a float"):
        call(ref_logp=r, kl_coef="0.1")
    with pytest.raises(TypeError, match="inplace_backward must be a bool"):
        call(inplace_backward=1)
    with pytest.raises(ValueError, match="global_batch_size is required"):
        call(agg="seq-mean-token-mean", dp_size=2)
    with pytest.raises(ValueError, match="old_logp is on meta"):
        call(old_logp=old.to("meta"))
    bad = tok.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match=r"id 10 \(flat position 5\) outside \[0, 10\)"):
        call(tokens=bad)


# ---------------------------------------------------------------------------------------------
# GPU: bf16 at a realistic vocabulary against a float32 reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_CUDA, reason="CUDA only")
@pytest.mark.parametrize("V", [128256, 151936])
def test_cuda_bf16_large_vocab(V):
    B, T = 2, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    base = (torch.randn(B, T + 1, V, device="cuda", generator=g) * 2).bfloat16()
    tokens = torch.randint(0, V, (B, T), device="cuda", generator=g)
    lp = ref.token_logprobs(base[:, :-1].float(), tokens)
    old = lp + 0.3 * torch.randn(B, T, device="cuda", generator=g)
    r = lp + 0.3 * torch.randn(B, T, device="cuda", generator=g)
    adv = torch.randn(B, T, device="cuda", generator=g)
    mask = torch.rand(B, T, device="cuda", generator=g) < 0.8
    kw = dict(ref_logp=r, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    for inplace in (False, True):
        leaf = base.clone().requires_grad_(True)
        loss, st = fused_ppo_loss(leaf[:, :-1] * 1, tokens, old, adv, mask,
                                  inplace_backward=inplace, **kw)
        loss.backward()
        leaf32 = base.float().requires_grad_(True)
        want, wst = composition(leaf32[:, :-1], tokens, old, adv, mask, **kw)
        want.backward()
        assert_close("loss", loss, want, atol=1e-5, rtol=1e-4)
        assert_close("logp", st["logp"], wst["logp"], atol=1e-4, rtol=1e-5)
        assert_close("entropy", st["entropy"], wst["entropy"], atol=1e-4, rtol=1e-5)
        assert_close("dlogits", leaf.grad, leaf32.grad, atol=1e-6, rtol=1e-2)


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_allocates_nothing_logits_sized(inplace):
    """No op in backward may produce a logits-sized tensor (e.g. autograd materializing a zero
    gradient for the non-differentiable outputs); in-place mode allocates none in forward either."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Big(TorchDispatchMode):
        def __init__(self, limit):
            super().__init__()
            self.limit, self.seen = limit, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat = list(args) + list((kwargs or {}).values())
            old = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                # a new buffer (views and in-place results alias an argument's storage)
                if (isinstance(t, torch.Tensor) and t.numel() >= self.limit
                        and t.untyped_storage().data_ptr() not in old):
                    self.seen.append(str(func))
            return out

    B, T, V = 2, 5, 61
    tokens = torch.randint(0, V, (B, T), device=DEVICE)
    old = torch.randn(B, T, device=DEVICE) - 3
    adv = torch.randn(B, T, device=DEVICE)
    mask = torch.ones(B, T, device=DEVICE)
    leaf = torch.randn(B, T, V, device=DEVICE, requires_grad=True)
    view = leaf * 1.0  # the model's activation (its own backward is the caller's business)
    fwd = Big(B * T * V)
    with fwd:
        loss, _ = fused_ppo_loss(view, tokens, old, adv, mask, entropy_coef=0.01,
                                 inplace_backward=inplace, backend="triton")
    if inplace:
        assert fwd.seen == [], f"in-place forward made logits-sized tensors: {fwd.seen}"
    bwd = Big(B * T * V)
    with bwd:
        g, = torch.autograd.grad(loss, view)
    assert bwd.seen == [], f"backward made logits-sized tensors: {bwd.seen}"
    assert torch.isfinite(g).all() and g.abs().sum() > 0
