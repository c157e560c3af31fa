"""The native (C++) fused lm_head: linear_token_logprobs / fused_linear_ppo_loss on CPU tensors
with backend="native" (csrc/fused_linear.cpp), against the float64 reference.

Shapes are tiny but cross every boundary of the C++ tiling: more than one 64-row tile, a
partial last tile, several vocab chunks (the launchers' ``chunk`` override, and V > 1024 for the
default backward chunk through the public op), a partial last 128-column dW tile, H and V that
are no multiple of anything.  Also: ignore_index rows, temperature, bias, strided hidden rows,
gradcheck in float64, bitwise thread-count independence, packed sequences and that ``auto``
picks native for CPU tensors.  The token-level fused_linear_ppo_loss, whose gradients are produced
in the forward (native.fused_linear_loss_fwd, row blocks of whole-vocab logits), has its own
section at the end: float64 agreement for every dtype and several block sizes, thread-count
independence, repeated backward, gradcheck, NaN / masked rows, path selection, opcheck.  Vocab parallelism on native: tests/test_vocab_parallel_ops.py (it
runs inside that file's existing gloo process group, so it costs no extra spawn)."""

import pytest
import torch

import fastrlhf as fr
import fastrlhf.reference as R
from fastrlhf import backend as _backend
from fastrlhf import native
from helpers import DEVICE, assert_close

pytestmark = pytest.mark.skipif(DEVICE != "cpu" or not _backend.native_available(),
                                reason="needs the native (C++) backend on CPU tensors")

F64 = torch.float64
# values accumulate in fp32 (fp64) whatever the input dtype; bf16 / fp16 gradients are stored
# in the input dtype, so they are held relative to their largest entry
VAL_TOL = {F64: 1e-12, torch.float32: 3e-5, torch.bfloat16: 3e-5, torch.float16: 3e-5}
GRAD_REL = {F64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(N, H, V, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=F64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=F64) * 0.4).to(dtype)
    b = torch.randn(V, generator=g, dtype=F64).to(dtype) if bias else None
    tok = torch.randint(0, V, (N,), generator=g)
    tok[:: 7] = -100
    return h, w, b, tok


def _ref(h, w, b, tok, T, up):
    """float64 reference on the same input values: (logp, ent, grads of h, w, b)."""
    leaves = [None if t is None else t.to(F64).requires_grad_() for t in (h, w, b)]
    lp, ent = R.linear_token_logprobs(leaves[0], leaves[1], tok, leaves[2], T, True, -100)
    live = [t for t in leaves if t is not None]
    gs = iter(torch.autograd.grad((lp * up[0]).sum() + (ent * up[1]).sum(), live))
    return lp, ent, [None if t is None else next(gs) for t in leaves]


def _rel(name, got, exp, rel):
    scale = max(float(exp.abs().max()), 1e-30)
    assert_close(name, got.to(F64), exp, atol=rel * scale, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,H,V,chunk", [(70, 13, 203, 48), (5, 40, 97, None), (1, 3, 1, None),
                                         (1100, 6, 150, 64)])
