"""Output buffers of the backends: large CPU gradients backed by transparent huge pages.

A fresh [N, V] gradient (or lm_head's [V, H]) is written exactly once, and on CPU the first
touch of its pages costs more than writing it: a 500 MB buffer took ~190 ms of page faults with
4 KiB pages against ~30 ms to fill once mapped, and ~40 ms to first-touch with 2 MiB pages
(measured on the 2-core dev machine, THP mode "madvise").  Linux gives a region huge pages only
when asked (madvise MADV_HUGEPAGE) unless THP is "always"; asking changes nothing about the
contents or the size.  ``FASTRLHF_HUGEPAGES=0`` turns it off.

Imported by the op layer (``ops/common.py``) and the C++ binding layer (``native.py``); imports
only ``config``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import config

# glibc's largest mmap threshold (32 MiB on 64-bit): a buffer this big has a mapping of its own,
# so advising it never touches (or splits) the heap.
HUGEPAGE_MIN_BYTES = 32 << 20
_HUGE = 1 << 21
_MADV_HUGEPAGE = 14
_madvise = None  # None: not looked up yet; False: unavailable


def _thp_madvise_fn():
    """libc's madvise when THP is in "madvise" mode (in "always" it is not needed, in "never" it
    does nothing), else False."""
    global _madvise
    if _madvise is None:
        _madvise = False
        try:
            with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                mode = f.read()
            if "[madvise]" in mode:
                import ctypes
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
        except (OSError, AttributeError):
            pass
    return _madvise


def advise_hugepages(t: Tensor) -> bool:
    """Ask the kernel to back the 2 MiB-aligned interior of CPU tensor ``t``'s storage with
    transparent huge pages, before anything is written to it.  Returns whether it asked: only for
    CPU tensors of at least HUGEPAGE_MIN_BYTES, on Linux with THP in "madvise" mode, unless
    ``FASTRLHF_HUGEPAGES=0``.  A refusal by the kernel is ignored (it only affects speed)."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < HUGEPAGE_MIN_BYTES or not config.hugepages_enabled():
        return False
    fn = _thp_madvise_fn()
    if not fn:
        return False
    start = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
    end = (t.data_ptr() + nbytes) & ~(_HUGE - 1)
    if end <= start:
        return False
    fn(start, end - start, _MADV_HUGEPAGE)
    return True


def grad_empty(shape, dtype: torch.dtype, device) -> Tensor:
    """``torch.empty(shape)`` for a large gradient the caller writes in full (contents
    undefined), on CPU backed by huge pages where the OS allows it (see advise_hugepages)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    advise_hugepages(out)
    return out
