"""Vocab-parallel full_kl, fused_ppo_loss, linear_token_logprobs and fused_linear_ppo_loss:
2 and 3 CPU processes (gloo) against the unsharded single-process op, forward and backward,
uneven vocab splits, tokens outside a rank's slice, ignore_index, masked vocab slices (a slice
that is all -inf in a row), NaN / inf rows, masked rows with NaN logits.

One process group per world size (spawning is the slow part); every case and backend runs
inside it.  Every rank builds the same full inputs from one seed, takes its slice, and compares
its outputs and its slice of the gradients with the reference op on the full inputs."""

import pytest
import torch
import torch.distributed as dist

from helpers import TRITON_OK, backends, run_gloo

BACKENDS = ["reference"] + (["triton"] if TRITON_OK and not torch.cuda.is_available() else [])
# fused_ppo_loss's and the lm_head ops' vocab-parallel paths also run on the native backend where
# it builds (full_kl has no native path)
NATIVE = ["native"] if not torch.cuda.is_available() and "native" in backends(native=True) else []
ATOL = 1e-9
TIMEOUT_S = 300


def _close(name, a, e, atol=ATOL, equal_nan=False):
    from helpers import assert_close
    assert_close(f"rank {dist.get_rank()} {name}", a, e, atol=atol, rtol=1e-9,
                 equal_nan=equal_nan)


def _worker(rank, world, splits, backends):
    start = sum(splits[:rank])
    sl = slice(start, start + splits[rank])
    for backend in backends:
        _check_full_kl(splits, sl, backend)
        _check_logprobs_masked_slice(splits, sl, backend)
        for inplace in ((False, True) if backend == "triton" else (False,)):
            _check_fused_ppo_loss(splits, sl, backend, inplace)
        _check_fused_ppo_loss_packed(splits, sl, backend)
        _check_linear(splits, sl, backend)
        _check_fused_linear_ppo_loss(splits, sl, backend)
    for backend in NATIVE:
        _check_fused_ppo_loss(splits, sl, backend, False)
        _check_linear(splits, sl, backend)
        _check_fused_linear_ppo_loss(splits, sl, backend)


def _vp(sl):
    return dict(process_group=dist.group.WORLD, vocab_start_index=sl.start)


def _check_full_kl(splits, sl, backend):
    import fastrlhf as fr
    from fastrlhf import reference as ref
    V = sum(splits)
    g = torch.Generator().manual_seed(7)
    B, T = 2, 5
    x = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 3
    y = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 3
    x[1, 2] += 1e4                       # huge offsets, different in the two tensors
    y[1, 2] -= 5e3
    last = slice(V - splits[-1], V)      # masked vocab padding: the last slice is -inf in both
    x[0, 1, last] = float("-inf")
    y[0, 1, last] = float("-inf")
    x[1, 3, :splits[0]] = float("-inf")  # the policy puts no mass on the first slice
    up = torch.randn(B, T, generator=g, dtype=torch.float64)
    # forward + backward (w.r.t. both tensors) on finite rows
    xs = x[..., sl].clone().requires_grad_(True)
    ys = y[..., sl].clone().requires_grad_(True)
    kl = fr.full_kl(xs[:, :-1], ys[:, :-1], temperature=0.7, backend=backend, **_vp(sl))
    (kl * up).sum().backward()
    xf, yf = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    rk = ref.full_kl(xf[:, :-1], yf[:, :-1], 0.7)
    (rk * up).sum().backward()
    assert kl.dtype == torch.float64 and kl.shape == (B, T)
    _close("full_kl", kl, rk, atol=ATOL)
    _close("full_kl dlogits", xs.grad, xf.grad[..., sl], atol=ATOL)
    _close("full_kl dref", ys.grad, yf.grad[..., sl], atol=ATOL)
    # special rows, forward: q = 0 under p > 0 on one rank -> +inf; NaN on one rank -> NaN in
    # that row only; a row entirely -inf in ref -> NaN
    x2, y2 = x.clone(), y.clone()
    y2[0, 0, V - 1] = float("-inf")
    x2[1, 0, 0] = float("nan")
    y2[0, 4] = float("-inf")
    kl2 = fr.full_kl(x2[..., sl], y2[..., sl], backend=backend, **_vp(sl))
    rk2 = ref.full_kl(x2, y2)
    assert torch.isinf(kl2[0, 0]) and kl2[0, 0] > 0
    assert torch.isnan(kl2[1, 0]) and torch.isnan(kl2[0, 4])
    assert int(torch.isnan(kl2).sum()) == 2
    _close("full_kl special rows", kl2, rk2, equal_nan=True)
    # shards must be given with a process group
    with pytest.raises(ValueError, match="only meaningful with process_group"):
        fr.full_kl(x, y, vocab_start_index=0, backend=backend)


