"""Benchmark (CPU): what each layer of a small native call costs in the benchmarks' conditions.

``bench_logprobs.py`` and ``bench_fused_loss.py`` time their implementations round-robin, so a
fastrlhf step runs right after eager's and ``torch.compile``'s steps, whose temporaries have
pushed the op's Python, torch's dispatcher and the logits out of the caches.  Each tensor call
or Python frame then costs microseconds instead of fractions of one.  This script times the same
call cut at each layer of the stack, so that the difference between two adjacent layers is
what that layer costs there:

``token_logprobs`` forward (under ``no_grad``, entropy on, bf16 ``N x V`` logits):

* ``op``: ``fastrlhf.token_logprobs`` (checks, backend choice, the custom op's dispatch);
* ``impl``: the op's implementation with its arguments prepared (rows layout, switches);
* ``binding``: ``native.logprobs_call`` (output allocation, the extension);
* ``extension``: the extension's function with its outputs allocated beforehand.

``fused_ppo_loss`` (bf16 ``B x T x V`` logits, gradient into a fresh buffer, the benchmark's
loss settings):

* ``step``: forward + ``torch.autograd.grad`` (the benchmark's step);
* ``op``: the public op's forward (checks, aggregation weights, stats dict);
* ``registered-op``: the custom op called with prepared arguments (its ``autograd.Function``);
* ``impl``: the op's forward implementation without autograd;
* ``binding``: the gradient buffer and ``native.fused_loss_call``;
* ``checks``, ``agg-weights``: the argument checks and the aggregation weights alone.

Conditions: ``warm`` (the call repeated back to back) and ``after-steps`` (each timed call right
after an eager step and, unless ``--no-compile``, a compiled step of the same op on other
logits of the same shape: the round-robin's order).  The layers take turns, round by round.

Before timing, the binding layer's results are checked equal (bitwise) to the op's.

``python bench/bench_cpu_layers.py [--rounds 100] [--no-compile] [--logprobs-shape NxV]
[--fused-shape BxTxV] [--out FILE]``: prints medians
and interquartile ranges in microseconds; ``--out`` writes the rows (``impl`` the layer,
``condition``, ``ms`` / ``iqr_ms``) as a result file (bench ``cpu_layers``) that ``fastrlhf
report`` renders.
"""

from __future__ import annotations

import argparse
import os
import sys
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fused_loss  # noqa: E402
import bench_logprobs  # noqa: E402
import common  # noqa: E402


def _logprobs_layers(N: int, V: int):
    import fastrlhf as fr
    from fastrlhf import native
    from fastrlhf.ops import logprobs as LP
    from fastrlhf.ops.common import rows_layout

    g = torch.Generator().manual_seed(0)
    data = (torch.randn(N, V, generator=g) * 2).to(torch.bfloat16)
    other = (torch.randn(N, V, generator=g) * 2).to(torch.bfloat16)
    tokens = torch.randint(0, V, (N,), generator=g)
    lg, dims, strides = rows_layout(data)
    ext = native.load()
    logp, ent, lse = torch.empty(N), torch.empty(N), torch.empty(N, 2)
    # the layers compute the same thing: checked before anything is timed
    with torch.no_grad():
        want = fr.token_logprobs(data, tokens, return_entropy=True)
    got = native.logprobs_call(lg, dims, strides, V, tokens, 1.0, -100, True, (N,))
    if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
        raise SystemExit("bench_cpu_layers: the binding layer disagrees with the op")
    layers = {
        "op": lambda: fr.token_logprobs(data, tokens, return_entropy=True),
        "impl": lambda: LP._tl_impl(data, tokens, 1.0, -100, "native"),
        "binding": lambda: native.logprobs_call(lg, dims, strides, V, tokens, 1.0, -100, True,
                                                (N,)),
        "extension": lambda: ext.logprobs_call(data, list(dims), list(strides), V, tokens, 1.0,
                                               -100, True, logp, ent, lse),
    }
    return layers, (lambda f: f(other, tokens)), bench_logprobs._eager, f"{N}x{V}"


