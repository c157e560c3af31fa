"""Argument checks and layout helpers shared by the op families, defined once.

Every public op validates its arguments with these before choosing a backend, so the same bad
input gets the same exception (a TypeError / ValueError naming the op, the argument and what is
wrong) on every backend.  Nothing here imports another op family: the families import this.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import config
from ..buffers import grad_empty
from ..tables import (AGG_KWARGS, AGG_MODES, BACKENDS, FLOAT_DTYPES, INT_DTYPES, KL_BASE,
                      KL_KINDS, MASK_DTYPES, RATIO_LEVELS)


def check_tensor(op: str, name: str, t, *, dtypes: Sequence[torch.dtype] | None = None,
                 min_dim: int = 0) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dim(s), got shape {tuple(t.shape)}")
    return t


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_shape(op: str, name: str, t: torch.Tensor, shape, what: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}{extra}, got {tuple(t.shape)}")


def check_positive_float(op: str, name: str, v) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{op}: {name} must be a scalar, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {v}")
    return v


def check_finite_float(op: str, name: str, v) -> float:
    """A finite real scalar (a Python number or a one-element tensor), e.g. a loss coefficient."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{op}: {name} must be a scalar, got a tensor of shape "
                             f"{tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be finite, got {v}")
    return v


def check_int(op: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    return v


def rows_layout(t: torch.Tensor, max_dims: int = 3):
    """Describe the leading dims of ``t`` ([..., V], unit stride on V) as at most ``max_dims``
    strided dims, without copying.

    Returns ``(t, dims, strides)`` with ``len(dims) == max_dims`` (padded with size 1 in front).
    Adjacent dims that are contiguous with each other are merged and size-1 dims dropped; only if
    more than ``max_dims`` non-mergeable dims remain, or the vocab dim is not unit-stride, is a
    contiguous copy made.
    """
    V = t.shape[-1]
    if t.is_contiguous() and V > 0 and t.numel() > 0:  # the common case, without the loop
        return t, (*(1,) * (max_dims - 1), t.numel() // V), (*(0,) * (max_dims - 1), V)
    if V > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    sizes = [s for s in t.shape[:-1]]
    strides = [st for st in t.stride()[:-1]]
    dims: list[list[int]] = []  # [size, stride] pairs, outermost first
    for sz, st in zip(sizes, strides):
        if sz == 1:
            continue
        if dims and dims[-1][1] == st * sz:
            dims[-1] = [dims[-1][0] * sz, st]
        else:
            dims.append([sz, st])
    if any(sz == 0 for sz in sizes):
        dims = [[0, 0]]
    if len(dims) > max_dims:
        t = t.contiguous()
        n = t.numel() // max(V, 1) if V else 0
        dims = [[n, V]]
    while len(dims) < max_dims:
        dims.insert(0, [1, 0])
    return t, tuple(d[0] for d in dims), tuple(d[1] for d in dims)


def contiguous_row_strides(dims, V: int):
    """Strides of a fresh contiguous [D0, D1, D2, V] buffer in the rows_layout convention."""
    D0, D1, D2 = dims
    return (D1 * D2 * V, D2 * V, V)


def grad_rows(logits: Tensor, out: Optional[Tensor]):
    """The rows of ``logits`` and where a gradient of their shape goes: over ``logits`` itself
    (``out`` is ``logits``; the caller checked it can take it) or, with ``out=None``, into a
    fresh contiguous buffer.  Returns ``(out, lg, dims, strides, ob, ostrides)``: the gradient
    tensor to return, the rows to read and the rows to write."""
    V = logits.shape[-1]
    lg, dims, strides = rows_layout(logits)
    if out is None:
        out = grad_empty(logits.shape, logits.dtype, logits.device)
        return out, lg, dims, strides, out, contiguous_row_strides(dims, V)
    return out, lg, dims, strides, lg, strides


def check_cu_seqlens(op: str, cu, ref_name: str, ref: torch.Tensor) -> int:
    """Validate ``cu_seqlens`` for the packed layout of ``ref`` (``[1, total, ...]``); returns the
    longest segment.

    ``cu`` must be an int32 / int64 ``[S+1]`` tensor on ``ref``'s device with ``cu[0] = 0``,
    ``cu[s] <= cu[s+1]`` and ``cu[S] = total = ref.shape[1]``; ``ref`` must have ``B = 1``.
    Checked on the host (one device sync).  Raises TypeError / ValueError naming the problem.
    """
    check_tensor(op, "cu_seqlens", cu, dtypes=INT_DTYPES)
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens must be 1-D [S+1] with at least one entry, got shape "
                         f"{tuple(cu.shape)}")
    check_same_device(op, ref_name, ref, cu_seqlens=cu)
    if ref.dim() < 2 or ref.shape[0] != 1:
        b = ref.shape[0] if ref.dim() else None
        raise ValueError(f"{op}: with cu_seqlens the inputs must be packed as [1, total], got "
                         f"{ref_name} of shape {tuple(ref.shape)} (B={b} != 1)")
    total = ref.shape[1]
    b = [int(x) for x in cu.tolist()]
    if b[0] != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0, got cu_seqlens[0]={b[0]}")
    for s in range(len(b) - 1):
        if b[s + 1] < b[s]:
            raise ValueError(f"{op}: cu_seqlens must be nondecreasing, got cu_seqlens[{s}]={b[s]} "
                             f"> cu_seqlens[{s + 1}]={b[s + 1]}")
    if b[-1] != total:
        raise ValueError(f"{op}: cu_seqlens must end at total={total} ({ref_name}.shape[1]), got "
                         f"cu_seqlens[-1]={b[-1]}")
    return max((b[s + 1] - b[s] for s in range(len(b) - 1)), default=0)


def check_backend_name(op: str, backend) -> None:
    """Plain-PyTorch ops accept ``backend`` for API uniformity: only the name is checked."""
    if backend is not None and (not isinstance(backend, str) or backend not in BACKENDS):
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")


def check_bool(op: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(v).__name__}")
    return v


def check_mask(op: str, mask, shape, what: str = "the shape of x") -> Tensor:
    """``mask`` is a bool / integer / floating tensor of exactly ``shape``.  Returns it detached:
    a mask (a float mask weighting tokens included) is data, never differentiated, on every
    backend."""
    check_tensor(op, "mask", mask, dtypes=MASK_DTYPES)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{op}: mask must have shape {tuple(shape)} ({what}), got "
                         f"{tuple(mask.shape)}")
    return mask.detach()