def test_launchers_match_float64(dtype, N, H, V, chunk):
    """The launchers (chunk override: several chunks and a partial one) against float64.  N =
    1100 takes 256-row GEMM tiles (4 and a partial one; row_tile grows with N), N = 70 64-row
    ones."""
    T = 0.7
    h, w, b, tok = _inputs(N, H, V, dtype, seed=N + V)
    g = torch.Generator().manual_seed(1)
    acc = F64 if dtype == F64 else torch.float32
    up = [torch.randn(N, generator=g, dtype=F64) for _ in range(2)]
    rl, re, rg = _ref(h, w, b, tok, T, up)
    lp, ent, lse = native.linear_logprobs_fwd(h, (1, 1, N), (0, 0, H), w, b, tok, 1 / T, -100,
                                              chunk=chunk)
    assert lp.dtype == ent.dtype == lse.dtype == acc
    assert_close("logp", lp.to(F64), rl, atol=VAL_TOL[dtype], rtol=VAL_TOL[dtype])
    assert_close("entropy", ent.to(F64), re, atol=VAL_TOL[dtype], rtol=VAL_TOL[dtype])
    dh, dw, db = native.linear_logprobs_bwd(h, (1, 1, N), (0, 0, H), w, b, tok, up[0].to(acc),
                                            up[1].to(acc), lse, ent, 1 / T, -100, True, True,
                                            True, chunk=chunk)
    assert (dh.dtype, dw.dtype, db.dtype) == (dtype,) * 3
    for name, got, exp in (("dhidden", dh, rg[0]), ("dweight", dw, rg[1]), ("dbias", db, rg[2])):
        _rel(name, got, exp, GRAD_REL[dtype])
    # one upstream gradient only (the other is None: its term is left out)
    dh1, dw1, db1 = native.linear_logprobs_bwd(h, (1, 1, N), (0, 0, H), w, b, tok, None,
                                             up[1].to(acc), lse, ent, 1 / T, -100, True, True,
                                             False, chunk=chunk)
    assert db1 is None
    _, _, rg2 = _ref(h, w, b, tok, T, [up[0] * 0, up[1]])
    _rel("dhidden (dent only)", dh1, rg2[0], GRAD_REL[dtype])
    _rel("dweight (dent only)", dw1, rg2[1], GRAD_REL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_public_op_multi_chunk_strided(dtype, bias):
    """backend='native' through the op: strided hidden rows (hidden[:, :-1]), 2 row tiles, more
    than one default backward chunk (V > 1024), temperature, ignore_index."""
    B, T1, H, V = 3, 25, 7, 1031
    g = torch.Generator().manual_seed(3)
    hid = torch.randn(B, T1 + 1, H, generator=g, dtype=F64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=F64) * 0.5).to(dtype)
    b = torch.randn(V, generator=g, dtype=F64).to(dtype) if bias else None
    tok = torch.randint(0, V, (B, T1), generator=g)
    tok[0, 3] = -100
    tok[1, 0] = V - 1
    up = [torch.randn(B, T1, generator=g, dtype=F64) for _ in range(2)]
    leaves = [None if t is None else t.clone().requires_grad_() for t in (hid, w, b)]
    lp, ent = fr.linear_token_logprobs(leaves[0][:, :-1], leaves[1], tok, bias=leaves[2],
                                       temperature=1.3, return_entropy=True, backend="native")
    live = [t for t in leaves if t is not None]
    gs = torch.autograd.grad((lp * up[0]).sum() + (ent * up[1]).sum(), live)
    rleaves = [None if t is None else t.to(F64).requires_grad_() for t in (hid, w, b)]
    rl, re = R.linear_token_logprobs(rleaves[0][:, :-1], rleaves[1], tok, rleaves[2], 1.3, True)
    rgs = torch.autograd.grad((rl * up[0]).sum() + (re * up[1]).sum(),
                              [t for t in rleaves if t is not None])
    assert_close("logp", lp.to(F64), rl, atol=VAL_TOL[dtype], rtol=VAL_TOL[dtype])
    assert_close("entropy", ent.to(F64), re, atol=VAL_TOL[dtype], rtol=VAL_TOL[dtype])
    assert float(lp.detach()[0, 3]) == 0.0
    for i, (a, e) in enumerate(zip(gs, rgs)):
        _rel(f"grad{i}", a, e, GRAD_REL[dtype])


