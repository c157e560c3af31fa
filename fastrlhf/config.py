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
_OFF = ("0", "false", "no", "off")

# os.environ keeps its items in ``_data`` under encoded keys (CPython's os module, every
# version since 3.2); ``env`` reads that mapping directly when it is there.
_DATA = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
_DECODE = getattr(os.environ, "decodevalue", None)
_FAST = isinstance(_DATA, dict) and callable(_ENCODE) and callable(_DECODE)
_KEYS: dict = {}  # name -> its encoded key


def env(name: str, default=None):
    """``os.environ.get(name, default)``, as one dict lookup in os.environ's own store.

    The ops read their switches on every call, so that changing the environment at run time
    (a test, a notebook) applies at once.  ``os.environ.get`` runs four Python frames
    (``Mapping.get``, ``__getitem__``, ``encodekey``, ``decodevalue``): ~1.5 us when warm, but
    ~25 us each time other work has pushed them out of the caches -- measured right after an
    eager step on 256 x 2048 logits (bench/bench_cpu_small.py's condition), where the two reads of
    a ``token_logprobs`` call were a third of its Python.  Every assignment or deletion through
    ``os.environ`` updates that store; where it is missing (another Python) this is
    ``os.environ.get``."""
    if not _FAST:
        return os.environ.get(name, default)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = _ENCODE(name)
    value = _DATA.get(key)
    return default if value is None else _DECODE(value)


def env_flag(name: str, default: bool = True) -> bool:
    """A boolean switch from the environment: off for ``0`` / ``false`` / ``no`` / ``off`` (any
    case, surrounding blanks ignored), on for any other value, ``default`` when unset."""
    value = env(name)
    if value is None:
        return default
    return value.strip().lower() not in _OFF


def check_tokens_enabled() -> bool:
    """Whether ops verify that token ids lie in [0, V) (default on)."""
    if _check_tokens is not None:
        return _check_tokens
    return env_flag("FASTRLHF_CHECK_TOKENS")


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
    return env_flag("FASTRLHF_HUGEPAGES")
