"""The native CPU backend (csrc/, fastrlhf/native.py): every op against the float64 reference and
against the Triton op (interpreter), gradients, gradcheck, bad input, thread-count determinism,
and the graceful fallback when the extension cannot be built.

The first test that needs the extension builds it (about a minute, once per machine: the build
is cached in $TORCH_EXTENSIONS_DIR).
"""

import importlib
import os
import warnings

import pytest
import torch

import fastrlhf as fr
from fastrlhf import backend as _backend
from fastrlhf import native as _native
from fastrlhf.ops import logprobs as LP
from fastrlhf.ops import losses as L
from fastrlhf import reference as ref
from helpers import TRITON_OK, assert_close

G = importlib.import_module("fastrlhf.ops.gae")  # the module (fastrlhf.ops.gae is the function)

CPU = torch.device("cpu")
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


@pytest.fixture(scope="module")
def native():
    if not _native.available():
        pytest.skip(f"native extension unavailable: {_native.build_error()}")
    return _native.load()


@pytest.fixture
def threads():
    """Restore the intra-op thread count after a test that changes it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _logits(shape, V, dtype, seed, scale=3.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, V, generator=g, dtype=torch.float64) * scale + offset
    tok = torch.randint(0, V, shape, generator=g)
    return x.to(dtype), tok


def _ref_lp(logits, tokens, temperature=1.0, ignore_index=-100):
    return ref.token_logprobs(logits.detach().double(), tokens, temperature, True, ignore_index)


# ----------------------------------------------------------------------------------------------
# build, dispatch and the no-compiler fallback
# ----------------------------------------------------------------------------------------------

def test_auto_picks_native_for_cpu_tensors(native, monkeypatch):
    monkeypatch.delenv("FASTRLHF_BACKEND", raising=False)
    assert _backend.resolve("auto", CPU, op="t", native_ok=True) == "native"
    assert _backend.resolve("auto", CPU, op="t", native_ok=False) == "reference"
    logits, tok = _logits((4,), 50, torch.float32, seed=0)
    a = fr.token_logprobs(logits, tok, backend="auto")
    b = fr.token_logprobs(logits, tok, backend="native")
    assert torch.equal(a, b)
    monkeypatch.setenv("FASTRLHF_BACKEND", "reference")
    assert _backend.resolve("auto", CPU, op="t", native_ok=True) == "reference"
    assert native.num_threads() == torch.get_num_threads()


@pytest.mark.parametrize("device", ["mps", "xpu", "hpu"])
def test_auto_keeps_native_to_cpu_tensors(native, monkeypatch, device):
    """The C++ backend reads CPU memory only: with the extension built (as on a Mac), ``auto`` on
    another device's tensors picks the reference (eager PyTorch runs there), not ``native``
    (whose binding would reject the tensors).  Only the device type is read: no such device is
    needed."""
    monkeypatch.delenv("FASTRLHF_BACKEND", raising=False)
    dev = torch.device(device)
    for native_ok in (True, False):
        assert _backend.resolve("auto", dev, op="t", native_ok=native_ok) == "reference"
        assert _backend.resolve(None, dev, op="t", native_ok=native_ok) == "reference"
    with pytest.raises(ValueError, match="backend='native' is the CPU backend"):
        _backend.resolve("native", dev, op="t", native_ok=True)
    assert _backend.resolve("auto", CPU, op="t", native_ok=True) == "native"


def test_env_preference_for_native_applies_to_cpu_tensors_only(native, monkeypatch):
    """FASTRLHF_BACKEND=native is a process-wide preference: CPU tensors of ops with a native
    implementation take it; other devices keep the automatic choice (CUDA: Triton; meta and
    the rest: the reference) instead of raising; an explicit backend="native" still raises."""
    monkeypatch.setenv("FASTRLHF_BACKEND", "native")
    assert _backend.resolve("auto", CPU, op="t", native_ok=True) == "native"
    assert _backend.resolve("auto", CPU, op="t", native_ok=False) == "reference"
    assert _backend.resolve("auto", torch.device("cuda"), op="t", native_ok=True) == "triton"
    for device in ("meta", "mps", "xpu"):
        assert _backend.resolve(None, torch.device(device), op="t", native_ok=True) == "reference"
    with pytest.raises(ValueError, match="backend='native' is the CPU backend"):
        _backend.resolve("native", torch.device("cuda"), op="t", native_ok=True)
    # shapes only, under the preference: the reference propagates meta tensors
    lp = fr.token_logprobs(torch.empty(3, 5, 11, device="meta"),
                           torch.zeros(3, 5, dtype=torch.long, device="meta"))
    assert lp.shape == (3, 5) and lp.device.type == "meta"


def _fresh_state(monkeypatch):
    monkeypatch.setattr(_native, "_STATE", {"tried": False, "module": None, "error": None})


def _fallback_checks():
    logits, tok = _logits((3,), 20, torch.float32, seed=1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert not _native.available()
        assert not _native.available()  # cached: no second build attempt, no second warning
        out = fr.token_logprobs(logits, tok)  # auto -> reference, no crash
        adv, _ = fr.gae(torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool))
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(msgs) == 1 and "could not be built" in msgs[0], msgs
    assert_close("fallback logp", out, _ref_lp(logits, tok)[0], atol=2e-5)
    assert adv.shape == (2, 5)
    with pytest.raises(RuntimeError, match="C\\+\\+ extension is not available"):
        fr.token_logprobs(logits, tok, backend="native")
    return msgs[0]


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    _fresh_state(monkeypatch)
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("Error building extension 'fastrlhf_native': c++: not found")

    monkeypatch.setattr(_native, "_build_extension", broken)
    msg = _fallback_checks()
    assert len(calls) == 1 and "c++: not found" in msg
    assert "c++: not found" in _native.build_error()


def test_a_build_with_another_aux_layout_is_refused(native, monkeypatch):
    """The fused loss's output rows are read by name (tables.FUSED_AUX_ROWS); a build whose
    FusedAux enum (csrc/native.h) says otherwise must not be used."""
    from fastrlhf.tables import FUSED_AUX_ROWS
    assert tuple(native.fused_aux_rows()) == FUSED_AUX_ROWS
    _native._check_layout(native)  # the real build passes
    _fresh_state(monkeypatch)

    class Swapped:  # two rows exchanged, as a stale or edited enum would give
        @staticmethod
        def fused_aux_rows():
            rows = list(FUSED_AUX_ROWS)
            rows[7], rows[9] = rows[9], rows[7]
            return rows
    monkeypatch.setattr(_native, "_build_extension", lambda: Swapped)
    msg = _fallback_checks()
    assert "aux rows" in msg and "FUSED_AUX_ROWS" in _native.build_error()


def test_no_compiler_on_path_falls_back(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(_native.shutil, "which", lambda name: None)
    msg = _fallback_checks()
    assert "no C++ compiler found" in msg


def test_disabled_by_env_is_silent(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.setenv("FASTRLHF_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _native.available()
    assert _backend.resolve("auto", CPU, op="t", native_ok=True) == "reference"


def test_sources_are_found_and_named_by_content():
    d = _native.source_dir()
    assert d is not None
    for f in ("bindings.cpp", "logprobs.cpp", "gae.cpp", "losses.cpp", "fused_loss.cpp",
              "common.h"):
        assert os.path.isfile(os.path.join(d, f)), f


# ----------------------------------------------------------------------------------------------
# token log-probs / entropy
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,V", [((1,), 1), ((2, 3), 130), ((3,), 5000), ((2,), 50257)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_forward_matches_float64(native, dtype, shape, V, temperature):
    logits, tok = _logits(shape, V, dtype, seed=V)
    lp, h = fr.token_logprobs(logits, tok, temperature=temperature, return_entropy=True,
                              backend="native")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert lp.dtype == acc and h.dtype == acc and lp.shape == tok.shape
    rl, rh = _ref_lp(logits, tok, temperature)
    assert_close("logp", lp, rl, atol=TOL[dtype], rtol=TOL[dtype])
    assert_close("entropy", h, rh, atol=TOL[dtype], rtol=TOL[dtype])
    assert_close("token_entropy", fr.token_entropy(logits, temperature=temperature,
                                                   backend="native"), rh,
                 atol=TOL[dtype], rtol=TOL[dtype])
    if V == 1:
        assert torch.all(lp == 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_logprobs_fp32_within_ulps_of_float64(native, temperature, scale):
    # The forward sums use a degree-5 exp (<= 2.02 ulp per term) and temperature 1 its own
    # multiply-free loops: log-probs stay within 2 ulp of max(1, |logp|) of float64 (measured:
    # <= 1.2), much tighter than the generic tolerance above.
    g = torch.Generator().manual_seed(int(scale * 10 + temperature * 100))
    x = torch.randn(64, 3001, generator=g) * scale
    tok = torch.randint(0, 3001, (64,), generator=g)
    lp = fr.token_logprobs(x, tok, temperature=temperature, backend="native").double()
    # the reference starts from the logits as the kernel scales them (x * float32(1 / T)): the
    # rounding of x / T itself is an error of every float32 implementation, eager's included
    z = (x * torch.tensor(1.0 / temperature, dtype=torch.float32)).double()
    want = torch.log_softmax(z, -1).gather(-1, tok[:, None]).squeeze(-1)
    eps = torch.finfo(torch.float32).eps
    err = ((lp - want).abs() / want.abs().clamp(min=1)).max().item()
    assert err <= 2 * eps, f"logp error {err / eps:.2f} ulp"
    # the argmax token's logp is -log S alone (|logp| often << 1): an absolute bound on the sum's
    # error (~375 additions per lane: measured <= 8.5 eps, with the degree-6 exp as well)
    top = x.argmax(-1)
    lp = fr.token_logprobs(x, top, temperature=temperature, backend="native").double()
    want = torch.log_softmax(z, -1).gather(-1, top[:, None]).squeeze(-1)
    err = (lp - want).abs().max().item()
    assert err <= 12 * eps, f"argmax logp error {err / eps:.2f} eps"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_logprobs_one_hot_rows_are_exact(native, dtype, temperature):
    # exp(0) is exactly 1 in the forward's exp (its constant term is 1), so a row with one
    # finite logit has log S = 0: logp exactly 0 and entropy exactly 0, at any temperature.
    x = torch.full((3, 5000), float("-inf"))
    x[0, 7] = 3.25
    x[1, 4999] = -11.5
    x[2, 2500] = 0.0
    x = x.to(dtype)
    tok = torch.tensor([7, 4999, 2500])
    lp, h = fr.token_logprobs(x, tok, temperature=temperature, return_entropy=True,
                              backend="native")
    assert torch.all(lp == 0), lp
    assert torch.all(h == 0), h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.001, 0.003])
def test_low_temperature_gradients_of_one_hot_rows(native, dtype, temperature):
    # At a low temperature the softmax of random logits is one-hot (the other exp terms
    # underflow) and every gradient is ~0.  The sweeps must all see the same x / T: with the
    # gradient sweep's multiply fused into its subtract (an FMA, GCC's default contraction) and
    # the statistics' not, log p of the largest logit came out half an ulp of x / T away from 0,
    # times 1 / T: entropy gradients of ~0.2 at T = 0.001 (found by the long hypothesis profile).
    x, tok = _logits((6,), 130, dtype, seed=35842546)
    top = x.float().argmax(-1)
    g = torch.Generator().manual_seed(1)
    up = torch.randn(2, 6, generator=g, dtype=torch.float64) + 0.5
    adv, old = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g) - 2.0
    mask = torch.ones(1, 6, dtype=torch.bool)
    cases = {
        "token_entropy": lambda v, b: (fr.token_entropy(v, temperature=temperature, backend=b)
                                       * up[1].to(v.dtype)).sum(),
        "token_logprobs": lambda v, b: sum(
            (o * u.to(o.dtype)).sum() for o, u in zip(fr.token_logprobs(
                v, top, temperature=temperature, return_entropy=True, backend=b), up)),
        "fused_ppo_loss": lambda v, b: fr.fused_ppo_loss(
            v[None], top[None], old, adv, mask, entropy_coef=0.1, temperature=temperature,
            backend=b)[0],
    }
    for name, loss in cases.items():
        leaf = x.clone().requires_grad_(True)
        (got,) = torch.autograd.grad(loss(leaf, "native"), leaf)
        leaf64 = x.double().requires_grad_(True)
        (want,) = torch.autograd.grad(loss(leaf64, "reference"), leaf64)
        assert want.abs().max() < 1e-20, (name, want.abs().max())  # the case is one-hot
        assert got.abs().max() <= 1e-6, (name, dtype, temperature, got.abs().max().item(),
                                         (got != 0).nonzero().tolist())


def test_row_statistics_leave_the_callers_denormal_mode_alone(native):
    # The forward and gradient sweeps run with flush-to-zero on (csrc/common.h FlushDenormals,
    # for the vscalefps of their exps) and must restore the thread's mode: afterwards a float op
    # on this thread still produces subnormals, and the sweeps' own results are exact where they
    # must be (a one-hot row: logp 0, entropy 0, gradient 0; -inf logits: gradient exactly 0).
    def subnormal():
        return float(torch.tensor([1e-30]) * torch.tensor([1e-10]))
    assert subnormal() != 0.0, "this thread flushes subnormals already"
    before = subnormal()
    x = torch.randn(4, 3000)
    x[1, ::2] = float("-inf")
    x[2] = float("-inf")
    x[2, 5] = 1.5  # one finite logit: log S = 0 exactly
    tok = torch.tensor([0, 1, 5, 2999])
    leaf = x.clone().requires_grad_(True)
    lp, h = fr.token_logprobs(leaf, tok, return_entropy=True, backend="native")
    assert subnormal() == before
    ref_lp = torch.log_softmax(x.double(), -1).gather(-1, tok[:, None])[:, 0]
    assert torch.allclose(lp.double(), ref_lp, rtol=0, atol=2e-6)
    assert float(lp[2].detach()) == 0.0 and float(h[2].detach()) == 0.0
    (lp.sum() + 0.5 * h.sum()).backward()
    assert subnormal() == before
    assert torch.all(leaf.grad[1, ::2] == 0) and torch.all(leaf.grad[2] == 0)
    x64 = x.double().requires_grad_(True)
    l64, h64 = ref.token_logprobs(x64, tok, 1.0, True)
    (l64.sum() + 0.5 * h64.sum()).backward()
    assert torch.allclose(leaf.grad.double(), x64.grad, rtol=0, atol=2e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp16_rows_compute_exactly_as_their_fp32_values(native, temperature):
    # fp16 -> fp32 is exact and the fp16 loader (one vector conversion) hands the loop the same
    # elements in the same order as the fp32 loader: bitwise equal results, subnormals, -inf
    # and an odd tail included.
    g = torch.Generator().manual_seed(7)
    V = 2 * 2048 + 37
    x = (torch.randn(5, V, generator=g) * 4).half()
    x[0, ::5] = float("-inf")
    x[1, :300] = torch.tensor(6e-8).half()          # fp16 subnormals
    x[2, 100] = 65504.0                              # the largest fp16
    x[3] = torch.linspace(-20, 20, V).half()
    tok = torch.randint(0, V, (5,), generator=g)
    a = fr.token_logprobs(x, tok, temperature=temperature, return_entropy=True,
                          backend="native")
    b = fr.token_logprobs(x.float(), tok, temperature=temperature, return_entropy=True,
                          backend="native")
    for u, w in zip(a, b):
        assert torch.equal(u, w), (u, w)


def test_logprobs_online_max_across_blocks(native):
    # The running max moves in every 2048-wide block (increasing logits), and also only in the
    # last one: the rescaling of the lane accumulators must be exact enough.
    V = 9000
    up = torch.linspace(-30, 30, V, dtype=torch.float64).repeat(2, 1)
    up[1] = up[1].flip(0)
    late = torch.randn(1, V, dtype=torch.float64)
    late[0, -1] = 40.0
    x = torch.cat([up, late]).float()
    tok = torch.tensor([V - 1, 0, 5])
    lp, h = fr.token_logprobs(x, tok, return_entropy=True, backend="native")
    rl, rh = _ref_lp(x, tok)
    assert_close("logp", lp, rl, atol=2e-5, rtol=2e-5)
    assert_close("entropy", h, rh, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("jump", [0.5, 7.9, 8.1, 20.0, 300.0])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_logprobs_block_max_above_the_running_max(native, dtype, jump, temperature):
    # The forward reads each 2048-wide block once, against the running max of the blocks before
    # it; a block up to 8 (scaled) above it is rescaled after the fact, one further above is
    # recomputed against its own max.  Both sides of that threshold, with peaked rows (entropy
    # near 0, where the rescale's cancellation would show) and flat ones, and the jump in the
    # last, partial block.
    V = 2 * 2048 + 37
    g = torch.Generator().manual_seed(int(jump * 10))
    x = torch.randn(4, V, generator=g, dtype=torch.float64)
    x[0, 3000] += jump * temperature           # one peak in block 2
    x[1, 2048:4096] += jump * temperature      # all of block 2 higher
    x[2, V - 5] += jump * temperature          # the peak in the partial last block
    x[3] *= 0.01                               # nearly flat, then a peak (entropy ~ log V)
    x[3, 4100] += jump * temperature
    x = x.to(dtype)
    tok = torch.tensor([3000, 2100, V - 5, 7])
    lp, h = fr.token_logprobs(x, tok, temperature=temperature, return_entropy=True,
                              backend="native")
    rl, rh = _ref_lp(x, tok, temperature)
    assert_close("logp", lp, rl, atol=2e-5, rtol=2e-5)
    assert_close("entropy", h, rh, atol=2e-5, rtol=2e-5)


def test_logprobs_inf_after_a_finite_block_is_nan(native):
    V = 3 * 2048
    x = torch.randn(3, V)
    x[0, 5000] = float("inf")    # +inf far above the running max: NaN, as log_softmax
    x[1, 5000] = float("nan")
    x[2, 2048:] = float("-inf")  # later blocks masked: they add exactly nothing
    lp, h = fr.token_logprobs(x, torch.tensor([1, 2, 3]), return_entropy=True, backend="native")
    assert torch.isnan(lp[:2]).all() and torch.isnan(h[:2]).all()
    rl, rh = _ref_lp(x[2:], torch.tensor([3]))
    assert_close("logp", lp[2:], rl, atol=2e-5, rtol=2e-5)
    assert_close("entropy", h[2:], rh, atol=2e-5, rtol=2e-5)


def test_logprobs_special_values(native):
    V = 3000  # two blocks
    logits, tok = _logits((6,), V, torch.float32, seed=5, offset=1e4)
    logits[0, ::3] = float("-inf")       # masked vocab
    tok[0] = 1
    logits[1, : V - 1] = float("-inf")   # one live entry, in the second block
    tok[1] = V - 1
    logits[2, 2500] = float("nan")       # NaN in the second block
    logits[3, :2048] = float("-inf")     # a block with nothing finite, then a NaN in it
    logits[3, 7] = float("nan")
    logits[4] = float("-inf")            # all -inf: NaN, as log_softmax
    x = logits.clone().requires_grad_(True)
    lp, h = fr.token_logprobs(x, tok, return_entropy=True, backend="native")
    rl, rh = _ref_lp(logits, tok)
    ok = [0, 1, 5]
    assert_close("logp", lp[ok], rl[ok], atol=5e-5, rtol=1e-5)
    assert_close("entropy", h[ok], rh[ok], atol=5e-5, rtol=1e-5)
    assert float(lp[1].detach()) == 0.0 and abs(float(h[1].detach())) < 1e-6
    for r in (2, 3, 4):
        assert torch.isnan(lp[r]) and torch.isnan(h[r]), r
    (lp[ok].sum() + h[ok].sum()).backward()
    assert torch.all(x.grad[0, ::3] == 0), "-inf vocab entries got a gradient"
    assert torch.isfinite(x.grad[ok]).all()


def test_bf16_gradient_store_nan_rules(native):
    # The bf16 gradient store skips its NaN select on rows whose scalars are all finite (they
    # cannot produce NaN); rows that can keep torch's canonical NaN 0x7fc0.
    V = 2 * 2048 + 37
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, V, generator=g) * 3).bfloat16()
    x[1, ::7] = float("-inf")
    x[2, 999] = float("nan")            # a NaN row: M is NaN, so is every gradient element
    x[3, ::5] = float("-inf")           # p = 0 there: inf * 0 = NaN under an infinite upstream
    tok = torch.randint(0, V, (4,), generator=g)
    up = torch.tensor([0.5, -1.25, 1.0, float("inf")])   # row 3: an infinite upstream factor
    leaf = x.clone().requires_grad_(True)
    lp = fr.token_logprobs(leaf, tok, backend="native")
    lp.backward(up)
    gb = leaf.grad
    ref = x.float().requires_grad_(True)
    fr.token_logprobs(ref, tok, backend="reference").backward(up)
    finite_rows = [0, 1]
    assert_close("bf16 grad", gb[finite_rows].float(), ref.grad[finite_rows], atol=2e-3, rtol=1e-2)
    assert torch.all(gb[1, ::7] == 0)
    bits = gb.view(torch.int16)
    assert torch.all(bits[2] == 0x7FC0), "NaN row: not the canonical bf16 NaN"
    nan3 = torch.isnan(gb[3])
    assert nan3.any() and torch.all(bits[3][nan3] == 0x7FC0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("V", [2100, 2063])  # V % 16 = 4, 15: the partial-vector stores
def test_logprobs_backward_matches_float64(native, dtype, inplace, V):
    B, T = 2, 5
    base, _ = _logits((B, T + 1), V, dtype, seed=7)
    tok = torch.randint(0, V, (B, T))
    tok[0, 1] = -100
    leaf = base.clone().requires_grad_(True)
    logits = leaf * 1.0  # a non-leaf activation, as an lm_head output
    lp, h = fr.token_logprobs(logits[:, :-1], tok, temperature=1.3, return_entropy=True,
                              inplace_backward=inplace, backend="native")
    g1, g2 = torch.randn(B, T, dtype=lp.dtype), torch.randn(B, T, dtype=h.dtype)
    (lp * g1 + h * g2).sum().backward()
    leaf64 = base.detach().double().requires_grad_(True)
    rl, rh = ref.token_logprobs(leaf64[:, :-1], tok, 1.3, True)
    (rl * g1.double() + rh * g2.double()).sum().backward()
    tol = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float64: 1e-10}[dtype]
    assert_close("dlogits", leaf.grad, leaf64.grad, atol=tol, rtol=tol)
    assert torch.all(leaf.grad[:, -1] == 0)
    if inplace:  # the gradient was written over the logits buffer
        assert_close("buffer", logits[:, :-1].detach(), leaf.grad[:, :-1], atol=0)


def test_inplace_backward_allocates_no_nv_buffer(native, monkeypatch):
    N, V = 6, 400
    base, tok = _logits((N,), V, torch.float32, seed=3)
    leaf = base.clone().requires_grad_(True)
    logits = leaf * 1.0
    lp, h = fr.token_logprobs(logits, tok, return_entropy=True, inplace_backward=True,
                              backend="native")
    big = []
    real_empty = torch.empty

    def spy(*a, **k):
        t = real_empty(*a, **k)
        if t.numel() >= N * V:
            big.append(tuple(t.shape))
        return t

    monkeypatch.setattr(_native.torch, "empty", spy)
    (lp.sum() + h.sum()).backward()
    monkeypatch.undo()
    assert big == [], f"in-place backward allocated [N, V] buffers: {big}"
    x64 = base.double().requires_grad_(True)
    rl, rh = ref.token_logprobs(x64, tok, 1.0, True)
    (rl.sum() + rh.sum()).backward()
    assert_close("dlogits", leaf.grad, x64.grad, atol=2e-5)


def test_large_cpu_gradients_are_advised_to_use_huge_pages(monkeypatch):
    # The fresh [N, V] gradient is advised (madvise MADV_HUGEPAGE) on its 2 MiB-aligned interior
    # before it is written; small buffers, and FASTRLHF_HUGEPAGES=0, are left alone.
    from fastrlhf import buffers as C
    calls = []
    monkeypatch.setattr(C, "_madvise", lambda addr, n, advice: calls.append((addr, n, advice)) or 0)
    small = C.grad_empty((4, 100), torch.float32, CPU)
    assert calls == [] and small.shape == (4, 100)
    big = C.grad_empty((C.HUGEPAGE_MIN_BYTES // 4 // 1000 + 1, 1000), torch.float32, CPU)
    ((addr, n, advice),) = calls
    lo, hi = big.data_ptr(), big.data_ptr() + big.numel() * 4
    assert advice == 14 and addr % (1 << 21) == 0 and n % (1 << 21) == 0 and n > 0
    assert lo <= addr and addr + n <= hi and hi - (addr + n) < (1 << 21) and addr - lo < (1 << 21)
    calls.clear()
    monkeypatch.setenv("FASTRLHF_HUGEPAGES", "0")
    C.grad_empty((C.HUGEPAGE_MIN_BYTES // 4 + 8,), torch.float32, CPU)
    assert calls == []


def test_native_backward_writes_into_an_advised_buffer(native, monkeypatch):
    from fastrlhf import buffers as C
    advised = []
    monkeypatch.setattr(C, "advise_hugepages", lambda t: advised.append(t.data_ptr()) or True)
    N, V = 8, 1000
    base, tok = _logits((N,), V, torch.float32, seed=11)
    leaf = base.clone().requires_grad_(True)
    lp, h = fr.token_logprobs(leaf, tok, return_entropy=True, backend="native")
    (lp.sum() + h.sum()).backward()
    assert advised == [leaf.grad.data_ptr()]  # autograd keeps the op's buffer as .grad
    x64 = base.double().requires_grad_(True)
    rl, rh = ref.token_logprobs(x64, tok, 1.0, True)
    (rl.sum() + rh.sum()).backward()
    assert_close("dlogits", leaf.grad, x64.grad, atol=2e-5)
    # the fused loss's gradient (computed in its forward) too
    advised.clear()
    from fastrlhf.ops.fused_loss import fused_ppo_loss
    x = base.view(2, 4, V).clone().requires_grad_(True)
    loss, _ = fused_ppo_loss(x, tok.view(2, 4), torch.zeros(2, 4), torch.ones(2, 4),
                             torch.ones(2, 4), backend="native")
    loss.backward()
    assert advised == [x.grad.data_ptr()]


def test_logprobs_strided_views_read_in_place(native, monkeypatch):
    base, _ = _logits((3, 7), 97, torch.float32, seed=2)
    x = base[:, :-1]
    tok = torch.randint(0, 97, (3, 6))
    copies = []
    real = torch.Tensor.contiguous

    def spy(self, *a, **k):
        if self.numel() >= x.numel():
            copies.append(tuple(self.shape))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    lp, h = fr.token_logprobs(x, tok, return_entropy=True, backend="native")
    monkeypatch.undo()
    assert copies == [], f"logits were copied: {copies}"
    rl, rh = _ref_lp(x, tok)
    assert_close("logp", lp, rl, atol=2e-5)
    y = torch.randn(4, 3, 5, 97)[:, ::2, 1:].transpose(0, 1)  # three strided leading dims
    ty = torch.randint(0, 97, y.shape[:-1])
    assert_close("3-d view", fr.token_logprobs(y, ty, backend="native"), _ref_lp(y, ty)[0],
                 atol=2e-5)


def test_logprobs_gradcheck(native):
    x = torch.randn(2, 4, 11, dtype=torch.float64, requires_grad=True)
    tok = torch.randint(0, 11, (2, 3))
    tok[1, 0] = -100
    f = lambda x: fr.token_logprobs(x[:, :-1], tok, temperature=0.8,  # noqa: E731
                                    return_entropy=True, backend="native")
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(
        lambda x: fr.token_entropy(x, temperature=1.5, backend="native"), (x,), eps=1e-6,
        atol=1e-7)


@pytest.mark.skipif(not TRITON_OK, reason="needs the Triton interpreter")
def test_logprobs_native_matches_triton(native):
    base, _ = _logits((2, 4), 70, torch.float32, seed=4)
    tok = torch.randint(0, 70, (2, 3))
    out = {}
    for be in ("native", "triton"):
        leaf = base.clone().requires_grad_(True)
        lp, h = fr.token_logprobs(leaf[:, :-1], tok, temperature=0.9, return_entropy=True,
                                  backend=be)
        (lp.sum() + 0.3 * h.sum()).backward()
        out[be] = (lp.detach(), h.detach(), leaf.grad)
    for name, a, b in zip(("logp", "entropy", "dlogits"), out["native"], out["triton"]):
        assert_close(name, a, b, atol=2e-6, rtol=2e-6)


def test_logprobs_bad_input(native):
    logits = torch.randn(2, 3, 10)
    tok = torch.randint(0, 10, (2, 3))
    with pytest.raises(TypeError, match="tokens must have dtype"):
        fr.token_logprobs(logits, tok.float(), backend="native")
    with pytest.raises(ValueError, match=r"tokens must have shape \(2, 3\)"):
        fr.token_logprobs(logits, tok[:, :2], backend="native")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fr.token_logprobs(logits, tok, temperature=0.0, backend="native")
    for dt in (torch.int64, torch.int32):  # (the ids are checked inside the extension call)
        for v in (10, -3):
            bad = tok.clone().to(dt)
            bad[1, 2] = v
            with pytest.raises(ValueError, match=rf"id {v} \(flat position 5\) outside \[0, 10\)"):
                fr.token_logprobs(logits, bad, backend="native")
            with fr.config.check_tokens(False):  # unchecked: NaN there, no out-of-bounds read
                lp = fr.token_logprobs(logits, bad, backend="native")
            assert torch.isnan(lp[1, 2]) and torch.isfinite(lp[0]).all()
        bad[1, 2] = -3
        lp = fr.token_logprobs(logits, bad, ignore_index=-3, backend="native")
        assert lp[1, 2] == 0 and torch.isfinite(lp).all()
    with pytest.raises(ValueError, match="backend='native' is the CPU backend"):
        fr.token_logprobs(logits.to("meta"), tok.to("meta"), backend="native")
    # the C++ layer itself refuses buffers that do not fit (no memory error)
    lse = torch.empty(3, 2)
    with pytest.raises(RuntimeError, match="lse must be contiguous with 12 elements"):
        native.logprobs_fwd(logits, [1, 2, 3], [30, 10, 0], 10, None, 1.0, -100, None, None, lse)
    with pytest.raises(RuntimeError, match="reaches outside its storage"):
        native.logprobs_fwd(logits, [1, 2, 6], [30, 10, 10], 10, None, 1.0, -100, None, None,
                            torch.empty(12, 2))


# ----------------------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------------------

def _gae_inputs(B, T, dtype, seed, mask_dtype=torch.bool):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    m = (torch.rand(B, T, generator=g) > 0.3)
    m[0] = False  # a fully masked row
    return r, v, m.to(mask_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64])
def test_gae_matches_float64(native, dtype, mask_dtype):
    r, v, m = _gae_inputs(4, 63, dtype, seed=1, mask_dtype=mask_dtype)
    r[1, ~(m[1] != 0)] = float("nan")  # garbage under the mask is never read
    adv, ret = fr.gae(r, v, m, gamma=0.99, lam=0.9, backend="native")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert adv.dtype == acc and ret.dtype == acc
    ra, rr = ref.gae(r.double(), v.double(), m, 0.99, 0.9)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert_close("advantages", adv, ra, atol=tol, rtol=tol)
    assert_close("returns", ret, rr, atol=tol, rtol=tol)
    assert torch.all(adv[0] == 0) and torch.all(ret[0] == 0)
    a64, _ = fr.gae(r, v, m, gamma=0.99, lam=0.9, compute_dtype=torch.float64, backend="native")
    assert a64.dtype == torch.float64


def test_gae_strided_and_varlen(native):
    r, v, m = _gae_inputs(3, 40, torch.float32, seed=2)
    rt, vt, mt = r.t().contiguous().t(), v[:, :], m.t().contiguous().t()  # column-major views
    adv, ret = fr.gae(rt, vt, mt, gamma=1.0, lam=0.95, backend="native")
    ra, rr = ref.gae(r.double(), v.double(), m, 1.0, 0.95)
    assert_close("strided adv", adv, ra, atol=2e-5)
    cu = torch.tensor([0, 7, 7, 20, 33, 40], dtype=torch.int32)
    pr, pv, pm = r[1:2], v[1:2], m[1:2]
    adv, ret = fr.gae(pr, pv, pm, cu_seqlens=cu, backend="native")
    ra, rr = ref.gae(pr.double(), pv.double(), pm, 1.0, 0.95, cu)
    assert_close("varlen adv", adv, ra, atol=2e-5)
    assert_close("varlen ret", ret, rr, atol=2e-5)


@pytest.mark.skipif(not TRITON_OK, reason="needs the Triton interpreter")
def test_gae_native_matches_triton(native):
    r, v, m = _gae_inputs(3, 37, torch.float32, seed=3)
    a1, r1 = fr.gae(r, v, m, gamma=0.97, lam=0.9, backend="native")
    a2, r2 = fr.gae(r, v, m, gamma=0.97, lam=0.9, backend="triton")
    assert_close("adv", a1, a2, atol=2e-5)
    assert_close("ret", r1, r2, atol=2e-5)


def test_gae_bad_input(native):
    r, v, m = _gae_inputs(2, 5, torch.float32, seed=0)
    with pytest.raises(ValueError, match="gamma must lie in"):
        fr.gae(r, v, m, gamma=1.5, backend="native")
    with pytest.raises(ValueError, match="values must have shape"):
        fr.gae(r, v[:, :4], m, backend="native")
    with pytest.raises(ValueError, match="cu_seqlens must end at total"):
        fr.gae(r[:1], v[:1], m[:1], cu_seqlens=torch.tensor([0, 3]), backend="native")
    with pytest.raises(RuntimeError, match="cu_seqlens"):  # the C++ layer checks too
        native.gae(r[:1], v[:1], m[:1], torch.tensor([0, 9]), 1.0, 1.0, torch.empty(1, 5),
                   torch.empty(1, 5))


# ----------------------------------------------------------------------------------------------
# PPO policy / value losses
# ----------------------------------------------------------------------------------------------

def _loss_inputs(B, T, dtype, seed, adv_row=False):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 2).to(dtype)
    old = (lp.double() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    adv = torch.randn(B if adv_row else (B, T), generator=g, dtype=torch.float64).to(dtype)
    m = torch.rand(B, T, generator=g) > 0.3
    m[1] = False
    return lp, old, adv, m


@pytest.mark.parametrize("agg", fr.ops.losses.AGG_MODES)
@pytest.mark.parametrize("level,dual,adv_row", [("token", None, False), ("token", 3.0, False),
                                                ("sequence", None, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_loss_matches_float64(native, agg, level, dual, adv_row, dtype):
    lp, old, adv, m = _loss_inputs(4, 29, dtype, seed=3, adv_row=adv_row)
    old[2, ~m[2]] = float("nan")  # ignored under the mask
    x = lp.clone().requires_grad_(True)
    loss, st = fr.ppo_policy_loss(x, old, adv, m, clip_low=0.2, clip_high=0.28, dual_clip=dual,
                                  agg=agg, ratio_level=level, backend="native")
    g, = torch.autograd.grad(loss, x)
    x64 = lp.double().requires_grad_(True)
    rl, rs = ref.ppo_policy_loss(x64, old.double(), adv.double(), m, 0.2, 0.28, dual, agg, level)
    rg, = torch.autograd.grad(rl, x64)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close("loss", loss, rl, atol=tol, rtol=tol)
    assert_close("dlogp", g, rg, atol=tol, rtol=tol)
    for k in ("clipfrac", "clipfrac_lower", "approx_kl"):
        assert_close(k, st[k], rs[k], atol=tol, rtol=tol)


@pytest.mark.parametrize("clip", [None, 0.3])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_value_loss_matches_float64(native, clip, agg):
    v, ov, ret, m = _loss_inputs(3, 33, torch.float32, seed=5)
    x = v.clone().requires_grad_(True)
    loss, st = fr.ppo_value_loss(x, ov, ret, m.float(), clip=clip, agg=agg, backend="native")
    g, = torch.autograd.grad(loss, x)
    x64 = v.double().requires_grad_(True)
    rl, rs = ref.ppo_value_loss(x64, ov.double(), ret.double(), m.float(), clip, agg)
    rg, = torch.autograd.grad(rl, x64)
    assert_close("loss", loss, rl, atol=2e-6, rtol=2e-6)
    assert_close("dvalues", g, rg, atol=2e-6, rtol=2e-6)
    assert_close("clipfrac", st["clipfrac"], rs["clipfrac"], atol=1e-7)


def test_losses_gradcheck_and_bf16(native):
    lp, old, adv, m = _loss_inputs(3, 9, torch.float64, seed=6)
    assert torch.autograd.gradcheck(
        lambda x: fr.ppo_policy_loss(x, old, adv, m, dual_clip=3.0, backend="native")[0],
        (lp.clone().requires_grad_(True),))
    assert torch.autograd.gradcheck(
        lambda x: fr.ppo_value_loss(x, old, adv, m, clip=0.2, backend="native")[0],
        (lp.clone().requires_grad_(True),))
    xb = lp.to(torch.bfloat16).requires_grad_(True)
    loss, _ = fr.ppo_policy_loss(xb, old.float(), adv.float(), m, backend="native")
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    rl, _ = ref.ppo_policy_loss(xb.detach().double(), old, adv, m)
    assert_close("bf16 logp loss", loss, rl, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not TRITON_OK, reason="needs the Triton interpreter")
def test_losses_native_match_triton(native):
    lp, old, adv, m = _loss_inputs(3, 21, torch.float32, seed=8)
    res = {}
    for be in ("native", "triton"):
        x = lp.clone().requires_grad_(True)
        loss, st = fr.ppo_policy_loss(x, old, adv, m, dual_clip=3.0, agg="seq-mean-token-sum",
                                      backend=be)
        v = lp.clone().requires_grad_(True)
        vl, vs = fr.ppo_value_loss(v, old, adv, m, clip=0.2, backend=be)
        (loss + vl).backward()
        res[be] = [loss, st["clipfrac"], st["approx_kl"], x.grad, vl, vs["clipfrac"], v.grad]
    for i, (a, b) in enumerate(zip(res["native"], res["triton"])):
        assert_close(f"output {i}", a, b, atol=2e-6, rtol=2e-6)


def test_losses_bad_input(native):
    lp, old, adv, m = _loss_inputs(2, 5, torch.float32, seed=0)
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        fr.ppo_policy_loss(lp, old, adv, m, agg="mean", backend="native")
    with pytest.raises(ValueError, match="dual_clip must be a finite number > 1"):
        fr.ppo_policy_loss(lp, old, adv, m, dual_clip=0.5, backend="native")
    with pytest.raises(ValueError, match="mask must have shape"):
        fr.ppo_value_loss(lp, old, adv, m[:, :3], backend="native")
    with pytest.raises(RuntimeError, match="stats must be contiguous with 3 elements"):
        native.policy_fwd(lp, old, adv, m, 0.8, 1.2, None, False, 0, 1.0, None, 5.0,
                          torch.empty(()), torch.empty(2), torch.empty(2), torch.empty(2))


# ----------------------------------------------------------------------------------------------
# fused PPO loss from the logits
# ----------------------------------------------------------------------------------------------

def _fused_loss(*args, **kwargs):
    from fastrlhf.ops.fused_loss import fused_ppo_loss  # (not re-exported by fastrlhf yet)
    return fused_ppo_loss(*args, **kwargs)


def _fused_native_available():
    """fastrlhf.ops.fused_loss dispatches backend="native" to fastrlhf.native."""
    try:
        from fastrlhf.ops.fused_loss import fused_ppo_loss
        fused_ppo_loss(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long),
                       torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), backend="native")
    except ImportError:
        return False
    except ValueError as e:
        if "no native" in str(e):
            return False
        raise
    return True


def _fused_inputs(B, T, V, dtype, seed, adv_row=False):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    tok = torch.randint(0, V, (B, T), generator=g)
    tok[0, 0] = -100
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2 - 6
    adv = torch.randn(B if adv_row else (B, T), generator=g, dtype=torch.float64)
    m = torch.rand(B, T, generator=g) > 0.3
    refl = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2 - 6
    return logits, tok, old, adv, m, refl


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("level,dual,kind,adv_row,inplace", [
    ("token", 3.0, "k3", False, False), ("token", None, "k2+", True, True),
    ("sequence", None, "k1", True, False), ("sequence", 3.0, "abs", False, True)])
def test_fused_loss_matches_float64(native, dtype, level, dual, kind, adv_row, inplace):
    if not _fused_native_available():
        pytest.skip("fastrlhf.ops.fused_loss has no native dispatch yet")
    B, T, V = 3, 4, 2100
    logits, tok, old, adv, m, refl = _fused_inputs(B, T, V, dtype, seed=11, adv_row=adv_row)
    leaf = logits.clone().requires_grad_(True)
    x = (leaf * 1.0)[:, :-1]
    loss, st = _fused_loss(x, tok, old, adv, m, ref_logp=refl, kl_coef=0.1, kl_kind=kind,
                                 entropy_coef=0.01, clip_low=0.2, clip_high=0.28,
                                 dual_clip=dual, temperature=1.3, agg="seq-mean-token-mean",
                                 ratio_level=level, inplace_backward=inplace, backend="native")
    (2.0 * loss).backward()
    x64 = logits.double().requires_grad_(True)
    rl, rs = ref.fused_ppo_loss(x64[:, :-1], tok, old, adv, m, refl, 0.1, kind, 0.01, 0.2, 0.28,
                                dual, 1.3, "seq-mean-token-mean", level)
    (2.0 * rl).backward()
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2}[dtype]
    assert_close("loss", loss, rl, atol=tol, rtol=tol)
    assert_close("dlogits", leaf.grad, x64.grad, atol=tol, rtol=tol)
    for k in ("logp", "entropy", "kl", "clipfrac", "clipfrac_lower", "approx_kl",
              "entropy_mean", "kl_mean"):
        assert_close(k, st[k], rs[k], atol=max(tol, 2e-5), rtol=max(tol, 2e-5))


@pytest.mark.parametrize("dtype,V", [(torch.float32, 65536 + 8), (torch.bfloat16, 65536 + 16)])
def test_streamed_gradients_equal_the_cached_ones(native, dtype, V):
    """token_logprobs' backward writes a separate gradient larger than the last-level cache
    with streaming stores (csrc/common.h stream_stores), row by row where the row is 64-byte
    aligned: V is chosen so that every other row is.  The in-place backward (never streamed)
    must give the same bits, and both match the float64 reference.  The fused loss (which does
    not stream) at the same size: out of place and in place bitwise equal too."""
    if not _fused_native_available():
        pytest.skip("fastrlhf.ops.fused_loss has no native dispatch yet")
    esize = torch.tensor([], dtype=dtype).element_size()
    N = 1
    while not native.stream_stores(N * V * esize):
        N *= 2
        if N * V * esize > (1 << 30):
            pytest.skip("this build does not stream (AVX-512 only), or its last-level cache "
                        "is too large to exceed in a test")
    N += 3  # an odd number of rows
    assert native.stream_stores(N * V * esize)
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(N, V, generator=g) * 2).to(dtype)
    tok = torch.randint(0, V, (N,), generator=g)
    w = torch.randn(N, generator=g)

    def grad_of(inplace):
        leaf = base.clone().requires_grad_(True)
        x = leaf * 1.0 if inplace else leaf
        lp, h = fr.token_logprobs(x, tok, return_entropy=True, inplace_backward=inplace,
                                  backend="native")
        ((lp * w).sum() + 0.1 * h.sum()).backward()
        return leaf.grad
    streamed, cached = grad_of(False), grad_of(True)
    assert torch.equal(streamed, cached)
    x64 = base[:4].double().requires_grad_(True)  # rows 0-3: aligned and not
    l64, h64 = ref.token_logprobs(x64, tok[:4], 1.0, True)
    ((l64 * w[:4].double()).sum() + 0.1 * h64.sum()).backward()
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    assert_close("dlogits", streamed[:4], x64.grad, atol=tol, rtol=tol)

    old = torch.randn(1, N, generator=g, dtype=torch.float64) * 0.1 - 11
    adv = torch.randn(1, N, generator=g, dtype=torch.float64)
    m = torch.ones(1, N, dtype=torch.bool)

    def fused_grad(inplace):
        leaf = base.clone().requires_grad_(True)
        x = (leaf * 1.0 if inplace else leaf).view(1, N, V)
        loss, _ = _fused_loss(x, tok.view(1, N), old, adv, m, entropy_coef=0.01,
                              inplace_backward=inplace, backend="native")
        loss.backward()
        return leaf.grad
    assert torch.equal(fused_grad(False), fused_grad(True))


@pytest.mark.parametrize("inplace", [False, True])
def test_gspo_in_sequence_groups_matches_float64(native, threads, inplace):
    """GSPO's two passes (statistics, then loss / gradient) run per group of whole sequences
    sized to the L2 caches (gspo_seq_group).  Sequences of a size that makes groups of two, with
    B = 3 (so a full group and a partial one), against the float64 reference."""
    if not _fused_native_available():
        pytest.skip("fastrlhf.ops.fused_loss has no native dispatch yet")
    torch.set_num_threads(2)  # the budget scales with the threads: keep the shapes small
    B, T = 3, 3
    # the smallest vocab whose sequences group two by two on this machine and thread count
    V = next(v for v in range(1000, 2_000_001, 500)
             if native.gspo_seq_group(T * v * 8, B) == 2)
    assert native.gspo_seq_group(T * V * 8, B) == 2
    logits, tok, _, adv, m, refl = _fused_inputs(B, T, V, torch.float64, seed=5, adv_row=True)
    g = torch.Generator().manual_seed(6)
    lp = ref.token_logprobs(logits[:, :-1], tok.clamp(min=0))
    old = lp + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios near 1
    m[1] = False                                                           # a masked sequence
    kw = dict(ref_logp=refl, kl_coef=0.1, kl_kind="k3", entropy_coef=0.01, clip_low=0.2,
              agg="seq-mean-token-mean", ratio_level="sequence")
    leaf = logits.clone().requires_grad_(True)
    loss, st = _fused_loss((leaf * 1.0)[:, :-1], tok, old, adv, m, backend="native",
                           inplace_backward=inplace, **kw)
    (1.5 * loss).backward()
    x64 = logits.clone().requires_grad_(True)
    rl, rs = ref.fused_ppo_loss(x64[:, :-1], tok, old, adv, m, refl, 0.1, "k3", 0.01, 0.2, None,
                                None, 1.0, "seq-mean-token-mean", "sequence")
    (1.5 * rl).backward()
    assert_close("loss", loss, rl, atol=1e-10, rtol=1e-10)
    assert_close("dlogits", leaf.grad, x64.grad, atol=1e-10, rtol=1e-10)
    assert_close("logp", st["logp"], rs["logp"], atol=1e-10, rtol=1e-10)
    assert (leaf.grad[1] == 0).all() and leaf.grad[0].abs().sum() > 0
    assert leaf.grad[2].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("ent_coef,temperature", [(0.0, 1.0), (0.03, 0.7)])
def test_fused_loss_gradient_from_kept_exps_across_blocks(native, dtype, ent_coef, temperature):
    """The token-level fused loss writes its gradient from the exp terms of the statistics
    sweep (RowExps, one per element, against each 2048-wide block's reference max): rows whose
    first block is all -inf (no reference: its terms are 0), whose later block jumps above the
    running max by less / more than the rescale slack (rescaled / recomputed block), with a
    partial last vector (V = 3 * 2048 + 37), masked and ignored tokens -- every gradient against
    the float64 reference."""
    if not _fused_native_available():
        pytest.skip("fastrlhf.ops.fused_loss has no native dispatch yet")
    B, T, V = 2, 5, 3 * 2048 + 37
    logits, tok, old, adv, m, refl = _fused_inputs(B, T, V, torch.float64, seed=23)
    logits[0, 1, :2048] = float("-inf")          # first block: nothing finite
    logits[0, 2, 2048 + 5] += 4.0                # later block a little above the running max
    logits[0, 3, 2 * 2048 + 9] += 30.0           # ... far above it (recomputed)
    logits[1, 0, :2048] = float("-inf")
    logits[1, 0, 3 * 2048 + 30] = 25.0           # the max in the partial last vector
    logits[1, 1, :] = -3.0                       # a constant row
    tok[0, 1] = 3000                             # a finite logit for the -inf-led rows
    tok[1, 0] = 3 * 2048 + 30
    m[0, 1:4] = True
    m[1, :2] = True
    m[1, 4] = False
    logits = logits.to(dtype)
    kw = dict(ref_logp=refl, kl_coef=0.1, kl_kind="k3", entropy_coef=ent_coef,
              temperature=temperature, agg="token-mean")
    leaf = logits.clone().requires_grad_(True)
    loss, st = _fused_loss(leaf[:, :-1], tok, old, adv, m, backend="native", **kw)
    (3.0 * loss).backward()
    x64 = logits.double().requires_grad_(True)
    rl, _ = ref.fused_ppo_loss(x64[:, :-1], tok, old, adv, m, refl, 0.1, "k3", ent_coef, 0.2,
                               None, None, temperature, "token-mean", "token")
    (3.0 * rl).backward()
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2}[dtype]
    assert_close("loss", loss, rl, atol=tol, rtol=tol)
    assert torch.isfinite(leaf.grad).all()
    assert_close("dlogits", leaf.grad, x64.grad, atol=tol, rtol=tol)
    # the -inf entries get exactly zero gradient, the masked row exactly zero everywhere
    assert (leaf.grad[0, 1, :2048] == 0).all() and (leaf.grad[1, 4] == 0).all()


def test_fused_loss_gradcheck(native):
    if not _fused_native_available():
        pytest.skip("fastrlhf.ops.fused_loss has no native dispatch yet")
    logits, tok, old, adv, m, refl = _fused_inputs(2, 3, 7, torch.float64, seed=2)
    x = logits[:, :-1].clone().requires_grad_(True)
    f = lambda x: _fused_loss(x, tok, old, adv, m, ref_logp=refl,  # noqa: E731
                                    kl_coef=0.2, entropy_coef=0.05, dual_clip=3.0,
                                    backend="native")[0]
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def test_fused_loss_token_ids_checked_in_the_extension(native):
    """The native fused loss checks the ids in its one C++ call: int32 / int64 ids, a negative
    or too large id is refused with the op's message (nothing computed, the logits untouched
    even in place), ignore_index passes; unchecked, that token's logp is NaN, the others
    finite."""
    logits, tok, old, adv, m, refl = _fused_inputs(2, 3, 10, torch.float32, seed=4)
    x = logits[:, :-1].contiguous()
    m[:] = True
    for dt in (torch.int64, torch.int32):
        for v in (10, -3):
            bad = tok.clone().to(dt)
            bad[1, 1] = v
            xi = x.clone().requires_grad_()
            with pytest.raises(ValueError, match=rf"tokens contains id {v} \(flat position 4\) "
                                                 r"outside \[0, 10\)"):
                _fused_loss(xi, bad, old, adv, m, backend="native", inplace_backward=True)
            assert torch.equal(xi.detach(), x)
        ok = tok.clone().to(dt)
        ok[ok == -100] = -7
        ok[1, 1] = -7
        loss, st = _fused_loss(x, ok, old, adv, m, ignore_index=-7, backend="native")
        assert st["logp"][1, 1] == 0 and torch.isfinite(loss)
        with fr.config.check_tokens(False):
            loss, st = _fused_loss(x, bad, old, adv, m, backend="native")
        assert torch.isnan(st["logp"][1, 1]) and torch.isnan(loss)
        keep = torch.ones(2, 3, dtype=torch.bool)
        keep[1, 1] = False
        assert torch.isfinite(st["logp"][keep]).all()


@pytest.mark.skipif(not TRITON_OK, reason="needs the Triton interpreter")
def test_fused_loss_native_matches_triton(native):
    if not _fused_native_available():
        pytest.skip("fastrlhf.ops.fused_loss has no native dispatch yet")
    logits, tok, old, adv, m, refl = _fused_inputs(2, 3, 70, torch.float32, seed=5)
    res = {}
    for be in ("native", "triton"):
        x = logits[:, :-1].clone().requires_grad_(True)
        loss, st = _fused_loss(x, tok, old, adv, m, ref_logp=refl, kl_coef=0.1,
                                     entropy_coef=0.02, backend=be)
        loss.backward()
        res[be] = [loss, x.grad] + [st[k] for k in sorted(st)]
    for i, (a, b) in enumerate(zip(res["native"], res["triton"])):
        assert_close(f"output {i}", a, b, atol=3e-6, rtol=3e-6)


# ----------------------------------------------------------------------------------------------
# determinism across thread counts (promised bitwise: one thread per row, serial reductions)
# ----------------------------------------------------------------------------------------------

def _run_all(fused: bool):
    out = []
    logits, tok = _logits((300,), 257, torch.float32, seed=21)  # > 2 chunks of rows
    x = logits.clone().requires_grad_(True)
    lp, h = fr.token_logprobs(x, tok, return_entropy=True, backend="native")
    (lp.sum() + 0.5 * h.sum()).backward()
    out += [lp, h, x.grad]
    r, v, m = _gae_inputs(512, 40, torch.float32, seed=22)
    out += list(fr.gae(r, v, m, backend="native"))
    lp2, old, adv, m2 = _loss_inputs(600, 30, torch.float32, seed=23)
    y = lp2.clone().requires_grad_(True)
    loss, st = fr.ppo_policy_loss(y, old, adv, m2, ratio_level="sequence", backend="native")
    vl, _ = fr.ppo_value_loss(y, old, adv, m2, backend="native")
    (loss + vl).backward()
    out += [loss, vl, y.grad, *st.values()]
    if fused:
        lg, tk, o, a, mk, rf = _fused_inputs(8, 40, 257, torch.float32, seed=24)
        z = lg[:, :-1].clone().requires_grad_(True)
        fl, fs = _fused_loss(z, tk, o, a, mk, ref_logp=rf, kl_coef=0.1, entropy_coef=0.01,
                                   backend="native")
        fl.backward()
        out += [fl, z.grad, *fs.values()]
    return [t.detach().clone() for t in out]


def test_thread_count_gives_bitwise_identical_results(native, threads):
    fused = _fused_native_available()
    torch.set_num_threads(1)
    one = _run_all(fused)
    torch.set_num_threads(2)
    assert native.num_threads() == 2
    two = _run_all(fused)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), \
            f"output {i} differs between 1 and 2 threads"


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------

def test_opcheck_native_ops(native):
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    logits, tok = _logits((3,), 20, torch.float32, seed=1)
    x = logits.clone().requires_grad_(True)
    torch.library.opcheck(LP._token_logprobs.op, (x, tok, 1.0, -100, "native"), test_utils=tests)
    torch.library.opcheck(LP._token_entropy.op, (x, 0.5, "native"), test_utils=tests)
    r, v, m = _gae_inputs(2, 6, torch.float32, seed=1)
    torch.library.opcheck(G._gae.op, (r, v, m, None, 1.0, 0.95, 6, False, "native"),
                          test_utils=tests)
    lp, old, adv, mk = _loss_inputs(2, 6, torch.float32, seed=1)
    lpg = lp.clone().requires_grad_(True)
    torch.library.opcheck(L._policy.op, (lpg, old, adv, mk, 0.8, 1.2, None, False,
                                         "token-mean", 1, None, None, 6.0, None, "native"),
                          test_utils=tests)
    torch.library.opcheck(L._value.op, (lpg, old, adv, mk, 0.5, "token-sum", 1, None,
                                        None, 6.0, None, "native"), test_utils=tests)


def test_torch_compile_fullgraph(native):
    torch._dynamo.reset()
    V, H = 29, 8
    lin = torch.nn.Linear(H, V)

    def f(h, tokens, old, adv, m):
        logits = lin(h)[:, :-1]
        lp, ent = fr.token_logprobs(logits, tokens, return_entropy=True, backend="native")
        loss, _ = fr.ppo_policy_loss(lp, old, adv, m, backend="native")
        return loss - 0.01 * ent.mean()

    h = torch.randn(2, 6, H)
    tok = torch.randint(0, V, (2, 5))
    old, adv, m = torch.randn(2, 5) - 3, torch.randn(2, 5), torch.rand(2, 5) > 0.2
    eager = f(h, tok, old, adv, m)
    eager.backward()
    g = lin.weight.grad.clone()
    lin.zero_grad()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(h, tok, old, adv, m)
    out.backward()
    assert_close("compiled loss", out, eager, atol=1e-6)
    assert_close("compiled grad", lin.weight.grad, g, atol=1e-6)


def _bench_module(name):
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_cpu_rate_reports_every_loop(native, tmp_path):
    # bench/bench_cpu_rate.py (the loops' compute-rate instrument) on a tiny problem: one row per
    # (loop, dtype, temperature), positive rates, and the JSON it writes.
    import json
    mod = _bench_module("bench_cpu_rate")
    out = tmp_path / "rate.json"
    threads = torch.get_num_threads()
    try:
        rows = mod.main(["--rows", "3", "--vocab", "70", "--reps", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    keys = {(r["loop"], r["dtype"], r["temperature"]) for r in rows}
    assert keys == {(lp, d, t) for lp in ("fwd", "grad", "fused", "fused+H")
                    for d in ("fp32", "bf16") for t in (1.0, 0.7)}
    assert all(r["gelem_s"] > 0 and r["ms"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows


def test_bench_cpu_small_times_every_layer_in_both_conditions(native, tmp_path):
    # bench/bench_cpu_small.py (where a small token_logprobs call's time goes) on a tiny shape:
    # one row per (layer, condition), positive times, and the JSON it writes.
    import json
    mod = _bench_module("bench_cpu_small")
    out = tmp_path / "small.json"
    rows = mod.main(["--shape", "5x70", "--rounds", "3", "--out", str(out)])
    layers = ("kernel", "kernel-bwd", "fwd", "fwd-grad", "fwd+bwd", "harness", "eager-fwd",
              "eager-fwd+bwd")
    assert {(r["impl"], r["condition"]) for r in rows} == {
        (layer, c) for layer in layers for c in ("warm", "after-eager")}
    assert all(r["ms"] > 0 and r["repeats"] == 3 and r["shape"] == "5x70" for r in rows)
    assert json.loads(out.read_text())["benchmarks"]["cpu_small"]["rows"] == rows


def test_bench_cpu_layers_times_every_layer_in_both_conditions(native, tmp_path):
    # bench/bench_cpu_layers.py (what each layer of a small call costs after the benchmarks'
    # previous steps) on tiny shapes, eager steps only: one row per (op, layer, condition),
    # positive times, and the JSON it writes (its own bitwise check of the layers ran first).
    import json
    mod = _bench_module("bench_cpu_layers")
    out = tmp_path / "layers.json"
    rows = mod.main(["--rounds", "2", "--no-compile", "--logprobs-shape", "5x70",
                     "--fused-shape", "2x3x70", "--out", str(out)])
    want = {("token_logprobs", layer) for layer in ("op", "impl", "binding", "extension")} | {
        ("fused_ppo_loss", layer) for layer in ("step", "op", "registered-op", "impl",
                                                "binding", "checks", "agg-weights")}
    assert {(r["op"], r["impl"], r["condition"]) for r in rows} == {
        (op, layer, c) for op, layer in want for c in ("warm", "after-steps")}
    assert all(r["ms"] > 0 and r["repeats"] == 2 and r["before"] == "eager" for r in rows)
    assert {r["shape"] for r in rows} == {"5x70", "6x70"}
    assert json.loads(out.read_text())["benchmarks"]["cpu_layers"]["rows"] == rows


def test_bench_cpu_stream_reports_trls_error_against_eager():
    # bench/bench_cpu_stream.py times TRL's log-softmax on both dtypes and puts its log-prob
    # error against eager on its rows: exact-ish on fp32, far off on bf16 (which it computes in
    # bf16) -- what bench_logprobs.py's 2e-2 accuracy gate leaves out.
    pytest.importorskip("trl")
    mod = _bench_module("bench_cpu_stream")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3000, generator=g) * 2
    tok = torch.randint(0, 3000, (80,), generator=g)
    assert mod.trl_error(x, tok) < 1e-4
    assert mod.trl_error(x.to(torch.bfloat16), tok) > 2e-2


def test_native_build_bits_script(native):
    # scripts/native_build_bits.py (the cross-build comparison) in this process: its calls run
    # on the native backend and give bitwise the same outputs twice with one build; compare()
    # counts the elements that differ.
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "native_build_bits.py")
    spec = importlib.util.spec_from_file_location("native_build_bits", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a, b = mod.outputs(), mod.outputs()
    assert len(a) == 14 and all(torch.isfinite(v).all() for v in a.values())
    assert all(same and diff == 0 and n == 0 for _, same, diff, n, _ in mod.compare(a, b))
    k = "gae advantages"
    b[k] = b[k].clone()
    b[k][0, 3] += 0.5
    want = float((b[k][0, 3].double() - a[k][0, 3].double()).abs())
    row = next(r for r in mod.compare(a, b) if r[0] == k)
    assert row[1:4] == (False, want, 1) and row[4] == a[k].numel() and abs(want - 0.5) < 1e-6


def test_bench_fused_linear_gemm_floor_is_the_three_matmuls():
    # The "gemms" floor rows of bench/bench_fused_linear.py time exactly the op's matmuls:
    # logits = h W^T, then G W and G^T h with the logits standing in for G.
    mod = _bench_module("bench_fused_linear")
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 5, generator=g), torch.randn(9, 5, generator=g)
    dh, dw = mod._gemm_floor_step(h, w)()
    logits = h @ w.T
    assert torch.equal(mod._gemms(h, w, None), logits)
    assert torch.allclose(dh, logits @ w) and torch.allclose(dw, logits.T @ h)
    assert dh.shape == h.shape and dw.shape == w.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("factor", [0.25, 1 / 3, -7.5])
def test_scale_rows_matches_mul_unrounded_bitwise(native, dtype, factor):
    # The native backward's upstream-factor scaling of the fused loss's stored gradient: the same
    # values, bit for bit, as the ATen path it replaced (mul_unrounded_), over strided rows of a
    # view (only those rows written), odd V, and NaN / inf / subnormal entries.
    from fastrlhf.ops.common import mul_unrounded_, rows_layout
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(3, 6, 77, generator=g, dtype=torch.float64) * 3).to(dtype)
    base[0, 1, 5] = float("nan")
    base[1, 2, 0] = float("inf")
    base[2, 3, 76] = -float("inf")
    base[2, 0, 9] = torch.finfo(dtype).tiny / 4
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    f = torch.tensor(factor, dtype=acc)
    want = base.clone()
    mul_unrounded_(want[:, :-1], f)
    got = base.clone()
    view = got[:, :-1]
    lg, dims, strides = rows_layout(view)
    assert lg.data_ptr() == view.data_ptr()  # the rows in place, no copy
    _native.scale_rows(lg, dims, strides, view.shape[-1], f)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
    assert torch.equal(got[:, -1], base[:, -1])  # the row outside the view is untouched


def test_scale_rows_rejects_rows_outside_the_buffer(native):
    x = torch.zeros(4, 10)
    with pytest.raises(RuntimeError, match="native: x"):
        _native.scale_rows(x, (1, 1, 5), (0, 0, 10), 10, torch.tensor(2.0))
    before = x.clone()
    _native.scale_rows(x, (1, 1, 4), (0, 0, 10), 10, torch.tensor(1.0))  # factor 1: untouched
    assert torch.equal(x, before)
