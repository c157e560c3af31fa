"""The native extension's build cache: its key covers everything that changes the build (the
source directory, the sources, the compiler, the flags, the torch version), a first build says
so once on stderr, and a built tree loads from the cache in a new process without a rebuild."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from fastrlhf import native


def _key(src, cxx="c++", flags=("-O3",)):
    return native.cache_key(str(src), cxx, list(flags))


def test_cache_key_covers_path_sources_compiler_and_flags(tmp_path):
    src = native.source_dir()
    if src is None:
        pytest.skip("C++ sources not shipped in this install")
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(src, a)
    shutil.copytree(src, b)
    # identical sources at two paths: two build directories (build.ninja stores absolute paths)
    assert _key(a) != _key(b)
    assert _key(a) == _key(a)
    assert _key(a) != _key(a, flags=("-O2",))
    if shutil.which("g++") and shutil.which("c++"):
        gxx = os.path.realpath(shutil.which("g++"))
        cxx = os.path.realpath(shutil.which("c++"))
        if gxx != cxx:
            assert _key(a, "g++") != _key(a, "c++")
    before = _key(a)
    with open(a / "gae.cpp", "a") as f:
        f.write("\n// edited\n")
    assert _key(a) != before


def test_a_built_tree_loads_from_the_cache_without_a_message():
    if not native.available():
        pytest.skip(f"native extension unavailable: {native.build_error()}")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "from fastrlhf import native; assert native.available()"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "FASTRLHF_NATIVE": "1"})
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert "compiling the native CPU backend" not in proc.stderr, proc.stderr
    # a cache hit is an import and a dlopen, never a compile (which takes about a minute)
    assert elapsed < 45, f"loading the cached extension took {elapsed:.0f} s"


def test_first_build_announces_itself_once(monkeypatch, capsys, tmp_path):
    """With an empty extensions directory the build prints one line before and one after; the
    compile itself is replaced by a stub (the real one takes a minute)."""
    if native.source_dir() is None:
        pytest.skip("C++ sources not shipped in this install")
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw["name"]) or "module")
    assert native._build_extension() == "module"
    err = capsys.readouterr().err
    assert err.count("compiling the native CPU backend") == 1
    assert err.count("native CPU backend built in") == 1
    assert calls and calls[0].startswith("fastrlhf_native_")
