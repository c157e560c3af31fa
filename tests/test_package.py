"""Packaging and harness: the wheel layout, the CLI, and the benchmark harness on CPU."""

import json
import os
import subprocess
import sys
import zipfile


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_public_api_names():
    import fastrlhf
    for name in ("token_logprobs", "token_entropy"):
        assert callable(getattr(fastrlhf, name)), name
        assert getattr(fastrlhf, name).__doc__, f"{name} has no docstring"
    assert set(fastrlhf.__all__) <= set(dir(fastrlhf))


def test_kernels_install_under_fastrlhf_only(tmp_path):
    """`pip install .` builds a wheel with fastrlhf/kernels/* and no top-level `kernels`."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / whl).namelist()
    assert "fastrlhf/kernels/logprobs.py" in names
    assert "fastrlhf/kernels/__init__.py" in names
    # the native backend's C++ sources ship inside the package, so an install can build them
    assert "fastrlhf/csrc/logprobs.cpp" in names and "fastrlhf/csrc/common.h" in names
    assert not [n for n in names if n.startswith("kernels/")], "top-level kernels package shipped"
    # and the installed (editable) package exposes no top-level `kernels` either. A `kernels`
    # found elsewhere is fine: newer transformers depend on the PyPI package of that name, which
    # lives in site-packages (inside ROOT when the venv is ROOT/.venv, as in CI).
    own = os.path.join(ROOT, "kernels")
    code = ("import importlib.util, os, fastrlhf.kernels; s = importlib.util.find_spec('kernels');"
            "where = [] if s is None else [s.origin or ''] + list(s.submodule_search_locations or []);"
            f"own = {own!r};"
            "print('found' if any(w == own or w.startswith(own + os.sep) for w in where) else 'none')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"


def test_top_level_kernels_from_a_checkout_hands_over(tmp_path):
    """Run from the repository root, `import kernels` (newer transformers import the PyPI package
    of that name) finds the checkout's kernels/ first; it hands the import over to the installed
    package, or raises a clear ImportError when there is none."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'pypi'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", "import kernels, fastrlhf.kernels as k; print(kernels.WHO, k.__name__)"],
        cwd=ROOT, env={**env, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True,
        text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pypi", "fastrlhf.kernels"]
    # no site-packages (-S) and no PYTHONPATH: nothing else named kernels exists
    out = subprocess.run([sys.executable, "-S", "-c", "import kernels"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "imported as fastrlhf.kernels" in out.stderr


def test_cli_help_and_unknown_command():
    from fastrlhf import cli
    assert cli.main(["--help"]) == 0
    assert cli.main(["no-such-command"]) == 2


def test_bench_harness_runs_on_cpu(tmp_path):
    """`fastrlhf bench --quick` runs the logprobs benchmark end to end and writes measured rows."""
    out = tmp_path / "cpu.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastrlhf.cli", "bench", "--quick", "--device",
                           "cpu", "--only", "logprobs", "--no-compile", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    bench = data["benchmarks"]["logprobs"]
    for key in ("device", "torch", "triton", "commit"):
        assert bench["env"].get(key), key
    assert bench["copy_gbps"] > 0
    rows = bench["rows"]
    timed = [r for r in rows if not r.get("skipped")]
    impls = {r["impl"] for r in timed}
    assert {"eager", "fastrlhf", "fastrlhf+inplace"} <= impls
    for r in timed:
        assert r["ms"] > 0 and r["gbps"] > 0 and r["pct_copy_bw"] > 0, r
        assert r["iqr_ms"] >= 0 and r["repeats"] >= 3 and r["noisy"] in (True, False), r
    # report renders it
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import report
        text = report.render(str(tmp_path))
    finally:
        sys.path.pop(0)
    assert "token_logprobs" in text and "median ms" in text


def test_readme_and_ci_agree():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    test_cmd = [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert len(test_cmd) == 1
    assert test_cmd[0].strip() in readme, "README's test command differs from .ci/run"