def _gradcheck_leaves(g):
    """float64 leaves (hidden [2, 3, 4], weight [9, 4], bias [9]) and tokens with one ignored."""
    h = torch.randn(2, 3, 4, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(9, 4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=F64, requires_grad=True)
    tok = torch.randint(0, 9, (2, 3), generator=g)
    tok[1, 1] = -100
    return h, w, b, tok


def test_gradcheck_float64():
    h, w, b, tok = _gradcheck_leaves(torch.Generator().manual_seed(11))

    def f(h, w, b):
        return fr.linear_token_logprobs(h, w, tok, bias=b, temperature=0.8, return_entropy=True,
                                        backend="native")
    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("N, H, V, chunk", [
    # 2 row tiles + a partial one, 3 vocab chunks, 2 dW column tiles (256 rows) in each full one
    (150, 24, 1100, 512),
    # 4 rows, long K: each tile GEMM runs on the calling thread, where MKL with 2 threads would
    # split the dhidden GEMM's K = 2048 (4 x 2048 x 300) between them unless kept to one
    (4, 300, 2100, 2048),
])
def test_thread_count_independent_bitwise(N, H, V, chunk):
    """Forward and all gradients bitwise equal with 1 and 2 threads (fixed tiles, no atomics,
    one BLAS thread per tile)."""
    h, w, b, tok = _inputs(N, H, V, torch.float32, seed=5)
    h = h * (5.0 / H) ** 0.5  # logits of O(1)
    up = torch.randn(N, generator=torch.Generator().manual_seed(2))
    n0 = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for _ in range(2):  # the first call warms new worker threads (csrc: SerialBlas)
                lp, ent, lse = native.linear_logprobs_fwd(h, (1, 1, N), (0, 0, H), w, b, tok, 1.1,
                                                          -100, chunk=chunk)
                grads = native.linear_logprobs_bwd(h, (1, 1, N), (0, 0, H), w, b, tok, up,
                                                   up * 0.5, lse, ent, 1.1, -100, True, True,
                                                   True, chunk=chunk)
            outs.append((lp, ent, lse) + tuple(grads))
    finally:
        torch.set_num_threads(n0)
    assert all(bool(torch.isfinite(t).all()) for t in outs[0])
    for i, (a, c) in enumerate(zip(*outs)):
        assert torch.equal(a, c), f"output {i} differs between 1 and 2 threads"


def test_nan_and_out_of_range_rows():
    """A NaN hidden row gives NaN outputs on that row only; an out-of-range id (host check off)
    gives NaN logp without reading out of bounds; ignored rows give logp 0."""
    h, w, b, tok = _inputs(6, 5, 33, torch.float32, seed=9, bias=False)
    h[2, 1] = float("nan")
    tok[4] = 40
    lp, ent, _ = native.linear_logprobs_fwd(h, (1, 1, 6), (0, 0, 5), w, None, tok, 1.0, -100)
    assert torch.isnan(lp[2]) and torch.isnan(ent[2]) and torch.isnan(lp[4])
    assert float(lp[0]) == 0.0  # tok[0] == -100
    ok = [1, 3, 5]
    assert torch.isfinite(lp[ok]).all() and torch.isfinite(ent[[0, 1, 3, 4, 5]]).all()


def test_auto_picks_native_for_cpu(monkeypatch):
    seen = []
    real_f, real_b = native.linear_logprobs_fwd, native.linear_logprobs_bwd
    monkeypatch.setattr(native, "linear_logprobs_fwd", lambda *a, **k: seen.append("f")
                        or real_f(*a, **k))
    monkeypatch.setattr(native, "linear_logprobs_bwd", lambda *a, **k: seen.append("b")
                        or real_b(*a, **k))
    h = torch.randn(2, 3, 4, requires_grad=True)
    w = torch.randn(5, 4)
    tok = torch.randint(0, 5, (2, 3))
    fr.linear_token_logprobs(h, w, tok).sum().backward()
    assert seen == ["f", "b"], seen
    real_l = native.fused_linear_loss_fwd
    monkeypatch.setattr(native, "fused_linear_loss_fwd", lambda *a, **k: seen.append("l")
                        or real_l(*a, **k))
    m = torch.ones(2, 3)
    fr.fused_linear_ppo_loss(h, w, tok, -torch.rand(2, 3), torch.randn(2, 3), m)[0].backward()
    assert seen == ["f", "b", "l"], seen  # the loss: gradients produced in its forward


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_fused_linear_ppo_loss_matches_reference(dtype, packed):
    g = torch.Generator().manual_seed(17)
    H, V = 6, 37
    if packed:
        B, T, cu = 1, 12, torch.tensor([0, 5, 5, 12])
        adv = torch.randn(3, generator=g, dtype=F64)
    else:
        B, T, cu = 3, 4, None
        adv = torch.randn(B, T, generator=g, dtype=F64)
    hid = torch.randn(B, T, H, generator=g, dtype=F64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=F64) * 0.5).to(dtype)
    b = torch.randn(V, generator=g, dtype=F64).to(dtype)
    tok = torch.randint(0, V, (B, T), generator=g)
    tok[0, 1] = -100
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2 - 0.5
    mask = torch.rand(B, T, generator=g) > 0.2
    kw = dict(ref_logp=old - 0.1, kl_coef=0.05, entropy_coef=0.01, temperature=0.9,
              agg="seq-mean-token-mean", cu_seqlens=cu, clip_high=0.3, dual_clip=3.0)
    res = {}
    for be in ("native", "reference"):
        d = dtype if be == "native" else F64
        leaves = [t.to(d).requires_grad_() for t in (hid, w, b)]
        acc = F64 if d == F64 else torch.float32
        loss, st = fr.fused_linear_ppo_loss(leaves[0], leaves[1], tok, old.to(acc), adv.to(acc),
                                            mask, bias=leaves[2], backend=be,
                                            **{**kw, "ref_logp": kw["ref_logp"].to(acc)})
        res[be] = (loss, st, torch.autograd.grad(loss, leaves))
    tol = 1e-11 if dtype == F64 else 2e-5
    (loss, st, gr), (rloss, rst, rgr) = res["native"], res["reference"]
    assert_close("loss", loss.to(F64), rloss, atol=tol, rtol=tol)
    for k in rst:
        assert_close(k, st[k].to(F64), rst[k], atol=tol, rtol=tol)
    for i, (a, e) in enumerate(zip(gr, rgr)):
        _rel(f"grad{i}", a, e, 1e-11 if dtype == F64 else 2e-5)