def _fused_loss_layers(B: int, T: int, V: int):
    from fastrlhf import native, reference
    from fastrlhf.ops import fused_loss as F
    from fastrlhf.ops.common import (check_fused_loss_args, check_logits, contiguous_row_strides,
                                     grad_empty, rows_layout)
    from fastrlhf.tables import KL_CODES

    clip, beta = bench_fused_loss.CLIP, bench_fused_loss.BETA
    full, tokens, old, adv, mask, ref = bench_fused_loss._inputs(B, T, V, "cpu")
    rest = (tokens, old, adv, mask, ref)
    data = full[:, :-1].contiguous()
    leaf = data.clone().requires_grad_(True)
    other = (data + 0.5).requires_grad_(True)
    one = torch.tensor(1.0)
    loss_fn = bench_fused_loss._fastrlhf(False, False)
    coef = reference.agg_row_weights(mask, "token-mean", dtype=torch.float32)
    args = (leaf, tokens, old, adv, mask, ref, coef, beta, "k3", 0.0, 1.0 - clip, 1.0 + clip,
            None, 1.0, False, -100)
    lg, dims, strides = rows_layout(data)
    k3 = KL_CODES["k3"]

    def step():
        torch.autograd.grad(loss_fn(leaf, *rest), leaf, grad_outputs=one)

    def binding():
        dl = grad_empty(data.shape, data.dtype, data.device)
        return dl, native.fused_loss_call(
            lg, dl, dims, strides, contiguous_row_strides(dims, V), V, B, T, tokens, old, adv,
            ref, mask, coef, inv_temp=1.0, ignore_index=-100, lo=1.0 - clip, hi=1.0 + clip,
            dual=None, seq=False, kl_coef=beta, kl_val=k3, kl_grad=k3, ent_coef=0.0,
            write_grad=True, check_tokens=True)[0]

    # the layers compute the same thing: checked before anything is timed
    (want,) = torch.autograd.grad(loss_fn(leaf, *rest), leaf, grad_outputs=one)
    dl, loss = binding()
    if not (torch.equal(dl, want) and torch.equal(loss, loss_fn(leaf.detach(), *rest))):
        raise SystemExit("bench_cpu_layers: the binding layer disagrees with the op")

    def checks():
        check_logits("fused_ppo_loss", leaf, dim=3)
        check_fused_loss_args("fused_ppo_loss", B, T, tokens, old, adv, mask, ref, beta, "k3",
                              0.0, clip, None, None, "token", False, "token-mean", {}, None,
                              "logits", leaf, "the leading shape of logits")

    layers = {
        "step": step,
        "op": lambda: loss_fn(leaf, *rest),
        "registered-op": lambda: F._fused(*args, True, None, "native"),
        "impl": lambda: F._forward(*args, True, False, None, "native"),
        "binding": binding,
        "checks": checks,
        "agg-weights": lambda: reference.agg_row_weights(mask, "token-mean",
                                                         dtype=torch.float32),
    }

    def run_step(f):
        torch.autograd.grad(f(other, *rest), other, grad_outputs=one)
    eager = lambda *a: bench_fused_loss._eager(*a)  # noqa: E731
    return layers, run_step, eager, f"{B * T}x{V}"


def run(rounds: int, with_compile: bool = True, logprobs_shape=(256, 2048),
        fused_shape=(4, 64, 8192)) -> list[dict]:
    """Rows for both ops' layers in both conditions (``logprobs_shape`` ``(N, V)``,
    ``fused_shape`` ``(B, T, V)``: the CPU shapes of bench_logprobs / bench_fused_loss)."""
    from fastrlhf import native

    if not native.available():
        raise SystemExit(f"the native backend is not available: {native.build_error()}")
    rows = []
    for op, mode, (layers, run_other, eager, shape) in (
            ("token_logprobs", "fwd", _logprobs_layers(*logprobs_shape)),
            ("fused_ppo_loss", "fwd+bwd", _fused_loss_layers(*fused_shape))):
        steps = [eager] + ([torch.compile(eager, dynamic=False)] if with_compile else [])
        grad_ctx = torch.no_grad if mode == "fwd" else torch.enable_grad

        def before(steps=steps, run_other=run_other, grad_ctx=grad_ctx):
            with grad_ctx():
                for s in steps:
                    run_other(s)
        with grad_ctx():
            times = common.time_layers(layers, before, rounds, after="after-steps")
        for (name, cond), ts in times.items():
            rows.append(common.finish_row(dict(
                op=op, mode=mode, impl=name, condition=cond, shape=shape, dtype="bf16",
                threads=torch.get_num_threads(),
                before="eager, compile" if with_compile else "eager", **common.spread(ts)),
                copy_gbps=None))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--no-compile", action="store_true",
                    help="the steps before each timed call: eager only (no torch.compile)")
    ap.add_argument("--logprobs-shape", default="256x2048", help="NxV of token_logprobs")
    ap.add_argument("--fused-shape", default="4x64x8192", help="BxTxV of fused_ppo_loss")
    ap.add_argument("--out", default="", help="write the rows (and the environment) as JSON")
    args = ap.parse_args(argv)
    shape = lambda text: tuple(int(v) for v in text.split("x"))  # noqa: E731
    rows = run(args.rounds, with_compile=not args.no_compile,
               logprobs_shape=shape(args.logprobs_shape), fused_shape=shape(args.fused_shape))
    return common.report_layers(rows, "after-steps", "cpu_layers", args.out)


if __name__ == "__main__":
    main()
