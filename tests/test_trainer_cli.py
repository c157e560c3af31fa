"""``fastrlhf train`` as a user drives it: the output directory is validated before anything is
written, a finished run is not re-run, Ctrl-C / SIGTERM stop cleanly with a resume hint,
``--backend native`` is accepted."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

from trainer_helpers import subprocess_env  # noqa: E402

from fastrlhf.trainer import TrainConfig  # noqa: E402
from fastrlhf.trainer.checkpoint import RUN_MARKER  # noqa: E402
from fastrlhf.trainer.cli import main as cli_main  # noqa: E402
from fastrlhf.trainer.cli import to_flags  # noqa: E402
from fastrlhf.trainer.ppo import train  # noqa: E402

# the smallest complete pipeline (SFT, reward model, PPO): a few seconds
TINY = dict(sft_steps=5, rm_train_pairs=64, rm_eval_pairs=32, rm_epochs=1, rm_norm_samples=16,
            rollout_batch_size=8, ppo_epochs=1, num_minibatches=2, hidden_size=32,
            num_layers=1, num_heads=2, num_print_samples=1, progress=False, device="cpu")


def _snapshot(d):
    """{relative path: (size, sha1)} of every file under ``d``."""
    out = {}
    for root, _, files in os.walk(d):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = hashlib.sha1(f.read()).hexdigest()
    return out


def _model_dir(path):
    """A directory that looks like a Hugging Face model: config.json and a weights file."""
    import transformers
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2)).save_pretrained(path)
    return path


def test_out_refuses_a_model_dir_and_writes_nothing(tmp_path, capsys):
    model = _model_dir(tmp_path / "model")
    before = _snapshot(model)
    rc = cli_main(["--model", str(model), "--out", str(model)] + to_flags(TINY))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "did not create" in err and "model directory" in err, err
    assert _snapshot(model) == before          # not one file added, removed or changed
    # any other non-empty directory is refused as well, with --overwrite too
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    assert cli_main(["--out", str(other), "--overwrite"] + to_flags(TINY)) == 2
    assert "did not create" in capsys.readouterr().err
    assert sorted(os.listdir(other)) == ["todo.txt"]


def test_out_accepts_new_empty_and_own_dirs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    train(TrainConfig(out=str(empty), total_steps=1, **TINY))
    assert (empty / RUN_MARKER).is_file() and (empty / "summary.json").is_file()
    # the run's own directory: refused while it holds checkpoints, unless --overwrite
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(TrainConfig(out=str(empty), total_steps=1, **TINY))
    summary = train(TrainConfig(out=str(empty), total_steps=1, overwrite=True, **TINY))
    assert summary["steps"] == 1


def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    out = tmp_path / "done"
    train(TrainConfig(out=str(out), total_steps=2, checkpoint_every=1, **TINY))
    before = _snapshot(out)
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["score_last"] is not None
    capsys.readouterr()
    assert cli_main(["--resume", str(out)]) == 0
    printed = capsys.readouterr()
    assert "already finished (step 2 of total_steps=2)" in printed.out + printed.err
    assert _snapshot(out) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly_with_a_resume_hint(tmp_path, sig):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastrlhf.train", "--out", str(out)] + to_flags(
        dict(TINY, total_steps=500, checkpoint_every=1))
    p = subprocess.Popen(cmd, env=subprocess_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    ckpt = out / "checkpoints" / "step_000001" / "trainer.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read().decode()[-3000:]
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    err = stderr.decode()
    assert p.returncode == 128 + sig, (p.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if "resume with:" in ln]
    assert lines == [f"fastrlhf train: stopped ({'Ctrl-C' if sig == signal.SIGINT else 'SIGTERM'})"
                     f"; resume with: fastrlhf train --resume {out}"], err[-3000:]
    assert not (out / "final").exists()


def test_backend_native_is_accepted():
    cfg = TrainConfig(backend="native")
    assert cfg.backend == "native" and cfg.op_backend == "auto"
    with pytest.raises(ValueError, match="TrainConfig.backend='native' is the CPU backend"):
        cfg.check_backend(torch.device("cuda"))
    try:
        cfg.check_backend(torch.device("cpu"))
    except ValueError as e:   # only when the C++ extension is not built here
        assert "needs the C++ extension" in str(e)
