"""The one seam between the op layer and its backends.

Every op family defines each of its ``torch.library`` custom ops once -- implementation, fake,
``setup_context`` and backward -- with :class:`Op`.  The op's schema carries a ``backend`` string
(``"triton"`` or ``"native"``); the implementation asks :func:`launchers` for that backend's
module and calls the launcher of the same name in it:

* ``"triton"``: ``fastrlhf.kernels.<family>`` (the Triton kernels and their launchers; imported
  on first use, because ``TRITON_INTERPRET`` may be set after ``import fastrlhf``).  On CPU
  tensors the same launchers run under Triton's interpreter.
* ``"native"``: :mod:`fastrlhf.native`, the C++ extension's binding layer, whose functions have
  the kernels' names, arguments and results.

So a backend is a launcher underneath the op, never a copy of it: the checks, the layout, the
autograd formula and the registration exist once per op.  The eager reference
(:mod:`fastrlhf.reference`) is plain PyTorch and differentiates itself.

:class:`Op` also gives an eager fast path: outside ``torch.compile`` the same implementation and
the same ``setup_context`` / backward run behind a ``torch.autograd.Function``, which skips the
dispatcher's Python overhead (tens of microseconds per call, as much as a small loss kernel
takes); under ``torch.compile`` the registered op is traced instead.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, Optional, Sequence

import torch

from .. import native

__all__ = ["launchers", "Op", "LAUNCH_BACKENDS"]

LAUNCH_BACKENDS = ("triton", "native")


def launchers(backend: str, family: str):
    """The module holding ``family``'s launchers for ``backend`` (``"triton"`` | ``"native"``)."""
    if backend == "native":
        return native
    if backend == "triton":
        return importlib.import_module(f"fastrlhf.kernels.{family}")
    raise ValueError(f"fastrlhf: no launchers for backend {backend!r} (expected one of "
                     f"{LAUNCH_BACKENDS})")


class Op:
    """A ``fastrlhf::<name>`` custom op defined once.

    Args:
        name: the op's name in the ``fastrlhf`` namespace.
        impl: the implementation; its type annotations give the schema.
        fake: the fake (meta) implementation for tracing.
        setup, backward: the autograd formula (``register_autograd``), or None for an op that
            is not differentiable.
        mutates_args: names of arguments the op writes (the schema states them).
        fast_eager: outside ``torch.compile``, run ``impl`` (and the formula) without the
            dispatcher: through a ``torch.autograd.Function`` when the op is differentiable and
            autograd would record the call, directly otherwise (``no_grad``, inference mode,
            or no input requiring grad).  A mutating op takes the direct call only when
            autograd would record nothing (e.g. inside a backward) and then bumps the version
            counters of the tensors it wrote, as the dispatcher does; otherwise (a mutated
            tensor that may need grad) it goes through the dispatcher, whose checks apply.

    Calling the object runs the op; ``.op`` is the registered ``torch.library`` op (what
    ``torch.compile`` traces and ``torch.library.opcheck`` checks).
    """

    def __init__(self, name: str, impl: Callable, fake: Callable, *,
                 setup: Optional[Callable] = None, backward: Optional[Callable] = None,
                 mutates_args: Sequence[str] = (), fast_eager: bool = False):
        if fast_eager and mutates_args and backward is not None:
            raise ValueError(f"fastrlhf::{name}: a differentiable mutating op must go through "
                             "the dispatcher")
        if (setup is None) != (backward is None):
            raise ValueError(f"fastrlhf::{name}: setup and backward come together")
        self.name = name
        self.impl = impl
        self.op = torch.library.custom_op(f"fastrlhf::{name}", mutates_args=tuple(mutates_args))(
            impl)
        self.op.register_fake(fake)
        self.differentiable = backward is not None
        if self.differentiable:
            self.op.register_autograd(backward, setup_context=setup)
        self._function = None
        if fast_eager and self.differentiable:
            self._function = type(f"{name}_function", (torch.autograd.Function,), {
                "forward": staticmethod(_forward_of(impl, setup)),
                "backward": staticmethod(backward),
            })
        self.fast_eager = fast_eager
        names = list(inspect.signature(impl).parameters)  # custom_op checked mutates_args
        self._mutated = tuple(names.index(a) for a in mutates_args)

    def __call__(self, *args):
        if not self.fast_eager or torch.compiler.is_compiling():
            return self.op(*args)
        # One pass over the arguments (this runs on every eager call; right after other work
        # has left the caches cold, each extra Python frame or generator costs microseconds):
        # any tensor subclass -- the fake, functional or proxy tensors of a tracer such as
        # AOTAutograd or ``opcheck`` -- must see the registered op; and autograd records the
        # call only with grad mode on and a tensor input requiring grad (otherwise the
        # ``autograd.Function`` would add only its cost, ~20 us a call).
        wants_grad = False
        for a in args:
            if isinstance(a, torch.Tensor):
                kind = type(a)
                if kind is not torch.Tensor and kind is not torch.nn.Parameter:
                    return self.op(*args)
                if a.requires_grad:
                    wants_grad = True
        records = wants_grad and torch.is_grad_enabled()
        if self._mutated:
            if records:
                return self.op(*args)
            out = self.impl(*args)
            for i in self._mutated:
                if isinstance(args[i], torch.Tensor):
                    torch.autograd.graph.increment_version(args[i])
            return out
        if records and self._function is not None:
            return self._function.apply(*args)
        return self.impl(*args)  # not differentiable, or autograd would record nothing


def _forward_of(impl: Callable, setup: Callable) -> Callable:
    def forward(ctx, *args):
        out = impl(*args)
        setup(ctx, args, out)
        return out
    return forward
