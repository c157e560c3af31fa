"""bench/gpu_check.py's CPU dry run: the stress step at tiny shapes in the interpreter and the
results file / summary, marked as a dry run.  (The test and benchmark steps are subprocesses of
``pytest`` and ``fastrlhf bench`` -- too slow for CI on CPU; ``--dry-run`` without
``--skip-*`` runs them too.)"""

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "dry.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry-run",
         "--skip-tests", "--skip-bench", "--out", str(out), "--seeds", "2"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DRY RUN" in proc.stdout
    res = json.loads(out.read_text())
    assert res["dry_run"] is True
    assert res["stress"]["status"] == "ok" and res["stress"]["seeds"] == 2
    assert "bench" not in res and "tests" not in res
    assert res["env"]["device_type"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-machine refusal")
def test_gpu_check_refuses_without_gpu_unless_dry_run():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "no CUDA device" in (proc.stdout + proc.stderr)
