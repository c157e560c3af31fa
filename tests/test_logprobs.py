"""token_logprobs / token_entropy against the float64 reference, on every backend available."""


import pytest
import torch

import fastrlhf as fr
from fastrlhf import reference as ref
from helpers import DEVICE, HAS_CUDA, TRITON_OK, assert_close, backends

DT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def _inputs(shape, V, dtype, *, seed, scale=3.0, offset=0.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g, dtype=torch.float64) * scale + offset)
    tokens = torch.randint(0, V, shape, generator=g)
    return logits.to(dtype).to(device), tokens.to(device)


def _ref64(logits, tokens, temperature, ignore_index=-100):
    """Reference on the exact same input values, computed in float64."""
    return ref.token_logprobs(logits.detach().double(), tokens, temperature, True, ignore_index)


@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,V", [((1,), 1), ((5,), 67), ((2, 3), 130), ((3,), 257)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_matches_float64(backend, dtype, shape, V, temperature):
    logits, tokens = _inputs(shape, V, dtype, seed=V + len(shape))
    logp, ent = fr.token_logprobs(logits, tokens, temperature=temperature, return_entropy=True,
                                  backend=backend)
    expect_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert logp.dtype == expect_dtype and ent.dtype == expect_dtype
    assert logp.shape == tokens.shape and ent.shape == tokens.shape
    rl, re = _ref64(logits, tokens, temperature)
    tol = DT_TOL[dtype]
    assert_close("logp", logp, rl, atol=tol, rtol=tol)
    assert_close("entropy", ent, re, atol=tol, rtol=tol)
    only = fr.token_logprobs(logits, tokens, temperature=temperature, backend=backend)
    assert_close("logp (no entropy)", only, rl, atol=tol, rtol=tol)
    e2 = fr.token_entropy(logits, temperature=temperature, backend=backend)
    assert_close("token_entropy", e2, re, atol=tol, rtol=tol)
    if V == 1:
        assert torch.all(logp == 0) and torch.all(ent.abs() < 1e-6)


