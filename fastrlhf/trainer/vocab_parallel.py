"""Vocab (tensor) parallelism for the trainer's policy: ``TrainConfig.vocab_parallel = P``.

Under ``torchrun`` with ``WORLD_SIZE = D * P``, ranks ``d*P .. d*P + P - 1`` form tensor-parallel
group ``d``.  The ranks of a group see the *same* prompts and responses; each holds only its
contiguous slice ``[start, end)`` of the vocabulary in the policy's (and the frozen reference's)
two vocab-sized matrices, Megatron-style:

* :class:`VocabParallelEmbedding` (the input embedding): a lookup of the ids that fall in the
  slice, zeros elsewhere, summed over the group (one ``[N, H]`` all-reduce in the forward; the
  backward is local: each rank's rows only receive the gradient of their own ids);
* :class:`VocabParallelLMHead` (the lm_head): ``hidden @ W[start:end].T``, so the model returns
  the **local logits** ``[B, T, V / P]`` and never the full ones; its backward all-reduces the
  hidden states' gradient (one ``[N, H]`` all-reduce), as Megatron's
  ``copy_to_tensor_model_parallel_region`` + ``ColumnParallelLinear(gather_output=False)``.

A tied lm_head (GPT-2, ``tie_word_embeddings``) stays tied: both modules share one shard.

Everything vocab-sized then stays on its rank: the log-probs, entropy and PPO losses call
fastrlhf's ops with ``process_group=`` / ``vocab_start_index=`` (:func:`op_kwargs`), which
exchange ``[N]``-sized per-row partials only; sampling is a Gumbel-max over the slice followed
by an all-gather of one (score, id) pair per row (:func:`sample_tokens`).  The transformer body
is replicated on every rank of a group and fed the same data, so its gradients are identical
there; :func:`sync_grads` averages body gradients over all ranks (the group replicas and the
data-parallel ranks) and slice gradients over the data-parallel ranks that hold the same slice.

Checkpoints stay full: :func:`gather_state` / :func:`scatter_state` turn sharded model and
optimizer states into unsharded ones and back (all-gathers over the group).

When it pays (figures computed here, not measured): with a Qwen2.5-7B-sized vocabulary
(V = 152064, H = 3584, untied) the embedding and lm_head hold 1.09 B parameters, 17.4 GB of
fp32 weights + gradients + AdamW moments on every data-parallel rank, and the logits of one
32k-token response take 10 GB in bf16, as much again for their gradient; ``P`` ranks divide both
by ``P``.  The price: two ``[N, H]`` all-reduces per forward/backward (28 KiB per token in fp32
at H = 3584; during generation one per decoding step), and the body's compute repeated on every
rank of a group, so per-GPU throughput falls towards ``1 / P`` of data parallelism's when the
body dominates the FLOPs.  Use it when vocabulary-sized memory is the limit (long responses,
large vocabularies, a body that fits replicated), not for speed.  Measured on this project's
2-core CPU machine with a V = 128256 tiny Llama: ``bench/bench_trainer_vocab_parallel.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# identity forward, all-reduce of the gradient in the backward: the ops' own lm_head uses it too
from ..ops.parallel import CopyToGroup

__all__ = ["VocabShard", "vocab_range", "VocabParallelEmbedding", "VocabParallelLMHead",
           "shard_vocab", "vocab_shard", "op_kwargs", "sample_tokens", "gumbel_scores",
           "sharded_parameters", "sync_grads", "grad_norm_sq", "gather_state", "scatter_state",
           "gather_optim_state", "scatter_optim_state"]


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice ``[start, end)`` of a vocabulary of ``size`` ids, split over the
    ``tp`` ranks of ``group`` (``tp_rank`` is this rank's index there)."""

    start: int
    end: int
    size: int
    tp: int
    tp_rank: int
    group: object = None

    def __deepcopy__(self, memo):      # immutable; the process group must not be copied
        return self

    @property
    def rows(self) -> int:
        return self.end - self.start

    def ranges(self) -> List[Tuple[int, int]]:
        return [vocab_range(self.size, self.tp, r) for r in range(self.tp)]


