"""Benchmark (CPU): where the time of a small native ``token_logprobs`` call goes.

At small shapes (the 256 x 2048 bf16 row of ``bench_logprobs.py``) a call is no longer the
logits sweep alone: the op layer's Python, autograd, and the state the caches are left in by the
work before it all count.  This splits one call into layers, each timed in two conditions:

* ``warm``: the step repeated back to back (the logits stay in L2, the Python in the caches);
* ``after-eager``: each timing right after an eager forward + backward of other logits of the
  same shape (what ``bench_logprobs.py``'s round-robin does to the next implementation: the
  eager step's temporaries push the logits out of L2 and the op's Python out of the caches).

Layers (bf16 logits, int64 tokens, entropy on, as in ``bench_logprobs.py``):

* ``kernel``: the extension's forward call alone (``native.logprobs_call``: the row sweep, its
  outputs' allocation, the ids check), no op layer;
* ``kernel-bwd``: the extension's gradient sweep alone (``native.logprobs_bwd`` into a fresh
  ``[N, V]`` buffer, with both upstream gradients), no op layer, no autograd;
* ``fwd``: ``fastrlhf.token_logprobs`` under ``no_grad`` (checks, backend choice, the call);
* ``fwd-grad``: the same with the logits requiring grad (the ``autograd.Function`` records it);
* ``fwd+bwd``: ``bench_logprobs.py``'s step (``(lp * a).sum() + (h * b).sum()``, backward);
* ``harness``: that step's loss arithmetic and backward on two leaves of ``[N]`` (no op), the
  part of ``fwd+bwd`` any implementation pays;
* ``eager-fwd`` / ``eager-fwd+bwd``: the eager reference, for the ratios.

``python bench/bench_cpu_small.py [--shape 256x2048] [--rounds 200] [--out FILE]``: prints
medians and interquartile ranges in microseconds; ``--out`` writes the rows (``impl`` the layer,
``condition``, ``ms`` / ``iqr_ms``) as a result file (bench ``cpu_small``) that ``fastrlhf
report`` renders.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _eager(logits, tokens):
    logsm = torch.log_softmax(logits.float(), dim=-1)
    logp = logsm.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logp, -(logsm.exp() * logsm).sum(-1)


# the pass(es) each layer times: fwd, the gradient sweep alone (bwd), or both
MODES = {"kernel": "fwd", "kernel-bwd": "bwd", "fwd": "fwd", "fwd-grad": "fwd",
         "fwd+bwd": "fwd+bwd", "harness": "fwd+bwd", "eager-fwd": "fwd",
         "eager-fwd+bwd": "fwd+bwd"}


def run(N: int, V: int, rounds: int) -> list[dict]:
    import fastrlhf as fr
    from fastrlhf import native
    from fastrlhf.ops.common import rows_layout

    if not native.available():
        raise SystemExit(f"the native backend is not available: {native.build_error()}")
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(N, V, generator=g) * 2).to(torch.bfloat16)
    other = (torch.randn(N, V, generator=g) * 2).to(torch.bfloat16)
    tokens = torch.randint(0, V, (N,), generator=g)
    w_lp, w_h = torch.randn(N, generator=g), torch.randn(N, generator=g)
    lg, dims, strides = rows_layout(data)
    leaf = data.clone().requires_grad_(True)
    eager_leaf = data.clone().requires_grad_(True)
    other_leaf = other.clone().requires_grad_(True)
    lp0, h0 = torch.randn(N, requires_grad=True), torch.randn(N, requires_grad=True)

    def loss_of(lp, h):
        return (lp * w_lp).sum() + (h * w_h).sum()

    def kernel():
        return native.logprobs_call(lg, dims, strides, V, tokens, 1.0, -100, True, (N,))

    _, ent, lse, _ = kernel()
    d_lp, d_h = torch.randn(N, generator=g), torch.randn(N, generator=g)

    def kernel_bwd():
        return native.logprobs_bwd(data, torch.empty_like(data), dims, strides, strides, V,
                                   tokens, d_lp, d_h, lse.view(N, 2), ent.view(N), 1.0, -100)

    def fwd():
        with torch.no_grad():
            return fr.token_logprobs(data, tokens, return_entropy=True)

    def fwd_grad():
        return fr.token_logprobs(leaf, tokens, return_entropy=True)

    def fwd_bwd():
        leaf.grad = None
        loss_of(*fr.token_logprobs(leaf, tokens, return_entropy=True)).backward()

    def harness():
        lp0.grad = h0.grad = None
        loss_of(lp0 * 1, h0 * 1).backward()

    def eager_fwd():
        with torch.no_grad():
            return _eager(data, tokens)

    def eager_fwd_bwd():
        eager_leaf.grad = None
        loss_of(*_eager(eager_leaf, tokens)).backward()

    def disturb():  # an eager step on other logits, as the round-robin's previous entry
        other_leaf.grad = None
        loss_of(*_eager(other_leaf, tokens)).backward()

    layers = {"kernel": kernel, "kernel-bwd": kernel_bwd, "fwd": fwd, "fwd-grad": fwd_grad, "fwd+bwd": fwd_bwd,
              "harness": harness, "eager-fwd": eager_fwd, "eager-fwd+bwd": eager_fwd_bwd}
    times = common.time_layers(layers, disturb, rounds, after="after-eager")
    rows = []
    for (name, cond), ts in times.items():
        s = common.spread(ts)
        rows.append(common.finish_row(dict(
            op="token_logprobs", mode=MODES[name], impl=name, condition=cond, shape=f"{N}x{V}",
            dtype="bf16", threads=torch.get_num_threads(), **s), copy_gbps=None))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="256x2048", help="NxV (bf16 logits)")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--out", default="", help="write the rows (and the environment) as JSON")
    args = ap.parse_args(argv)
    N, V = (int(v) for v in args.shape.split("x"))
    rows = run(N, V, args.rounds)
    return common.report_layers(rows, "after-eager", "cpu_small", args.out)


if __name__ == "__main__":
    main()
