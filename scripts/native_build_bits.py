"""Compare the native backend's results between two builds of the same source (ISA flags).

Runs one fixed set of native calls -- ``token_logprobs`` (+ entropy, backward), ``fused_ppo_loss``
(+ backward) on fp32 and bf16 logits, ``gae``, ``linear_token_logprobs`` (+ backward) -- in a
subprocess per build (``FASTRLHF_NATIVE_CFLAGS`` set to each flag set; a build not cached yet
compiles first, ~1 minute) and prints, per output, whether the two builds agree bitwise, the
largest absolute difference and how many elements differ.

``python scripts/native_build_bits.py [--a "-mavx2 -mfma -mf16c"] [--b ""]`` (an empty flag
set means the default flags for this machine).  Threads and the calls are the same in both
runs, so any difference is the build's (vector width, FMA contraction).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch


def outputs() -> dict:
    """The fixed calls, in this process (with whatever build it loads)."""
    import fastrlhf as fr
    from fastrlhf import native
    if not native.available():
        raise SystemExit(f"native backend unavailable: {native.build_error()}")
    out = {}
    g = torch.Generator().manual_seed(0)
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = (torch.randn(4, 33, 1000, generator=g) * 3).to(dt).requires_grad_(True)
        tok = torch.randint(0, 1000, (4, 33), generator=g)
        lp, h = fr.token_logprobs(x, tok, return_entropy=True, backend="native")
        (gx,) = torch.autograd.grad((lp * 0.3).sum() + (h * 0.7).sum(), x)
        out.update({f"token_logprobs logp {name}": lp.detach(),
                    f"token_logprobs entropy {name}": h.detach(),
                    f"token_logprobs dlogits {name}": gx})
        old = lp.detach() + 0.1
        adv = torch.randn(4, 33, generator=g)
        mask = torch.rand(4, 33, generator=g) < 0.8
        loss, _ = fr.fused_ppo_loss(x, tok, old, adv, mask, entropy_coef=0.01, backend="native")
        (gx,) = torch.autograd.grad(loss, x)
        out.update({f"fused_ppo_loss loss {name}": loss.detach(),
                    f"fused_ppo_loss dlogits {name}": gx})
    adv, _ = fr.gae(torch.randn(8, 50, generator=g), torch.randn(8, 50, generator=g),
                    torch.ones(8, 50), backend="native")
    out["gae advantages"] = adv
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(500, 32, generator=g, requires_grad=True)
    lp = fr.linear_token_logprobs(h, w, torch.randint(0, 500, (64,), generator=g),
                                  backend="native")
    dh, dw = torch.autograd.grad(lp.sum(), (h, w))
    out.update({"linear_token_logprobs logp": lp.detach(), "linear_token_logprobs dhidden": dh,
                "linear_token_logprobs dweight": dw})
    return out


def compare(a: dict, b: dict) -> list:
    """``(name, bitwise, max |a - b|, elements that differ, elements)`` per output."""
    rows = []
    for k in a:
        x, y = a[k], b[k]
        rows.append((k, torch.equal(x, y), float((x.double() - y.double()).abs().max()),
                     int((x != y).sum()), x.numel()))
    return rows


def _run_build(flags: str, path: str) -> None:
    env = dict(os.environ)
    if flags.strip():
        env["FASTRLHF_NATIVE_CFLAGS"] = flags
    else:
        env.pop("FASTRLHF_NATIVE_CFLAGS", None)
    subprocess.run([sys.executable, __file__, "--save", path], env=env, check=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="-mavx2 -mfma -mf16c", help="flags of the first build")
    ap.add_argument("--b", default="", help="flags of the second build ('' = the default)")
    ap.add_argument("--save", help=argparse.SUPPRESS)  # child mode: write this build's outputs
    args = ap.parse_args(argv)
    if args.save:
        torch.save(outputs(), args.save)
        return []
    with tempfile.TemporaryDirectory() as d:
        pa, pb = os.path.join(d, "a.pt"), os.path.join(d, "b.pt")
        _run_build(args.a, pa)
        _run_build(args.b, pb)
        rows = compare(torch.load(pa), torch.load(pb))
    print(f"build a: {args.a or '(default flags)'}\nbuild b: {args.b or '(default flags)'}")
    for name, same, diff, n, total in rows:
        print(f"{name:34s} {'bitwise' if same else 'differs':8s} max |diff| {diff:.3g}  "
              f"{n} of {total} elements differ")
    return rows


if __name__ == "__main__":
    main()