def vocab_range(size: int, tp: int, tp_rank: int) -> Tuple[int, int]:
    """Contiguous balanced split: the first ``size % tp`` ranks get one id more."""
    base, extra = divmod(size, tp)
    start = tp_rank * base + min(tp_rank, extra)
    return start, start + base + (tp_rank < extra)


# ------------------------------------------------------------------------------------------------
# collectives with the gradients Megatron's tensor parallelism uses
# ------------------------------------------------------------------------------------------------

class _SumForward(torch.autograd.Function):
    """Forward: sum over the group.  Backward: identity (the output is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class VocabParallelEmbedding(nn.Module):
    """Input embedding holding the rows ``[start, end)`` of the full ``[V, H]`` table.

    ``forward(ids [...]) -> [..., H]``: rows of the ids in the slice, zeros for the others,
    summed over the group; exactly one rank contributes each id, so the result equals the full
    lookup bit for bit.
    """

    def __init__(self, weight: nn.Parameter, shard: VocabShard,
                 padding_idx: Optional[int] = None):
        super().__init__()
        self.weight = weight
        self.shard = shard
        self.num_embeddings = shard.size        # what Hugging Face code reads
        self.embedding_dim = weight.shape[1]
        self.padding_idx = padding_idx          # full-vocabulary id whose row gets no gradient

    def forward(self, ids: Tensor) -> Tensor:
        s = self.shard
        inside = (ids >= s.start) & (ids < s.end)
        local = torch.where(inside, ids - s.start, torch.zeros_like(ids))
        pad = self.padding_idx
        pad = pad - s.start if pad is not None and s.start <= pad < s.end else None
        out = torch.where(inside.unsqueeze(-1), F.embedding(local, self.weight, padding_idx=pad),
                          torch.zeros((), dtype=self.weight.dtype, device=self.weight.device))
        return _SumForward.apply(out, s.group)

    def extra_repr(self) -> str:
        s = self.shard
        return f"rows [{s.start}, {s.end}) of {s.size}, dim {self.embedding_dim}, tp {s.tp}"


class VocabParallelLMHead(nn.Module):
    """lm_head holding the rows ``[start, end)`` of the full ``[V, H]`` weight (and bias).

    ``forward(hidden [..., H]) -> local logits [..., end - start]``; the backward sums the
    hidden states' gradient over the group.
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], shard: VocabShard):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.shard = shard
        self.in_features, self.out_features = weight.shape[1], shard.rows

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(CopyToGroup.apply(hidden, self.shard.group), self.weight, self.bias)

    def extra_repr(self) -> str:
        s = self.shard
        return f"rows [{s.start}, {s.end}) of {s.size}, in {self.in_features}, tp {s.tp}"