@pytest.mark.parametrize("backend", backends(native=True))
def test_strided_view_is_not_copied_and_matches(backend, monkeypatch):
    B, T, V = 3, 6, 97
    base, _ = _inputs((B, T + 1), V, torch.float32, seed=1)
    x = base[:, :-1]  # the trainer's slice: non-contiguous leading dims
    assert not x.is_contiguous()
    tokens = torch.randint(0, V, (B, T), device=DEVICE)
    copies = []
    real_contig = torch.Tensor.contiguous

    def spy(self, *a, **k):
        if self.numel() >= x.numel():
            copies.append(tuple(self.shape))
        return real_contig(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    logp, ent = fr.token_logprobs(x, tokens, return_entropy=True, backend=backend)
    monkeypatch.undo()
    if backend == "triton":
        assert copies == [], f"logits were copied: {copies}"
    rl, re = _ref64(x, tokens, 1.0)
    assert_close("logp", logp, rl, atol=2e-5, rtol=2e-5)
    assert_close("entropy", ent, re, atol=2e-5, rtol=2e-5)
    # A view with three non-mergeable leading dims (and a transposed one) still works.
    y = torch.randn(4, 3, 5, V, device=DEVICE)[:, ::2, 1:].transpose(0, 1)
    tk = torch.randint(0, V, y.shape[:-1], device=DEVICE)
    assert_close("logp 3-d view", fr.token_logprobs(y, tk, backend=backend),
                 _ref64(y, tk, 1.0)[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_backward_matches_float64(backend, dtype, temperature):
    B, T, V = 2, 5, 75
    base, _ = _inputs((B, T + 1), V, dtype, seed=7)
    tokens = torch.randint(0, V, (B, T), device=DEVICE)
    tokens[0, 1] = -100
    leaf = base.clone().requires_grad_(True)
    logp, ent = fr.token_logprobs(leaf[:, :-1], tokens, temperature=temperature,
                                  return_entropy=True, backend=backend)
    g1 = torch.randn(B, T, device=DEVICE, dtype=logp.dtype)
    g2 = torch.randn(B, T, device=DEVICE, dtype=ent.dtype)
    (logp * g1 + ent * g2).sum().backward()
    got = leaf.grad
    assert got.dtype == dtype
    leaf64 = base.detach().double().requires_grad_(True)
    rl, re = ref.token_logprobs(leaf64[:, :-1], tokens, temperature, True)
    (rl * g1.double() + re * g2.double()).sum().backward()
    tol = 2e-5 if dtype == torch.float32 else 1e-2  # bf16 gradient storage rounding
    assert_close("dlogits", got, leaf64.grad, atol=tol, rtol=tol)
    assert torch.all(got[:, -1] == 0), "the sliced-off position got a gradient"


@pytest.mark.parametrize("backend", backends(native=True))
def test_gradcheck_float64(backend):
    B, T, V = 2, 3, 11
    x = torch.randn(B, T + 1, V, dtype=torch.float64, device=DEVICE, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), device=DEVICE)
    tokens[1, 0] = -100

    def f(x):
        lp, h = fr.token_logprobs(x[:, :-1], tokens, temperature=0.8, return_entropy=True,
                                  backend=backend)
        return lp, h

    # In the interpreter every evaluation is a kernel launch in Python: fast mode (a random
    # projection of the Jacobian) keeps the check to seconds; CUDA / native / reference check
    # the full Jacobian.
    fast = backend == "triton" and not torch.cuda.is_available()
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, fast_mode=fast)
    assert torch.autograd.gradcheck(lambda x: fr.token_entropy(x, temperature=1.5, backend=backend),
                                    (x,), eps=1e-6, atol=1e-7, fast_mode=fast)


@pytest.mark.parametrize("backend", backends(native=True))
def test_ignore_index(backend):
    V = 40
    logits, tokens = _inputs((6,), V, torch.float32, seed=3)
    tokens[[1, 4]] = 7  # custom ignore id that is also a valid vocab id
    logits.requires_grad_(True)
    logp, ent = fr.token_logprobs(logits, tokens, ignore_index=7, return_entropy=True,
                                  backend=backend)
    assert torch.all(logp[[1, 4]] == 0)
    rl, re = _ref64(logits, tokens, 1.0, ignore_index=7)
    assert_close("logp", logp, rl, atol=2e-5)
    assert_close("entropy at ignored positions still computed", ent, re, atol=2e-5)
    assert torch.all(ent[[1, 4]] > 0)
    logp.sum().backward()
    assert torch.all(logits.grad[[1, 4]] == 0), "ignored positions received a logp gradient"
    assert torch.all(logits.grad[0].abs().sum() > 0)


@pytest.mark.parametrize("backend", backends(native=True))
def test_neg_inf_logits_and_huge_offsets(backend):
    V = 150
    logits, tokens = _inputs((4,), V, torch.float32, seed=5, offset=1e4)
    logits[0, ::3] = float("-inf")          # masked vocab entries
    logits[1, : V - 1] = float("-inf")      # a single live entry
    tokens[0] = 1
    tokens[1] = V - 1
    logits.requires_grad_(True)
    logp, ent = fr.token_logprobs(logits, tokens, return_entropy=True, backend=backend)
    rl, re = _ref64(logits, tokens, 1.0)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert_close("logp", logp, rl, atol=5e-5, rtol=1e-5)
    assert_close("entropy", ent, re, atol=5e-5, rtol=1e-5)
    assert float(logp[1].detach()) == 0.0 and abs(float(ent[1].detach())) < 1e-6
    (logp.sum() + ent.sum()).backward()
    g = logits.grad
    assert torch.isfinite(g).all()
    assert torch.all(g[0, ::3] == 0), "masked (-inf) vocab entries got a gradient"


@pytest.mark.parametrize("backend", backends(native=True))
def test_nan_logits_stay_in_their_row(backend):
    logits, tokens = _inputs((4,), 90, torch.float32, seed=9)
    logits[2, 17] = float("nan")
    logp, ent = fr.token_logprobs(logits, tokens, return_entropy=True, backend=backend)
    assert torch.isnan(logp[2]) and torch.isnan(ent[2])
    keep = [0, 1, 3]
    assert torch.isfinite(logp[keep]).all() and torch.isfinite(ent[keep]).all()


@pytest.mark.parametrize("backend", backends(native=True))
def test_empty_and_int32_tokens(backend):
    logits = torch.randn(0, 5, 33, device=DEVICE)
    tokens = torch.zeros(0, 5, dtype=torch.int32, device=DEVICE)
    lp, h = fr.token_logprobs(logits, tokens, return_entropy=True, backend=backend)
    assert lp.shape == (0, 5) and h.shape == (0, 5)
    logits, tokens = _inputs((7,), 33, torch.float32, seed=11)
    lp32 = fr.token_logprobs(logits, tokens.int(), backend=backend)
    assert_close("int32 tokens", lp32, _ref64(logits, tokens, 1.0)[0], atol=2e-5)


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
def test_inplace_backward_equals_out_of_place_without_new_buffers(monkeypatch):
    B, T, V = 2, 4, 70
    base, _ = _inputs((B, T + 1), V, torch.float32, seed=13)
    tokens = torch.randint(0, V, (B, T), device=DEVICE)
    w1 = base.clone().requires_grad_(True)
    lp, h = fr.token_logprobs(w1[:, :-1], tokens, return_entropy=True, backend="triton")
    (lp.sum() + 0.5 * h.sum()).backward()

    w2 = base.clone().requires_grad_(True)
    logits = w2 * 1.0  # a non-leaf activation, as the lm_head output would be
    view = logits[:, :-1]
    lp2, h2 = fr.token_logprobs(view, tokens, return_entropy=True, inplace_backward=True,
                                backend="triton")
    big = []
    real_empty = torch.empty

    def spy(*a, **k):
        t = real_empty(*a, **k)
        if t.numel() >= B * T * V:
            big.append(tuple(t.shape))
        return t

    # Only count allocations made by fastrlhf's backward (autograd's own grad of `w2 * 1.0` is
    # the caller's graph, not ours).
    import fastrlhf.ops.logprobs as mod
    monkeypatch.setattr(mod.torch, "empty", spy)
    (lp2.sum() + 0.5 * h2.sum()).backward()
    monkeypatch.undo()
    assert big == [], f"in-place backward allocated [N, V] buffers: {big}"
    assert_close("in-place dlogits", w2.grad, w1.grad, atol=1e-6)
    # the gradient was written into the logits buffer itself
    assert_close("buffer holds the gradient", logits[:, :-1], w1.grad[:, :-1], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends(native=True))
def test_bad_inputs(backend):
    logits = torch.randn(2, 3, 10, device=DEVICE)
    tokens = torch.randint(0, 10, (2, 3), device=DEVICE)
    with pytest.raises(TypeError, match="tokens must have dtype"):
        fr.token_logprobs(logits, tokens.float(), backend=backend)
    with pytest.raises(TypeError, match="logits must have dtype"):
        fr.token_logprobs(logits.long(), tokens, backend=backend)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        fr.token_logprobs(logits.tolist(), tokens, backend=backend)
    with pytest.raises(ValueError, match=r"tokens must have shape \(2, 3\)"):
        fr.token_logprobs(logits, tokens[:, :2], backend=backend)
    with pytest.raises(ValueError, match="non-empty vocab"):
        fr.token_logprobs(logits[..., :0], tokens, backend=backend)
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            fr.token_logprobs(logits, tokens, temperature=t, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        fr.token_logprobs(logits, tokens, backend="cuda")
    with pytest.raises(ValueError, match="tokens is on meta"):
        fr.token_logprobs(logits, tokens.to("meta"), backend=backend)
    bad = tokens.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match=r"id 10 \(flat position 5\) outside \[0, 10\)"):
        fr.token_logprobs(logits, bad, backend=backend)
    bad[1, 2] = -3
    with pytest.raises(ValueError, match="id -3"):
        fr.token_logprobs(logits, bad, backend=backend)


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
def test_token_check_can_be_disabled_and_kernel_stays_in_bounds():
    logits = torch.randn(3, 10, device=DEVICE)
    tokens = torch.tensor([1, 10 ** 9, -5], device=DEVICE)
    with fr.config.check_tokens(False):
        lp = fr.token_logprobs(logits, tokens, backend="triton")
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1]) and torch.isnan(lp[2])


