#!/usr/bin/env bash
# Set up a fresh clone: a virtualenv in .venv with fastrlhf (editable) and its test/bench extras.
#
# * The venv sees the system site-packages, so a machine that already has a (CUDA) torch and
#   triton keeps them: nothing here replaces a GPU user's torch.
# * With no torch importable at all: on a machine without an NVIDIA GPU it installs the CPU build
#   `torch==2.13.0` (the wheel that CPU machines here have on disk; never a multi-GB CUDA build);
#   with a GPU it installs the registry's default build of `torch>=2.6`.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q "torch>=2.6"
  else
    pip install -q "torch==2.13.0"
  fi
fi
pip install -q -e ".[test,bench]"
python -c "import torch, triton, fastrlhf; print(f'fastrlhf {fastrlhf.__version__}: torch {torch.__version__}, triton {triton.__version__}, cuda={torch.cuda.is_available()}')"
