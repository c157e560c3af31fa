"""Vocab-parallel token_logprobs / token_entropy: 2 and 3 CPU processes (gloo) against the
unsharded op, forward and backward, uneven splits, tokens outside a rank's slice."""

import pytest
import torch
import torch.distributed as dist

from helpers import backends, run_gloo

# The vocab-parallel path runs the local slice with the chosen backend's own forward / backward
# (triton, native) or in plain torch (reference); CPU tensors here.
BACKENDS = ["reference"] if torch.cuda.is_available() else backends(native=True)


def _worker(rank, world, splits, cases):
    for backend, inplace in cases:
        _check(rank, splits, backend, inplace)


def _check(rank, splits, backend, inplace):
    if True:
        import fastrlhf as fr
        from fastrlhf import reference as ref
        V = sum(splits)
        g = torch.Generator().manual_seed(1234)  # identical full data on every rank
        B, T = 2, 5
        full = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 3
        full[1, 2] += 1e4                # a row with a huge offset
        tokens = torch.randint(0, V, (B, T), generator=g)
        tokens[0, 0] = -100
        tokens[1, 3] = V - 1             # last id: lives on the last rank
        g1 = torch.randn(B, T, generator=g, dtype=torch.float64)
        g2 = torch.randn(B, T, generator=g, dtype=torch.float64)
        start = sum(splits[:rank])
        shard = full[..., start:start + splits[rank]].clone().requires_grad_(True)
        x = shard * 1.0 if inplace else shard
        lp, h = fr.token_logprobs(x[:, :-1], tokens, temperature=0.9, return_entropy=True,
                                  process_group=dist.group.WORLD, vocab_start_index=start,
                                  backend=backend, inplace_backward=inplace)
        (lp * g1 + h * g2).sum().backward()
        leaf = full.clone().requires_grad_(True)
        rl, rh = ref.token_logprobs(leaf[:, :-1], tokens, 0.9, True)
        (rl * g1 + rh * g2).sum().backward()
        assert lp.dtype == torch.float64
        assert torch.allclose(lp, rl, atol=1e-9), (rank, (lp - rl).abs().max())
        assert torch.allclose(h, rh, atol=1e-9), (rank, (h - rh).abs().max())
        gref = leaf.grad[..., start:start + splits[rank]]
        assert torch.allclose(shard.grad, gref, atol=1e-9), (rank, (shard.grad - gref).abs().max())
        ent = fr.token_entropy(shard[:, :-1].detach(), temperature=0.9,
                               process_group=dist.group.WORLD, vocab_start_index=start,
                               backend=backend)
        assert torch.allclose(ent, rh, atol=1e-9)
        # a token id outside the full vocab is rejected on every rank
        bad = tokens.clone()
        bad[0, 1] = V
        try:
            fr.token_logprobs(shard[:, :-1].detach(), bad, process_group=dist.group.WORLD,
                              vocab_start_index=start, backend=backend)
            raise AssertionError("out-of-vocab id accepted")
        except ValueError as e:
            assert f"outside the full vocab [0, {V})" in str(e)


# One process group per world size (spawning is the slow part); every backend inside it, plus
# the in-place backward (a Triton-path feature).
CASES = [(b, False) for b in BACKENDS] + ([("triton", True)] if "triton" in BACKENDS else [])


@pytest.mark.parametrize("splits", [(23, 23), (10, 31, 6)], ids=["2-ranks-even", "3-ranks-uneven"])
def test_vocab_parallel_matches_unsharded(splits):
    run_gloo(_worker, len(splits), splits, CASES, timeout_s=240)


def test_process_group_requires_initialized_distributed():
    import fastrlhf as fr
    x = torch.randn(3, 5)
    t = torch.randint(0, 5, (3,))
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        fr.token_logprobs(x, t, process_group=object(), vocab_start_index=0)
