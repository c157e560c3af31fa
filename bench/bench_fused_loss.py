"""Benchmark: the whole policy loss from bf16 logits, forward + backward to the logits.

The loss (GRPO-style, the configuration Liger's kernel also expresses): per-sequence advantages,
PPO clip 0.2, KL to a reference policy with k3 and coefficient 0.04, temperature 1, token-mean
aggregation (Liger's "bnpo").  Mode ``fwd+bwd`` times ``loss = f(logits); torch.autograd.grad(loss,
logits)`` -- the gradient handed to the lm_head's backward, no accumulation into a leaf.  Mode
``fwd+bwd,gspo`` is the same with the GSPO sequence ratio; ``fwd+bwd,upstream=0.25`` hands the
backward an upstream gradient of 0.25 (a loss divided by gradient-accumulation steps).

Implementations:
  eager             the composition as trainers write it (verl style): log_softmax of the fp32
                    logits, gather, the clipped loss, the k3 KL, the masked mean
  compile           torch.compile of that eager function
  fastrlhf          fastrlhf.fused_ppo_loss (backend auto): one kernel, the gradient is written
                    in the forward; "+inplace": written over the logits (no [N, V] allocation);
                    ",grad_timing=backward": read in the forward, gradient swept in the backward
                    (Triton; the native backend always writes the gradient in the forward, so
                    on CPU these rows run the same code as their twins without it: the
                    difference between the two is the machine's noise)
  liger             liger_kernel's triton_grpo_loss (per-token output reduced as "bnpo"), when
                    installed; it reads [B, T + 1, V] logits (one extra position per sequence)

Every implementation's loss is checked against eager on the same inputs before it is timed; the
implementations of one mode are timed round-robin on CPU (``common.time_group``), so that their
ratios compare the same stretch of a shared machine's time (on GPU one after the other: one
``[N, V]`` leaf at a time).
Bytes = the one-read-one-write floor of the logits (2 x N x V x 2 bytes for bf16), so x_floor is
the time over what a copy of the logits would take.  peak_mb: memory allocated beyond the inputs.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GPU_SHAPES = [(8, 2048, 128256), (8, 2048, 151936)]   # N = 16384 rows
CPU_SHAPES = [(4, 64, 8192)]
CPU_QUICK_SHAPES = [(2, 16, 1000)]
CLIP, BETA = 0.2, 0.04


def _eager(logits, tokens, old, adv, mask, ref, seq=False):
    """verl-style eager composition (fp32 math from the bf16 logits)."""
    logsm = torch.log_softmax(logits.float(), dim=-1)
    logp = logsm.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    m = mask.float()
    if seq:
        d = logp - old
        s = ((d * m).sum(-1) / m.sum(-1).clamp(min=1)).unsqueeze(-1)
        ratio = torch.exp(torch.clamp(logp - logp.detach() + s.detach(), max=10.0))
    else:
        ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    a = adv.unsqueeze(-1)
    pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - CLIP, 1 + CLIP))
    k = torch.clamp(ref - logp, -20.0, 20.0)
    kl = torch.clamp(torch.exp(k) - k - 1, -10.0, 10.0)
    per_token = pg + BETA * kl
    return (per_token * m).sum() / m.sum()


def _fastrlhf(inplace, seq, timing="forward"):
    import fastrlhf.ops.fused_loss as F

    def f(logits, tokens, old, adv, mask, ref):
        loss, _ = F.fused_ppo_loss(logits, tokens, old, adv, mask, ref_logp=ref, kl_coef=BETA,
                                   kl_kind="k3", clip_low=CLIP,
                                   ratio_level="sequence" if seq else "token",
                                   inplace_backward=inplace, grad_timing=timing)
        return loss
    return f


def _liger():
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    def f(logits_full, tokens, old, adv, mask, ref):
        out = triton_grpo_loss(logits_full, old, ref, tokens, adv, mask, temperature=1.0,
                               beta=BETA, eps_low=CLIP, eps_high=CLIP)
        per_token = out[0]
        m = mask.float()
        return (per_token * m).sum() / m.sum()
    return f


def _impls(with_compile, seq):
    impls = {"eager": lambda: (lambda *a: _eager(*a, seq=seq))}
    if with_compile:
        impls["compile"] = lambda: torch.compile(lambda *a: _eager(*a, seq=seq), dynamic=False)
    impls["fastrlhf"] = lambda: _fastrlhf(False, seq)
    impls["fastrlhf+inplace"] = lambda: _fastrlhf(True, seq)
    impls["fastrlhf,grad_timing=backward"] = lambda: _fastrlhf(False, seq, "backward")
    impls["fastrlhf+inplace,grad_timing=backward"] = lambda: _fastrlhf(True, seq, "backward")
    if not seq:
        impls["liger"] = _liger
    return impls


def _inputs(B, T, V, device):
    g = torch.Generator(device=device).manual_seed(0)
    full = (torch.randn(B, T + 1, V, device=device, generator=g) * 2).to(torch.bfloat16)
    tokens = torch.randint(0, V, (B, T), device=device, generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(full[:, :-1].float(), -1).gather(-1, tokens.unsqueeze(-1))[..., 0]
    old = lp + 0.2 * torch.randn(B, T, device=device, generator=g)
    ref = lp + 0.2 * torch.randn(B, T, device=device, generator=g)
    adv = torch.randn(B, device=device, generator=g)
    mask = torch.rand(B, T, device=device, generator=g) < 0.9
    return full, tokens, old, adv, mask, ref


def _check(name, fn, full, rest, want):
    """Loss of ``fn`` on the first two sequences vs eager's, before any timing."""
    try:
        x = full[:2].clone()
        arg = x if name == "liger" else x[:, :-1].contiguous()
        got = fn(arg, *[t[:2] for t in rest])
        if not torch.allclose(got.float(), want, atol=1e-3, rtol=1e-3):
            return f"loss differs from eager ({float(got):.6g} vs {float(want):.6g})"
    except Exception as e:
        return common.skip_reason(e, full.device)
    return None


