"""Test harness.

* Without CUDA the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set here,
  before anything imports triton.  With CUDA the same tests run natively (plus GPU-only cases).
* Every floating buffer created with ``torch.empty`` / ``torch.empty_like`` during a test is
  filled with NaN (``poison`` fixture, autouse), so an output element a kernel forgot to write
  shows up as NaN instead of passing by accident.
* ``assert_close`` compares against a reference computed in float64 and names what differed.
"""

from __future__ import annotations

import os
import sys
import zlib

# The repository root holds `kernels/`, installed as fastrlhf.kernels.  `python -m pytest` puts
# the working directory (the root, in CI) first on sys.path, where that directory shadows the
# PyPI package `kernels`, which recent transformers imports when it is installed: spawned test
# ranks (which inherit sys.path) then failed with "cannot import name 'CUDAProperties' from
# 'kernels'".  fastrlhf itself is importable through its (editable) install.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns until this is set; 1 keeps its (and Triton 3.6's) default of FMA fusion on.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
# Backends whose kernels the suite exercises on this machine.
TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _poison(t):
    if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
        t.fill_(float("nan"))
    return t


def _poisoned_empty(*args, **kwargs):
    return _poison(_real_empty(*args, **kwargs))


def _poisoned_empty_like(*args, **kwargs):
    return _poison(_real_empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def seeded_rng(request):
    """Seed torch's global RNG per test, from the test's id: many tests draw their data from it,
    so without this their data depended on which tests had run before them on the same worker
    (pytest-xdist's split changes with every new test), and an assertion about the data -- e.g.
    test_packed's "the data exercises the clip" -- could fail in one split and not another."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """NaN-fill every new floating buffer made with torch.empty / empty_like in this test."""
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", _poisoned_empty_like)
    yield


@pytest.fixture
def device():
    return DEVICE


def assert_close(name, actual, expected, *, atol, rtol=0.0, equal_nan=False):
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, compared in float64.

    NaN never passes unless ``equal_nan`` (then NaN must be at exactly the same places).
    """
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if equal_nan:
        assert torch.equal(a.isnan(), e.isnan()), f"{name}: NaN pattern differs"
        keep = ~e.isnan()
        a, e = a[keep], e[keep]
    assert not a.isnan().any(), f"{name}: {int(a.isnan().sum())} NaN element(s)"
    inf_e = e.isinf()
    if inf_e.any():
        assert torch.equal(a[inf_e], e[inf_e]), f"{name}: infinities differ"
        a, e = a[~inf_e], e[~inf_e]
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    if err.numel() and not bool((err <= tol).all()):
        i = int((err - tol).argmax())
        raise AssertionError(
            f"{name}: max error {float(err.max()):.3e} (tolerance atol={atol:g} rtol={rtol:g}); "
            f"worst at flat index {i}: got {float(a.reshape(-1)[i])!r}, "
            f"expected {float(e.reshape(-1)[i])!r}")


def backends(native: bool = False):
    """Backends the op tests parametrize over on this machine.  ``native=True`` (for the ops the
    C++ CPU backend implements) adds "native" when it builds here; the first call builds it,
    about a minute, then it is cached."""
    out = ["reference"]
    if TRITON_OK:
        out.append("triton")
    if native and not HAS_CUDA:
        from fastrlhf import native
        if native.available():
            out.append("native")
    return out


# ------------------------------------------------------------------------------------------------
# multi-process tests: gloo CPU process groups spawned from a test, with a hard deadline
# ------------------------------------------------------------------------------------------------

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_entry(rank, world, port, errfile, fn, args):
    """Body of one spawned process: join the gloo group, run ``fn(rank, world, *args)``, report
    any exception (with its traceback) to ``errfile`` for the parent."""
    import torch.distributed as dist
    try:
        os.environ["TRITON_INTERPRET"] = "1"   # CPU tensors: kernels run in the interpreter
        os.environ["TRITON_DEFAULT_FP_FUSION"] = "1"
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:
        import traceback
        with open(errfile, "a") as f:
            f.write(f"rank {rank}: {traceback.format_exc()}\n")
        raise SystemExit(1) from e


def run_gloo(fn, world: int, *args, timeout_s: float = 300.0) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned CPU processes joined in one gloo
    group (``fn`` must be a module-level function); fail with the workers' tracebacks if any
    raises, and kill them all if they are not done within ``timeout_s``."""
    import tempfile
    import time

    import torch.multiprocessing as mp
    with tempfile.NamedTemporaryFile("r", suffix=".err") as err:
        ctx = mp.start_processes(_gloo_entry, args=(world, _free_port(), err.name, fn, args),
                                 nprocs=world, join=False, start_method="spawn")
        ok, deadline = True, time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    ok = False
                    break
        except Exception:
            ok = False
        msg = open(err.name).read()
        assert ok and not msg, msg or f"a worker failed or did not finish in {timeout_s:.0f} s"


# CI runs the suite on two pytest-xdist workers (--dist loadgroup), which take tests in collection
# order.  A few modules (ahead-of-time compilation, the multi-process and whole-pipeline trainer
# runs) take most of the time; collected last (alphabetically) they kept one worker busy for the
# last ~3 minutes while the other idled.  They are collected first, the rest keep their order.
SLOW_FIRST = ("test_aot.py", "test_trainer_vocab_parallel.py", "test_trainer.py",
              "test_vocab_parallel_ops.py", "test_vocab_parallel.py", "test_trainer_cli.py",
              "test_trainer_text.py", "test_trainer_reference.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda it: rank.get(os.path.basename(str(it.path)), len(rank)))  # stable
