"""Re-export of conftest helpers for `from helpers import ...` in test modules."""
from conftest import DEVICE, HAS_CUDA, TRITON_OK, assert_close, backends, run_gloo  # noqa: F401
