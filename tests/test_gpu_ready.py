"""Issue 15 / 16 (item 8) reproducers on the Triton backend: NaN propagation in the fused linear
log-probs, full_kl where p underflows against q = 0 and its backward in non-finite rows, the
in-place fused loss's barrier, and the gradient-only fused-loss launcher."""

import inspect
import math

import pytest
import torch

import fastrlhf as fr
import fastrlhf.reference as R
from helpers import DEVICE, TRITON_OK, assert_close

pytestmark = pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
inf, nan = math.inf, math.nan


# --- bug 5: fused_linear's running max must propagate NaN ------------------------------------

@pytest.mark.parametrize("where", ["hidden", "weight"])
def test_linear_logprobs_nan_propagates_to_affected_rows_only(where):
    torch.manual_seed(0)
    N, H, V = 5, 16, 70
    hidden = torch.randn(N, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE) * 0.3
    tokens = torch.randint(0, V, (N,), device=DEVICE)
    if where == "hidden":
        hidden[2, 3] = nan          # row 2's logits are all NaN
        bad = torch.zeros(N, dtype=torch.bool)
        bad[2] = True
    else:
        weight[41, 5] = nan         # column 41 of every row is NaN: every row is affected
        bad = torch.ones(N, dtype=torch.bool)
    logp, ent = fr.linear_token_logprobs(hidden, weight, tokens, return_entropy=True,
                                         backend="triton")
    assert torch.equal(logp.isnan().cpu(), bad), logp
    assert torch.equal(ent.isnan().cpu(), bad), ent
    if not bad.all():
        ref_lp, ref_h = R.token_logprobs((hidden[~bad].double() @ weight.double().T),
                                         tokens[~bad.to(tokens.device)], return_entropy=True)
        assert_close("logp", logp[~bad], ref_lp, atol=1e-4, rtol=1e-4)
        assert_close("entropy", ent[~bad], ref_h, atol=1e-4, rtol=1e-4)


def test_linear_logprobs_nan_tile_of_one_row():
    """A whole vocab tile of NaN in one row (every logit of the tile NaN): still NaN there."""
    torch.manual_seed(1)
    N, H, V = 4, 8, 64
    hidden = torch.randn(N, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE)
    hidden[1] = nan
    tokens = torch.randint(0, V, (N,), device=DEVICE)
    logp, ent = fr.linear_token_logprobs(hidden, weight, tokens, return_entropy=True,
                                         backend="triton")
    assert logp[1].isnan() and ent[1].isnan()
    keep = [0, 2, 3]
    assert logp[keep].isfinite().all() and ent[keep].isfinite().all()


# --- issue 16 item 8: full_kl follows the reference (value and gradient) ---------------------

def _kl_both(x, y, T=1.0, g=None):
    """Triton vs the reference on the same (fp32) inputs: the reference's contract for fp32
    logits is its fp32 evaluation (where p_j = exp(log p_j) underflows in fp32)."""
    xs = [x.clone().requires_grad_(True), x.clone().requires_grad_(True)]
    ys = [y.clone().requires_grad_(True), y.clone().requires_grad_(True)]
    out = fr.full_kl(xs[0], ys[0], temperature=T, backend="triton")
    ref = R.full_kl(xs[1], ys[1], T)
    up = torch.ones_like(ref) if g is None else torch.tensor(g, dtype=ref.dtype,
                                                             device=ref.device)
    (out * up.to(out.dtype)).sum().backward()
    (ref * up).sum().backward()
    return out, ref, xs, ys


def test_full_kl_p_underflow_against_q_zero():
    x = torch.tensor([[0.0, -1.0]], device=DEVICE)
    y = torch.tensor([[0.0, -inf]], device=DEVICE)
    out, ref, xs, ys = _kl_both(x, y, T=1e-3)
    assert float(ref.detach()) == 0.0 and float(out.detach()) == 0.0
    assert torch.equal(xs[0].grad.cpu(), torch.zeros(1, 2))
    assert torch.equal(ys[0].grad.cpu(), torch.zeros(1, 2))


