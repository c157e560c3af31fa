"""Checkpoints that resume a run exactly.

Layout: ``OUT/checkpoints/step_000040/`` with

* ``trainer.pt``: config, step, policy / value / reference / reward-model weights, both
  optimizers and LR schedulers, the KL controller (written by rank 0);
* ``rng_rank{r}.pt``: every random state of rank ``r``: torch (CPU and CUDA), Python ``random``,
  NumPy, and the trainer's own ``torch.Generator`` streams (rollout sampling, minibatch shuffles).

A checkpoint is written into ``step_XXXXXX.tmp`` and renamed when complete, so a run killed
while saving never leaves a half-written checkpoint behind; ``--resume`` picks the newest
complete one.  Model and optimizer states are full (unsharded) CPU copies: ``state_dict()``
for plain and DDP models, the full state dicts of ``torch.distributed.checkpoint.state_dict``
for FSDP2; the vocab slices of a vocab-parallel policy are all-gathered
(:mod:`fastrlhf.trainer.vocab_parallel`): the weights in a checkpoint are always full.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .data import PromptTask
from .distributed import Runtime, unwrap
from .vocab_parallel import (gather_optim_state, gather_state, scatter_optim_state,
                             scatter_state, vocab_shard)

__all__ = ["model_state", "load_model_state", "optim_state", "load_optim_state", "rng_state",
           "set_rng_state", "save_checkpoint", "find_checkpoint", "load_checkpoint",
           "checkpoint_step", "RUN_MARKER", "is_run_dir", "check_out_dir", "claim_out_dir",
           "run_root", "open_run_dir", "save_policy", "dump_first_update"]

_STEP_DIR = re.compile(r"^step_(\d+)$")

RUN_MARKER = ".fastrlhf_run"
"""File written first into every run directory ``fastrlhf train`` creates: only directories that
hold it (or checkpoints of an older run) are ever written into again."""


def is_run_dir(path: str) -> bool:
    """True if ``path`` is a run directory made by ``fastrlhf train``."""
    return os.path.isfile(os.path.join(path, RUN_MARKER)) or find_checkpoint(path) is not None


def check_out_dir(out: str, *, overwrite: bool, resuming_here: bool) -> None:
    """Raise ``ValueError`` unless ``out`` may receive this run's outputs; writes nothing.

    Allowed: a missing or empty directory; a run directory of ``fastrlhf train`` that holds no
    checkpoints (a run stopped before its first one); the run being resumed
    (``resuming_here``); another run's directory with ``overwrite``.  Anything else, a model
    directory above all, is refused before a single file is written.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} exists and is not a directory")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    if not is_run_dir(out):
        looks = (" (it looks like a model directory: it holds config.json without being a run)"
                 if os.path.isfile(os.path.join(out, "config.json")) else "")
        raise ValueError(f"--out {out!r} is a non-empty directory that fastrlhf train did not "
                         f"create{looks}; refusing to write there: pass a new or empty directory")
    if resuming_here or overwrite or find_checkpoint(out) is None:
        return
    raise ValueError(f"{out!r} already holds checkpoints of an earlier run: continue it with "
                     f"--resume {out}, or pass --overwrite to start afresh there")


def claim_out_dir(out: str, *, fresh: bool) -> None:
    """Create ``out`` with its :data:`RUN_MARKER` (call after :func:`check_out_dir`, on rank 0);
    ``fresh`` deletes an earlier run's checkpoints, final weights, debug dumps and results."""
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, RUN_MARKER)
    if not os.path.isfile(marker):
        with open(marker, "w") as f:
            f.write("fastrlhf train run directory\n")
    if fresh:
        for sub in ("checkpoints", "final", "debug"):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
        for name in ("summary.json", "metrics.jsonl", "curves.png"):
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))


def checkpoint_step(ckpt: str) -> int:
    """The PPO step a checkpoint directory was written at."""
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(ckpt)))
    if m:
        return int(m.group(1))
    return int(torch.load(os.path.join(ckpt, "trainer.pt"), map_location="cpu",
                          weights_only=False)["step"])