def _check_logprobs_masked_slice(splits, sl, backend):
    """token_logprobs with a row whose first slice is all -inf (combine skips that slice)."""
    import fastrlhf as fr
    from fastrlhf import reference as ref
    V = sum(splits)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, V, generator=g, dtype=torch.float64)
    x[1, :splits[0]] = float("-inf")
    tokens = torch.tensor([0, V - 1, splits[0]])
    xs = x[:, sl].clone().requires_grad_(True)
    lp, h = fr.token_logprobs(xs, tokens, return_entropy=True, backend=backend, **_vp(sl))
    (lp + 0.5 * h).sum().backward()
    xf = x.clone().requires_grad_(True)
    rl, rh = ref.token_logprobs(xf, tokens, 1.0, True)
    (rl + 0.5 * rh).sum().backward()
    _close("logprobs masked slice", lp, rl)
    _close("entropy masked slice", h, rh)
    _close("logprobs masked slice grad", xs.grad, xf.grad[:, sl])


def _ppo_inputs(V, g, B=3, T=5):
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[0, 0] = -100
    tokens[1, 3] = V - 1
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 2
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    refl = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 2
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[2] = 0                                   # a fully masked row
    return tokens, old, adv, refl, mask


def _check_fused_ppo_loss(splits, sl, backend, inplace):
    import fastrlhf as fr
    from fastrlhf import reference as ref
    V = sum(splits)
    g = torch.Generator().manual_seed(11)
    B, T = 3, 5
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    logits[1, 1] += 1e4
    logits[0, 4, V - 1] = float("nan")            # NaN logit at a masked position
    tokens, old, adv, refl, mask = _ppo_inputs(V, g, B, T)
    keep = (mask != 0).unsqueeze(-1)
    for ratio_level, agg in (("token", "token-mean"), ("sequence", "seq-mean-token-mean")):
        kw = dict(ref_logp=refl, kl_coef=0.1, kl_kind="k3", entropy_coef=0.01, clip_low=0.2,
                  clip_high=0.28, dual_clip=3.0, temperature=0.9, agg=agg,
                  ratio_level=ratio_level)
        shard = logits[..., sl].clone().requires_grad_(True)
        x = shard * 1.0 if inplace else shard
        loss, st = fr.fused_ppo_loss(x, tokens, old, adv, mask, backend=backend,
                                     inplace_backward=inplace, **kw, **_vp(sl))
        loss.backward()
        full = logits.clone().requires_grad_(True)
        rloss, rst = ref.fused_ppo_loss(full, tokens, old, adv, mask, **kw)
        rloss.backward()
        tag = f"fused_ppo_loss[{backend},{ratio_level},inplace={inplace}]"
        assert torch.isfinite(loss)
        _close(tag, loss, rloss)
        assert set(st) == set(rst), (set(st), set(rst))
        for k in st:
            if st[k].dim() == 2:   # per token: compare where unmasked (NaN in a masked row)
                _close(f"{tag} {k}", st[k][mask != 0], rst[k][mask != 0])
            else:
                _close(f"{tag} {k}", st[k], rst[k])
        gr = full.grad[..., sl]
        assert not torch.isnan(shard.grad).any(), f"{tag}: NaN gradient"
        assert torch.equal(shard.grad * ~keep, torch.zeros_like(shard.grad)), \
            f"{tag}: masked rows got a gradient"
        _close(f"{tag} dlogits", shard.grad, gr)


def _check_fused_ppo_loss_packed(splits, sl, backend):
    """Packed sequences ([1, total] + cu_seqlens) on vocab-parallel logits."""
    import inspect

    import fastrlhf as fr
    from fastrlhf import reference as ref
    if "cu_seqlens" not in inspect.signature(fr.fused_ppo_loss).parameters:
        return
    V = sum(splits)
    g = torch.Generator().manual_seed(17)
    total = 9
    cu = torch.tensor([0, 4, 9])
    logits = torch.randn(1, total, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (1, total), generator=g)
    tokens[0, 2] = V - 1
    tokens[0, 5] = -100
    old = torch.randn(1, total, generator=g, dtype=torch.float64) * 0.3 - 2
    adv = torch.randn(1, total, generator=g, dtype=torch.float64)
    refl = torch.randn(1, total, generator=g, dtype=torch.float64) * 0.3 - 2
    mask = torch.ones(1, total)
    mask[0, 6] = 0
    kw = dict(ref_logp=refl, kl_coef=0.1, entropy_coef=0.01, agg="seq-mean-token-mean",
              ratio_level="sequence", cu_seqlens=cu)
    shard = logits[..., sl].clone().requires_grad_(True)
    loss, st = fr.fused_ppo_loss(shard, tokens, old, adv, mask, backend=backend, **kw, **_vp(sl))
    loss.backward()
    full = logits.clone().requires_grad_(True)
    rloss, rst = ref.fused_ppo_loss(full, tokens, old, adv, mask, **kw)
    rloss.backward()
    tag = f"fused_ppo_loss packed[{backend}]"
    _close(tag, loss, rloss)
    _close(f"{tag} entropy_mean", st["entropy_mean"], rst["entropy_mean"])
    _close(f"{tag} dlogits", shard.grad, full.grad[..., sl])


