"""linear_token_logprobs / fused_linear_ppo_loss (lm_head fused in) against the float64
references, on every backend available.

Sizes are chosen so that the Triton kernels (16 x 32 x 16 tiles in the interpreter) run several
row tiles, vocab tiles and K steps, an H that is not a multiple of the K step, three vocab splits
in the forward and several vocab chunks in the backward.

GPU tolerances: fp32 inputs multiply in tf32 unless torch's float32 matmul precision is "highest"
(the CUDA tests set it), bf16 in bf16 tensor cores with fp32 accumulation; the values are held to
1e-4 (fp32, "highest") and the bf16 gradients to 2% of their largest entry (bf16 storage of the
gradients and of the logits-gradient scratch).
"""


import pytest
import torch

import fastrlhf.reference as R
from fastrlhf.ops.fused_linear import fused_linear_ppo_loss, linear_token_logprobs
from helpers import DEVICE, HAS_CUDA, TRITON_OK, assert_close, backends

# values: the kernels accumulate in fp32 (fp64) whatever the input dtype
VAL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def _inputs(lead, H, V, dtype, *, seed, bias=True, wscale=0.4, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * wscale
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    tokens = torch.randint(0, V, lead, generator=g)
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), tokens.to(device)


def _leaf(t, dtype=None):
    if t is None:
        return None
    t = t.detach().clone()
    return (t if dtype is None else t.to(dtype)).requires_grad_(True)


def _grads(outs, upstream, leaves):
    loss = sum((o * u).sum() for o, u in zip(outs, upstream))
    live = [t for t in leaves if t is not None]
    gs = iter(torch.autograd.grad(loss, live))
    return [None if t is None else next(gs) for t in leaves]


def _ref64(hidden, weight, bias, tokens, temperature, ignore_index=-100):
    """The reference in float64 on the very same input values, with its leaves."""
    leaves = [_leaf(hidden, torch.float64), _leaf(weight, torch.float64),
              _leaf(bias, torch.float64)]
    lp, ent = R.linear_token_logprobs(*leaves[:2], tokens, leaves[2], temperature, True,
                                      ignore_index)
    return lp, ent, leaves


def _rel_close(name, got, expect, rel):
    """bf16 gradients: error relative to the largest entry of the expected tensor."""
    scale = float(expect.detach().abs().max())
    assert_close(name, got, expect, atol=rel * max(scale, 1e-30))


# ---------------------------------------------------------------------------------------------
# forward and gradients against float64
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead,H,V", [((13,), 40, 203), ((3, 23), 33, 97), ((1,), 16, 1)])
def test_forward_and_grads_match_float64(backend, dtype, bias, lead, H, V):
    T = 0.7
    h, w, b, tok = _inputs(lead, H, V, dtype, seed=V + H, bias=bias)
    if V > 1:
        tok.view(-1)[1] = -100
    leaves = [_leaf(h), _leaf(w), _leaf(b)]
    logp, ent = linear_token_logprobs(leaves[0], leaves[1], tok, bias=leaves[2], temperature=T,
                                      return_entropy=True, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert logp.dtype == acc and ent.dtype == acc
    assert logp.shape == tok.shape and ent.shape == tok.shape
    rl, re, rleaves = _ref64(h, w, b, tok, T)
    tol = VAL_TOL[dtype]
    assert_close("logp", logp, rl, atol=tol, rtol=tol)
    assert_close("entropy", ent, re, atol=tol, rtol=tol)
    if V > 1:
        assert float(logp.detach().view(-1)[1]) == 0.0
    up = [torch.randn(tok.shape, dtype=acc, device=DEVICE) for _ in range(2)]
    got = _grads((logp, ent), up, leaves)
    expect = _grads((rl, re), [u.double() for u in up], rleaves)
    for name, g, e, leaf in zip(("dhidden", "dweight", "dbias"), got, expect, leaves):
        if leaf is None:
            continue
        assert g.dtype == dtype and g.shape == leaf.shape
        if dtype in (torch.bfloat16, torch.float16):
            _rel_close(name, g, e, 2e-2)
        else:
            gt = 1e-10 if dtype == torch.float64 else 2e-5
            assert_close(name, g, e, atol=gt, rtol=gt)


@pytest.mark.parametrize("backend", backends())
def test_gradcheck_float64(backend):
    B, T, H, V = 2, 3, 5, 37  # Triton: 2 vocab chunks in the backward, 2 splits in the forward
    h, w, b, tok = _inputs((B, T + 1), H, V, torch.float64, seed=3)
    tok = tok[:, :-1]
    tok[1, 0] = -100
    h, w, b = (t.requires_grad_(True) for t in (h, w, b))

    def f(h, w, b):
        return linear_token_logprobs(h[:, :-1], w, tok, bias=b, temperature=0.8,
                                     return_entropy=True, backend=backend)

    # fast mode (random projections of the Jacobian) keeps the interpreter run short
    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-7,
                                    fast_mode=backend == "triton" and not HAS_CUDA)


