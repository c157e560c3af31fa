"""Communication volume of the vocab-parallel ops -- COMPUTED, not measured.

    python bench/comm_volume.py                 # print the Markdown table
    python bench/comm_volume.py --out FILE.md   # also write it to FILE.md

For each vocab-parallel op (``process_group=``) this runs the real implementation once, forward
and backward, in a one-process gloo group with ``torch.distributed.all_reduce`` wrapped to record
every call's tensor size and dtype, at the benchmarks' GPU row counts (N = 16384; H = 4096 for
the lm_head ops; bf16 inputs).  The reference backend does the local work on the CPU; the
combine / backward code that issues the all-reduces is shared with the Triton path, so the calls
and their sizes are the same on GPU.  The all-reduced tensors are ``[N]``-sized (``[N, H]`` for
the lm_head's ``dhidden``), independent of the vocab, which the script checks by running each
op at two local vocab sizes.  Nothing is timed: the table contains byte counts only.

Columns:

* ``partials payload``: bytes of the ``[N]``-sized tensors passed to ``all_reduce`` per rank per
  step (forward + backward), incl. the 8-byte scalar of the token-range check (on by default);
  ``dhidden payload``: the lm_head ops' ``[N, H]`` all-reduce of the hidden states' gradient
  (the standard cost of any vocab-parallel lm_head, listed apart).
* ``ring wire / rank``: what a ring all-reduce sends (and receives) per rank for the whole
  payload, ``2 (P - 1) / P * payload``, for tensor-parallel size ``P``.
* ``logits avoided``: the alternative of gathering the full-vocab bf16 logits on every rank
  (all-gather: ``(P - 1) / P * N * V * 2`` bytes received per rank; x2 for ``full_kl``, which
  needs both the policy's and the reference's logits).  For the lm_head ops the logits are never
  formed at all; the comparison is with gathering them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

import torch
import torch.distributed as dist

N = 16384
H = 4096
VOCABS = (32000, 128256, 151936)
TP = (2, 4, 8)


@contextlib.contextmanager
def _recording():
    calls = []
    real = dist.all_reduce

    def rec(tensor, *args, **kwargs):
        calls.append((tuple(tensor.shape), tensor.dtype, tensor.numel() * tensor.element_size()))
        return real(tensor, *args, **kwargs)

    dist.all_reduce = rec
    try:
        yield calls
    finally:
        dist.all_reduce = real


def _run_op(name: str, v_local: int):
    """One forward + backward of ``name`` on a local vocab slice of ``v_local`` columns.
    Returns (forward calls, backward calls)."""
    import fastrlhf as fr
    g = torch.Generator().manual_seed(0)
    vp = dict(process_group=dist.group.WORLD, vocab_start_index=0, backend="reference")
    dt = torch.bfloat16
    tokens = torch.randint(0, v_local, (N,), generator=g)
    if name in ("token_logprobs", "full_kl", "fused_ppo_loss"):
        logits = torch.randn(N, v_local, generator=g).to(dt).requires_grad_(True)
    if name in ("linear_token_logprobs", "fused_linear_ppo_loss"):
        hidden = torch.randn(N, H, generator=g).to(dt).requires_grad_(True)
        weight = (torch.randn(v_local, H, generator=g) * H ** -0.5).to(dt).requires_grad_(True)
    with _recording() as fwd:
        if name == "token_logprobs":
            lp, ent = fr.token_logprobs(logits, tokens, return_entropy=True, **vp)
            loss = lp.sum() + ent.sum()
        elif name == "full_kl":
            ref = torch.randn(N, v_local, generator=g).to(dt)
            loss = fr.full_kl(logits, ref, **vp).sum()
        elif name == "linear_token_logprobs":
            lp, ent = fr.linear_token_logprobs(hidden, weight, tokens, return_entropy=True, **vp)
            loss = lp.sum() + ent.sum()
        else:
            B, T = 8, N // 8
            old = torch.randn(B, T, generator=g) * 0.1 - 3
            adv = torch.randn(B, T, generator=g)
            mask = torch.ones(B, T)
            kw = dict(ref_logp=old.clone(), kl_coef=0.01, entropy_coef=0.01, **vp)
            if name == "fused_ppo_loss":
                loss, _ = fr.fused_ppo_loss(logits.view(B, T, v_local), tokens.view(B, T), old,
                                            adv, mask, **kw)
            else:
                from fastrlhf.ops.fused_linear import fused_linear_ppo_loss
                loss, _ = fused_linear_ppo_loss(hidden.view(B, T, H), weight, tokens.view(B, T),
                                                old, adv, mask, **kw)
    with _recording() as bwd:
        loss.backward()
    return fwd, bwd


def _fmt(b: float) -> str:
    for unit, k in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= 0.95 * k:
            return f"{b / k:.3g} {unit}"
    return f"{int(b)} B"


def _describe(calls) -> str:
    return " + ".join(f"{list(s)} {str(d).replace('torch.', '')}" for s, d, _ in calls) or "-"


def compute() -> list[dict]:
    ops = ["token_logprobs", "full_kl", "fused_ppo_loss", "linear_token_logprobs",
           "fused_linear_ppo_loss"]
    rows = []
    for op in ops:
        runs = [_run_op(op, v) for v in (64, 96)]
        sizes = [f + bw for f, bw in runs]
        if sizes[0] != sizes[1]:
            raise RuntimeError(f"{op}: all-reduce sizes depend on the local vocab: {sizes}")
        fwd, bwd = runs[0]
        # [N, H] gradients of the lm_head input: the cost of any vocab-parallel lm_head
        dh = sum(b for s, _, b in fwd + bwd if len(s) >= 2 and s[-1] == H and "linear" in op)
        partials = sum(b for *_, b in fwd + bwd) - dh
        n_logits = 2 if op == "full_kl" else 1
        for V in VOCABS:
            if "linear" in op and V == 32000:
                continue
            for P in TP:
                ring = 2 * (P - 1) / P
                gather = (P - 1) / P * N * V * 2 * n_logits
                rows.append(dict(op=op, N=N, V=V, H=H if "linear" in op else None, P=P,
                                 forward=_describe(fwd), backward=_describe(bwd),
                                 partials_bytes=partials, dhidden_bytes=dh,
                                 ring_wire_bytes=int(ring * (partials + dh)),
                                 logits_gather_bytes=int(gather),
                                 ratio=gather / (ring * partials)))
    return rows


def render(rows: list[dict]) -> str:
    out = ["Vocab-parallel communication per rank per step (forward + backward), **computed from "
           "the implementation's all-reduce calls, not measured** (`python bench/comm_volume.py`"
           "; bf16 inputs, fp32 partials; ring all-reduce wire bytes = 2(P-1)/P x payload).", ""]
    seen = set()
    out.append("| op | all-reduced tensors, forward | backward |")
    out.append("|---|---|---|")
    for r in rows:
        if r["op"] not in seen:
            seen.add(r["op"])
            out.append(f"| {r['op']} | {r['forward']} | {r['backward']} |")
    out += ["", "| op | N | V | H | TP size P | partials payload | dhidden payload | "
            "ring wire / rank (all) | logits all-gather avoided / rank | "
            "avoided / partials' wire |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['op']} | {r['N']} | {r['V']} | {r['H'] or ''} | {r['P']} | "
                   f"{_fmt(r['partials_bytes'])} | "
                   f"{_fmt(r['dhidden_bytes']) if r['dhidden_bytes'] else '-'} | "
                   f"{_fmt(r['ring_wire_bytes'])} | {_fmt(r['logits_gather_bytes'])} | "
                   f"{r['ratio']:,.0f}x |")
    out += ["", "partials: the [N]-sized per-row statistics (+ the 8-byte token-range check); "
            "dhidden: the [N, H] all-reduce of the lm_head input's gradient, which every "
            "vocab-parallel lm_head pays (Megatron's copy_to_tensor_model_parallel_region), with "
            "or without fastrlhf; logits all-gather avoided: (P-1)/P x N x V x 2 bytes of bf16 "
            "logits (x2 for full_kl: policy and reference)."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the Markdown table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'store')}",
                                rank=0, world_size=1)
        try:
            text = render(compute())
        finally:
            dist.destroy_process_group()
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