def shard_vocab(model: nn.Module, group, tp: int, tp_rank: int) -> nn.Module:
    """Replace the input embedding and the lm_head of a Hugging Face causal LM by this rank's
    vocab slices (in place; returns ``model``).  Every rank must start from the same full
    weights.  A tied lm_head shares the embedding's shard."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding) or not isinstance(head, nn.Linear):
        raise ValueError("TrainConfig.vocab_parallel needs a model whose input embedding is an "
                         f"nn.Embedding and whose lm_head is an nn.Linear; got "
                         f"{type(emb).__name__} and {type(head).__name__}")
    V = emb.num_embeddings
    if head.weight.shape != emb.weight.shape:
        raise ValueError(f"TrainConfig.vocab_parallel: the lm_head has {head.weight.shape[0]} "
                         f"rows but the embedding {V}; both must cover the same vocabulary")
    if not 1 <= tp <= V:
        raise ValueError(f"TrainConfig.vocab_parallel={tp} must be between 1 and the "
                         f"vocabulary size {V}")
    start, end = vocab_range(V, tp, tp_rank)
    shard = VocabShard(start, end, V, tp, tp_rank, group)
    tied = head.weight is emb.weight

    def rows(p: Tensor) -> nn.Parameter:
        return nn.Parameter(p.detach()[start:end].clone(), requires_grad=p.requires_grad)

    w_emb = rows(emb.weight)
    w_head = w_emb if tied else rows(head.weight)
    bias = None if head.bias is None else rows(head.bias)
    model.set_input_embeddings(VocabParallelEmbedding(w_emb, shard, emb.padding_idx))
    model.set_output_embeddings(VocabParallelLMHead(w_head, bias, shard))
    return model


def vocab_shard(model: nn.Module) -> Optional[VocabShard]:
    """The :class:`VocabShard` of a model sharded by :func:`shard_vocab` (else None)."""
    for m in model.modules():
        if isinstance(m, VocabParallelLMHead):
            return m.shard
    return None


def op_kwargs(model: nn.Module) -> Dict:
    """``{process_group, vocab_start_index}`` for fastrlhf's ops on the model's logits (empty
    for an unsharded model)."""
    s = vocab_shard(model)
    return {} if s is None else {"process_group": s.group, "vocab_start_index": s.start}


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------

def gumbel_scores(local_logits: Tensor, temperature: float, generator: torch.Generator
                  ) -> Tensor:
    """``logits / T + Gumbel(0, 1)`` noise, ``[B, V_r]`` float32: the argmax over the full
    vocabulary of these scores is a sample of ``softmax(logits / T)`` (Gumbel-max), so every
    rank can score its own slice with its own noise stream."""
    e = torch.empty(local_logits.shape, dtype=torch.float32, device=local_logits.device)
    e.exponential_(generator=generator)                       # E ~ Exp(1); -log E ~ Gumbel
    return local_logits.float() / temperature - torch.log(e)


def sample_tokens(local_logits: Tensor, temperature: float, generator: torch.Generator,
                  shard: VocabShard) -> Tensor:
    """One token per row ``[B]`` (int64, full-vocabulary ids) from ``softmax(logits / T)``,
    where each rank holds the columns ``[shard.start, shard.end)`` of the logits.

    Each rank takes the best Gumbel-perturbed score of its slice; the ranks all-gather one
    (score, id) pair per row and all pick the best (ties: the smallest id).  The noise streams
    of the ranks must be independent (the trainer seeds them by global rank); all ranks return
    the same tokens.
    """
    scores = gumbel_scores(local_logits, temperature, generator)                 # [B, V_r]
    best, idx = scores.max(dim=-1)                                                # [B], [B]
    pair = torch.stack([best.double(), (idx + shard.start).double()])            # [2, B]
    if shard.tp == 1:
        return pair[1].long()
    parts = [torch.empty_like(pair) for _ in range(shard.tp)]
    dist.all_gather(parts, pair, group=shard.group)
    cand = torch.stack(parts)                                                     # [P, 2, B]
    winner = cand[:, 0].argmax(dim=0)                       # first maximum: the smallest ids
    return cand[:, 1].gather(0, winner[None]).squeeze(0).long()


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------

def sharded_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The vocab-sharded parameters of ``model`` (no duplicates for a tied head)."""
    out: Dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, (VocabParallelEmbedding, VocabParallelLMHead)):
            for p in m.parameters(recurse=False):
                out[id(p)] = p
    return list(out.values())


def _all_reduce_mean(grads: List[Tensor], group, n: int) -> None:
    if not grads or n == 1:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat.div_(n)
    for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(f)


def sync_grads(model: nn.Module, world: int, dp_world: int, dp_group) -> None:
    """Average the gradients of a vocab-sharded model after its backward.

    Body (replicated) parameters: mean over all ``world`` ranks: the ``P`` replicas of a
    tensor-parallel group hold equal gradients, so this is the data-parallel mean, and it keeps
    the replicas bit-identical.  Sharded parameters: mean over the ``dp_world`` ranks of
    ``dp_group`` (those holding the same slice).
    """
    shard_ids = {id(p) for p in sharded_parameters(model)}
    body, sharded = [], []
    for p in model.parameters():
        if p.grad is not None:
            (sharded if id(p) in shard_ids else body).append(p.grad)
    _all_reduce_mean(body, None, world)
    _all_reduce_mean(sharded, dp_group, dp_world)