@pytest.mark.parametrize("backend", backends())
def test_strided_hidden_is_read_in_place(backend, monkeypatch):
    B, T, H, V = 3, 5, 24, 70
    base, w, b, _ = _inputs((B, T + 1), H, V, torch.float32, seed=5)
    x = base[:, :-1]  # the trainer's slice: non-contiguous leading dims
    tok = torch.randint(0, V, (B, T), device=DEVICE)
    copies = []
    real_contig = torch.Tensor.contiguous

    def spy(self, *a, **k):
        if self.numel() >= x.numel() and self.shape[-1] == H:
            copies.append(tuple(self.shape))
        return real_contig(self, *a, **k)

    leaf = _leaf(base)
    monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    logp, ent = linear_token_logprobs(leaf[:, :-1], w, tok, bias=b, return_entropy=True,
                                      backend=backend)
    (logp.sum() + ent.sum()).backward()
    monkeypatch.undo()
    if backend == "triton":
        assert copies == [], f"hidden was copied: {copies}"
    rl, re, rleaves = _ref64(x, w, b, tok, 1.0)
    assert_close("logp", logp, rl, atol=2e-5, rtol=2e-5)
    assert_close("entropy", ent, re, atol=2e-5, rtol=2e-5)
    (rl.sum() + re.sum()).backward()
    assert_close("dhidden", leaf.grad[:, :-1], rleaves[0].grad, atol=2e-5, rtol=2e-5)
    assert torch.all(leaf.grad[:, -1] == 0), "the sliced-off position got a gradient"
    # three non-mergeable leading dims (one transposed)
    y = torch.randn(4, 3, 5, H, device=DEVICE)[:, ::2, 1:].transpose(0, 1)
    ty = torch.randint(0, V, y.shape[:-1], device=DEVICE)
    assert_close("logp 3-d view", linear_token_logprobs(y, w, ty, backend=backend),
                 _ref64(y, w, None, ty, 1.0)[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", backends())
def test_ignore_index(backend):
    H, V = 20, 45
    h, w, b, tok = _inputs((6,), H, V, torch.float32, seed=11)
    tok[[1, 4]] = 7  # a custom ignore id that is also a valid vocab id
    hl = _leaf(h)
    logp, ent = linear_token_logprobs(hl, w, tok, bias=b, ignore_index=7, return_entropy=True,
                                      backend=backend)
    assert torch.all(logp[[1, 4]] == 0)
    rl, re, _ = _ref64(h, w, b, tok, 1.0, ignore_index=7)
    assert_close("logp", logp, rl, atol=2e-5)
    assert_close("entropy at ignored positions still computed", ent, re, atol=2e-5)
    assert torch.all(ent[[1, 4]] > 0)
    logp.sum().backward()
    assert torch.all(hl.grad[[1, 4]] == 0), "ignored positions received a logp gradient"
    assert torch.all(hl.grad[[0, 2, 3, 5]].abs().sum(-1) > 0)


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
@pytest.mark.parametrize("bias", [False, True])
def test_equals_token_logprobs_on_materialized_logits(bias):
    import fastrlhf as fr
    B, T, H, V = 2, 6, 36, 150
    h, w, b, tok = _inputs((B, T), H, V, torch.float32, seed=17, bias=bias)
    tok[0, 2] = -100
    l1 = [_leaf(h), _leaf(w), _leaf(b)]
    lp1, e1 = linear_token_logprobs(l1[0], l1[1], tok, bias=l1[2], temperature=1.3,
                                    return_entropy=True, backend="triton")
    l2 = [_leaf(h), _leaf(w), _leaf(b)]
    logits = R.linear_logits(*l2[:2], l2[2])
    lp2, e2 = fr.token_logprobs(logits, tok, temperature=1.3, return_entropy=True,
                                backend="triton")
    assert_close("logp", lp1, lp2, atol=1e-5, rtol=1e-5)
    assert_close("entropy", e1, e2, atol=1e-5, rtol=1e-5)
    up = [torch.randn(B, T, device=DEVICE) for _ in range(2)]
    for name, g1, g2 in zip(("dhidden", "dweight", "dbias"), _grads((lp1, e1), up, l1),
                            _grads((lp2, e2), up, l2)):
        if g1 is not None:
            assert_close(name, g1, g2, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
def test_chunking_is_exact_deterministic_and_never_allocates_n_by_v(monkeypatch):
    from fastrlhf.kernels import fused_linear as k
    N, H, V = 13, 40, 203  # scratch of 2 N H elements: 64 of 203 columns per chunk
    h, w, b, tok = _inputs((N,), H, V, torch.float32, seed=23)
    up = [torch.randn(N, device=DEVICE) for _ in range(2)]
    shapes = []
    real_empty = torch.empty

    def spy(*a, **kw):
        t = real_empty(*a, **kw)
        shapes.append(tuple(t.shape))
        return t

    def run(chunk):
        monkeypatch.setattr(k, "chunk_columns",
                            lambda n, hh, vv, dt: chunk or real_chunk(n, hh, vv, dt))
        leaves = [_leaf(h), _leaf(w), _leaf(b)]
        monkeypatch.setattr(k.torch, "empty", spy)
        lp, ent = linear_token_logprobs(leaves[0], leaves[1], tok, bias=leaves[2],
                                        return_entropy=True, backend="triton")
        gs = _grads((lp, ent), up, leaves)
        monkeypatch.setattr(k.torch, "empty", real_empty)
        return [lp, ent] + gs

    real_chunk = k.chunk_columns
    assert real_chunk(N, H, V, torch.float32) < V
    shapes.clear()
    a = run(None)
    assert not any(V in s and N in s for s in shapes), f"an [N, V] buffer was allocated: {shapes}"
    assert any(s == (N, real_chunk(N, H, V, torch.float32)) for s in shapes), shapes
    b2 = run(None)
    for x, y in zip(a, b2):
        assert torch.equal(x, y), "two identical runs differ"
    one = run(224)  # a single chunk covering the vocab
    for name, x, y in zip(("logp", "entropy", "dhidden", "dweight", "dbias"), a, one):
        assert_close(f"{name}: chunked vs one chunk", x, y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", backends())
def test_only_requested_gradients(backend, monkeypatch):
    if backend == "triton":  # an output nobody differentiates adds no term to the backward
        from fastrlhf.kernels import fused_linear as k
        seen = []
        real_bwd = k.linear_logprobs_bwd

        def spy(*a):
            seen.append((a[6] is not None, a[7] is not None, a[12:15]))
            return real_bwd(*a)
        monkeypatch.setattr(k, "linear_logprobs_bwd", spy)
    H, V = 16, 50
    h, w, b, tok = _inputs((2, 5), H, V, torch.float32, seed=29)
    hl = _leaf(h)
    logp = linear_token_logprobs(hl, w, tok, bias=b, backend=backend)  # frozen lm_head
    logp.sum().backward()
    rl, _, rleaves = _ref64(h, w, b, tok, 1.0)
    rl.sum().backward()
    assert_close("dhidden", hl.grad, rleaves[0].grad, atol=2e-5, rtol=2e-5)
    wl, bl = _leaf(w), _leaf(b)
    ent = linear_token_logprobs(h, wl, tok, bias=bl, return_entropy=True, backend=backend)[1]
    ent.sum().backward()
    _, re, rleaves = _ref64(h, w, b, tok, 1.0)
    re.sum().backward()
    assert_close("dweight (entropy only)", wl.grad, rleaves[1].grad, atol=2e-5, rtol=2e-5)
    assert_close("dbias (entropy only)", bl.grad, rleaves[2].grad, atol=2e-5, rtol=2e-5)
    bl2 = _leaf(b)
    linear_token_logprobs(h, w, tok, bias=bl2, backend=backend).sum().backward()
    rl, _, rleaves = _ref64(h, w, b, tok, 1.0)
    rl.sum().backward()
    assert_close("dbias alone", bl2.grad, rleaves[2].grad, atol=2e-5, rtol=2e-5)
    if backend == "triton":  # (dlogp given, dent given, (need dh, need dw, need db))
        assert seen == [(True, False, (True, False, False)), (False, True, (False, True, True)),
                        (True, False, (False, False, True))], seen


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", backends())
def test_neg_inf_bias_nan_rows_and_empty(backend):
    H, V = 20, 90
    h, w, b, tok = _inputs((5,), H, V, torch.float32, seed=31)
    b[::3] = float("-inf")  # vocab entries masked through the bias
    tok[tok % 3 == 0] += 1
    bl = _leaf(b)
    logp, ent = linear_token_logprobs(h, w, tok, bias=bl, return_entropy=True, backend=backend)
    rl, re, rleaves = _ref64(h, w, b, tok, 1.0)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert_close("logp", logp, rl, atol=2e-5, rtol=2e-5)
    assert_close("entropy", ent, re, atol=2e-5, rtol=2e-5)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(bl.grad).all() and torch.all(bl.grad[::3] == 0)
    # NaN in one hidden row stays in that row
    h2 = h.clone()
    h2[2, 5] = float("nan")
    lp2, e2 = linear_token_logprobs(h2, w, tok, return_entropy=True, backend=backend)
    assert torch.isnan(lp2[2]) and torch.isnan(e2[2])
    keep = [0, 1, 3, 4]
    assert torch.isfinite(lp2[keep]).all() and torch.isfinite(e2[keep]).all()
    # no rows
    he = _leaf(torch.randn(0, 4, H, device=DEVICE))
    we = _leaf(w)
    lp0, e0 = linear_token_logprobs(he, we, torch.zeros(0, 4, dtype=torch.long, device=DEVICE),
                                    return_entropy=True, backend=backend)
    assert lp0.shape == (0, 4) and e0.shape == (0, 4)
    (lp0.sum() + e0.sum()).backward()
    assert torch.all(we.grad == 0) and he.grad.shape == he.shape


@pytest.mark.parametrize("backend", backends())
def test_bad_inputs(backend):
    h = torch.randn(2, 3, 8, device=DEVICE)
    w = torch.randn(10, 8, device=DEVICE)
    tok = torch.randint(0, 10, (2, 3), device=DEVICE)
    f = linear_token_logprobs
    with pytest.raises(ValueError, match=r"hidden's last dim \(8\) must equal weight's second"):
        f(h, w[:, :7], tok, backend=backend)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        f(h, w[0], tok, backend=backend)
    with pytest.raises(TypeError, match="weight dtype float64 must match hidden dtype float32"):
        f(h, w.double(), tok, backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        f(h, w, tok, bias=torch.zeros(9, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"tokens must have shape \(2, 3\)"):
        f(h, w, tok[:, :2], backend=backend)
    with pytest.raises(TypeError, match="tokens must have dtype"):
        f(h, w, tok.float(), backend=backend)
    with pytest.raises(ValueError, match="non-empty vocab"):
        f(h, w[:0], tok, backend=backend)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        f(h, w, tok, temperature=0.0, backend=backend)
    with pytest.raises(ValueError, match="weight is on meta"):
        f(h, w.to("meta"), tok, backend=backend)
    bad = tok.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match=r"id 10 \(flat position 5\) outside \[0, 10\)"):
        f(h, w, bad, backend=backend)


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    H, V = 16, 37

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(H, H)
            self.lm_head = torch.nn.Linear(H, V)

        def forward(self, x, tokens):
            hidden = torch.tanh(self.proj(x))[:, :-1]
            lp, ent = linear_token_logprobs(hidden, self.lm_head.weight, tokens,
                                            bias=self.lm_head.bias, return_entropy=True,
                                            backend="triton")
            return lp.sum() + 0.1 * ent.sum()

    torch.manual_seed(0)
    m = Tiny().to(DEVICE)
    x = torch.randn(2, 6, H, device=DEVICE)
    tokens = torch.randint(0, V, (2, 5), device=DEVICE)
    eager = m(x, tokens)
    eager.backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x, tokens)
    out.backward()
    assert_close("compiled loss", out, eager, atol=1e-5)
    for p, g in zip(m.parameters(), ref):
        assert_close("compiled grad", p.grad, g, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# fused_linear_ppo_loss
# ---------------------------------------------------------------------------------------------

def _ppo_inputs(B, T, H, V, dtype, *, seed):
    h, w, b, tok = _inputs((B, T), H, V, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        lp = R.linear_token_logprobs(h.double(), w.double(), tok, b.double())
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64).to(DEVICE)).float()
    ref = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64).to(DEVICE)).float()
    adv = torch.randn(B, T, generator=g).to(DEVICE)
    mask = torch.rand(B, T, generator=g).to(DEVICE) > 0.25
    mask[-1] = False  # a fully masked row
    return h, w, b, tok, old, adv, mask, ref


PPO_CASES = [
    dict(),
    dict(kl_coef=0.1, kl_kind="k3", entropy_coef=0.01, dual_clip=3.0, clip_high=0.28,
         agg="seq-mean-token-mean"),
    dict(kl_coef=0.05, kl_kind="k1+", entropy_coef=0.02, ratio_level="sequence",
         temperature=0.8, agg="token-sum"),
]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", range(len(PPO_CASES)))
def test_ppo_loss_matches_float64_reference(backend, case):
    kw = dict(PPO_CASES[case])
    B, T, H, V = 3, 5, 24, 77
    h, w, b, tok, old, adv, mask, ref = _ppo_inputs(B, T, H, V, torch.float32, seed=40 + case)
    tok[0, 1] = -100
    if kw.get("kl_coef"):
        kw["ref_logp"] = ref
    leaves = [_leaf(h), _leaf(w), _leaf(b)]
    loss, stats = fused_linear_ppo_loss(leaves[0], leaves[1], tok, old, adv, mask,
                                        bias=leaves[2], backend=backend, **kw)
    loss.backward()
    r64 = [_leaf(t, torch.float64) for t in (h, w, b)]
    rloss, rstats = R.fused_linear_ppo_loss(r64[0], r64[1], tok, old.double(), adv.double(),
                                            mask, r64[2], **{
                                                k: (v.double() if torch.is_tensor(v) else v)
                                                for k, v in kw.items()})
    rloss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close("loss", loss, rloss, atol=2e-5, rtol=2e-5)
    assert set(stats) == set(rstats)
    for k in rstats:
        assert_close(f"stats[{k}]", stats[k], rstats[k], atol=2e-5, rtol=2e-5)
        assert not stats[k].requires_grad
    for name, leaf, r in zip(("dhidden", "dweight", "dbias"), leaves, r64):
        assert_close(name, leaf.grad, r.grad, atol=2e-5, rtol=2e-5)
    assert torch.all(leaves[0].grad[-1] == 0), "a fully masked row got a gradient"


@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("bt", [(0, 3), (2, 0), (0, 0)])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_ppo_loss_with_no_tokens(backend, bt, ratio_level):
    # An empty batch (B = 0) or empty responses (T = 0): a zero loss, zero-filled stats and
    # gradients of the right shapes, as the reference (the native path once failed to reshape
    # its per-token rows for B = 0: "[-1, 0, T] is ambiguous").
    B, T = bt
    H, V = 6, 11
    w = torch.randn(V, H, device=DEVICE)
    h, wl = _leaf(torch.randn(B, T, H, device=DEVICE)), _leaf(w)
    z = torch.zeros(B, T, device=DEVICE)
    tok = torch.zeros(B, T, dtype=torch.long, device=DEVICE)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    loss, stats = fused_linear_ppo_loss(h, wl, tok, z, z, mask, ref_logp=z, kl_coef=0.1,
                                        entropy_coef=0.01, ratio_level=ratio_level,
                                        backend=backend)
    rloss, rstats = R.fused_linear_ppo_loss(h.detach(), w, tok, z, z, mask, ref_logp=z,
                                            kl_coef=0.1, entropy_coef=0.01,
                                            ratio_level=ratio_level)
    assert loss.item() == 0 and rloss.item() == 0
    assert set(stats) == set(rstats)
    for k in rstats:
        assert stats[k].shape == rstats[k].shape, k
        assert_close(f"stats[{k}]", stats[k], rstats[k], atol=0)
    loss.backward()
    assert h.grad.shape == h.shape and wl.grad.shape == w.shape
    assert torch.all(wl.grad == 0)


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
def test_ppo_loss_equals_fused_ppo_loss_on_materialized_logits():
    import fastrlhf as fr
    fused_ppo_loss = getattr(fr, "fused_ppo_loss", None)
    if fused_ppo_loss is None:
        from fastrlhf.ops.fused_loss import fused_ppo_loss
    B, T, H, V = 2, 6, 20, 64
    h, w, b, tok, old, adv, mask, ref = _ppo_inputs(B, T, H, V, torch.float32, seed=50)
    kw = dict(ref_logp=ref, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    l1 = [_leaf(h), _leaf(w), _leaf(b)]
    loss1, st1 = fused_linear_ppo_loss(l1[0], l1[1], tok, old, adv, mask, bias=l1[2],
                                       backend="triton", **kw)
    loss1.backward()
    l2 = [_leaf(h), _leaf(w), _leaf(b)]
    loss2, st2 = fused_ppo_loss(R.linear_logits(*l2[:2], l2[2]), tok, old, adv, mask,
                                backend="triton", **kw)
    loss2.backward()
    assert_close("loss", loss1, loss2, atol=1e-5, rtol=1e-5)
    for k in st2:
        assert_close(f"stats[{k}]", st1[k], st2[k], atol=1e-5, rtol=1e-5)
    for name, x, y in zip(("dhidden", "dweight", "dbias"), l1, l2):
        assert_close(name, x.grad, y.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", backends())
def test_ppo_loss_bad_inputs(backend):
    B, T, H, V = 2, 3, 8, 10
    h, w, b, tok, old, adv, mask, ref = _ppo_inputs(B, T, H, V, torch.float32, seed=60)
    f = fused_linear_ppo_loss
    with pytest.raises(ValueError, match=r"hidden must be 3-D \[B, T, H\]"):
        f(h[0], w, tok[0], old, adv, mask, backend=backend)
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logp"):
        f(h, w, tok, old, adv, mask, kl_coef=0.1, backend=backend)
    with pytest.raises(ValueError, match="ratio_level must be one of"):
        f(h, w, tok, old, adv, mask, ratio_level="seq", backend=backend)
    with pytest.raises(ValueError, match="old_logp must have shape"):
        f(h, w, tok, old[:, :2], adv, mask, backend=backend)
    with pytest.raises(TypeError, match="entropy_coef must be a float"):
        f(h, w, tok, old, adv, mask, entropy_coef="0.1", backend=backend)


# (Tensor-core use and 128-bit cp.async operand loads are checked in tests/test_aot.py.)


# ---------------------------------------------------------------------------------------------
# GPU only: bf16 vs fp32, production-like sizes
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_CUDA, reason="CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_vocab_odd_hidden(dtype):
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32: exact fp32 products, no tf32
    try:
        N, H, V = 1000, 1000, 50257  # H not a multiple of the K step, odd V, several chunks
        h, w, b, tok = _inputs((N,), H, V, dtype, seed=70, wscale=0.05)
        tok[::7] = -100
        leaves = [_leaf(h), _leaf(w), _leaf(b)]
        lp, ent = linear_token_logprobs(leaves[0], leaves[1], tok, bias=leaves[2],
                                        return_entropy=True)
        up = [torch.randn(N, device="cuda") for _ in range(2)]
        got = _grads((lp, ent), up, leaves)
        rl, re, rleaves = _ref64(h, w, b, tok, 1.0)
        expect = _grads((rl, re), [u.double() for u in up], rleaves)
        assert_close("logp", lp, rl, atol=1e-4, rtol=1e-5)
        assert_close("entropy", ent, re, atol=1e-4, rtol=1e-5)
        rel = 1e-4 if dtype == torch.float32 else 2e-2
        for name, g, e in zip(("dhidden", "dweight", "dbias"), got, expect):
            _rel_close(name, g, e, rel)
    finally:
        torch.set_float32_matmul_precision(prev)