def check_logits(op: str, logits, *, dim: Optional[int] = None) -> Tensor:
    """Floating ``[..., V]`` logits (exactly ``dim`` dims when given) with a non-empty vocab."""
    check_tensor(op, "logits", logits, dtypes=FLOAT_DTYPES, min_dim=1)
    if dim is not None and logits.dim() != dim:
        raise ValueError(f"{op}: logits must be {dim}-D [B, T, V], got shape "
                         f"{tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have a non-empty vocab (last) dim, got shape "
                         f"{tuple(logits.shape)}")
    return logits


# ---------------------------------------------------------------------------------------------
# token ids
# ---------------------------------------------------------------------------------------------

def _raise_bad_token(op: str, tokens: Tensor, bad: Tensor, V: int, ignore_index: int,
                     what: str = "") -> None:
    pos = int(bad.reshape(-1).nonzero()[0, 0])
    val = int(tokens.reshape(-1)[pos])
    raise ValueError(
        f"{op}: tokens contains id {val} (flat position {pos}) outside {what}[0, {V}) that "
        f"is not ignore_index={ignore_index}; disable this check with "
        "fastrlhf.config.set_check_tokens(False) or FASTRLHF_CHECK_TOKENS=0 (e.g. for CUDA "
        "graph capture), in which case such positions give NaN")