def _is_sharded(model: nn.Module) -> bool:
    """True for FSDP2 models (DTensor parameters)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _cpu_copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _dcp():
    """``torch.distributed.checkpoint.state_dict`` and the full-state options (FSDP2 only)."""
    # lazy: importing it pulls in DTensor (about 1 s per process), which only FSDP2 models need
    import torch.distributed.checkpoint.state_dict as dcp
    return dcp, dcp.StateDictOptions(full_state_dict=True)


def model_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A full (unsharded) CPU copy of the model's state dict, on every rank.

    Plain and DDP models: ``state_dict()`` copied.  FSDP2: ``get_model_state_dict`` with
    ``full_state_dict=True``; vocab-parallel: the slices all-gathered (both collectives, so
    call it on every rank)."""
    m = unwrap(model)
    if _is_sharded(m):
        dcp, full = _dcp()
        return _cpu_copy(dcp.get_model_state_dict(m, options=full))
    if vocab_shard(m) is not None:
        return _cpu_copy(gather_state(m, m.state_dict()))
    return _cpu_copy(m.state_dict())


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load a full state dict (as :func:`model_state` returns) into any of the model kinds."""
    m = unwrap(model)
    if _is_sharded(m):
        dcp, full = _dcp()
        dcp.set_model_state_dict(m, state, options=full)
    elif vocab_shard(m) is not None:
        m.load_state_dict(scatter_state(m, state))
    else:
        m.load_state_dict(state)


def optim_state(model: nn.Module, optim: torch.optim.Optimizer) -> Dict:
    m = unwrap(model)
    if _is_sharded(m):
        dcp, full = _dcp()
        return _cpu_copy(dcp.get_optimizer_state_dict(m, optim, options=full))
    if vocab_shard(m) is not None:
        return _cpu_copy(gather_optim_state(m, optim))
    return _cpu_copy(optim.state_dict())


def load_optim_state(model: nn.Module, optim: torch.optim.Optimizer, state: Dict) -> None:
    m = unwrap(model)
    if _is_sharded(m):
        dcp, full = _dcp()
        dcp.set_optimizer_state_dict(m, optim, state, options=full)
    elif vocab_shard(m) is not None:
        optim.load_state_dict(scatter_optim_state(m, optim, state))
    else:
        optim.load_state_dict(state)


def rng_state(generators: Dict[str, torch.Generator]) -> Dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state(),
             "generators": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict, generators: Dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str, step: int, payload: Dict, rng: Dict, rt: Runtime,
                    keep: int) -> str:
    """Write checkpoint ``step`` (payload from rank 0, ``rng`` from every rank); keep the
    newest ``keep``.  Call on every rank."""
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    rt.barrier()
    torch.save(rng, os.path.join(tmp, f"rng_rank{rt.rank}.pt"))
    if rt.is_main:
        torch.save(payload, os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(payload.get("config", {}), f, indent=2)
    rt.barrier()
    if rt.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        steps = sorted(d for d in os.listdir(root) if _STEP_DIR.match(d))
        for old in steps[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    rt.barrier()
    return final


def find_checkpoint(path: str) -> Optional[str]:
    """``path`` itself if it is a checkpoint, else the newest complete one in
    ``path/checkpoints`` (None if there is none)."""
    if os.path.isfile(os.path.join(path, "trainer.pt")):
        return path
    root = os.path.join(path, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = sorted(d for d in os.listdir(root)
                   if _STEP_DIR.match(d) and os.path.isfile(os.path.join(root, d, "trainer.pt")))
    return os.path.join(root, steps[-1]) if steps else None


def load_checkpoint(ckpt: str, rt: Runtime):
    """``(payload, rng)`` of a checkpoint for this rank."""
    payload = torch.load(os.path.join(ckpt, "trainer.pt"), map_location="cpu", weights_only=False)
    rng_file = os.path.join(ckpt, f"rng_rank{rt.rank}.pt")
    if not os.path.isfile(rng_file):
        raise ValueError(f"checkpoint {ckpt!r} has no RNG state for rank {rt.rank}: it was "
                         "written with a different number of processes")
    rng = torch.load(rng_file, map_location="cpu", weights_only=False)
    return payload, rng


def run_root(ckpt: str) -> str:
    """The run directory of a checkpoint ``RUN/checkpoints/step_N``."""
    parent = os.path.dirname(os.path.normpath(ckpt))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else ckpt


def open_run_dir(cfg: TrainConfig, rt: Runtime, resume: Optional[str], say
                 ) -> Tuple[Optional[str], Optional[Dict]]:
    """Validate ``cfg.out`` (and the checkpoint to resume) before anything is written, then
    claim it and write ``config.json`` (rank 0).  Returns ``(checkpoint or None, None)``, or
    ``(checkpoint, summary)`` for a finished run given to ``--resume``: then nothing is written
    and the run's own ``summary.json`` is returned."""
    ckpt = None
    if resume is not None:
        ckpt = find_checkpoint(resume)
        if ckpt is None:
            raise ValueError(f"--resume {resume!r}: no checkpoint found there")
        done = checkpoint_step(ckpt)
        if done >= cfg.total_steps:          # a finished run: report it, touch nothing
            say(f"fastrlhf train: the run in {run_root(ckpt)} is already finished (step {done} "
                f"of total_steps={cfg.total_steps}); nothing to do (pass --total-steps N > "
                f"{done} to train it further)")
            summary_file = os.path.join(run_root(ckpt), "summary.json")
            if os.path.isfile(summary_file):
                with open(summary_file) as f:
                    return ckpt, json.load(f)
            return ckpt, {"out": run_root(ckpt), "steps": done, "finished": True}
    resuming_here = ckpt is not None and os.path.abspath(run_root(ckpt)) == \
        os.path.abspath(cfg.out)
    check_out_dir(cfg.out, overwrite=cfg.overwrite, resuming_here=resuming_here)
    rt.barrier()                        # every rank validated before rank 0 writes
    if rt.is_main:
        claim_out_dir(cfg.out, fresh=ckpt is None)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    return ckpt, None


