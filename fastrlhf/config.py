"""Runtime switches of fastrlhf.

``FASTRLHF_BACKEND``       overrides ``backend="auto"`` (one of triton | native | reference).
``FASTRLHF_CHECK_TOKENS``  ``0`` turns off the host-side token-range check (it synchronizes the
                           device once per call, which CUDA-graph capture forbids).  Out-of-range
                           ids then give NaN log-probs instead of an exception; kernels never read
                           out of bounds either way.
``FASTRLHF_HUGEPAGES``     ``0`` stops fastrlhf from asking Linux for transparent huge pages on the
                           large CPU buffers it allocates (gradients of the logits and of lm_head;
                           see :mod:`fastrlhf.buffers`).
"""

from __future__ import annotations

import contextlib
import os

_check_tokens: bool | None = None


def check_tokens_enabled() -> bool:
    """Whether ops verify that token ids lie in [0, V) (default on)."""
    if _check_tokens is not None:
        return _check_tokens
    return os.environ.get("FASTRLHF_CHECK_TOKENS", "1").strip().lower() not in ("0", "false", "no", "off")


def set_check_tokens(enabled: bool | None) -> None:
    """Turn the token-range check on/off for this process; ``None`` returns to the env default."""
    global _check_tokens
    _check_tokens = None if enabled is None else bool(enabled)


@contextlib.contextmanager
def check_tokens(enabled: bool):
    """Context manager form of :func:`set_check_tokens` (e.g. around CUDA-graph capture)."""
    global _check_tokens
    old = _check_tokens
    _check_tokens = bool(enabled)
    try:
        yield
    finally:
        _check_tokens = old


def hugepages_enabled() -> bool:
    """Whether large CPU output buffers are advised to use transparent huge pages (default on)."""
    return os.environ.get("FASTRLHF_HUGEPAGES", "1").strip().lower() not in ("0", "false", "no", "off")