def _bad_ids(tokens: Tensor, V: int, ignore_index: int) -> Tensor:
    """Where an id lies outside ``[0, V)`` and is not ``ignore_index``."""
    return ((tokens < 0) | (tokens >= V)) & (tokens != ignore_index)


def raise_bad_token(op: str, tokens: Tensor, V: int, ignore_index: int, what: str = "") -> None:
    """Raise :func:`check_token_range`'s ValueError for ``tokens``, known to hold a bad id (a
    launcher that checked the ids itself found one)."""
    _raise_bad_token(op, tokens, _bad_ids(tokens, V, ignore_index), V, ignore_index, what)


def check_token_range(op: str, tokens: Tensor, V: int, ignore_index: int,
                      what: str = "") -> None:
    """Raise ValueError if an id lies outside ``[0, V)`` and is not ``ignore_index``.

    A host-side check (one device sync), skipped when :mod:`fastrlhf.config` turns it off.
    Call it where the data is concrete: in eager code or inside a custom op's implementation
    (under ``torch.compile`` the ops run it in their kernels' launcher; see
    :func:`checked_tokens` for the eager-reference path)."""
    if not config.check_tokens_enabled() or tokens.numel() == 0 or tokens.is_meta:
        return  # (meta tensors carry no data to check)
    lo, hi = torch.aminmax(tokens)  # one pass; the exact check only when some id is outside
    if (int(lo) >= 0 and int(hi) < V) if tokens.device.type == "cpu" else bool((lo >= 0) & (hi < V)):
        return
    bad = _bad_ids(tokens, V, ignore_index)
    if bool(bad.any()):
        _raise_bad_token(op, tokens, bad, V, ignore_index, what)


@torch.library.custom_op("fastrlhf::checked_tokens", mutates_args=())
def _checked_tokens_op(tokens: Tensor, V: int, ignore_index: int, op: str) -> Tensor:
    check_token_range(op, tokens, V, ignore_index)
    return tokens.clone()


@_checked_tokens_op.register_fake
def _(tokens, V, ignore_index, op):
    return torch.empty_like(tokens)


def checked_tokens(op: str, tokens: Tensor, V: int, ignore_index: int) -> Tensor:
    """``tokens`` after :func:`check_token_range`, in a form ``torch.compile`` can trace.

    Eager: the check, then ``tokens`` itself.  Compiling: an opaque custom op that runs the same
    check when the graph executes and returns a copy of the (O(N)) ids, which the caller must use
    in place of ``tokens`` so the check is part of the graph (no data-dependent guard, no graph
    break)."""
    if torch.compiler.is_compiling():
        if not config.check_tokens_enabled():
            return tokens
        return _checked_tokens_op(tokens, V, ignore_index, op)
    check_token_range(op, tokens, V, ignore_index)
    return tokens


# ---------------------------------------------------------------------------------------------
# KL kinds
# ---------------------------------------------------------------------------------------------

def canonical_kl_kind(op: str, kind) -> str:
    """The canonical name of a KL estimator (``"k1" | "abs" | "k2" | "k3"``, ``+`` for the
    straight-through variants); raises TypeError / ValueError listing the valid kinds."""
    if not isinstance(kind, str):
        raise TypeError(f"{op}: kind must be a str, one of {KL_KINDS}, got {type(kind).__name__}")
    plus = kind.endswith("+")
    base = KL_BASE.get(kind[:-1] if plus else kind)
    if base is None:
        raise ValueError(f"{op}: unknown kind {kind!r}; valid kinds are {', '.join(KL_KINDS)}")
    # k2 is its own straight-through variant.
    return base + "+" if plus and base != "k2" else base


# ---------------------------------------------------------------------------------------------
# per-token [B, T] inputs, aggregation and the clipped losses
# ---------------------------------------------------------------------------------------------