def test_env_backend_override(monkeypatch):
    logits = torch.randn(2, 10, device=DEVICE)
    tokens = torch.randint(0, 10, (2,), device=DEVICE)
    monkeypatch.setenv("FASTRLHF_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTRLHF_BACKEND must be one of"):
        fr.token_logprobs(logits, tokens)
    monkeypatch.setenv("FASTRLHF_BACKEND", "reference")
    out = fr.token_logprobs(logits, tokens)
    assert out.grad_fn is None or "CustomOp" not in type(out.grad_fn).__name__
    assert_close("env reference", out, _ref64(logits, tokens, 1.0)[0], atol=2e-5)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_fullgraph(inplace):
    torch._dynamo.reset()
    V, H = 29, 8

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(H, V)

        def forward(self, h, tokens):
            logits = self.lm_head(h)[:, :-1]
            lp, ent = fr.token_logprobs(logits, tokens, return_entropy=True, backend="triton",
                                        inplace_backward=inplace)
            return lp.sum() + 0.1 * ent.sum()

    torch.manual_seed(0)
    m = Tiny().to(DEVICE)
    h = torch.randn(2, 6, H, device=DEVICE)
    tokens = torch.randint(0, V, (2, 5), device=DEVICE)
    eager = m(h, tokens)
    eager.backward()
    g_eager = m.lm_head.weight.grad.clone()
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(h, tokens)
    out.backward()
    assert_close("compiled loss", out, eager, atol=1e-5)
    assert_close("compiled lm_head grad", m.lm_head.weight.grad, g_eager, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# sizes that only a GPU can afford
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_CUDA, reason="CUDA only: 5 GB of logits")
def test_cuda_64bit_offsets_full_size():
    N, V = 16384, 151936  # N * V > 2**31
    assert N * V > 2 ** 31
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randint(0, V, (N,), device="cuda")
    lp, h = fr.token_logprobs(logits, tokens, return_entropy=True)
    rows = torch.tensor([0, 1, N // 2, N - 2, N - 1], device="cuda")
    rl, re = _ref64(logits[rows], tokens[rows], 1.0)
    assert_close("logp tail rows", lp[rows], rl, atol=1e-4, rtol=1e-5)
    assert_close("entropy tail rows", h[rows], re, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA only")
def test_cuda_many_rows_and_no_recompile():
    from fastrlhf.kernels import logprobs as k
    V = 1000
    for N in (70000, 70001, 12345):  # > 65535 rows
        logits = torch.randn(N, V, device="cuda")
        tokens = torch.randint(0, V, (N,), device="cuda")
        lp = fr.token_logprobs(logits, tokens)
        rows = torch.tensor([0, N - 1], device="cuda")
        assert_close("logp", lp[rows], _ref64(logits[rows], tokens[rows], 1.0)[0], atol=1e-4)
    caches = k._logprobs_fwd_kernel.device_caches
    n_variants = sum(len(c[0]) for c in caches.values())
    assert n_variants == 1, f"forward kernel compiled {n_variants} variants for different N"


def _one_hot_rows_off_the_round_trip(n=4, V=130, T=0.001, seed=0):
    """fp32 rows whose softmax at temperature ``T`` is one-hot and whose largest logit ``l``
    does not survive ``fl(fl(l / T) * T)``: a backward that recovers the raw max from the scaled
    one as ``M * T`` lands an ulp away from ``l``, and the gradient multiplies that by ``1 / T``."""
    g = torch.Generator().manual_seed(seed)
    inv = torch.tensor(1.0 / T, dtype=torch.float32)
    cand = (torch.randn(200000, generator=g) * 3 + 20).float()
    cand = cand[(cand * inv) / inv != cand][:2 * n]
    rows = (torch.randn(n, V, generator=g) * 3).float()
    top = torch.randint(0, V, (n,), generator=g)
    rows[torch.arange(n), top] = cand[:n]
    other = rows.clone()  # the same argmax with another such value: KL(p || q) ~0 as well
    other[torch.arange(n), top] = cand[n:]
    for r in (rows, other):
        assert bool(((r * inv) / inv != r).gather(1, top[:, None]).all())
    return rows, top, other


@pytest.mark.parametrize("backend", backends(native=True))
def test_low_temperature_one_hot_rows_have_zero_gradients(backend):
    # At T = 0.001 every row is one-hot: each gradient below is ~0 (the float64 reference gives
    # < 1e-30).  Before the fix the Triton backward recovered the raw max as M * T and gave
    # ~2 here; the native one fused x / T - M into an FMA and gave ~0.2 for the entropy.
    T = 0.001
    rows, top, other = _one_hot_rows_off_the_round_trip(T=T)
    n = rows.shape[0]
    rows, top, other = rows.to(DEVICE), top.to(DEVICE), other.to(DEVICE)
    g = torch.Generator().manual_seed(1)
    up = (torch.randn(2, n, generator=g) + 0.5).to(DEVICE)
    adv = torch.randn(1, n, generator=g).to(DEVICE)
    old = (torch.randn(1, n, generator=g) - 2.0).to(DEVICE)
    mask = torch.ones(1, n, dtype=torch.bool, device=DEVICE)
    eye = torch.eye(rows.shape[1], device=DEVICE)
    cases = {
        "token_logprobs": lambda x, b: sum(
            (o * u).sum() for o, u in zip(fr.token_logprobs(
                x, top, temperature=T, return_entropy=True, backend=b), up)),
        "token_entropy": lambda x, b: (fr.token_entropy(x, temperature=T, backend=b)
                                       * up[1]).sum(),
        "fused_ppo_loss": lambda x, b: fr.fused_ppo_loss(
            x[None], top[None], old, adv, mask, entropy_coef=0.1, temperature=T,
            backend=b)[0],
        "full_kl": lambda x, b: (fr.full_kl(x, other, temperature=T, backend=b) * up[0]).sum(),
        # the fused lm_head with an identity weight: its logits are the rows exactly
        "linear_token_logprobs": lambda x, b: sum(
            (o * u).sum() for o, u in zip(fr.linear_token_logprobs(
                x, eye.to(x.dtype), top, temperature=T, return_entropy=True, backend=b), up)),
        "fused_linear_ppo_loss": lambda x, b: fr.fused_linear_ppo_loss(
            x[None], eye.to(x.dtype), top[None], old, adv, mask, entropy_coef=0.1,
            temperature=T, backend=b)[0],
    }
    if backend == "native":  # full_kl has no native implementation (auto runs the reference)
        del cases["full_kl"]
    if backend != "reference":
        cases["fused_ppo_loss deferred"] = lambda x, b: fr.fused_ppo_loss(
            x[None], top[None], old, adv, mask, entropy_coef=0.1, temperature=T,
            grad_timing="backward", backend=b)[0]
    for name, loss in cases.items():
        leaf = rows.clone().requires_grad_(True)
        (got,) = torch.autograd.grad(loss(leaf, backend), leaf)
        leaf64 = rows.double().requires_grad_(True)
        ref_case = "fused_ppo_loss" if name.startswith("fused_ppo_loss") else name
        (want,) = torch.autograd.grad(cases[ref_case](leaf64, "reference"), leaf64)
        assert want.abs().max() < 1e-30, (name, want.abs().max().item())
        assert got.abs().max() <= 1e-5, (name, backend, got.abs().max().item())