# ----------------------------------------------------------------------------------------------
# fused_linear_ppo_loss, token-level ratio: the gradients are produced in the forward
# (native.fused_linear_loss_fwd: three GEMMs over row blocks, the backward only scales)
# ----------------------------------------------------------------------------------------------

LOSS_KW = dict(kl_coef=0.05, kl_kind="k3+", entropy_coef=0.02, temperature=0.9, clip_high=0.28,
               dual_clip=3.0)


def _loss_case(B, T, H, V, dtype, seed, bias=True, adv_row=False):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(B, T, H, generator=g, dtype=F64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=F64) * 0.5).to(dtype)
    b = torch.randn(V, generator=g, dtype=F64).to(dtype) if bias else None
    tok = torch.randint(0, V, (B, T), generator=g)
    tok[0, 1] = -100
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2 - 0.5
    adv = torch.randn(B, generator=g, dtype=F64) if adv_row else torch.randn(B, T, generator=g,
                                                                              dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[-1] = False  # a fully masked sequence: zero weight, zero gradient rows
    return hid, w, b, tok, old, adv, mask


def _loss_run(case, dtype, backend, upstream=1.0, **kw):
    hid, w, b, tok, old, adv, mask = case
    acc = F64 if dtype == F64 else torch.float32
    leaves = [None if t is None else t.to(dtype).clone().requires_grad_() for t in (hid, w, b)]
    loss, st = fr.fused_linear_ppo_loss(leaves[0], leaves[1], tok, old.to(acc), adv.to(acc),
                                        mask, bias=leaves[2], ref_logp=old.to(acc) - 0.1,
                                        backend=backend, **{**LOSS_KW, **kw})
    live = [t for t in leaves if t is not None]
    return loss, st, torch.autograd.grad(loss * upstream, live)


def _block_rows(monkeypatch, rows):
    real = native.fused_linear_loss_fwd
    calls = []

    def wrapped(*a, **k):
        calls.append(rows)
        return real(*a, **{**k, "block_rows": rows})
    monkeypatch.setattr(native, "fused_linear_loss_fwd", wrapped)
    return calls


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_loss_grads_in_forward_match_float64(monkeypatch, dtype, rows):
    """Loss, stats and the gradients of hidden / weight / bias (upstream 0.7: the backward's
    scaling) against float64, with row blocks of 1, 5 (a partial last block) and 64 rows (one
    block) over 3 x 9 tokens; V = 1100 > one 512-column GEMM chunk, 9 dW column tiles."""
    calls = _block_rows(monkeypatch, rows)
    case = _loss_case(3, 9, 11, 1100, dtype, seed=rows)
    loss, st, gr = _loss_run(case, dtype, "native", upstream=0.7,
                             agg="seq-mean-token-mean" if rows == 5 else "token-mean")
    assert calls == [rows]
    rloss, rst, rgr = _loss_run(case, F64, "reference", upstream=0.7,
                                agg="seq-mean-token-mean" if rows == 5 else "token-mean")
    tol = VAL_TOL[dtype] * 10
    assert loss.dtype == (F64 if dtype == F64 else torch.float32)
    assert_close("loss", loss.to(F64), rloss, atol=tol, rtol=tol)
    for k in rst:
        assert_close(k, st[k].to(F64), rst[k], atol=tol, rtol=tol)
        assert not st[k].requires_grad
    for name, a, e in zip(("dhidden", "dweight", "dbias"), gr, rgr):
        assert a.dtype == dtype and a.shape == e.shape
        _rel(name, a, e, GRAD_REL[dtype] * (1 if dtype == F64 else 2))
    # the fully masked sequence has exactly zero hidden gradient
    assert torch.count_nonzero(gr[0][-1]) == 0


def test_loss_grads_in_forward_options():
    """Per-sequence advantages, no bias, agg kwargs, temperature 1, a frozen weight (only
    dhidden) and a frozen backbone (only dweight) -- each against float64."""
    case = _loss_case(2, 7, 6, 53, torch.float32, seed=4, bias=False, adv_row=True)
    kw = dict(agg="seq-mean-token-sum-norm", temperature=1.0, dual_clip=None, kl_kind="k1")
    _, _, gr = _loss_run(case, torch.float32, "native", **kw)
    _, _, rgr = _loss_run(case, F64, "reference", **kw)
    for name, a, e in zip(("dhidden", "dweight"), gr, rgr):
        _rel(name, a, e, 2e-5)
    hid, w, b, tok, old, adv, mask = case
    for frozen in (0, 1):
        leaves = [hid.clone().requires_grad_(frozen != 0), w.clone().requires_grad_(frozen != 1)]
        loss, _ = fr.fused_linear_ppo_loss(leaves[0], leaves[1], tok, old.float(), adv.float(),
                                           mask, ref_logp=old.float() - 0.1, backend="native",
                                           **{**LOSS_KW, **kw})
        loss.backward()
        live = 1 - frozen
        assert leaves[frozen].grad is None
        _rel(f"grad{live}", leaves[live].grad, rgr[live], 2e-5)


def test_loss_grads_thread_count_independent_bitwise(monkeypatch):
    """1 and 2 threads give bitwise the same loss, stats and gradients: 3 row blocks of 64 (a
    partial one), 2 GEMM vocab chunks, 2 dhidden column tiles (H = 300 > 256)."""
    _block_rows(monkeypatch, 64)
    case = _loss_case(5, 30, 300, 700, torch.float32, seed=8)
    n0 = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for _ in range(2):  # the first call warms new worker threads (csrc: SerialBlas)
                loss, st, gr = _loss_run(case, torch.float32, "native")
            outs.append([loss, *st.values(), *gr])
    finally:
        torch.set_num_threads(n0)
    for i, (a, c) in enumerate(zip(*outs)):
        assert torch.equal(a, c), f"output {i} differs between 1 and 2 threads"


@pytest.mark.parametrize("hdt, wdt", [(torch.bfloat16, torch.bfloat16),
                                      (torch.float16, torch.float16)])
def test_loss_grads_low_precision_weight_tiles(monkeypatch, hdt, wdt):
    """bf16 / fp16 weights are converted tile by tile (no fp32 copy of W): dhidden then sums
    K = V over chunks of 2048 converted vocab rows.  V = 2100 (a partial second chunk; five
    512-column logits chunks), H = 300 (a partial second dhidden column tile), 2 row blocks --
    against float64, and bitwise the same at 1 and 2 threads."""
    _block_rows(monkeypatch, 4)
    hid, w, b, tok, old, adv, mask = _loss_case(2, 3, 300, 2100, F64, seed=13)
    hid = hid * 0.15  # logits of O(1) at H = 300
    outs = []
    n0 = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for _ in range(2):  # the first call warms new worker threads (csrc: SerialBlas)
                hl = hid.to(hdt).requires_grad_()
                wl = w.to(wdt).requires_grad_()
                bl = b.to(wdt).requires_grad_()
                loss, st = fr.fused_linear_ppo_loss(hl, wl, tok, old.float(), adv.float(), mask,
                                                    bias=bl, ref_logp=old.float() - 0.1,
                                                    backend="native", **LOSS_KW)
                res = [loss, *torch.autograd.grad(loss * 0.7, [hl, wl, bl])]
            outs.append(res)
    finally:
        torch.set_num_threads(n0)
    for i, (a, c) in enumerate(zip(*outs)):
        assert torch.equal(a, c), f"output {i} differs between 1 and 2 threads"
    # the reference on the same (rounded) values in float64
    leaves = [t.to(dt).to(F64).requires_grad_() for t, dt in ((hid, hdt), (w, wdt), (b, wdt))]
    rloss, _ = fr.fused_linear_ppo_loss(leaves[0], leaves[1], tok, old, adv, mask,
                                        bias=leaves[2], ref_logp=old - 0.1, backend="reference",
                                        **LOSS_KW)
    rgr = torch.autograd.grad(rloss * 0.7, leaves)
    loss, *gr = outs[0]
    assert_close("loss", loss.to(F64), rloss, atol=1e-5, rtol=1e-5)
    for name, a, e, dt in zip(("dhidden", "dweight", "dbias"), gr, rgr, (hdt, wdt, wdt)):
        assert a.dtype == dt and a.shape == e.shape
        _rel(name, a, e, GRAD_REL[dt] * 2)


def test_loss_grads_repeated_backward():
    """retain_graph: each backward adds the gradient again, also after the caller changed the
    accumulated .grad in place (the stored gradient is never handed out to be mutated)."""
    case = _loss_case(2, 4, 5, 19, torch.float32, seed=2)
    hid, w, b, tok, old, adv, mask = case
    wl = w.clone().requires_grad_()
    hl = hid.clone().requires_grad_()
    loss, _ = fr.fused_linear_ppo_loss(hl, wl, tok, old.float(), adv.float(), mask,
                                       ref_logp=old.float() - 0.1, backend="native", **LOSS_KW)
    G = torch.autograd.grad(loss, [wl], retain_graph=True)[0].clone()
    loss.backward(retain_graph=True)
    assert torch.equal(wl.grad, G)
    wl.grad.mul_(0.0)  # e.g. an optimizer's zero_grad(set_to_none=False)
    (loss * 3).backward(retain_graph=True)
    assert_close("3x", wl.grad, 3 * G, atol=1e-6, rtol=1e-6)
    loss.backward()
    assert_close("4x", wl.grad, 4 * G, atol=1e-6, rtol=1e-6)


def test_loss_grads_gradcheck_float64():
    g = torch.Generator().manual_seed(21)
    h, w, b, tok = _gradcheck_leaves(g)
    old = -torch.rand(2, 3, generator=g, dtype=F64) - 1.0  # ratios far from the clip bounds
    adv = torch.randn(2, 3, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])

    def f(h, w, b):
        return fr.fused_linear_ppo_loss(h, w, tok, old, adv, mask, bias=b, ref_logp=old - 0.2,
                                        kl_coef=0.1, entropy_coef=0.05, temperature=0.8,
                                        clip_low=10.0, clip_high=10.0, backend="native")[0]
    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-7)