def check_bt(op: str, name: str, t, shape=None) -> Tensor:
    """A floating ``[B, T]`` tensor (of exactly ``shape`` when given)."""
    check_tensor(op, name, t, dtypes=FLOAT_DTYPES)
    if shape is None:
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D [B, T], got shape {tuple(t.shape)}")
    elif tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} (the shape of the first "
                         f"argument), got {tuple(t.shape)}")
    return t


def check_advantages(op: str, adv, shape, n_seqs: Optional[int] = None) -> Tensor:
    """``[B, T]`` per token or ``[B]`` per sequence; packed (``n_seqs = S``): ``[1, total]`` or
    ``[S]``."""
    check_tensor(op, "advantages", adv, dtypes=FLOAT_DTYPES)
    n = shape[0] if n_seqs is None else n_seqs
    if tuple(adv.shape) not in (tuple(shape), (n,)):
        raise ValueError(f"{op}: advantages must have shape {tuple(shape)} (per token) or "
                         f"({n},) (per sequence), got {tuple(adv.shape)}")
    return adv


def check_packed(op: str, cu_seqlens, name: str, ref: Tensor):
    """``(n_seqs, norm_len)``: ``(None, T)`` without ``cu_seqlens``; else the validated packed
    layout's segment count ``S`` and longest segment ``Tmax`` (the default
    ``loss_scale_factor``)."""
    if cu_seqlens is None:
        return None, ref.shape[1]
    max_len = check_cu_seqlens(op, cu_seqlens, name, ref)
    return cu_seqlens.numel() - 1, max_len


def _check_count(op: str, name: str, v):
    """None, a number >= 0, or a one-element numeric tensor (used as is, no host sync)."""
    if v is None:
        return None
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"{op}: {name} must be a scalar, got a tensor of shape "
                             f"{tuple(v.shape)}")
        if v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{op}: {name} must be a number, got a {v.dtype} tensor")
        return v.reshape(())
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number or a scalar tensor, got "
                        f"{type(v).__name__}")
    v = float(v)
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{op}: {name} must be a finite number >= 0, got {v}")
    return v


def check_agg(op: str, mode, kwargs: dict) -> dict:
    """Validate the aggregation ``mode`` and verl's global-batch arguments (``kwargs``: any of
    :data:`fastrlhf.tables.AGG_KWARGS`); returns them normalized (all four keys)."""
    if not isinstance(mode, str) or mode not in AGG_MODES:
        raise ValueError(f"{op}: unknown aggregation mode {mode!r}; expected one of "
                         f"{', '.join(AGG_MODES)}")
    unknown = sorted(set(kwargs) - set(AGG_KWARGS))
    if unknown:
        raise TypeError(f"{op}: unexpected keyword argument(s) {', '.join(unknown)}; the "
                        f"aggregation accepts {', '.join(AGG_KWARGS)}")
    dp = kwargs.get("dp_size", 1)
    if isinstance(dp, bool) or not isinstance(dp, numbers.Integral):
        raise TypeError(f"{op}: dp_size must be an int, got {type(dp).__name__}")
    if dp < 1:
        raise ValueError(f"{op}: dp_size must be >= 1, got {dp}")
    bnt = _check_count(op, "batch_num_tokens", kwargs.get("batch_num_tokens"))
    gbs = _check_count(op, "global_batch_size", kwargs.get("global_batch_size"))
    lsf = kwargs.get("loss_scale_factor")
    if lsf is not None:
        lsf = check_positive_float(op, "loss_scale_factor", lsf)
    if dp > 1 and mode == "token-mean" and bnt is None:
        raise ValueError(f"{op}: (global) batch_num_tokens is required when dp_size > 1 "
                         f"(dp_size={dp}, mode={mode!r})")
    if dp > 1 and mode.startswith("seq-") and gbs is None:
        raise ValueError(f"{op}: global_batch_size is required when dp_size > 1 "
                         f"(dp_size={dp}, mode={mode!r})")
    return {"dp_size": int(dp), "batch_num_tokens": bnt, "global_batch_size": gbs,
            "loss_scale_factor": lsf}


