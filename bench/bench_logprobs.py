"""Benchmark: token log-probs (+ entropy), forward and forward+backward.

Implementations compared at the same inputs (bf16 logits [N, V], int64 tokens):
  eager         log_softmax(logits.float()) + gather (+ entropy from the same log-softmax),
                the way trainers write it
  compile       torch.compile of that eager function
  fastrlhf      fastrlhf.token_logprobs (backend auto); "+inplace": in-place backward
  trl           trl's selective_log_softmax (+ entropy_from_logits), when installed
  liger         liger_kernel's fused selective log-softmax, when installed

Byte floors (the fewest DRAM bytes the op can move): forward reads the logits once; forward +
backward reads them twice and writes the gradient once (3 x N x V x 2 bytes for bf16).

On CPU the implementations of one shape and mode are timed round-robin (``common.time_group``),
so that their ratios compare the same stretch of a shared machine's time.
"""

from __future__ import annotations

import torch

try:  # run as part of the package CLI or as a script
    from . import common
except ImportError:  # pragma: no cover
    import common  # type: ignore

GPU_SHAPES = [(16384, 32000), (16384, 128256), (16384, 151936)]
CPU_SHAPES = [(256, 2048), (512, 8192)]
CPU_QUICK_SHAPES = [(64, 1000)]


def _eager(logits, tokens):
    logsm = torch.log_softmax(logits.float(), dim=-1)
    logp = logsm.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    return logp, ent


def _fastrlhf(inplace):
    import fastrlhf as fr

    def f(logits, tokens):
        return fr.token_logprobs(logits, tokens, return_entropy=True, inplace_backward=inplace)
    return f


def _trl():
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    def f(logits, tokens):
        return selective_log_softmax(logits, tokens), entropy_from_logits(logits)
    return f


def _liger():
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

    def f(logits, tokens):
        # Liger's op returns log-probs of the next tokens for [B, T+1, V] logits and [B, T]
        # completion ids; feed it that layout.  No entropy.
        return fused_selective_log_softmax(logits.unsqueeze(0), tokens.unsqueeze(0)), None
    return f


def _check_against_eager(fn, data, tokens):
    """Only time implementations that compute the same thing: compare on the first rows."""
    try:
        with torch.no_grad():
            lp, h = fn(data[:64], tokens[:64])
            rl, rh = _eager(data[:64], tokens[:64])
        lp = lp.reshape(rl.shape).float()
        if not torch.allclose(lp, rl, atol=2e-2, rtol=1e-3):
            return f"output differs from eager (max |dlogp| {float((lp - rl).abs().max()):.3g})"
        if h is not None and not torch.allclose(h.float(), rh, atol=2e-2, rtol=1e-3):
            return "entropy differs from eager"
    except Exception as e:
        return common.skip_reason(e, data.device)
    return None


def _impls(device, with_compile):
    impls = {"eager": lambda: _eager}
    if with_compile:
        impls["compile"] = lambda: torch.compile(_eager, dynamic=False)
    impls["fastrlhf"] = lambda: _fastrlhf(False)
    impls["fastrlhf+inplace"] = lambda: _fastrlhf(True)
    impls["trl"] = _trl
    impls["liger"] = _liger
    return impls


def run(device: str, quick: bool = False, with_compile: bool = True) -> list[dict]:
    on_gpu = device.startswith("cuda")
    shapes = GPU_SHAPES if on_gpu else (CPU_QUICK_SHAPES if quick else CPU_SHAPES)
    dtype = torch.bfloat16
    rows = []
    for N, V in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        data = (torch.randn(N, V, device=device, generator=g) * 2).to(dtype)
        tokens = torch.randint(0, V, (N,), device=device, generator=g)
        w_lp = torch.randn(N, device=device, generator=g)
        w_h = torch.randn(N, device=device, generator=g)
        elem = data.element_size()
        fns = {}
        for name, make in _impls(device, with_compile).items():
            try:
                fn = make()
                problem = None if name == "eager" else _check_against_eager(fn, data, tokens)
            except Exception as e:  # peer not installed, etc.
                problem = common.skip_reason(e, device)
            if problem:
                for mode in ("fwd", "fwd+bwd"):
                    rows.append(dict(op="token_logprobs", impl=name, mode=mode, shape=f"{N}x{V}",
                                     dtype="bf16", skipped=problem))
                continue
            fns[name] = fn
        for mode in ("fwd", "fwd+bwd"):
            entries = []
            for name, fn in fns.items():
                if mode == "fwd" and name.endswith("+inplace"):
                    continue  # same forward as "fastrlhf"
                row = dict(op="token_logprobs", impl=name, mode=mode, shape=f"{N}x{V}", dtype="bf16",
                           bytes=(1 if mode == "fwd" else 3) * N * V * elem)
                if name.startswith("fastrlhf"):
                    row["backend"] = common.fastrlhf_backend(device)
                rows.append(row)
                if mode == "fwd":
                    def step(fn=fn):
                        with torch.no_grad():
                            return fn(data, tokens)
                else:
                    # A fresh leaf each step would add a copy; reuse one leaf per implementation
                    # (the in-place variant overwrites it with its gradient: values stay finite
                    # and random).
                    leaf = data.clone().requires_grad_(True)

                    def step(fn=fn, leaf=leaf):
                        leaf.grad = None
                        lp, h = fn(leaf, tokens)
                        loss = (lp * w_lp).sum()
                        if h is not None:
                            loss = loss + (h * w_h).sum()
                        loss.backward()
                if on_gpu:  # one leaf at a time (GPU timings are steady anyway)
                    common.time_group([(row, step)], device, warmup=3, rep=20)
                    del step
                    leaf = None
                    torch.cuda.empty_cache()
                else:
                    entries.append((row, step))
            # CPU: round-robin (common.time_group), so the ratios compare the same stretch of
            # a shared machine's time
            common.time_group(entries, device, warmup=3, rep=20, max_seconds=30)
            del entries
        del data
        if on_gpu:
            torch.cuda.empty_cache()
    common.add_speedups(rows)
    return rows
