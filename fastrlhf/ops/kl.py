"""KL penalties: per-token estimators on sampled log-probs, and the exact full-vocabulary KL.

Public entry points check their arguments, pick a backend and call either the eager reference
(:mod:`fastrlhf.reference`) or the registered ``torch.library`` ops below
(``fastrlhf::kl_penalty``, ``fastrlhf::full_kl`` and their backward ops), whose autograd formulas
run the Triton backward kernels in :mod:`fastrlhf.kernels.kl`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend, reference
from ._common import (FLOAT_DTYPES, check_positive_float, check_same_device, check_shape,
                      check_tensor, rows_layout)

__all__ = ["kl_penalty", "full_kl", "KL_KINDS"]

# Accepted names -> canonical kind.  A trailing "+" selects the straight-through variant: the
# forward value of the base estimator with the gradient of k2 (see kl_penalty's docstring).
_BASE = {"k1": "k1", "kl": "k1", "abs": "abs", "k2": "k2", "mse": "k2", "k3": "k3",
         "low_var_kl": "k3"}
KL_KINDS = tuple(_BASE) + tuple(f"{k}+" for k in _BASE)


def _kernels():
    from ..kernels import kl as k  # lazy: TRITON_INTERPRET may be set after fastrlhf import
    return k


def _canonical_kind(op: str, kind) -> str:
    if not isinstance(kind, str):
        raise TypeError(f"{op}: kind must be a str, one of {KL_KINDS}, got {type(kind).__name__}")
    plus = kind.endswith("+")
    base = _BASE.get(kind[:-1] if plus else kind)
    if base is None:
        raise ValueError(f"{op}: unknown kind {kind!r}; valid kinds are {', '.join(KL_KINDS)}")
    # k2 is its own straight-through variant.
    return base + "+" if plus and base != "k2" else base


# ---------------------------------------------------------------------------------------------
# torch.library ops (Triton backend): kl_penalty
# ---------------------------------------------------------------------------------------------

def _acc(*dtypes) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1).contiguous()


@torch.library.custom_op("fastrlhf::kl_penalty", mutates_args=())
def _klp_fwd(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    k = _kernels()
    out = k.kl_penalty_fwd(_flat(logp), _flat(ref_logp), k.KINDS[kind.rstrip("+")])
    return out.view(logp.shape)


@_klp_fwd.register_fake
def _(logp, ref_logp, kind):
    return logp.new_empty(logp.shape, dtype=_acc(logp.dtype, ref_logp.dtype))


@torch.library.custom_op("fastrlhf::kl_penalty_bwd", mutates_args=())
def _klp_bwd(grad: Tensor, logp: Tensor, ref_logp: Tensor, kind: str, need_dlogp: bool,
             need_dref: bool) -> Tuple[Tensor, Tensor]:
    k = _kernels()
    # Straight-through kinds ("k1+", "k3+", ...) differentiate as k2.
    code = k.KINDS["k2"] if kind.endswith("+") else k.KINDS[kind]
    dx, dy = k.kl_penalty_bwd(_flat(grad), _flat(logp), _flat(ref_logp), code, need_dlogp,
                              need_dref)
    return (dx.view(logp.shape) if need_dlogp else dx,
            dy.view(ref_logp.shape) if need_dref else dy)


@_klp_bwd.register_fake
def _(grad, logp, ref_logp, kind, need_dlogp, need_dref):
    dx = logp.new_empty(logp.shape if need_dlogp else (0,))
    dy = ref_logp.new_empty(ref_logp.shape if need_dref else (0,))
    return dx, dy


def _klp_setup(ctx, inputs, output):
    logp, ref_logp, kind = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.kind = kind


def _klp_backward(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_y):
        return None, None, None
    dx, dy = _klp_bwd(grad, logp, ref_logp, ctx.kind, need_x, need_y)
    return (dx if need_x else None), (dy if need_y else None), None


_klp_fwd.register_autograd(_klp_backward, setup_context=_klp_setup)


# ---------------------------------------------------------------------------------------------
# torch.library ops (Triton backend): full_kl
# ---------------------------------------------------------------------------------------------

def _layouts(logits: Tensor, ref_logits: Tensor):
    x, xd, xs = rows_layout(logits)
    y, yd, ys = rows_layout(ref_logits)
    return x, xd, xs, y, yd, ys


@torch.library.custom_op("fastrlhf::full_kl", mutates_args=())
def _fkl_fwd(logits: Tensor, ref_logits: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    V = logits.shape[-1]
    x, xd, xs, y, yd, ys = _layouts(logits, ref_logits)
    kl, stats = _kernels().full_kl_fwd(x, xd, xs, y, yd, ys, V, 1.0 / temperature)
    lead = logits.shape[:-1]
    return kl.view(lead), stats.view((4,) + tuple(lead))


@_fkl_fwd.register_fake
def _(logits, ref_logits, temperature):
    acc = _acc(logits.dtype, ref_logits.dtype)
    lead = logits.shape[:-1]
    return logits.new_empty(lead, dtype=acc), logits.new_empty((4, *lead), dtype=acc)


@torch.library.custom_op("fastrlhf::full_kl_bwd", mutates_args=())
def _fkl_bwd(grad: Tensor, logits: Tensor, ref_logits: Tensor, kl: Tensor, stats: Tensor,
             temperature: float, need_dlogits: bool, need_dref: bool) -> Tuple[Tensor, Tensor]:
    V = logits.shape[-1]
    x, xd, xs, y, yd, ys = _layouts(logits, ref_logits)
    dx, dy = _kernels().full_kl_bwd(x, xd, xs, y, yd, ys, V, _flat(grad), _flat(kl),
                                    stats.reshape(4, -1).contiguous(), 1.0 / temperature,
                                    need_dlogits, need_dref)
    return (dx.view(logits.shape) if need_dlogits else dx,
            dy.view(ref_logits.shape) if need_dref else dy)


@_fkl_bwd.register_fake
def _(grad, logits, ref_logits, kl, stats, temperature, need_dlogits, need_dref):
    dx = logits.new_empty(logits.shape if need_dlogits else (0,))
    dy = ref_logits.new_empty(ref_logits.shape if need_dref else (0,))
    return dx, dy


def _fkl_setup(ctx, inputs, output):
    logits, ref_logits, temperature = inputs
    kl, stats = output
    ctx.save_for_backward(logits, ref_logits, kl, stats)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(stats)


def _fkl_backward(ctx, grad, dstats):
    logits, ref_logits, kl, stats = ctx.saved_tensors
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad is None or not (need_x or need_y):
        return None, None, None
    dx, dy = _fkl_bwd(grad, logits, ref_logits, kl, stats, ctx.temperature, need_x, need_y)
    return (dx if need_x else None), (dy if need_y else None), None


_fkl_fwd.register_autograd(_fkl_backward, setup_context=_fkl_setup)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k1", *, backend: str = "auto"
               ) -> Tensor:
    """Per-token KL estimator from sampled log-probs (verl ``kl_penalty``), elementwise.

    Args:
        logp: log-probs of the sampled tokens under the policy, any shape, float16 / bfloat16 /
            float32 / float64.
        ref_logp: the same tokens' log-probs under the reference policy; same shape and device
            (dtype may differ).
        kind: with ``d = logp - ref_logp``:

            * ``"k1"`` / ``"kl"``: ``d``
            * ``"abs"``: ``|d|``
            * ``"k2"`` / ``"mse"``: ``0.5 * d**2``
            * ``"k3"`` / ``"low_var_kl"``: ``k = clamp(-d, -20, 20)``;
              ``clamp(exp(k) - k - 1, -10, 10)``
            * any of these with a ``"+"`` suffix (``"k1+"``, ``"k3+"``, ``"low_var_kl+"``...):
              straight-through estimator, the forward value of the base kind with the gradient
              of k2 (``k2 - k2.detach() + base.detach()``), as verl 0.9.x's ``kl_penalty``
              computes them (it strips the "+" and applies this straight-through form; earlier
              verl releases passed the suffixed name on and failed).  Value and both gradients
              are tested against verl 0.9.1 for all kinds.  ``"k2+"`` equals ``"k2"``.

            Anything else raises ValueError listing the valid kinds.
        backend: ``"auto" | "triton" | "reference"`` (see :mod:`fastrlhf._backend`).

    Returns:
        The estimate, shape of ``logp``, float32 (float64 if either input is float64).  No
        masking: apply the response mask / aggregation afterwards.

    Differentiable w.r.t. both ``logp`` and ``ref_logp``, with exactly the gradients torch
    autograd gives the reference formula: the clamps pass the gradient on their closed interval
    and block it outside (and for NaN), ``d|d|/dd = sign(d)`` (0 at 0), and
    ``d/d ref_logp = -d/d logp`` for every kind.
    """
    op = "kl_penalty"
    check_tensor(op, "logp", logp, dtypes=FLOAT_DTYPES)
    check_tensor(op, "ref_logp", ref_logp, dtypes=FLOAT_DTYPES)
    check_shape(op, "ref_logp", ref_logp, logp.shape, "the shape of logp")
    check_same_device(op, "logp", logp, ref_logp=ref_logp)
    canon = _canonical_kind(op, kind)
    which = _backend.resolve(backend, logp.device, op=op)
    if which == "reference":
        return reference.kl_penalty(logp, ref_logp, canon)
    return _klp_fwd(logp, ref_logp, canon)


def full_kl(logits: Tensor, ref_logits: Tensor, *, temperature: float = 1.0,
            backend: str = "auto", process_group=None,
            vocab_start_index: Optional[int] = None) -> Tensor:
    """Exact per-position KL(pi || pi_ref) over the whole vocabulary, in one streaming pass.

    Args:
        logits: policy logits ``[..., V]``, float16 / bfloat16 / float32 / float64, any strides
            on the leading dims (``logits[:, :-1]`` is read in place).
        ref_logits: reference-policy logits, the same shape and device (dtype and strides may
            differ).
        temperature: > 0; both distributions are tempered by it.
        backend: ``"auto" | "triton" | "reference"``.
        process_group: vocab parallelism: ``logits`` and ``ref_logits`` hold only this rank's
            slice of the vocab (the same slice in both).  Per row, the slice's maxima,
            log-sum-exps, p-weighted log-ratio and two flags are combined with two all-reduces
            (``[4, N]`` max, ``[3, N]`` sum, accumulation dtype), never the logits; every rank
            returns the full-vocab KL; the backward is local (no communication).  See
            :mod:`fastrlhf.ops._vocab_parallel`.
        vocab_start_index: first vocab id of this rank's slice (default ``rank * V_local``);
            accepted for uniformity with the other vocab-parallel ops and validated, but the KL
            does not depend on it (no token ids are involved).

    Returns:
        ``[...]`` (the leading shape), float32 (float64 if either input is float64)::

            p = softmax(logits / T),  q = softmax(ref_logits / T)
            KL = sum_j p_j (log p_j - log q_j)

        Entries where ``p_j = 0`` (policy logit ``-inf``) contribute 0; ``q_j = 0`` where
        ``p_j > 0`` gives ``+inf``; a row that is entirely ``-inf`` in either tensor, or holds a
        NaN or ``+inf``, gives NaN (as the reference's ``log_softmax`` does).  No masking over
        positions: apply the response mask afterwards.

    Differentiable w.r.t. ``logits``: ``dKL/dlogits_j = p_j (log p_j - log q_j - KL) / T``,
    recomputed in the backward from per-row maxima and log-sum-exps saved by the forward
    (no [N, V] probabilities are ever stored).  Usually ``ref_logits`` is a frozen model's
    output and gets no gradient; if it does require grad, its gradient
    ``dKL/dref_logits_j = (q_j - p_j) / T`` is computed as well.
    """
    op = "full_kl"
    check_tensor(op, "logits", logits, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor(op, "ref_logits", ref_logits, dtypes=FLOAT_DTYPES, min_dim=1)
    check_shape(op, "ref_logits", ref_logits, logits.shape, "the shape of logits")
    if logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have a non-empty vocab (last) dim, got shape "
                         f"{tuple(logits.shape)}")
    check_same_device(op, "logits", logits, ref_logits=ref_logits)
    temperature = check_positive_float(op, "temperature", temperature)
    which = _backend.resolve(backend, logits.device, op=op)
    if process_group is not None:
        from ._vocab_parallel import vocab_parallel_full_kl
        return vocab_parallel_full_kl(logits, ref_logits, temperature, process_group,
                                      vocab_start_index, which == "triton")
    if vocab_start_index is not None:
        raise ValueError(f"{op}: vocab_start_index is only meaningful with process_group")
    if which == "reference":
        return reference.full_kl(logits, ref_logits, temperature)
    kl, _ = _fkl_fwd(logits, ref_logits, temperature)
    return kl
