"""Backend choice for every op: ``"auto" | "triton" | "native" | "reference"``.

* ``auto`` -> ``triton`` for CUDA tensors; for CPU tensors ``native`` when the C++ extension is
  available, else ``reference``; ``reference`` on any other device (mps, xpu, ...).  The
  environment variable ``FASTRLHF_BACKEND`` replaces ``auto`` (an explicit ``backend=`` argument
  always wins); its ``native`` is a preference for the CPU tensors of ops that have a native
  implementation, and ``auto`` applies elsewhere.
* ``triton`` on CPU tensors runs the real kernels in Triton's interpreter; that requires
  ``TRITON_INTERPRET=1`` in the environment before the kernels are first imported.
* ``reference`` is the eager PyTorch definition in :mod:`fastrlhf.reference`.
"""

from __future__ import annotations

import sys

import torch

from . import config, native
from .tables import BACKENDS

__all__ = ["BACKENDS", "requested", "resolve", "native_available", "interpret_env"]


def interpret_env() -> bool:
    return config.env("TRITON_INTERPRET", "0") not in ("", "0")


def native_available() -> bool:
    """True when the C++ CPU extension (csrc/) is built and loadable."""
    return native.available()


def requested(backend: str | None, *, op: str) -> str:
    """The backend asked for: ``backend`` validated, with ``FASTRLHF_BACKEND`` replacing
    ``"auto"`` (and None).  Raises ValueError on a bad name in either."""
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = config.env("FASTRLHF_BACKEND", "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"FASTRLHF_BACKEND must be one of {BACKENDS}, got {env!r}")
            return env
    return backend


def resolve(backend: str | None, device: torch.device, *, op: str, native_ok: bool = False) -> str:
    """Return the concrete backend for ``op`` on ``device``; raises ValueError on a bad name."""
    explicit = backend is not None and backend != "auto"
    backend = requested(backend, op=op)
    kind = device.type  # read once: every op call resolves, and each step costs when cold
    # A process-wide preference (FASTRLHF_BACKEND) for "native" applies to the ops that have a
    # native implementation and to CPU tensors; the others keep their automatic choice instead
    # of failing (an explicit backend="native" still raises for them, below).
    if not explicit and backend == "native" and not (native_ok and kind == "cpu"):
        backend = "auto"
    if backend == "auto":
        if kind == "cuda":
            return "triton"
        # The C++ extension is opaque to torch.compile: traced code keeps the reference path.
        # It reads CPU memory only: any other device (mps, xpu, meta: shapes only, the eager
        # reference propagates meta tensors) runs the reference.
        if kind == "cpu" and native_ok and not torch.compiler.is_compiling() and native.available():
            return "native"
        return "reference"
    # an explicit "triton" / "native" on meta tensors raises below, naming the device
    if backend == "triton":
        if kind == "cpu":
            if not interpret_env():
                raise RuntimeError(
                    f"{op}: backend='triton' on CPU tensors needs Triton's interpreter: set "
                    "TRITON_INTERPRET=1 before triton is imported (or use backend='reference')")
            kmod = sys.modules.get("fastrlhf.kernels.utils")
            if kmod is not None and not kmod.INTERPRET_AT_IMPORT:
                raise RuntimeError(
                    f"{op}: TRITON_INTERPRET=1 was set after fastrlhf.kernels was imported; set it "
                    "before the first Triton-backed call")
        elif kind != "cuda":
            raise ValueError(f"{op}: backend='triton' supports CUDA tensors (or CPU under "
                             f"TRITON_INTERPRET=1), got device {device}")
        return "triton"
    if backend == "native":
        if kind != "cpu":
            raise ValueError(f"{op}: backend='native' is the CPU backend, got device {device}")
        if not native_ok:
            raise ValueError(f"{op}: no native (C++) implementation of this op yet")
        if not native_available():
            raise RuntimeError(f"{op}: backend='native' requested but the C++ extension is not "
                               "available (no compiler, or the build failed; see the warning)")
        return "native"
    return "reference"
