"""Benchmark: the trainer's sampling loop (``fastrlhf.trainer.models.generate``) with and
without the KV cache, time per new token against the response length.

A random-weight Llama (hidden 256, 4 layers, 4 heads, vocabulary 32000; no downloads) samples
``B = 8`` responses to prompts of ``P = 16`` tokens, EOS disabled so that every run generates
exactly ``R`` tokens, for ``R`` in 16, 32, 64, 128, 256, 512 (``--quick``: 16, 32, 64).

Rows: ``ms`` = median wall time of the whole generation; ``ms_per_token`` = ``ms / R``;
``marginal_ms_per_token`` = ``(ms(R) - ms(R / 2)) / (R / 2)``, the cost of one token generated
between positions ``R / 2`` and ``R`` of the response.  With the cache the marginal cost should
stay flat as ``R`` grows (each step feeds one token); without it, every step re-runs the whole
prefix and the marginal cost grows linearly with ``R``.

    python bench/bench_trainer_generate.py [--device cuda] [--quick] [--no-cache-max R]
                                           [--threads N] [--write]

``--write`` merges the rows into ``bench/results/trainer-generate-<device>.json`` (a file of its
own, outside the ops' tables).  On a CPU, ``--no-cache-max 128`` stops the quadratic uncached
series at 128 tokens.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

B, P = 8, 16


def _policy(device: str):
    import transformers

    from fastrlhf.trainer.models import disable_dropout
    torch.manual_seed(0)
    conf = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        tie_word_embeddings=False)
    return disable_dropout(transformers.LlamaForCausalLM(conf)).to(device)


def run(device: str, quick: bool, no_cache_max: int = 0) -> list:
    from fastrlhf.trainer.distributed import Runtime
    from fastrlhf.trainer.models import generate

    policy = _policy(device)
    rt = Runtime(device=torch.device(device))
    query = torch.randint(3, 32000, (B, P), generator=torch.Generator().manual_seed(1)).to(device)
    lengths = (16, 32, 64) if quick else (16, 32, 64, 128, 256, 512)
    rows = []
    for cached in (True, False):
        ms = {}
        for R in (8,) + lengths:
            if not cached and no_cache_max and R > no_cache_max:
                continue
            def fn(R=R):
                g = torch.Generator(device=device).manual_seed(2)
                return generate(policy, query, R, 1.0, g, rt, eos_id=-1, kv_cache=cached)
            ms[R] = common.time_ms(fn, device, warmup=1, rep=3, max_seconds=60.0)
            if R == 8:
                continue
            rows.append({"op": "trainer_generate", "impl": "kv_cache" if cached else "no_cache",
                         "mode": "sample", "shape": f"B={B} P={P} R={R} V=32000 H=256 L=4",
                         "dtype": "float32", "ms": ms[R], "ms_per_token": round(ms[R] / R, 4),
                         "marginal_ms_per_token": round((ms[R] - ms[R // 2]) / (R // 2), 4)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--no-cache-max", type=int, default=0,
                    help="longest response timed without the cache (0: all; the uncached loop "
                         "is quadratic, so on a CPU 128 keeps the run to minutes)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); on a shared CPU use 1: "
                         "OpenMP threads competing with other processes distort the timings")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    copy_gbps = common.copy_bandwidth_gbps(args.device)
    rows = [common.finish_row(r, copy_gbps)
            for r in run(args.device, args.quick, args.no_cache_max)]
    print(common.format_table(rows))
    for r in rows:
        print(f"{r['impl']:>9} R={r['shape'].split('R=')[1].split()[0]:>4}: "
              f"{r['ms_per_token']:.3f} ms/token, marginal {r['marginal_ms_per_token']:.3f}")
    if args.write:
        # a file of its own: the trainer's results stay out of the ops' table (cpu.json, ...)
        path = os.path.join(common.RESULTS_DIR,
                            f"trainer-generate-{common.device_slug(args.device)}.json")
        common.write_results(path, common.environment(args.device), copy_gbps,
                             {"trainer_generate": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
