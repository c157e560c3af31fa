"""The native-CPU comparisons of issue [native-cpu] under pytest-benchmark, side by side in one run.

    .venv/bin/python -m pytest bench/pytest_native.py --benchmark-columns=median,mean,stddev,rounds

Same cases and inputs as ``bench/bench_native.py`` (fp32 token log-prob + entropy fwd+bwd at
N=4096, V=32000; GAE at 256 x 1024 against verl's Python loop; the fused PPO loss fwd+bwd at
8 x 512 x 32000 against the eager composition), grouped per op so pytest-benchmark prints eager
and native next to each other.  At the end the medians, their interquartile ranges and the ratios
(eager / native) are written under ``native_pytest_benchmark`` to a new file in ``bench/runs/``,
or merged into the committed ``bench/results/cpu.json`` with FASTRLHF_BENCH_WRITE=1.  ``--quick`` (env
FASTRLHF_BENCH_QUICK=1) uses the small shapes.  Not part of the test suite: it only measures.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_gae  # noqa: E402
import bench_native as bn  # noqa: E402
import common  # noqa: E402

QUICK = os.environ.get("FASTRLHF_BENCH_QUICK", "0") not in ("", "0")
_MEDIANS: dict = {}


def _inputs_logprobs():
    N, V = bn.QUICK["logprobs"] if QUICK else bn.LOGPROBS_SHAPE
    g = torch.Generator().manual_seed(0)
    data = torch.randn(N, V, generator=g) * 2
    tokens = torch.randint(0, V, (N,), generator=g)
    w = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return f"{N}x{V}", data, tokens, w


def _inputs_fused():
    B, T, V = bn.QUICK["fused"] if QUICK else bn.FUSED_SHAPE
    g = torch.Generator().manual_seed(1)
    data = torch.randn(B, T, V, generator=g) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(data, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    args = (tokens, lp + 0.1 * torch.randn(B, T, generator=g), torch.randn(B, generator=g),
            torch.rand(B, T, generator=g) > 0.1, lp + 0.1 * torch.randn(B, T, generator=g))
    return f"{B}x{T}x{V}", data, args


@pytest.fixture(scope="module", autouse=True)
def _report():
    problem = bn._native_ready()
    if problem:
        pytest.skip(f"native backend unavailable: {problem}")
    yield
    rows = []
    for (op, shape), med in sorted(_MEDIANS.items()):
        eager = med.get("eager")
        for impl, (ms, iqr, n) in sorted(med.items()):
            rows.append(common.finish_row(
                dict(op=op, impl=impl, mode="fwd+bwd" if op != "gae" else "fwd", shape=shape,
                     dtype="fp32", threads=torch.get_num_threads(), ms=ms, iqr_ms=iqr, repeats=n,
                     tool="pytest-benchmark",
                     speedup_vs_eager=round(eager[0] / ms, 2) if eager else None), 0.0))
    if rows:
        path = common.results_path("cpu", write=os.environ.get("FASTRLHF_BENCH_WRITE") == "1")
        common.write_results(path, common.environment("cpu"), common.copy_bandwidth_gbps("cpu"),
                             {"native_pytest_benchmark": rows})
        print("\n" + common.format_table(rows) + f"\nwrote {path}")


def _record(benchmark, op, shape, impl):
    st = benchmark.stats.stats
    _MEDIANS.setdefault((op, shape), {})[impl] = (st.median * 1e3, st.iqr * 1e3, st.rounds)


@pytest.mark.benchmark(group="token_logprobs fwd+bwd")
@pytest.mark.parametrize("impl", ["eager", "native", "native+inplace"])
def test_token_logprobs(benchmark, impl):
    shape, data, tokens, (w_lp, w_h) = _inputs_logprobs()
    fn = bn._eager_logprobs if impl == "eager" else bn._native_logprobs(impl.endswith("inplace"))
    leaf = data.clone().requires_grad_(True)

    def step():
        lp, h = fn(leaf, tokens)
        return torch.autograd.grad((lp * w_lp).sum() + (h * w_h).sum(), leaf)[0]

    g = benchmark.pedantic(step, rounds=3 if QUICK else 5, warmup_rounds=1)
    assert torch.isfinite(g).all()
    _record(benchmark, "token_logprobs", shape, impl)


@pytest.mark.benchmark(group="gae")
@pytest.mark.parametrize("impl", ["eager", "native"])
def test_gae(benchmark, impl):
    import fastrlhf as fr
    B, T = bn.QUICK["gae"] if QUICK else bn.GAE_SHAPE
    g = torch.Generator().manual_seed(2)
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > 0.2
    if impl == "eager":
        def step():
            return bench_gae.verl_loop(r, v, m, 1.0, 0.95)
    else:
        def step():
            return fr.gae(r, v, m, gamma=1.0, lam=0.95, backend="native")
    adv = benchmark.pedantic(step, rounds=3 if QUICK else 5, warmup_rounds=1)[0]
    assert torch.isfinite(adv).all()
    _record(benchmark, "gae", f"{B}x{T}", impl)


@pytest.mark.benchmark(group="fused_ppo_loss fwd+bwd")
@pytest.mark.parametrize("impl", ["eager", "native", "native+inplace"])
def test_fused_ppo_loss(benchmark, impl):
    shape, data, args = _inputs_fused()
    fn = bn._eager_fused if impl == "eager" else bn._native_fused(impl.endswith("inplace"))
    leaf = data.clone().requires_grad_(True)

    def step():
        return torch.autograd.grad(fn(leaf, *args), leaf)[0]

    g = benchmark.pedantic(step, rounds=3 if QUICK else 5, warmup_rounds=1)
    assert torch.isfinite(g).all()
    _record(benchmark, "fused_ppo_loss", shape, impl)
