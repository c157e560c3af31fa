"""fastrlhf.kernels: Triton kernels and their launchers.

Installed as ``fastrlhf.kernels`` (the source lives in ``kernels/`` at the repository root).  This
package imports nothing from ``fastrlhf`` besides its own helpers (``utils``) and the leaf
``fastrlhf.tables`` (shared codes and the dtype rule); ``fastrlhf.ops`` imports it
lazily, the first time a Triton-backed op runs, so that ``TRITON_INTERPRET`` may be set late.
"""

KERNEL_MODULES = ("logprobs", "kl", "gae", "losses", "fused_loss", "fused_linear")
