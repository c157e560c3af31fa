#!/usr/bin/env bash
# Set up a fresh clone: a virtualenv in .venv with fastrlhf installed editable.  Two set-ups:
#
#   bash scripts/setup.sh --train   the main job (`fastrlhf train`, `fastrlhf bench`, the ops):
#                                   fastrlhf with its [train] extra, plus Triton where a GPU is
#                                   present.  No test tools, no peer trainers (verl, OpenRLHF,
#                                   TRL, Liger), no Ray, deepspeed, datasets, pandas or pyarrow.
#   bash scripts/setup.sh --test    everything the test suite needs (the default): the [test],
#                                   [bench] and [integrations] extras and the trainers the
#                                   integration tests compare against (verl, OpenRLHF, deepspeed).
#
# * The venv sees the system site-packages, so a machine that already has a (CUDA) torch and
#   triton keeps them: nothing here replaces a GPU user's torch.
# * With no torch importable at all: on a machine without an NVIDIA GPU it installs the CPU build
#   `torch==2.13.0` (the wheel that CPU machines here have on disk; never a multi-GB CUDA build);
#   with a GPU it installs the registry's default build of `torch>=2.6`.
# Idempotent: re-running only installs what is missing.  --test after --train adds to the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=test
case "${1:-}" in
  --train) MODE=train ;;
  --test | "") MODE=test ;;
  -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: bash scripts/setup.sh [--train | --test]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
HAVE_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  HAVE_GPU=1
fi
if ! python -c "import torch" >/dev/null 2>&1; then
  if [ "$HAVE_GPU" = 1 ]; then
    pip install -q "torch>=2.6"
  else
    pip install -q "torch==2.13.0"
  fi
fi
if [ "$MODE" = train ]; then
  # Triton runs the kernels on GPUs; on a CPU the ops use the native C++ backend (or the eager
  # references), so a CPU machine does not need Triton's ~1 GB.
  if [ "$HAVE_GPU" = 1 ]; then
    pip install -q -e ".[train,triton]"
  else
    pip install -q -e ".[train]"
  fi
else
  pip install -q -e ".[test,bench,integrations]"
  # The trainers whose loss functions fastrlhf.integrations replaces (tests compare against them).
  # --no-deps: their exact pins (transformers, flash-attn, vllm, deepspeed, a CUDA torch) must not
  # replace this environment's packages; what their loss modules import comes from [integrations].
  pip install -q --no-deps "verl==0.9.1" "openrlhf==0.11.2" "tensordict==0.15.3"
  DS_BUILD_OPS=0 pip install -q --no-deps --no-build-isolation "deepspeed==0.19.8"
fi
python -c "
import importlib.util, torch, fastrlhf
tr = importlib.util.find_spec('triton')
tv = __import__('triton').__version__ if tr else 'not installed'
print(f'fastrlhf {fastrlhf.__version__} ($MODE set-up): torch {torch.__version__}, triton {tv}, cuda={torch.cuda.is_available()}')"
