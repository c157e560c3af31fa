"""fastrlhf.kernels: Triton kernels and their launchers.

Installed as ``fastrlhf.kernels`` (the source lives in ``kernels/`` at the repository root).  This
package imports nothing from ``fastrlhf`` besides its own helpers (``utils``) and the leaf
``fastrlhf.tables`` (shared codes and the dtype rule); ``fastrlhf.ops`` imports it
lazily, the first time a Triton-backed op runs, so that ``TRITON_INTERPRET`` may be set late.
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path (``python -m ...``
    # or ``python -c`` run from a checkout) and something imported that name -- newer
    # transformers import the PyPI package ``kernels``.  This directory is not that package; hand
    # the import over to the installed one (the import system returns whatever sys.modules holds
    # under the name once this file has run), or say what happened if there is none.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ImportError(
            f"'kernels' resolved to fastrlhf's Triton kernels in {_root}/kernels because that "
            "checkout is on sys.path; they are imported as fastrlhf.kernels, and no other "
            "package named 'kernels' is installed", name="kernels")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
    del _machinery, _util, _os, _sys, _root, _elsewhere, _spec, _module
else:
    KERNEL_MODULES = ("logprobs", "kl", "gae", "losses", "fused_loss", "fused_linear")