def check_clips(op: str, clip_low, clip_high, dual_clip):
    """``(clip_low, clip_high, dual_clip)`` normalized: both clips > 0 (``clip_high=None`` is
    ``clip_low``), ``dual_clip`` None or a finite number > 1."""
    clip_low = check_positive_float(op, "clip_low", clip_low)
    clip_high = clip_low if clip_high is None else check_positive_float(op, "clip_high",
                                                                        clip_high)
    if dual_clip is not None:
        if isinstance(dual_clip, bool) or not isinstance(dual_clip, numbers.Real):
            raise TypeError(f"{op}: dual_clip must be a float > 1 or None, got "
                            f"{type(dual_clip).__name__}")
        dual_clip = float(dual_clip)
        if not (dual_clip > 1 and math.isfinite(dual_clip)):
            raise ValueError(f"{op}: dual_clip must be a finite number > 1 (the lower bound of "
                             f"the ratio for dual-clip PPO), got {dual_clip}")
    return clip_low, clip_high, dual_clip


def check_ratio_level(op: str, ratio_level) -> str:
    if not isinstance(ratio_level, str) or ratio_level not in RATIO_LEVELS:
        raise ValueError(f"{op}: ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    return ratio_level


def check_fused_loss_args(op: str, B: int, T: int, tokens, old_logp, advantages, mask, ref_logp,
                          kl_coef, kl_kind, entropy_coef, clip_low, clip_high, dual_clip,
                          ratio_level, inplace_backward, agg, agg_kwargs, cu_seqlens,
                          packed_name: str, packed_ref: Tensor, lead: str):
    """The argument block shared by ``fused_ppo_loss`` and ``fused_linear_ppo_loss`` (everything
    but the logits / hidden states): per-token inputs of shape ``(B, T)``, coefficients, clips,
    the KL kind and the aggregation.  Returns the normalized ``(kl_coef, entropy_coef, kl_kind,
    clip_low, clip_high, dual_clip, agg_kwargs, mask)`` (the mask detached)."""
    check_tensor(op, "tokens", tokens, dtypes=INT_DTYPES)
    check_shape(op, "tokens", tokens, (B, T), lead)
    check_bt(op, "old_logp", old_logp, (B, T))
    n_seqs, _ = check_packed(op, cu_seqlens, packed_name, packed_ref)
    check_advantages(op, advantages, (B, T), n_seqs)
    mask = check_mask(op, mask, (B, T), lead)
    if ref_logp is not None:
        check_bt(op, "ref_logp", ref_logp, (B, T))
    check_same_device(op, packed_name, packed_ref, tokens=tokens, old_logp=old_logp,
                      advantages=advantages, mask=mask, ref_logp=ref_logp)
    kl_coef = check_finite_float(op, "kl_coef", kl_coef)
    entropy_coef = check_finite_float(op, "entropy_coef", entropy_coef)
    kl_kind = canonical_kl_kind(op, kl_kind)
    if ref_logp is None and kl_coef != 0.0:
        raise ValueError(f"{op}: kl_coef={kl_coef} needs ref_logp (the reference policy's "
                         "log-probs of the tokens)")
    clip_low, clip_high, dual_clip = check_clips(op, clip_low, clip_high, dual_clip)
    check_ratio_level(op, ratio_level)
    check_bool(op, "inplace_backward", inplace_backward)
    kw = check_agg(op, agg, agg_kwargs)
    return kl_coef, entropy_coef, kl_kind, clip_low, clip_high, dual_clip, kw, mask


def row_view(t: Tensor) -> Tensor:
    """Unit stride along T (what the [B, T] kernels need); other strides are read in place."""
    if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        return t.contiguous()
    return t


def denominator(mode: str, kw: dict, acc: torch.dtype, device):
    """The aggregation's global denominator as ``(float or None, device tensor or None)``:
    ``batch_num_tokens`` for token-mean, ``global_batch_size`` for the seq modes."""
    v = kw["batch_num_tokens"] if mode == "token-mean" else (
        kw["global_batch_size"] if mode.startswith("seq-") else None)
    if isinstance(v, Tensor):
        return None, v.to(device=device, dtype=acc).reshape(1)
    return v, None


def non_overlapping(t: Tensor) -> bool:
    """True when no two elements of ``t`` share memory, proven from its sizes and strides
    (sorted by stride, each dim's stride exceeds the span of all smaller ones).  False for an
    expanded (stride 0) or otherwise self-overlapping view -- and, conservatively, for exotic
    interleaved layouts this simple test cannot prove; the callers then take the safe path."""
    extent = 0
    for st, sz in sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if st <= extent:
            return False
        extent += (sz - 1) * st
    return True


def with_contract(spec):
    """Decorator: append the edge-case contract of the reference function ``spec`` (the part of
    its docstring from the line starting "Edge-case contract" / "Edge cases" to its end) to the
    public op's docstring.  The contract is written once, in :mod:`fastrlhf.reference`, which
    every backend follows, and ``help()`` on the op shows it."""
    doc = inspect.cleandoc(spec.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(doc)
                  if line.startswith(("Edge-case contract", "Edge cases"))), None)
    if start is None:
        raise ValueError(f"{spec.__qualname__} states no edge-case contract")
    body = "\n".join(("    " + line) if line else "" for line in doc[start:])

    def deco(fn):
        own = inspect.cleandoc(fn.__doc__ or "")
        own = "\n".join(("    " + line) if (line and i) else line
                         for i, line in enumerate(own.splitlines()))
        fn.__doc__ = (f"{own}\n\n{body}\n\n    (The contract of "
                      f":func:`fastrlhf.reference.{spec.__name__}`, the spec of this op.)\n")
        return fn
    return deco


