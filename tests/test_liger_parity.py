"""fused_ppo_loss matches Liger-Kernel's triton_grpo_loss where both express the same loss.

Liger (installed by the [integrations] extra) runs its own Triton kernels here, under the
interpreter on CPU.  Mapping: Liger's "bnpo" is our "token-mean", "grpo" our
"seq-mean-token-mean", "dr_grpo" our "seq-mean-token-sum-norm" with loss_scale_factor = T,
beta = kl_coef with kl_kind="k3"; advantages are per sequence; Liger reads logits [B, T+1, V]
and uses the first T positions, i.e. our logits[:, :-1].  Inputs stay where neither side's
clamps bind (|log-ratio| < 20, KL < 10), which is where the two definitions coincide.
"""

import pytest
import torch

from fastrlhf.ops.fused_loss import fused_ppo_loss
from helpers import DEVICE, TRITON_OK, assert_close

liger = pytest.importorskip("liger_kernel.transformers.grpo_loss",
                            reason="liger-kernel not installed (pip install -e '.[integrations]')")

CASES = [("bnpo", "token-mean", {}), ("grpo", "seq-mean-token-mean", {}),
         ("dr_grpo", "seq-mean-token-sum-norm", {})]


@pytest.mark.skipif(not TRITON_OK, reason="Liger's kernels need CUDA or the Triton interpreter")
@pytest.mark.parametrize("loss_type,agg,extra", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_liger_triton_grpo_loss(loss_type, agg, extra, beta):
    g = torch.Generator().manual_seed(7)
    B, T, V, temp = 3, 6, 40, 0.9
    logits = (torch.randn(B, T + 1, V, generator=g) * 2).to(DEVICE)
    tokens = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    with torch.no_grad():
        lp = torch.log_softmax(logits[:, :-1].double() / temp, -1).gather(
            -1, tokens.unsqueeze(-1)).squeeze(-1).float()
    old = lp + 0.3 * torch.randn(B, T, generator=g).to(DEVICE)
    ref = lp + 0.3 * torch.randn(B, T, generator=g).to(DEVICE)
    adv = torch.randn(B, generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(DEVICE)
    mask[:, 0] = True

    a = logits.clone().requires_grad_(True)
    out = liger.triton_grpo_loss(a, old, ref if beta else None, tokens, adv, mask.int(),
                                 temperature=temp, beta=beta, eps_low=0.2, eps_high=0.28,
                                 inplace=False, loss_type=loss_type, max_completion_length=T,
                                 reduce=True)
    theirs = out[0] if isinstance(out, tuple) else out
    theirs.backward()

    b = logits.clone().requires_grad_(True)
    ours, stats = fused_ppo_loss(b[:, :-1], tokens, old, adv, mask, ref_logp=ref if beta else None,
                                 kl_coef=beta, kl_kind="k3", clip_low=0.2, clip_high=0.28,
                                 temperature=temp, agg=agg, backend="triton", **extra)
    ours.backward()
    assert_close(f"{loss_type} loss", ours, theirs, atol=2e-5, rtol=1e-4)
    assert_close(f"{loss_type} dlogits", b.grad, a.grad, atol=2e-6, rtol=1e-3)
    assert bool(b.grad[:, -1].eq(0).all())
