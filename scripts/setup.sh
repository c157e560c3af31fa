#!/usr/bin/env bash
# Set up a fresh clone: a virtualenv in .venv with fastrlhf (editable), its test/bench extras and
# the trainers it integrates with (verl, OpenRLHF, TRL).
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
pip install -q -e ".[test,bench,integrations]"
# The trainers whose loss functions fastrlhf.integrations replaces (tests compare against them).
# --no-deps: their exact pins (transformers, flash-attn, vllm, deepspeed, a CUDA torch) must not
# replace this environment's packages; what their loss modules import comes from [integrations].
pip install -q --no-deps "verl==0.9.1" "openrlhf==0.11.2" "tensordict==0.15.3"
DS_BUILD_OPS=0 pip install -q --no-deps --no-build-isolation "deepspeed==0.19.8"
python -c "import torch, triton, fastrlhf; print(f'fastrlhf {fastrlhf.__version__}: torch {torch.__version__}, triton {triton.__version__}, cuda={torch.cuda.is_available()}')"
