"""Benchmark (CPU): single timed fused_linear_ppo_loss forward + backward steps with bf16 hidden /
weight, for machines where bf16 GEMMs are so slow (no bf16 dot instructions: AVX2) that
``bench_fused_linear.py --dtype bf16`` (warm-up, three repeats, a peak-memory run, per impl) does
not finish in hours.  Each step starts from fresh leaves; one JSON line per step is printed as it
ends, so a stopped run keeps what it measured.

``python bench/bench_fused_linear_bf16_quick.py IMPLS REPS`` with IMPLS a comma list of
``fastrlhf`` (native fused lm_head), ``eager`` (bf16 ``h @ w.T`` + reference loss) and ``liger``
(``LigerFusedLinearGRPOLoss``), e.g. ``fastrlhf,eager,liger,fastrlhf 2``.  Shape B=16, T=128,
H=1024, V=32000.  ``--peak`` (third argument): after each implementation's timed steps, one more
step under ``common.peak_extra_bytes`` (the sampled resident set beyond what was live before it),
printed as ``peak_mb``.
"""
import sys, time, json, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import bench_fused_linear as B
torch.manual_seed(0)
Bt, T, H, V = 16, 128, 1024, 32000
dt = torch.bfloat16
h = (torch.randn(Bt, T, H) * 0.5).to(dt)
w = (torch.randn(V, H) * 0.02).to(dt)
tok = torch.randint(0, V, (Bt, T)); old = torch.randn(Bt, T) * 0.1 - 10; adv = torch.randn(Bt); mask = torch.ones(Bt, T, dtype=torch.bool)
impls = {"fastrlhf": B._ppo_fastrlhf, "eager": B._ppo_eager, "liger": B._ppo_liger()}
order = sys.argv[1].split(",")
reps = int(sys.argv[2])
peak = sys.argv[3:] == ["--peak"]
if sys.argv[3:] and not peak:
    raise SystemExit("usage: bench_fused_linear_bf16_quick.py IMPLS REPS [--peak]")
for name in order:
    f = impls[name]
    ts = []
    for r in range(reps):
        hl = h.clone().requires_grad_(True); wl = w.clone().requires_grad_(True)
        t = time.perf_counter()
        loss = f(hl, wl, tok, old, adv, mask)
        loss.backward()
        ts.append(time.perf_counter() - t)
        print(json.dumps({"impl": name, "rep": r, "s": round(ts[-1], 3), "loss": float(loss.detach())}), flush=True)
    if peak:  # as bench_fused_linear: the leaves exist before, their gradients are counted
        hl = h.clone().requires_grad_(True); wl = w.clone().requires_grad_(True)

        def step():
            f(hl, wl, tok, old, adv, mask).backward()
        mb = B.common.peak_extra_bytes(step, "cpu") / 2 ** 20
        print(json.dumps({"impl": name, "peak_mb": round(mb, 1)}), flush=True)
