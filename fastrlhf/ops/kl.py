"""KL penalties: per-token estimators on sampled log-probs, and the exact full-vocabulary KL.

The family in one place: the public functions (checks, backend choice, ``full_kl``'s
vocab-parallel mode), one custom op each (``fastrlhf::kl_penalty``, ``fastrlhf::full_kl``, with
their backward ops) with one autograd formula, whose implementations call the launchers of
:mod:`fastrlhf.kernels.kl` (the only backend that implements them; the native backend has none,
so CPU tensors use the reference).  The reference is :func:`fastrlhf.reference.kl_penalty` /
``full_kl`` (and, per vocab slice, ``full_kl_partials`` / ``full_kl_grad``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import reference
from ..backend import resolve as resolve_backend
from ..tables import FLOAT_DTYPES, KL_CODES, KL_KINDS, acc_dtype
from .common import (with_contract, canonical_kl_kind, check_positive_float, check_same_device, check_shape,
                     check_tensor, rows_layout)
from .parallel import check_group, slice_start
from .registry import Op, launchers

__all__ = ["kl_penalty", "full_kl", "KL_KINDS"]


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1).contiguous()


# ---------------------------------------------------------------------------------------------
# custom ops: kl_penalty
# ---------------------------------------------------------------------------------------------

def _klp_impl(logp: Tensor, ref_logp: Tensor, kind: str, backend: str) -> Tensor:
    out = launchers(backend, "kl").kl_penalty_fwd(_flat(logp), _flat(ref_logp),
                                                  KL_CODES[kind.rstrip("+")])
    return out.view(logp.shape)


def _klp_fake(logp, ref_logp, kind, backend):
    return logp.new_empty(logp.shape, dtype=acc_dtype(logp, ref_logp))


def _klp_bwd_impl(grad: Tensor, logp: Tensor, ref_logp: Tensor, kind: str, need_dlogp: bool,
                  need_dref: bool, backend: str) -> Tuple[Tensor, Tensor]:
    # Straight-through kinds ("k1+", "k3+", ...) differentiate as k2.
    code = KL_CODES["k2"] if kind.endswith("+") else KL_CODES[kind]
    dx, dy = launchers(backend, "kl").kl_penalty_bwd(_flat(grad), _flat(logp), _flat(ref_logp),
                                                     code, need_dlogp, need_dref)
    return (dx.view(logp.shape) if need_dlogp else dx,
            dy.view(ref_logp.shape) if need_dref else dy)


def _grad_fakes(x, y, need_x, need_y):
    """Fake gradients of two inputs (0 elements where not needed)."""
    return x.new_empty(x.shape if need_x else (0,)), y.new_empty(y.shape if need_y else (0,))


def _klp_bwd_fake(grad, logp, ref_logp, kind, need_dlogp, need_dref, backend):
    return _grad_fakes(logp, ref_logp, need_dlogp, need_dref)


_klp_bwd = Op("kl_penalty_bwd", _klp_bwd_impl, _klp_bwd_fake, fast_eager=True)


def _klp_setup(ctx, inputs, output):
    logp, ref_logp, kind, backend = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.kind = kind
    ctx.backend = backend


def _klp_backward(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_y):
        return None, None, None, None
    dx, dy = _klp_bwd(grad, logp, ref_logp, ctx.kind, need_x, need_y, ctx.backend)
    return (dx if need_x else None), (dy if need_y else None), None, None


_kl_penalty = Op("kl_penalty", _klp_impl, _klp_fake, setup=_klp_setup, backward=_klp_backward,
                 fast_eager=True)


# ---------------------------------------------------------------------------------------------
# custom ops: full_kl
# ---------------------------------------------------------------------------------------------

def full_kl_stats(logits: Tensor, ref_logits: Tensor, temperature: float, backend: str,
                  partial: bool = False):
    """The backend's forward: ``(kl [...], stats [4, ...])``; ``partial=True`` (one vocab slice):
    ``(E [...], stats [6, ...])`` as :func:`fastrlhf.reference.full_kl_partials`."""
    V = logits.shape[-1]
    x, xd, xs = rows_layout(logits)
    y, yd, ys = rows_layout(ref_logits)
    kl, stats = launchers(backend, "kl").full_kl_fwd(x, xd, xs, y, yd, ys, V, 1.0 / temperature,
                                                     partial=partial)
    lead = tuple(logits.shape[:-1])
    return kl.view(lead), stats.view((stats.shape[0],) + lead)


def full_kl_grad(grad: Tensor, logits: Tensor, ref_logits: Tensor, kl: Tensor, stats: Tensor,
                 temperature: float, need_dlogits: bool, need_dref: bool, backend: str):
    """The backend's backward from the rows' ``stats`` ``[4, ...]`` and KL: ``(dx, dy)`` (a
    0-element tensor where not needed)."""
    V = logits.shape[-1]
    x, xd, xs = rows_layout(logits)
    y, yd, ys = rows_layout(ref_logits)
    dx, dy = launchers(backend, "kl").full_kl_bwd(x, xd, xs, y, yd, ys, V, _flat(grad),
                                                  _flat(kl), stats.reshape(4, -1).contiguous(),
                                                  1.0 / temperature, need_dlogits, need_dref)
    return (dx.view(logits.shape) if need_dlogits else dx,
            dy.view(ref_logits.shape) if need_dref else dy)


def _fkl_impl(logits: Tensor, ref_logits: Tensor, temperature: float, backend: str
              ) -> Tuple[Tensor, Tensor]:
    return full_kl_stats(logits, ref_logits, temperature, backend)


def _fkl_fake(logits, ref_logits, temperature, backend):
    acc = acc_dtype(logits, ref_logits)
    lead = logits.shape[:-1]
    return logits.new_empty(lead, dtype=acc), logits.new_empty((4, *lead), dtype=acc)


def _fkl_bwd_impl(grad: Tensor, logits: Tensor, ref_logits: Tensor, kl: Tensor, stats: Tensor,
                  temperature: float, need_dlogits: bool, need_dref: bool, backend: str
                  ) -> Tuple[Tensor, Tensor]:
    return full_kl_grad(grad, logits, ref_logits, kl, stats, temperature, need_dlogits, need_dref,
                        backend)


def _fkl_bwd_fake(grad, logits, ref_logits, kl, stats, temperature, need_dlogits, need_dref,
                  backend):
    return _grad_fakes(logits, ref_logits, need_dlogits, need_dref)


_fkl_bwd = Op("full_kl_bwd", _fkl_bwd_impl, _fkl_bwd_fake, fast_eager=True)


def _fkl_setup(ctx, inputs, output):
    logits, ref_logits, temperature, backend = inputs
    kl, stats = output
    ctx.save_for_backward(logits, ref_logits, kl, stats)
    ctx.temperature = temperature
    ctx.backend = backend
    ctx.mark_non_differentiable(stats)


def _fkl_backward(ctx, grad, dstats):
    logits, ref_logits, kl, stats = ctx.saved_tensors
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad is None or not (need_x or need_y):
        return None, None, None, None
    dx, dy = _fkl_bwd(grad, logits, ref_logits, kl, stats, ctx.temperature, need_x, need_y,
                      ctx.backend)
    return (dx if need_x else None), (dy if need_y else None), None, None


_full_kl = Op("full_kl", _fkl_impl, _fkl_fake, setup=_fkl_setup, backward=_fkl_backward,
              fast_eager=True)


# ---------------------------------------------------------------------------------------------
# vocab parallelism for full_kl: each rank holds the same slice of both logits
# ---------------------------------------------------------------------------------------------
#
# Per row and slice: both distributions' (M_r, log S_r), the p-weighted
# E_r = sum_j p^r_j ((x_j - Mx_r) - (y_j - My_r)) relative to the slice maxima, and two flags
# (a q_j = 0 under p_j > 0; a NaN / +inf).  One MAX all-reduce of [4, N] (both maxima, both
# flags), one SUM of [3, N]:
#
#     ax_r = Sx_r e^(Mx_r - Mx),  ay_r = Sy_r e^(My_r - My),  Sx = sum ax_r,  Sy = sum ay_r
#     KL   = sum_r ax_r (E_r + (Mx_r - Mx) - (My_r - My)) / Sx - log Sx + log Sy
#
# The backward is the unsharded one, run on the slice with the global (M, log S) of both rows
# and the global KL: local, no communication.

def _combine_kl(E, st, group):
    """Global (KL, stats [4, ...] = (Mx, log Sx, My, log Sy)) from the slice partials."""
    Mx_r, lsx_r, My_r, lsy_r, qz_r, bad_r = st.unbind(0)
    mx = torch.stack([Mx_r, My_r, qz_r, bad_r])
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    Mx, My, qz, bad = mx.unbind(0)
    ninf = float("-inf")
    zero = torch.zeros_like(E)
    ax = torch.where(lsx_r == ninf, zero, torch.exp(lsx_r + (Mx_r - Mx)))
    ay = torch.where(lsy_r == ninf, zero, torch.exp(lsy_r + (My_r - My)))
    # slices with p mass and no flag (a flagged row's value is decided by the flag below)
    ok = (lsx_r > ninf) & (qz_r == 0) & (bad_r == 0)
    tx = torch.where(ok, ax * (E + (Mx_r - Mx) - (My_r - My)), zero)
    sums = torch.stack([ax, ay, tx])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    Sx, Sy, Tt = sums.unbind(0)
    lsx, lsy = Sx.log(), Sy.log()
    kl = Tt / Sx - lsx + lsy
    kl = torch.where(qz > 0, torch.full_like(kl, float("inf")), kl)
    kl = torch.where((bad > 0) | (Mx == ninf) | (My == ninf), torch.full_like(kl, float("nan")),
                     kl)
    return kl, torch.stack([Mx, lsx, My, lsy])


class _VocabParallelFullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, temperature, group, backend):
        with torch.no_grad():
            if backend == "triton":
                E, st = full_kl_stats(logits, ref_logits, temperature, backend, partial=True)
            else:
                E, st = reference.full_kl_partials(logits, ref_logits, temperature)
        kl, stats = _combine_kl(E, st, group)
        ctx.save_for_backward(logits, ref_logits, kl, stats)
        ctx.temperature = temperature
        ctx.backend = backend
        return kl

    @staticmethod
    def backward(ctx, g):
        logits, ref_logits, kl, stats = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_y):
            return None, None, None, None, None
        if ctx.backend == "triton":
            dx, dy = full_kl_grad(g.contiguous(), logits, ref_logits, kl, stats.contiguous(),
                                  ctx.temperature, need_x, need_y, ctx.backend)
        else:
            dx, dy = reference.full_kl_grad(g, logits, ref_logits, kl, stats, ctx.temperature,
                                            need_x, need_y)
        return (dx if need_x else None), (dy if need_y else None), None, None, None


def vocab_parallel_full_kl(logits, ref_logits, temperature, process_group, vocab_start_index,
                           backend):
    """KL over the full vocab from each rank's slice of both logits (equal slices on both)."""
    op = "full_kl"
    group = check_group(op, process_group)
    slice_start(op, group, logits.shape[-1], vocab_start_index)  # validated; KL needs no ids
    return _VocabParallelFullKL.apply(logits, ref_logits, temperature, group, backend)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

@with_contract(reference.kl_penalty)
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
        backend: ``"auto" | "triton" | "reference"`` (see :mod:`fastrlhf.backend`).

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
    canon = canonical_kl_kind(op, kind)
    which = resolve_backend(backend, logp.device, op=op)
    if which == "reference":
        return reference.kl_penalty(logp, ref_logp, canon)
    return _kl_penalty(logp, ref_logp, canon, which)


@with_contract(reference.full_kl)
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
            the vocab-parallel section above.
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
    which = resolve_backend(backend, logits.device, op=op)
    if process_group is not None:
        return vocab_parallel_full_kl(logits, ref_logits, temperature, process_group,
                                      vocab_start_index, which)
    if vocab_start_index is not None:
        raise ValueError(f"{op}: vocab_start_index is only meaningful with process_group")
    if which == "reference":
        return reference.full_kl(logits, ref_logits, temperature)
    kl, _ = _full_kl(logits, ref_logits, temperature, which)
    return kl