def _check_linear(splits, sl, backend):
    import fastrlhf as fr
    from fastrlhf import reference as ref
    V = sum(splits)
    g = torch.Generator().manual_seed(5)
    B, T, H = 2, 5, 8
    hidden = torch.randn(B, T + 1, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[0, 0] = -100
    tokens[1, 3] = V - 1
    tokens[1, 4] = 0
    a = torch.randn(B, T, generator=g, dtype=torch.float64)
    b = torch.randn(B, T, generator=g, dtype=torch.float64)
    for with_bias in (True, False):
        h = hidden.clone().requires_grad_(True)
        w = weight[sl].clone().requires_grad_(True)
        bs = bias[sl].clone().requires_grad_(True) if with_bias else None
        lp, ent = fr.linear_token_logprobs(h[:, :-1], w, tokens, bias=bs, temperature=0.8,
                                           return_entropy=True, backend=backend, **_vp(sl))
        (lp * a + ent * b).sum().backward()
        hf = hidden.clone().requires_grad_(True)
        wf = weight.clone().requires_grad_(True)
        bf = bias.clone().requires_grad_(True) if with_bias else None
        rl, re = ref.linear_token_logprobs(hf[:, :-1], wf, tokens, bf, 0.8, True)
        (rl * a + re * b).sum().backward()
        tag = f"linear[{backend},bias={with_bias}]"
        assert lp.dtype == torch.float64
        _close(f"{tag} logp", lp, rl)
        _close(f"{tag} entropy", ent, re)
        _close(f"{tag} dhidden", h.grad, hf.grad)      # all-reduced: full gradient everywhere
        _close(f"{tag} dweight", w.grad, wf.grad[sl])  # local rows
        if with_bias:
            _close(f"{tag} dbias", bs.grad, bf.grad[sl])
    # out-of-vocab ids are rejected on every rank
    bad = tokens.clone()
    bad[0, 1] = V
    with pytest.raises(ValueError, match=rf"outside the full vocab \[0, {V}\)"):
        fr.linear_token_logprobs(hidden[:, :-1], weight[sl], bad, backend=backend, **_vp(sl))


def _check_fused_linear_ppo_loss(splits, sl, backend):
    import fastrlhf as fr
    from fastrlhf import reference as ref
    V = sum(splits)
    g = torch.Generator().manual_seed(13)
    B, T, H = 3, 5, 8
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    tokens, old, adv, refl, mask = _ppo_inputs(V, g, B, T)
    kw = dict(ref_logp=refl, kl_coef=0.05, kl_kind="k1", entropy_coef=0.02,
              agg="seq-mean-token-sum", temperature=1.1)
    h = hidden.clone().requires_grad_(True)
    w = weight[sl].clone().requires_grad_(True)
    loss, st = fr.fused_linear_ppo_loss(h, w, tokens, old, adv, mask, backend=backend, **kw,
                                        **_vp(sl))
    loss.backward()
    hf, wf = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    rloss, rst = ref.fused_linear_ppo_loss(hf, wf, tokens, old, adv, mask, **kw)
    rloss.backward()
    tag = f"fused_linear_ppo_loss[{backend}]"
    _close(tag, loss, rloss)
    for k in ("clipfrac", "approx_kl", "entropy_mean", "kl_mean"):
        _close(f"{tag} {k}", st[k], rst[k])
    _close(f"{tag} logp", st["logp"], rst["logp"])
    _close(f"{tag} dhidden", h.grad, hf.grad)
    _close(f"{tag} dweight", w.grad, wf.grad[sl])


@pytest.mark.parametrize("splits", [(17, 29), (10, 31, 6)], ids=["2-ranks-uneven",
                                                                 "3-ranks-uneven"])
def test_vocab_parallel_ops_match_unsharded(splits):
    run_gloo(_worker, len(splits), splits, BACKENDS, timeout_s=TIMEOUT_S)


def test_process_group_requires_initialized_distributed():
    import fastrlhf as fr
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        fr.full_kl(x, x, process_group=object())
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        fr.linear_token_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3).long(),
                                 process_group=object())
    with pytest.raises(ValueError, match="only meaningful with process_group"):
        fr.linear_token_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3).long(),
                                 vocab_start_index=0)