def test_full_kl_q_zero_under_live_p_is_inf():
    x = torch.tensor([[0.0, 1.0, 2.0], [0.0, -200.0, 1.0]], device=DEVICE)
    y = torch.tensor([[0.0, -inf, 1.0], [0.0, -inf, 1.0]], device=DEVICE)
    out, ref, xs, ys = _kl_both(x, y, T=1.0)
    # row 0: p_1 > 0 -> +inf; row 1: p_1 = exp(-201.3) underflows in fp32 -> finite
    assert math.isinf(float(out[0].detach())) and math.isinf(float(ref[0].detach()))
    assert_close("kl", out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("g", [1.0, -2.0, 0.0])
def test_full_kl_backward_in_non_finite_rows_matches_reference(g):
    x = torch.tensor([[inf, 0.0], [0.5, 0.0], [0.0, 1.0], [nan, 1.0], [-inf, -inf],
                      [0.0, 1.0]], device=DEVICE)
    y = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, -inf], [0.0, 1.0], [0.0, 1.0],
                      [-inf, -inf]], device=DEVICE)
    out, ref, xs, ys = _kl_both(x, y, g=[g] * 6)
    assert_close("kl", out, ref, atol=1e-6, rtol=1e-5, equal_nan=True)
    assert_close("dlogits", xs[0].grad, xs[1].grad, atol=1e-6, rtol=1e-5, equal_nan=True)
    assert_close("dref", ys[0].grad, ys[1].grad, atol=1e-6, rtol=1e-5, equal_nan=True)


def test_full_kl_mixed_rows_long_vocab():
    """Several sweep iterations and threads: -inf stretches, one q = 0 column under tiny p."""
    torch.manual_seed(3)
    N, V = 4, 300
    x = torch.randn(N, V, device=DEVICE) * 3
    y = torch.randn(N, V, device=DEVICE) * 3
    x[0, :130] = -inf
    y[1, 7] = -inf
    x[1, 7] = -500.0          # p underflows there: finite KL
    y[2, 250] = -inf          # live p: +inf
    out, ref, xs, ys = _kl_both(x, y)
    assert math.isfinite(float(ref[1].detach())) and math.isinf(float(ref[2].detach()))
    assert_close("kl", out, ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    keep = [0, 1, 3]
    assert_close("dlogits", xs[0].grad[keep], xs[1].grad[keep], atol=1e-6, rtol=1e-5)
    assert_close("dref", ys[0].grad, ys[1].grad, atol=1e-6, rtol=1e-5)


# --- bug 1: the in-place fused loss reads the target logit before a barrier ------------------

def test_inplace_fused_loss_barrier_between_target_read_and_gradient_stores():
    """Structural: in the fused-loss kernel the target logit is read, then a barrier, then the
    gradient sweep (whose stores may overwrite it in place); and the sweep's one-hot fix-up
    store comes after another barrier.  (The interpreter runs warps in order, so the race
    itself cannot show here; on a GPU the stress in bench/gpu_check.py does.)"""
    from fastrlhf.kernels import fused_loss, logprobs
    from fastrlhf.kernels import utils as _utils
    src = inspect.getsource(fused_loss._fused_loss_kernel.fn)
    read = src.index("x_tok2 = tl.load(")
    barrier = src.index("tl.debug_barrier()", read)
    sweep = src.index("grad_sweep(", read)
    assert read < barrier < sweep
    src_lp = inspect.getsource(logprobs._logprobs_bwd_kernel.fn)
    assert (src_lp.index("x_tok = tl.load(") < src_lp.index("tl.debug_barrier()")
            < src_lp.index("grad_sweep("))
    gs = inspect.getsource(_utils.grad_sweep.fn)
    loop_end = gs.rindex("grad_step(")
    assert loop_end < gs.index("tl.debug_barrier()") < gs.rindex("tl.store(")


def test_inplace_equals_out_of_place_bitwise():
    torch.manual_seed(4)
    B, T, V = 2, 5, 77
    logits = torch.randn(B, T, V, device=DEVICE) * 2
    tokens = torch.randint(0, V, (B, T), device=DEVICE)
    old = torch.randn(B, T, device=DEVICE) * 0.1 - 3
    adv = torch.randn(B, T, device=DEVICE)
    mask = torch.ones(B, T, device=DEVICE)
    mask[1, -2:] = 0
    grads = []
    for inplace in (False, True):
        x = logits.clone().requires_grad_(True)
        loss, _ = fr.fused_ppo_loss(x * 1 if inplace else x, tokens, old, adv, mask,
                                    entropy_coef=0.01, inplace_backward=inplace,
                                    backend="triton")
        loss.backward()
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])


# --- gradient-only fused-loss launcher --------------------------------------------------------

