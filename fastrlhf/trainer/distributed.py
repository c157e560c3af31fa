"""Data parallelism for the trainer: process group, model wrapping, collectives.

``torchrun --nproc_per_node=N -m fastrlhf.train ...`` sets ``RANK / WORLD_SIZE / LOCAL_RANK``; the
trainer then runs one process per rank:

* ``ddp`` (default): every rank holds full models wrapped in ``DistributedDataParallel``; the
  gradients are averaged over ranks.  Backend gloo on CPU, NCCL on GPU.  Tested on CPU (gloo).
* ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every transformer block and then the
  whole model (parameters, gradients and optimizer state sharded; gradients averaged by
  reduce-scatter, like DDP).  NCCL on GPU; gloo on CPU, where the tests check it (the update of
  2 CPU ranks equals the single-process one).  **Not tested on GPU** (the development machine
  has none); it uses only the documented FSDP2 API of torch >= 2.6 (``fully_shard``,
  ``set_requires_gradient_sync``, ``torch.distributed.checkpoint.state_dict``).

Both average gradients over ranks, so the losses are aggregated with ``fastrlhf.agg_loss``'s
global normalisation: each rank divides its local sum by the *global* token (or sequence) count
of the minibatch and multiplies by ``dp_size``; the average over ranks is then exactly the loss
of the global minibatch.  Rollouts are sampled independently on every rank (its own seed).

Vocab (tensor) parallelism is deliberately not a trainer option.  fastrlhf's ops accept
``process_group=`` / ``vocab_start_index=`` (``token_logprobs``, ``token_entropy``,
``full_kl``, ``fused_ppo_loss``, ``linear_token_logprobs``, ``fused_linear_ppo_loss``) for
a policy whose lm_head is sharded over the vocab: the ranks of a tensor-parallel group see the
*same* tokens, each holds the logits (or lm_head rows) of its slice, and they exchange only
``[N]``-sized per-row partials (about 16 bytes per token per step; ``bench/comm_volume.py``).
This trainer is data parallel only -- every rank runs a whole Hugging Face model on its *own*
rollouts -- so there is no sharded lm_head to feed them: adding one would mean a second
(tensor-parallel) process-group axis, a sharded lm_head inside the model code, and a
vocab-parallel sampler for generation, none of which the built-in tiny task (vocabulary of 33
ids, logits of a few KiB) could ever pay back.  It pays in the user's own model code when the
vocabulary is large (128k-256k) and the logits dominate memory: at 16384 tokens x 151936 ids the
bf16 logits are 4.6 GiB and their gradient as much again, each divided by the tensor-parallel
size P, for ~256 KiB of all-reduce per step instead of gathering (P-1)/P of those logits.  Shard
the lm_head (Megatron ``ColumnParallelLinear(gather_output=False)``, or a ``Shard(0)``
``DTensor`` weight), keep the local logits ``[B, T, V / P]`` and call e.g.
``fr.fused_ppo_loss(local_logits, tokens, ..., process_group=tp_group,
vocab_start_index=tp_rank * V_local)``; with ``fr.linear_token_logprobs`` /
``fused_linear_ppo_loss`` on the lm_head rows, the op itself all-reduces the hidden states'
gradient (do not also route them through Megatron's ``copy_to_tensor_model_parallel_region``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Iterable, List, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Runtime", "setup_runtime", "wrap_model", "unwrap", "grad_sync", "clip_grad_norm"]


@dataclass
class Runtime:
    """Where this process runs: rank, world size, device, data-parallel strategy."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    parallel: str = "ddp"
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # -------------------------------------------------------------- collectives (no-ops at world 1)
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (a new tensor; ``t`` is left untouched)."""
        t = t.detach().clone()
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_runtime(device: str = "auto", parallel: str = "ddp") -> Runtime:
    """Join the process group when launched by torchrun; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device={device!r} but CUDA is not available")
        if world > 1 or dev.index is None:
            dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return Runtime(rank=rank, world=world, local_rank=local_rank, device=dev, parallel=parallel,
                   owns_group=owns)


def _block_classes(model: nn.Module) -> tuple:
    """Transformer-block classes of a Hugging Face model (its ``_no_split_modules``)."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def wrap_model(model: nn.Module, rt: Runtime, *, trainable: bool) -> nn.Module:
    """The module the training loop calls: ``model`` itself at world 1, else DDP / FSDP2.

    Frozen models (reference policy, reward model) are not wrapped under DDP (nothing to
    synchronise); under FSDP2 they are sharded too, to save memory.
    """
    if not rt.distributed:
        return model
    if rt.parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6

        blocks = _block_classes(model)
        for m in list(model.modules()):
            if blocks and isinstance(m, blocks):
                fully_shard(m)
        # reshard_after_forward=True also for the root: by default FSDP2 leaves the root's
        # parameters unsharded after a forward (expecting a backward), which after the no-grad
        # forwards of generation and scoring would leave plain tensors where the optimizer and
        # the state-dict helpers expect the sharded DTensors.
        fully_shard(model, reshard_after_forward=True)
        return model
    if not trainable:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [rt.device.index] if rt.device.type == "cuda" else None
    # Buffers (rotary tables) are identical on every rank: no need to re-broadcast each forward.
    params = inspect.signature(DDP.__init__).parameters
    no_sync_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                       else {"broadcast_buffers": False})
    return DDP(model, device_ids=ids, **no_sync_buffers)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP wrapper (FSDP2 modules are their own module)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" \
        else model


@contextlib.contextmanager
def grad_sync(models: Sequence[nn.Module], enabled: bool):
    """Skip the gradient all-reduce of DDP / FSDP2 models inside this block when not
    ``enabled`` (gradient accumulation over micro-batches)."""
    with contextlib.ExitStack() as stack:
        for m in models:
            if enabled:
                continue
            if hasattr(m, "no_sync") and type(m).__name__ == "DistributedDataParallel":
                stack.enter_context(m.no_sync())
            elif hasattr(m, "set_requires_gradient_sync"):  # FSDP2
                m.set_requires_gradient_sync(False)
                stack.callback(m.set_requires_gradient_sync, True)
        yield


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float, rt: Runtime) -> torch.Tensor:
    """Clip the global L2 norm of the gradients to ``max_norm`` (0 = only measure it).

    Plain / DDP parameters hold full, already averaged gradients: ``torch.nn.utils``'s clipping.
    FSDP2 parameters are DTensor shards: the squared norms of the local shards are summed over
    ranks first (untested on GPU).
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    grads: List[torch.Tensor] = [p.grad for p in params]
    if rt.parallel == "fsdp2" and rt.distributed and hasattr(grads[0], "to_local"):
        sq = sum(g.to_local().float().pow(2).sum() for g in grads)
        total = rt.all_reduce_sum(sq).sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.to_local().mul_(coef.to(g.dtype))
        return total.cpu()
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).detach().cpu()
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
