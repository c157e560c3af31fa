"""gae: the reverse-scan kernel and the reference backend against the float64 loop reference
(verl 0.9 multi-turn GAE, not whitened), hand-checked cases, packed varlen, and bad input."""

import pytest
import torch

import fastrlhf.reference as R
from fastrlhf.ops.gae import gae
from helpers import DEVICE, assert_close, backends

TRITON = "triton" in backends(native=True)
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton backend not runnable here")


def _kmod():
    from fastrlhf.kernels import gae as k
    return k


def _multiturn_mask(B, T, gen):
    """Alternating action spans / observation gaps, then right padding; row 0 may start masked."""
    m = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        length = int(torch.randint(max(1, T // 2), T + 1, (1,), generator=gen))
        t = int(torch.randint(0, 3, (1,), generator=gen))
        while t < length:
            n = int(torch.randint(1, 12, (1,), generator=gen))
            m[b, t:min(t + n, length)] = True
            t += n + int(torch.randint(0, 8, (1,), generator=gen))
    return m


def _inputs(B, T, seed, dtype=torch.float32, poison_masked=True):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=gen)
    v = torch.randn(B, T, generator=gen)
    m = _multiturn_mask(B, T, gen)
    if poison_masked:  # whatever sits under the mask must be ignored
        r = torch.where(m, r, torch.full_like(r, float("nan")))
        v = torch.where(m, v, torch.full_like(v, float("inf")))
    return r.to(DEVICE, dtype), v.to(DEVICE, dtype), m.to(DEVICE)


def _ref(r, v, m, gamma, lam, cu=None):
    return R.gae(r.double(), v.double(), m, gamma, lam, cu, torch.float64)


def _verl_loop(r, v, m, gamma, lam):
    """verl 0.9 compute_gae_advantage_return, transcribed literally, without the whitening."""
    m = m.to(r.dtype)
    nextvalues, lastgaelam, out = 0, 0, []
    for t in reversed(range(r.shape[-1])):
        delta = r[:, t] + gamma * nextvalues - v[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = v[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * m[:, t] + (1 - m[:, t]) * lastgaelam
        out.append(lastgaelam)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + v


# ---------------------------------------------------------------------------------------------
# against the float64 loop reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B,T", [(3, 37), (4, 300)])
def test_matches_reference(B, T, dtype, backend):
    r, v, m = _inputs(B, T, seed=B * T, dtype=dtype)
    adv, ret = gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert adv.dtype == acc and ret.dtype == acc
    assert adv.shape == (B, T) and ret.shape == (B, T) and adv.is_contiguous()
    ea, er = _ref(r, v, m, 0.99, 0.95)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    assert_close("advantages", adv, ea, atol=tol, rtol=tol)
    assert_close("returns", ret, er, atol=tol, rtol=tol)
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()


@needs_triton
@pytest.mark.parametrize("use_reverse_scan", [True, False])
def test_multiblock_carry_small_tiles(monkeypatch, use_reverse_scan):
    # Tiny tiles: 10 blocks of 4 per row, 2 rows per program with a ragged last tile, both scan
    # variants (reverse scan in memory order / forward scan over reversed addresses).
    k = _kmod()
    for name in ("TILE", "TILE_INTERPRET"):
        monkeypatch.setattr(k, name, 8)
    for name in ("MAX_BLOCK_T", "MAX_BLOCK_T_INTERPRET"):
        monkeypatch.setattr(k, name, 4)
    monkeypatch.setattr(k, "USE_REVERSE_SCAN", use_reverse_scan)
    r, v, m = _inputs(3, 37, seed=5)
    adv, ret = gae(r, v, m, gamma=0.97, lam=0.9, backend="triton")
    ea, er = _ref(r, v, m, 0.97, 0.9)
    assert_close("advantages", adv, ea, atol=2e-5, rtol=2e-5)
    assert_close("returns", ret, er, atol=2e-5, rtol=2e-5)
    # Packed: segments spanning several blocks, an empty one, and a single token.
    cu = torch.tensor([0, 9, 9, 10, 23, 37], dtype=torch.int32, device=DEVICE)
    pr, pv, pm = r[:1], v[:1], m[:1]
    adv, ret = gae(pr, pv, pm, gamma=0.97, lam=0.9, cu_seqlens=cu, backend="triton")
    ea, er = _ref(pr, pv, pm, 0.97, 0.9, cu)
    assert_close("packed advantages", adv, ea, atol=2e-5, rtol=2e-5)
    assert_close("packed returns", ret, er, atol=2e-5, rtol=2e-5)


@needs_triton
def test_both_scan_variants_on_device():
    # Launch the kernel directly with each scan variant (on CUDA the op picks the reverse scan
    # only after checking it against the forward one on this device).
    k = _kmod()
    r, v, m = _inputs(5, 2 * 1024 + 77, seed=6, poison_masked=False)
    ea, er = _ref(r, v, m, 0.99, 0.95)
    for rev in (True, False):
        blocks = k._blocks(r.shape[1], False)
        if rev and DEVICE == "cuda" and not k._reverse_scan_ok(r, v, m.view(torch.uint8), None,
                                                               blocks, torch.float32):
            pytest.skip("Triton's reverse scan is wrong on this device; the op uses the forward "
                        "scan variant")
        adv, ret = k.gae_fwd(r, v, m.view(torch.uint8), 0.99, 0.95, None, r.shape[1],
                             torch.float32, reverse_scan=rev)
        assert_close(f"advantages (reverse_scan={rev})", adv, ea, atol=2e-5, rtol=2e-5)
        assert_close(f"returns (reverse_scan={rev})", ret, er, atol=2e-5, rtol=2e-5)


@needs_triton
def test_long_sequence():
    # T in the tens of thousands: 2 rows x 20000, one almost fully valid, one multi-turn.
    gen = torch.Generator().manual_seed(7)
    T = 20000
    r = torch.randn(2, T, generator=gen) * 0.1
    v = torch.randn(2, T, generator=gen)
    m = torch.ones(2, T, dtype=torch.bool)
    m[0, -3:] = False
    m[1] = _multiturn_mask(1, T, gen)[0]
    r, v, m = r.to(DEVICE), v.to(DEVICE), m.to(DEVICE)
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.95, backend="triton")
    ea, er = _ref(r, v, m, 1.0, 0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert_close("advantages", adv, ea, atol=1e-4, rtol=1e-4)
    assert_close("returns", ret, er, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="full-size case: CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_size_cuda(dtype):
    r, v, m = _inputs(512, 4096, seed=3, dtype=dtype)
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.95)  # auto -> triton on CUDA
    ea, er = _ref(r, v, m, 1.0, 0.95)
    assert_close("advantages", adv, ea, atol=1e-4, rtol=1e-4)
    assert_close("returns", ret, er, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# hand-checked and closed-form cases
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends(native=True))
def test_hand_checked_three_steps(backend):
    # gamma = lam = 0.5, r = [1, 0, 2], V = [0.5, 1, 1]:
    #   t=2: delta = 2 + 0.5*0 - 1 = 1                A2 = 1
    #   t=1: delta = 0 + 0.5*1 - 1 = -0.5             A1 = -0.5 + 0.25*1     = -0.25
    #   t=0: delta = 1 + 0.5*1 - 0.5 = 1              A0 = 1 + 0.25*(-0.25)  = 0.9375
    #   returns = A + V = [1.4375, 0.75, 2]
    # Second row, same numbers with t=1 masked (an observation token): it is skipped, so
    #   t=2: A2 = 1, nv = V2 = 1;  t=0: delta = 1 + 0.5*1 - 0.5 = 1,  A0 = 1 + 0.25*1 = 1.25
    #   advantages = [1.25, 0, 1], returns = [1.75, 0, 2]
    r = torch.tensor([[1.0, 0.0, 2.0], [1.0, 123.0, 2.0]], device=DEVICE)
    v = torch.tensor([[0.5, 1.0, 1.0], [0.5, -77.0, 1.0]], device=DEVICE)
    m = torch.tensor([[1, 1, 1], [1, 0, 1]], device=DEVICE)
    adv, ret = gae(r, v, m, gamma=0.5, lam=0.5, backend=backend)
    assert_close("advantages", adv, torch.tensor([[0.9375, -0.25, 1.0], [1.25, 0.0, 1.0]]),
                 atol=1e-7)
    assert_close("returns", ret, torch.tensor([[1.4375, 0.75, 2.0], [1.75, 0.0, 2.0]]),
                 atol=1e-7)


@pytest.mark.parametrize("backend", backends(native=True))
def test_matches_verl_at_valid_positions(backend):
    r, v, m = _inputs(4, 53, seed=11, poison_masked=False)
    adv, ret = gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
    va, vr = _verl_loop(r.double(), v.double(), m, 0.99, 0.95)
    assert_close("advantages (valid)", adv[m], va[m], atol=2e-5, rtol=2e-5)
    assert_close("returns (valid)", ret[m], vr[m], atol=2e-5, rtol=2e-5)
    # Documented difference: verl leaves the carried advantage (and carried + V as the return)
    # at masked positions; fastrlhf writes 0 there.
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()
    assert (va[~m] != 0).any()


@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("gamma,lam", [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0),
                                       (0.5, 1.0), (1.0, 0.5)])
def test_gamma_lam_edges(gamma, lam, backend):
    r, v, m = _inputs(3, 41, seed=13)
    adv, ret = gae(r, v, m, gamma=gamma, lam=lam, backend=backend)
    ea, er = _ref(r, v, m, gamma, lam)
    assert_close("advantages", adv, ea, atol=2e-5, rtol=2e-5)
    assert_close("returns", ret, er, atol=2e-5, rtol=2e-5)
    rd, vd = torch.where(m, r, 0).double(), torch.where(m, v, 0).double()
    if gamma == 0.0:  # one-step TD error, whatever lam: adv = r - V
        assert_close("gamma=0", adv, torch.where(m, rd - vd, 0), atol=1e-6)
    if gamma == 1.0 and lam == 1.0:  # Monte Carlo: return = sum of the valid rewards from t on
        suffix = rd.flip(1).cumsum(1).flip(1)
        assert_close("MC returns", ret, torch.where(m, suffix, 0), atol=1e-4)
    if lam == 0.0:  # TD(0): adv = r_t + gamma * V(next valid) - V_t
        nxt = torch.zeros_like(vd)
        for b in range(m.shape[0]):
            later = 0.0
            for t in reversed(range(m.shape[1])):
                nxt[b, t] = later
                if m[b, t]:
                    later = float(vd[b, t])
        assert_close("TD(0)", adv, torch.where(m, rd + gamma * nxt - vd, 0), atol=1e-5)


@pytest.mark.parametrize("backend", backends(native=True))
def test_fully_masked_rows_and_batch(backend):
    r, v, m = _inputs(4, 29, seed=17)
    m[1] = False
    m[3] = False
    adv, ret = gae(r, v, m, backend=backend)
    assert not adv.isnan().any() and not ret.isnan().any()
    assert (adv[1] == 0).all() and (ret[3] == 0).all()
    ea, er = _ref(r, v, m, 1.0, 0.95)
    assert_close("advantages", adv, ea, atol=2e-5, rtol=2e-5)
    none = torch.zeros_like(m)
    adv, ret = gae(r, v, none, backend=backend)  # the masked inputs hold NaN / inf
    assert (adv == 0).all() and (ret == 0).all()


@pytest.mark.parametrize("backend", backends(native=True))
def test_single_valid_token(backend):
    r = torch.randn(3, 17, device=DEVICE)
    v = torch.randn(3, 17, device=DEVICE)
    m = torch.zeros(3, 17, dtype=torch.bool, device=DEVICE)
    m[0, 0] = m[1, 8] = m[2, 16] = True
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8, backend=backend)
    # No valid token after it: nv = 0 and A = 0, so adv = r - V and ret = r.
    assert_close("advantages", adv, torch.where(m, r - v, 0), atol=1e-6)
    assert_close("returns", ret, torch.where(m, r, 0), atol=1e-6)


@pytest.mark.parametrize("backend", backends(native=True))
def test_t_equals_one(backend):
    r = torch.randn(6, 1, device=DEVICE)
    v = torch.randn(6, 1, device=DEVICE)
    m = torch.tensor([[1], [0], [1], [1], [0], [1]], device=DEVICE)
    adv, ret = gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
    assert_close("advantages", adv, torch.where(m != 0, r - v, 0), atol=1e-6)
    assert_close("returns", ret, torch.where(m != 0, r, 0), atol=1e-6)


@pytest.mark.parametrize("backend", backends(native=True))
def test_empty_inputs(backend):
    for shape in ((0, 5), (3, 0)):
        x = torch.randn(shape, device=DEVICE)
        adv, ret = gae(x, x, x > 0, backend=backend)
        assert adv.shape == shape and ret.shape == shape and adv.dtype == torch.float32
    x = torch.randn(1, 0, device=DEVICE)
    cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    adv, _ = gae(x, x, x > 0, cu_seqlens=cu, backend=backend)
    assert adv.shape == (1, 0)


# ---------------------------------------------------------------------------------------------
# layouts and dtypes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends(native=True))
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_packed_varlen_equals_per_sequence(cu_dtype, backend):
    lens = [7, 0, 1, 150, 33, 1, 64]
    total = sum(lens)
    gen = torch.Generator().manual_seed(19)
    r = torch.randn(1, total, generator=gen).to(DEVICE)
    v = torch.randn(1, total, generator=gen).to(DEVICE)
    m = _multiturn_mask(1, total, gen).to(DEVICE)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=cu_dtype, device=DEVICE)
    adv, ret = gae(r, v, m, gamma=0.99, lam=0.9, cu_seqlens=cu, backend=backend)
    assert adv.shape == (1, total)
    for s in range(len(lens)):
        a, b = int(cu[s]), int(cu[s + 1])
        if a == b:
            continue
        sa, sr = gae(r[:, a:b], v[:, a:b], m[:, a:b], gamma=0.99, lam=0.9, backend=backend)
        assert_close(f"segment {s} advantages", adv[:, a:b], sa, atol=1e-6, rtol=1e-6)
        assert_close(f"segment {s} returns", ret[:, a:b], sr, atol=1e-6, rtol=1e-6)
    ea, er = _ref(r, v, m, 0.99, 0.9, cu)
    assert_close("advantages", adv, ea, atol=2e-5, rtol=2e-5)
    # The packed result differs from treating the row as one sequence (segments do not leak).
    whole, _ = gae(r, v, m, gamma=0.99, lam=0.9, backend=backend)
    assert not torch.allclose(whole, adv)


@pytest.mark.parametrize("backend", backends(native=True))
def test_float64_option(backend):
    r, v, m = _inputs(3, 45, seed=23)
    adv, ret = gae(r, v, m, gamma=0.99, lam=0.95, compute_dtype=torch.float64, backend=backend)
    assert adv.dtype == torch.float64 and ret.dtype == torch.float64
    ea, er = _ref(r, v, m, 0.99, 0.95)
    assert_close("advantages", adv, ea, atol=1e-12, rtol=1e-12)
    assert_close("returns", ret, er, atol=1e-12, rtol=1e-12)
    # and float32 compute on float64 inputs
    adv32, _ = gae(r.double(), v.double(), m, compute_dtype=torch.float32, backend=backend)
    assert adv32.dtype == torch.float32
    # mixed input dtypes: float64 if either is float64
    adv_mixed, _ = gae(r, v.double(), m, backend=backend)
    assert adv_mixed.dtype == torch.float64


@pytest.mark.parametrize("backend", backends(native=True))
def test_mask_dtypes_agree(backend):
    r, v, m = _inputs(3, 31, seed=29)
    base_adv, base_ret = gae(r, v, m, backend=backend)
    masks = {
        "uint8": m.to(torch.uint8), "int32": m.to(torch.int32), "int64": m.long(),
        "float32": m.float(), "float16": m.half(),
        "float32 weights": m.float() * 2.5,  # any nonzero value means valid
    }
    for name, mk in masks.items():
        adv, ret = gae(r, v, mk, backend=backend)
        assert torch.equal(adv, base_adv), name
        assert torch.equal(ret, base_ret), name


@pytest.mark.parametrize("backend", backends(native=True))
def test_strided_inputs(backend):
    r, v, m = _inputs(4, 40, seed=31, poison_masked=False)
    base_adv, base_ret = gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
    wide = torch.randn(4, 41, device=DEVICE)
    wide[:, :-1] = r
    rs = wide[:, :-1]                          # row stride 41
    vs = v.t().contiguous().t()                # column-major: column stride 4
    ms = torch.zeros(4, 80, dtype=torch.bool, device=DEVICE)
    ms[:, ::2] = m
    ms = ms[:, ::2]                            # column stride 2
    assert not (rs.is_contiguous() or vs.is_contiguous() or ms.is_contiguous())
    adv, ret = gae(rs, vs, ms, gamma=0.99, lam=0.95, backend=backend)
    assert_close("advantages", adv, base_adv, atol=1e-6)
    assert_close("returns", ret, base_ret, atol=1e-6)
    # broadcast mask (stride 0 along T)
    mrow = torch.tensor([True, False, True, True], device=DEVICE)[:, None].expand(4, 40)
    adv, _ = gae(r, v, mrow, backend=backend)
    ea, _ = _ref(r, v, mrow, 1.0, 0.95)
    assert_close("advantages (expanded mask)", adv, ea, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", backends(native=True))
def test_nan_stays_in_its_row(backend):
    r, v, m = _inputs(3, 30, seed=37, poison_masked=False)
    m[0] = True
    r[0, 20] = float("nan")
    adv, ret = gae(r, v, m, backend=backend)
    assert adv[0, :21].isnan().all() and ret[0, :21].isnan().all()
    assert torch.isfinite(adv[0, 21:]).all()
    assert torch.isfinite(adv[1:]).all() and torch.isfinite(ret[1:]).all()
    ea, er = _ref(r, v, m, 1.0, 0.95)
    assert_close("advantages", adv, ea, atol=2e-5, rtol=2e-5, equal_nan=True)


@pytest.mark.parametrize("backend", backends(native=True))
def test_outputs_detached(backend):
    r = torch.randn(2, 9, device=DEVICE, requires_grad=True)
    v = torch.randn(2, 9, device=DEVICE, requires_grad=True)
    adv, ret = gae(r, v, torch.ones(2, 9, device=DEVICE), backend=backend)
    assert not adv.requires_grad and not ret.requires_grad
    assert adv.grad_fn is None and ret.grad_fn is None


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def test_bad_shapes_and_types():
    x = torch.randn(2, 5, device=DEVICE)
    m = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=r"values must have shape \(2, 5\).*got \(2, 4\)"):
        gae(x, x[:, :4], m)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 5\).*got \(5, 2\)"):
        gae(x, x, m.t())
    with pytest.raises(ValueError, match=r"rewards must be 2-D.*got shape \(10,\)"):
        gae(x.reshape(-1), x.reshape(-1), m.reshape(-1))
    with pytest.raises(ValueError, match=r"rewards must be 2-D.*got shape \(1, 2, 5\)"):
        gae(x[None], x[None], m[None])
    with pytest.raises(TypeError, match="rewards must have dtype .* got int64"):
        gae(x.long(), x, m)
    with pytest.raises(TypeError, match="values must be a torch.Tensor, got list"):
        gae(x, [[0.0] * 5] * 2, m)
    with pytest.raises(TypeError, match="mask must have dtype .* got complex64"):
        gae(x, x, torch.ones(2, 5, dtype=torch.complex64, device=DEVICE))
    with pytest.raises(ValueError, match="mask is on meta but rewards is on"):
        gae(x, x, torch.ones(2, 5, device="meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        gae(x, x, m, backend="cuda")


@pytest.mark.parametrize("name,value,exc,msg", [
    ("gamma", 1.5, ValueError, r"gamma must lie in \[0, 1\], got 1.5"),
    ("gamma", -0.1, ValueError, r"gamma must lie in \[0, 1\], got -0.1"),
    ("gamma", float("nan"), ValueError, r"gamma must lie in \[0, 1\], got nan"),
    ("lam", 2, ValueError, r"lam must lie in \[0, 1\], got 2.0"),
    ("lam", "0.9", TypeError, "lam must be a float in \\[0, 1\\], got str"),
    ("gamma", True, TypeError, "gamma must be a float in \\[0, 1\\], got bool"),
])
def test_bad_gamma_lam(name, value, exc, msg):
    x = torch.randn(2, 5, device=DEVICE)
    with pytest.raises(exc, match=msg):
        gae(x, x, x > 0, **{name: value})


def test_bad_compute_dtype():
    x = torch.randn(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="compute_dtype must be .* got torch.float16"):
        gae(x, x, x > 0, compute_dtype=torch.float16)
    with pytest.raises(TypeError, match="compute_dtype must be .* got str"):
        gae(x, x, x > 0, compute_dtype="float64")


def test_bad_cu_seqlens():
    x = torch.randn(1, 10, device=DEVICE)
    m = x > 0

    def cu(*vals, dtype=torch.int32):
        return torch.tensor(vals, dtype=dtype, device=DEVICE)

    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0, got cu_seqlens\[0\]=1"):
        gae(x, x, m, cu_seqlens=cu(1, 4, 10))
    with pytest.raises(ValueError,
                       match=r"nondecreasing, got cu_seqlens\[1\]=6 > cu_seqlens\[2\]=4"):
        gae(x, x, m, cu_seqlens=cu(0, 6, 4, 10))
    with pytest.raises(ValueError, match=r"must end at total=10.*got cu_seqlens\[-1\]=9"):
        gae(x, x, m, cu_seqlens=cu(0, 4, 9))
    with pytest.raises(ValueError, match=r"must end at total=10.*got cu_seqlens\[-1\]=12"):
        gae(x, x, m, cu_seqlens=cu(0, 4, 12))
    x2 = torch.randn(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"packed as \[1, total\].*shape \(2, 5\) \(B=2 != 1\)"):
        gae(x2, x2, x2 > 0, cu_seqlens=cu(0, 5))
    with pytest.raises(TypeError, match="cu_seqlens must have dtype .* got float32"):
        gae(x, x, m, cu_seqlens=cu(0, 10).float())
    with pytest.raises(ValueError, match=r"cu_seqlens must be 1-D \[S\+1\].*got shape \(1, 2\)"):
        gae(x, x, m, cu_seqlens=cu(0, 10)[None])
    with pytest.raises(ValueError, match=r"cu_seqlens must be 1-D \[S\+1\].*got shape \(0,\)"):
        gae(x, x, m, cu_seqlens=cu(0, 10)[:0])


# ---------------------------------------------------------------------------------------------
# torch.library registration of the Triton-path op
# ---------------------------------------------------------------------------------------------

@needs_triton
def test_registered_op_opcheck():
    r, v, m = _inputs(2, 9, seed=41, poison_masked=False)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fastrlhf.gae.default, (r, v, m, None, 0.99, 0.95, 9, False,
                                                             "triton"),
                          test_utils=tests)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.fastrlhf.gae.default,
                          (r[:1], v[:1], m[:1].float(), cu, 1.0, 0.9, 5, True, "triton"),
                          test_utils=tests)


@needs_triton
def test_compile_fullgraph():
    # The public entry point (dense layout: no host sync) traces without graph breaks.
    r, v, m = _inputs(2, 9, seed=43, poison_masked=False)

    def f(r, v, m):
        return gae(r, v, m, gamma=0.99, lam=0.95, backend="triton")

    adv, ret = torch.compile(f, fullgraph=True, backend="eager")(r, v, m)
    ea, er = _ref(r, v, m, 0.99, 0.95)
    assert_close("advantages", adv, ea, atol=2e-5, rtol=2e-5)
    assert_close("returns", ret, er, atol=2e-5, rtol=2e-5)