def test_loss_grads_nan_row_and_all_masked():
    """A NaN hidden row that is masked out leaves the loss, the stats means and dhidden finite
    (its gradient row is zero); dweight is NaN in the NaN row's column exactly as the reference's
    (0 * NaN in dlogits^T @ hidden).  Everything masked gives loss 0 and zero gradients."""
    case = _loss_case(2, 5, 4, 23, torch.float32, seed=6)
    hid, w, b, tok, old, adv, mask = case
    hid = hid.clone()
    hid[0, 2, 1] = float("nan")
    mask = mask.clone()
    mask[0, 2] = False
    case = (hid, w, b, tok, old, adv, mask)
    loss, st, gr = _loss_run(case, torch.float32, "native")
    rloss, rst, rgr = _loss_run(case, F64, "reference")
    assert torch.isfinite(loss) and torch.isfinite(gr[0]).all() and torch.isfinite(gr[2]).all()
    assert torch.isnan(st["logp"][0, 2]) and torch.isfinite(st["clipfrac"])
    assert_close("loss", loss.to(F64), rloss, atol=1e-5, rtol=1e-5)
    for name, a, e in zip(("dhidden", "dweight", "dbias"), gr, rgr):
        assert torch.equal(a.isnan(), e.isnan()), name
        assert_close(name, a.to(F64).nan_to_num(), e.nan_to_num(), atol=2e-5, rtol=1e-4)
    none = torch.zeros_like(mask)
    loss, st, gr = _loss_run((hid.nan_to_num(), w, b, tok, old, adv, none), torch.float32,
                             "native")
    assert float(loss.detach()) == 0.0 and all(torch.count_nonzero(x) == 0 for x in gr)