def mul_unrounded_(t: torch.Tensor, factor: torch.Tensor) -> None:
    """``t *= factor`` (a one-element tensor, e.g. fp32) without first rounding the factor to
    ``t``'s dtype: ``factor.to(bfloat16)`` would scale every element of a bf16 tensor by the
    same wrong amount (1/3 -> 0.33398: a bias of +0.2%).  On the CPU a 0-dim CPU factor is
    applied as a float scalar (one rounding per element); elsewhere through a temporary in the
    factor's dtype.  Used for the trainer's gradient clipping and for a fused-loss gradient
    whose rows a launcher cannot address in place (``native`` / Triton ``scale_rows`` do the
    rest)."""
    factor = factor.reshape(())
    if t.dtype == factor.dtype or (t.device.type == "cpu" and factor.device.type == "cpu"):
        t.mul_(factor)
    else:
        t.copy_(t.to(factor.dtype).mul_(factor))


def fused_stats(scal: torch.Tensor, per_token: torch.Tensor) -> dict:
    """The stats dict of the fused losses (keys of :data:`fastrlhf.tables.FUSED_STATS`) from a
    fused kernel's ``[5]`` scalars (clipfrac, clipfrac_lower, approx_kl, entropy_mean, kl_mean)
    and ``[3, B, T]`` per-token rows (logp, entropy, kl)."""
    logp, entropy, kl = per_token.unbind(0)  # two calls instead of eight indexing ops
    clipfrac, clipfrac_lower, approx_kl, entropy_mean, kl_mean = scal.unbind(0)
    return {"logp": logp, "entropy": entropy, "kl": kl, "clipfrac": clipfrac,
            "clipfrac_lower": clipfrac_lower, "approx_kl": approx_kl,
            "entropy_mean": entropy_mean, "kl_mean": kl_mean}