@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("has_ent", [False, True])
def test_fused_loss_grad_from_stats_matches_reference(inplace, has_ent):
    from fastrlhf.kernels import logprobs as klp
    from fastrlhf.kernels.fused_loss import fused_loss_grad
    torch.manual_seed(5)
    N, V, T = 6, 90, 0.7
    logits = torch.randn(N, V, device=DEVICE) * 3
    logits[1, ::4] = -inf
    tokens = torch.randint(0, V, (N,), device=DEVICE)
    tokens[3] = -100                          # ignored: no one-hot term
    _, ent, lse = klp.logprobs_fwd(logits, (1, 1, N), (0, 0, V), V, tokens, 1.0 / T, -100,
                                   True)
    g_lp = torch.randn(N, device=DEVICE)
    g_h = torch.randn(N, device=DEVICE) if has_ent else torch.zeros(N, device=DEVICE)
    w = torch.ones(N, device=DEVICE)
    w[4] = 0.0                                # a token that does not count: zero gradient row
    upstream = torch.tensor(0.25, device=DEVICE)
    # reference: d/dlogits of sum_n w_n (g_lp logp_n + g_h H_n) * upstream, in float64
    x64 = logits.double().clone().requires_grad_(True)
    lp64, h64 = R.token_logprobs(x64, tokens, temperature=T, return_entropy=True)
    lp64 = torch.where(tokens == -100, torch.zeros_like(lp64), lp64)
    obj = (w.double() * (g_lp.double() * lp64 + g_h.double() * h64)).sum() * 0.25
    obj.backward()
    out = logits.clone() if inplace else torch.empty_like(logits)
    src = out if inplace else logits
    res = fused_loss_grad(src, out, (1, 1, N), (0, 0, V), (0, 0, V), V, tokens, lse, ent,
                          g_lp * w, g_h * w, upstream, inv_temp=1.0 / T, ignore_index=-100,
                          has_ent=has_ent)
    assert res is out
    ref = torch.nan_to_num(x64.grad, nan=0.0)
    assert_close("dlogits", out, ref, atol=2e-6, rtol=1e-5)
    assert torch.equal(out[4], torch.zeros(V, device=DEVICE))


# --- bug 4: fp32 fused_linear under torch's default matmul precision ("highest") -------------

def test_fp32_ieee_fused_linear_has_its_own_tiles_and_aot_specs(monkeypatch):
    """fp32 with matmul precision "highest" takes PREC="ieee" (FMA dot): its own smaller tiles
    and launch options, declared in AOT_SPECS so tests/test_aot.py proves it compiles for
    sm_90 / sm_80 with zero spills (the tf32 tiles needed 255 registers and spilled there)."""
    from fastrlhf.kernels import fused_linear as K
    monkeypatch.setattr(K, "interpreting", lambda: False)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert K.dot_precision(torch.float32) == "ieee"
        assert K._blocks(torch.float32) == K.FP32_IEEE_BLOCKS
        assert K._launch_opts(torch.float32) == K.FP32_IEEE_OPTS
        torch.set_float32_matmul_precision("high")
        assert K.dot_precision(torch.float32) == "tf32"
        assert K._blocks(torch.float32) == (K.BLOCK_N, K.BLOCK_V, K.BLOCK_K_FP32)
    finally:
        torch.set_float32_matmul_precision(old)
    ieee = [s for s in K.AOT_SPECS() if "fp32-ieee" in s["name"]]
    kernels = {s["fn"] for s in ieee}
    assert {K._fwd_kernel, K._dlogits_kernel, K._dh_kernel, K._dw_kernel} <= kernels
    for s in ieee:
        assert s["constexprs"]["PREC"] == "ieee"
        assert s["num_warps"] == K.FP32_IEEE_OPTS["num_warps"]


def test_rows_far_below_zero_keep_finite_statistics():
    """A thread's first real max far below its placeholder reference 0 (row of -1e4) must not
    rescale its empty sums by 2^(+big) = inf (0 * inf = NaN)."""
    x = torch.full((2, 47), -1e4, device=DEVICE)
    x[1, :5] = -3e4
    tok = torch.tensor([3, 7], device=DEVICE)
    lp, h = fr.token_logprobs(x, tok, return_entropy=True, backend="triton")
    rl, rh = R.token_logprobs(x.double(), tok, return_entropy=True)
    assert_close("logp", lp, rl, atol=1e-5)
    assert_close("entropy", h, rh, atol=1e-5)
    kl = fr.full_kl(x, x.flip(0), backend="triton")
    assert_close("kl", kl, R.full_kl(x, x.flip(0)), atol=1e-5, rtol=1e-5)