@pytest.mark.parametrize("how", ["gspo", "packed", "no_grad"])
def test_loss_grads_path_selection(monkeypatch, how):
    """The gradients-in-forward launcher serves token-level ratios under autograd; GSPO, packed
    sequences and no_grad calls take the composition (forward log-probs + O(BT) loss terms)."""
    seen = []
    for name in ("fused_linear_loss_fwd", "linear_logprobs_fwd"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _r=real, _n=name, **k: seen.append(_n)
                            or _r(*a, **k))
    hid, w, b, tok, old, adv, mask = _loss_case(1, 6, 4, 11, torch.float32, seed=1)
    hl = hid.clone().requires_grad_()
    kw = {}
    if how == "gspo":
        kw = dict(ratio_level="sequence")
    elif how == "packed":
        kw = dict(cu_seqlens=torch.tensor([0, 2, 6]), agg="seq-mean-token-mean")
        adv = adv[0, :2]
    with torch.set_grad_enabled(how != "no_grad"):
        fr.fused_linear_ppo_loss(hl, w, tok, old.float(), adv.float(), mask, backend="native",
                                 **kw)
    assert seen == ["linear_logprobs_fwd"], seen
    seen.clear()
    fr.fused_linear_ppo_loss(hl, w, tok, old.float(), adv[..., :1].expand(1, 6).float()
                             if how == "packed" else adv.float(), mask, backend="native")
    assert seen == ["fused_linear_loss_fwd"], seen


def test_loss_grads_opcheck():
    from fastrlhf.ops import fused_linear as FL
    hid, w, b, tok, old, adv, mask = _loss_case(2, 3, 4, 7, torch.float32, seed=3)
    coef = R.agg_row_weights(mask, "token-mean")
    args = (hid.requires_grad_(), w.requires_grad_(), b, tok, old.float(), adv.float(),
            mask.float(), None, coef, 0.0, "k3", 0.01, 0.8, 1.2, None, 1.0, -100, True, True,
            False, "native")
    torch.library.opcheck(FL._lossgrad.op, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
