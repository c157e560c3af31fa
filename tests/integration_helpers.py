"""Shared pieces of the trainer-adapter tests (tests/test_integrations_*.py).

* ``params(fn)`` -- a function's parameters as (name, kind, default): what "same signature" means
  for a drop-in (annotations are not compared: ours cannot name verl's config classes).
* ``gpu_only_stubs()`` -- OpenRLHF's loss modules import flash-attn (and its Ray trainer modules
  vLLM) at module level; neither installs on a CPU machine.  Inside this context manager the
  missing ones are minimal placeholder modules (attribute access gives an inert class), so the
  *loss* code can be imported and compared; the placeholders are removed again on exit.  Nothing
  here is used when the real packages are installed.
* ``backend`` fixture (imported by the test modules) -- runs a test once per fastrlhf backend this
  machine exercises (``helpers.backends()``: reference, and Triton through the interpreter or on
  CUDA) by setting ``FASTRLHF_BACKEND``, which the adapters' ``backend="auto"`` calls honour.
  Tests that do not request it run on the reference (autouse ``_reference_unless_parametrized``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import sys
import types

import pytest

from helpers import backends

GPU_ONLY = ("flash_attn", "flash_attn.bert_padding", "flash_attn.utils",
            "flash_attn.utils.distributed", "flash_attn.ops", "flash_attn.ops.triton",
            "vllm", "vllm.inputs", "vllm.utils")


def import_or_skip(module: str, what: str):
    """Import ``module`` or skip the whole test module, naming what is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"{what} not importable ({type(e).__name__}: {e}); CI installs the "
                    "[integrations] extra", allow_module_level=True)


def params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def assert_same_params(ours, theirs):
    a, b = params(ours), params(theirs)
    assert a == b, f"{getattr(ours, '__qualname__', ours)}: parameters {a} != upstream {b}"


class _Inert:
    def __init__(self, *args, **kwargs):
        pass


def _placeholder(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__path__ = []  # a package, so submodule imports resolve to the placeholders below

    def __getattr__(attr):
        if attr.startswith("__") or attr == "ops":
            # flash_attn.ops.* must stay unimportable: OpenRLHF / verl fall back to torch on
            # ImportError there.
            raise AttributeError(attr)
        return type(attr, (_Inert,), {})

    mod.__getattr__ = __getattr__
    return mod


def _absent(name: str) -> bool:
    root = name.split(".")[0]
    if root in sys.modules:
        return getattr(sys.modules[root], "_fastrlhf_placeholder", False)
    try:
        return importlib.util.find_spec(root) is None
    except (ImportError, ValueError):
        return True


@contextlib.contextmanager
def gpu_only_stubs():
    added = []
    for name in GPU_ONLY:
        if name.startswith("flash_attn.ops"):
            continue
        if name not in sys.modules and _absent(name):
            mod = _placeholder(name)
            mod._fastrlhf_placeholder = True
            sys.modules[name] = mod
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def _reference_unless_parametrized(monkeypatch):
    """Tests that do not ask for ``backend`` run the eager reference (``auto`` on CPU may first
    try to build the native extension, which is the native backend's tests' business)."""
    monkeypatch.setenv("FASTRLHF_BACKEND", "reference")


@pytest.fixture(params=backends())
def backend(request, monkeypatch, _reference_unless_parametrized):
    monkeypatch.setenv("FASTRLHF_BACKEND", request.param)
    return request.param