def save_policy(cfg: TrainConfig, task, policy: nn.Module, state: Dict, path: str) -> None:
    """``final/policy``: the weights, the tokenizer (the model's own with --prompts, a word-level
    one of the built-in vocabulary otherwise) and a ``generation_config.json`` that samples as
    the trainer did (pure sampling at ``temperature``, no top-k / top-p, the trained EOS / PAD /
    BOS, ``response_length`` new tokens), so ``AutoModelForCausalLM`` + ``AutoTokenizer`` +
    ``generate()`` reproduce the trained behaviour."""
    import transformers

    policy.generation_config = transformers.GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
        max_new_tokens=cfg.response_length, eos_token_id=task.eos_id, pad_token_id=task.pad_id,
        bos_token_id=task.bos_id)
    policy.save_pretrained(path, state_dict=state)
    tok = task.tokenizer if isinstance(task, PromptTask) else task.hf_tokenizer()
    tok.save_pretrained(path)


def dump_first_update(cfg: TrainConfig, rt: Runtime, batch, kl_coef: float, pre: Dict,
                      policy: nn.Module, critic: Optional[nn.Module]) -> None:
    """``--dump-first-update``: ``OUT/debug/`` gets each rank's first rollout and the policy /
    critic weights before and after the first update (to replay it elsewhere)."""
    d = os.path.join(cfg.out, "debug")
    if rt.is_main:
        os.makedirs(d, exist_ok=True)
    rt.barrier()
    torch.save({"batch": batch.to_dict(), "kl_coef": kl_coef},
               os.path.join(d, f"rollout_rank{rt.rank}.pt"))
    post = {"policy": model_state(policy), "critic": {} if critic is None else model_state(critic)}
    if rt.is_main:
        torch.save({"pre": pre, "post": post, "world": rt.world, "tp": rt.tp},
                   os.path.join(d, "first_update.pt"))
    rt.barrier()