def run(device: str, quick: bool = False, with_compile: bool = True) -> list[dict]:
    on_gpu = device.startswith("cuda")
    shapes = GPU_SHAPES if on_gpu else (CPU_QUICK_SHAPES if quick else CPU_SHAPES)
    rows = []
    for B, T, V in shapes:
        full, tokens, old, adv, mask, ref = _inputs(B, T, V, device)
        rest = (tokens, old, adv, mask, ref)
        N = B * T
        # the logits as the loss sees them: [B, T, V], N rows (what lm_head(hidden[:, :-1])
        # gives); Liger gets the [B, T + 1, V] tensor it expects
        data = full[:, :-1].contiguous()
        # upstream 0.25: a loss scaled before backward (gradient accumulation), where
        # grad_timing="forward" pays one more read + write of the gradient
        for seq, up in ((False, 1.0), (False, 0.25), (True, 1.0)):
            mode = ("fwd+bwd,gspo" if seq else "fwd+bwd") + (f",upstream={up}" if up != 1 else "")
            g_out = torch.tensor(up, device=device)
            with torch.no_grad():
                want = _eager(full[:2, :-1], *[t[:2] for t in rest], seq=seq).float()
            entries = []
            for name, make in _impls(with_compile, seq).items():
                row = dict(op="fused_ppo_loss", impl=name, mode=mode, shape=f"{N}x{V}",
                           dtype="bf16")
                rows.append(row)
                if name.startswith("fastrlhf"):
                    row["backend"] = common.fastrlhf_backend(device)
                try:
                    fn = make()
                except Exception as e:  # peer not installed, etc.
                    row["skipped"] = common.skip_reason(e, device)
                    continue
                problem = _check(name, fn, full, rest, want)
                if problem:
                    row["skipped"] = problem
                    continue
                row["bytes"] = 2 * N * V * data.element_size()
                # One leaf per implementation, reused across steps (a fresh copy per step would
                # add a copy); the in-place variants overwrite it with gradients: values stay
                # finite.
                leaf = (full if name == "liger" else data).clone().requires_grad_(True)

                def step(fn=fn, leaf=leaf):
                    loss = fn(leaf, *rest)
                    return torch.autograd.grad(loss, leaf, grad_outputs=g_out.to(loss.dtype))
                if on_gpu:  # one [N, V] leaf at a time (GPU timings are steady anyway)
                    common.time_group([(row, step)], device, warmup=3, rep=20)
                    del leaf, step
                    torch.cuda.empty_cache()
                else:
                    entries.append((row, step))
            # CPU: round-robin (common.time_group); the steps are milliseconds: many repeats
            common.time_group(entries, device, warmup=3, rep=40, max_seconds=30)
            del entries
        del full, data
        if on_gpu:
            torch.cuda.empty_cache()
    common.add_speedups(rows)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--write", action="store_true", help="merge into bench/results/<device>.json")
    args = ap.parse_args(argv)
    rows = run(args.device, args.quick, with_compile=not args.no_compile)
    copy_gbps = common.copy_bandwidth_gbps(args.device)
    rows = [common.finish_row(r, copy_gbps) for r in rows]
    print(f"{common.device_name(args.device)}: copy bandwidth {copy_gbps:.0f} GB/s")
    print(common.format_table(rows))
    if args.write:
        path = os.path.join(common.RESULTS_DIR, f"{common.device_slug(args.device)}.json")
        common.write_results(path, common.environment(args.device), copy_gbps,
                             {"fused_loss": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
