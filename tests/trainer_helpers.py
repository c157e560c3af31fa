"""Shared by the trainer tests that launch ``fastrlhf.train`` (or torchrun) in subprocesses."""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env() -> dict:
    """This environment with the checkout importable, the reference / native backends (no
    Triton interpreter) and one OpenMP thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    return env