def grad_norm_sq(model: nn.Module) -> Tensor:
    """Squared L2 norm of the *full* gradient of a vocab-sharded model, identical on every rank
    of the group: the body's (replicated) part once plus the slices' parts summed over the
    group.  float64 scalar."""
    shard = vocab_shard(model)
    shard_ids = {id(p) for p in sharded_parameters(model)}
    dev = next(model.parameters()).device
    body = torch.zeros((), dtype=torch.float64, device=dev)
    sl = torch.zeros((), dtype=torch.float64, device=dev)
    for p in model.parameters():
        if p.grad is not None:
            sq = p.grad.detach().double().pow(2).sum()
            if id(p) in shard_ids:
                sl += sq
            else:
                body += sq
    if shard is not None and shard.tp > 1:
        dist.all_reduce(sl, group=shard.group)
    return (body + sl).cpu()


# ------------------------------------------------------------------------------------------------
# full (unsharded) model and optimizer states
# ------------------------------------------------------------------------------------------------

def _gather_rows(local: Tensor, shard: VocabShard) -> Tensor:
    """``[end - start, ...]`` slices of the group -> the full ``[V, ...]`` tensor (every rank)."""
    ranges = shard.ranges()
    n = max(e - s for s, e in ranges)
    pad = local.new_zeros((n,) + tuple(local.shape[1:]))
    pad[:local.shape[0]] = local
    parts = [torch.empty_like(pad) for _ in ranges]
    dist.all_gather(parts, pad, group=shard.group)
    return torch.cat([p[:e - s] for p, (s, e) in zip(parts, ranges)])


def _sharded_keys(model: nn.Module) -> Dict[str, VocabShard]:
    keys = {}
    for name, m in model.named_modules():
        if isinstance(m, (VocabParallelEmbedding, VocabParallelLMHead)):
            for pname, p in m.named_parameters(recurse=False):
                keys[f"{name}.{pname}" if name else pname] = m.shard
    return keys


def gather_state(model: nn.Module, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``model.state_dict()`` of a sharded model -> the full state dict (a collective: call
    on every rank of the group)."""
    keys = _sharded_keys(model)
    return {k: (_gather_rows(v, keys[k]) if k in keys else v) for k, v in state.items()}


def scatter_state(model: nn.Module, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A full state dict -> this rank's slices for :meth:`load_state_dict` of a sharded model."""
    keys = _sharded_keys(model)
    out = {}
    for k, v in state.items():
        if k in keys:
            s = keys[k]
            if v.shape[0] != s.size:
                raise ValueError(f"state {k!r} has {v.shape[0]} rows; the sharded model's "
                                 f"vocabulary has {s.size}")
            v = v[s.start:s.end]
        out[k] = v
    return out


def _optim_sharded(model: nn.Module, optim: torch.optim.Optimizer) -> Dict[int, VocabShard]:
    """Optimizer-state index -> shard, for the sharded parameters."""
    shard = vocab_shard(model)
    ids = {id(p) for p in sharded_parameters(model)}
    flat = [p for g in optim.param_groups for p in g["params"]]
    return {i: shard for i, p in enumerate(flat) if id(p) in ids}


def gather_optim_state(model: nn.Module, optim: torch.optim.Optimizer) -> Dict:
    """``optim.state_dict()`` with the per-parameter tensors of the sharded parameters (Adam's
    moments) gathered to full size (a collective over the group)."""
    sd = optim.state_dict()
    idx = _optim_sharded(model, optim)
    state = {}
    for i, st in sd["state"].items():
        if i in idx:
            st = {k: (_gather_rows(v, idx[i]) if torch.is_tensor(v) and v.dim() >= 1 else v)
                  for k, v in st.items()}
        state[i] = st
    return {**sd, "state": state}


def scatter_optim_state(model: nn.Module, optim: torch.optim.Optimizer, sd: Dict) -> Dict:
    """A full optimizer state dict (from :func:`gather_optim_state`) -> this rank's."""
    idx = _optim_sharded(model, optim)
    state = {}
    for i, st in sd["state"].items():
        i = int(i)
        if i in idx:
            s = idx[i]
            st = {k: (v[s.start:s.end] if torch.is_tensor(v) and v.dim() >= 1 else v)
                  for k, v in st.items()}
        state[i] = st
    return {**sd, "state": state}
