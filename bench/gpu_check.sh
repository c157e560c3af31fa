#!/usr/bin/env bash
# One-call GPU check (issue 15): the test suite on CUDA, every benchmark at 16384 x 151936 bf16
# against eager / torch.compile / Liger / TRL, and a bitwise in-place vs fresh-buffer stress of
# fused_ppo_loss; writes bench/results/<gpu>.json and prints a one-screen summary.
#   bash bench/gpu_check.sh              # on one H100 / H200, about 8 minutes
#   bash bench/gpu_check.sh --dry-run    # CPU: interpreter, tiny shapes, clearly marked DRY RUN
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
exec "$PY" bench/gpu_check.py "$@"
