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

``vocab_parallel = P`` (ddp only) adds a second axis: ``WORLD_SIZE = D * P`` ranks form ``D``
data-parallel replicas of ``P`` tensor-parallel ranks each (ranks ``d*P .. d*P + P - 1``).  The
ranks of a tensor-parallel group share the rollouts (prompts seeded by the data-parallel rank,
tokens sampled vocab-parallel); each holds one vocab slice of the policy's embedding and lm_head
(:mod:`fastrlhf.trainer.vocab_parallel`).  The policy is then not DDP-wrapped: its gradients are
synchronised by :func:`fastrlhf.trainer.vocab_parallel.sync_grads`.  The reward and value models
stay DDP over all ranks (the replicas of a group feed them the same data, so the mean over all
ranks is the data-parallel mean).  Losses and metrics are normalised and reduced over the
``D`` data-parallel ranks only (:attr:`Runtime.dp_world`, :meth:`Runtime.all_reduce_sum`).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..ops.common import mul_unrounded_
from .vocab_parallel import grad_norm_sq, sync_grads, vocab_shard

__all__ = ["Runtime", "PeakMemory", "setup_runtime", "wrap_model", "unwrap", "grad_sync",
           "finish_grad_sync", "clip_grad_norm"]


@dataclass
class Runtime:
    """Where this process runs: rank, world size, device, data-parallel strategy, and the
    vocab-parallel (tensor-parallel) size ``tp`` with its process groups."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    parallel: str = "ddp"
    owns_group: bool = False
    tp: int = 1
    tp_group: Any = None      # this rank's tensor-parallel group (ranks sharing rollouts)
    dp_group: Any = None      # the ranks holding the same vocab slice (None: all ranks)
    amp_dtype: Any = None     # autocast dtype of the forwards (a bf16 / fp16 --model on CUDA)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def dp_world(self) -> int:
        """Data-parallel size: the number of independent rollout streams."""
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    # -------------------------------------------------------------- collectives (no-ops at world 1)
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the data-parallel ranks (a new tensor; ``t`` is left untouched).
        The tensor-parallel replicas of a group hold the same values; they are counted once."""
        t = t.detach().clone()
        if self.dp_world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
        return t

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        """Minimum of ``t`` over all ranks."""
        t = t.detach().clone()
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Maximum of ``t`` over all ranks."""
        t = t.detach().clone()
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t


    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group this runtime created (none otherwise).

        A ``DistributedDataParallel`` / FSDP2 module lives in reference cycles (its hooks), so
        it outlives the run's locals until a garbage-collection pass; its reducer holds the
        process group.  Collecting first destroys those while the group and the interpreter are
        fully alive, instead of at some later pass -- possibly during interpreter shutdown,
        after the group was destroyed (a rank of a 2-process CPU run once aborted with
        "terminate called without an active exception" at about that point)."""
        if self.owns_group and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


class PeakMemory:
    """Peak memory of this process in MiB, over the whole run and over marked sections.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset with ``reset_peak_memory_stats``).  CPU:
    the peak resident set size, Python and libraries included (Linux ``VmHWM``, reset by
    writing 5 to ``/proc/self/clear_refs``; elsewhere ``getrusage``, which cannot be reset, so
    a section's peak is then the run's peak so far).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.run = 0.0         # the whole run (so far)
        self.section = 0.0     # the largest peak of the sections between start() and stop()

    def read(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024                  # kB
        except OSError:
            pass
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def start(self) -> None:
        """Begin a section: fold the peak so far into the run's, then reset the counter."""
        self.run = max(self.run, self.read())
        self._reset()

    def stop(self) -> None:
        """End a section: its peak counts for :attr:`section` and the run."""
        p = self.read()
        self.section = max(self.section, p)
        self.run = max(self.run, p)

    def total(self) -> float:
        return max(self.run, self.read())


def setup_runtime(device: str = "auto", parallel: str = "ddp", vocab_parallel: int = 1
                  ) -> Runtime:
    """Join the process group when launched by torchrun; pick this rank's device; build the
    tensor-parallel and data-parallel groups when ``vocab_parallel > 1``."""
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
    rt = Runtime(rank=rank, world=world, local_rank=local_rank, device=dev, parallel=parallel,
                 owns_group=owns)
    if vocab_parallel > 1 and world % vocab_parallel == 0:  # else TrainConfig.check_world says
        P, D = vocab_parallel, world // vocab_parallel
        rt.tp = P
        # every rank creates every group, in the same order (torch.distributed's rule)
        for d in range(D):
            g = dist.new_group([d * P + r for r in range(P)])
            if d == rt.dp_rank:
                rt.tp_group = g
        for r in range(P):
            g = dist.new_group([d * P + r for d in range(D)])
            if r == rt.tp_rank:
                rt.dp_group = g
    return rt


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
    if vocab_shard(model) is not None:    # vocab-sharded policy: see finish_grad_sync
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


def finish_grad_sync(model: nn.Module, rt: Runtime) -> None:
    """Synchronise the gradients a wrapper did not: those of a vocab-sharded policy (after its
    last backward of the step).  DDP / FSDP2 / single-process models: nothing to do."""
    if rt.distributed and vocab_shard(model) is not None:
        sync_grads(model, rt.world, rt.dp_world, rt.dp_group)


def scale_grads_(grads: List[torch.Tensor], coef: torch.Tensor) -> None:
    """``g *= coef`` for each gradient with the fp32 0-dim ``coef`` itself, not first rounded to
    a bf16 / fp16 gradient's dtype (``coef.to(bf16)`` would scale every element by the same wrong
    amount, up to 0.4% off): :func:`fastrlhf.ops.common.mul_unrounded_`, one fp32 multiply
    rounded once.  (``torch.nn.utils.clip_grad_norm_``, used for the other layouts, computes the
    norm itself in the gradients' dtype.)"""
    for g in grads:
        mul_unrounded_(g, coef.to(g.device))


def clip_grad_norm(model: nn.Module, max_norm: float, rt: Runtime) -> torch.Tensor:
    """Clip the global L2 norm of ``model``'s gradients to ``max_norm`` (0 = only measure it).

    Plain / DDP parameters hold full, already averaged gradients: ``torch.nn.utils``'s clipping.
    FSDP2 parameters are DTensor shards: the squared norms of the local shards are summed over
    ranks first (untested on GPU).  A vocab-sharded policy: the replicated body counted once
    plus the slices summed over the tensor-parallel group, so every rank of the group computes
    the norm of the full gradient and scales by the same factor.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    grads: List[torch.Tensor] = [p.grad for p in params]
    if vocab_shard(model) is not None:
        total = grad_norm_sq(model).sqrt().float()
        if max_norm > 0:
            coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
            for g in grads:
                g.mul_(coef)
        return total
    if rt.parallel == "fsdp2" and rt.distributed and hasattr(grads[0], "to_local"):
        sq = sum(g.to_local().float().pow(2).sum() for g in grads)
        total = rt.all_reduce_sum(sq).sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            scale_grads_([g.to_local() for g in grads], coef)
        return total.cpu()
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).detach().cpu()
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
