"""Vocab-parallel token_logprobs / token_entropy: 2 and 3 CPU processes (gloo) against the
unsharded op, forward and backward, uneven splits, tokens outside a rank's slice."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import TRITON_OK

BACKENDS = ["reference"] + (["triton"] if TRITON_OK and not torch.cuda.is_available() else [])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, splits, cases, errfile):
    try:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["TRITON_DEFAULT_FP_FUSION"] = "1"
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        for backend, inplace in cases:
            _check(rank, splits, backend, inplace)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # report to the parent
        import traceback
        with open(errfile, "a") as f:
            f.write(f"rank {rank}: {traceback.format_exc()}\n")
        raise SystemExit(1) from e


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
    with tempfile.NamedTemporaryFile("r", suffix=".err") as err:
        ctx = mp.start_processes(_worker, args=(len(splits), _free_port(), splits, CASES,
                                                err.name),
                                 nprocs=len(splits), join=False, start_method="spawn")
        ok = True
        try:
            while not ctx.join(timeout=240):
                pass
        except Exception:
            ok = False
        msg = open(err.name).read()
        assert ok and not msg, msg or "a worker failed"


def test_process_group_requires_initialized_distributed():
    import fastrlhf as fr
    x = torch.randn(3, 5)
    t = torch.randint(0, 5, (3,))
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        fr.token_logprobs(x, t, process_group=object(), vocab_start_index=0)
