"""``fastrlhf train``: command line of the PPO trainer.

    fastrlhf train                                   # the built-in task, outputs in runs/ppo
    fastrlhf train --out runs/a --total-steps 50 --backend reference
    fastrlhf train --config my.json --model ./my_local_hf_model
    fastrlhf train --resume runs/a                   # continue from the newest checkpoint
    torchrun --nproc_per_node=2 -m fastrlhf.train --out runs/ddp
    torchrun --nproc_per_node=4 -m fastrlhf.train --vocab-parallel 2   # 2 data x 2 vocab ranks

Every :class:`~fastrlhf.trainer.config.TrainConfig` field is a flag (``--field-name VALUE``;
booleans as ``--flag`` / ``--no-flag``; ``none`` for None where a field allows it; fields with a
fixed set of values list it as argparse choices).  Priority: defaults <
the resumed checkpoint's config < ``--config FILE`` < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import typing
from typing import Any, Dict, List, Optional

from ..helptext import HelpFormatter, plain
from .config import (ARCHS, BACKENDS, KL_KINDS, LOSS_AGGS, PARALLEL, REFERENCES, SCHEDULES,
                     TrainConfig, field_docs, load_config_file)

__all__ = ["main", "build_parser", "config_from_args", "to_flags"]


# Config fields whose value is one of a fixed set (the set TrainConfig checks).
CHOICES = {"backend": BACKENDS, "arch": ARCHS, "parallel": PARALLEL, "lr_schedule": SCHEDULES,
           "loss_agg": LOSS_AGGS, "kl_reward_kind": KL_KINDS + ("full",), "kl_loss_kind": KL_KINDS,
           "reference": REFERENCES}
METAVARS = {"out": "DIR", "model": "DIR", "device": "DEVICE"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastrlhf train", formatter_class=HelpFormatter,
        description="RLHF with PPO end to end on fastrlhf's fused ops: SFT warm start, "
                    "Bradley-Terry reward model, PPO.  The built-in task (a synthetic language "
                    "and a hidden preference oracle) needs no downloads.",
        epilog="Every option sets the config field of the same name.  Booleans: --flag / "
               "--no-flag.  Options shown as TYPE|none take the word none for None.  "
               "Priority: defaults < the resumed checkpoint's config < --config FILE < flags.  "
               "Several processes: torchrun --nproc_per_node=N -m fastrlhf.train [options].")
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="JSON (or TOML) file of config fields")
    p.add_argument("--resume", metavar="DIR", default=argparse.SUPPRESS,
                   help="continue the run in DIR from its newest checkpoint (or from DIR itself "
                        "if it is a checkpoint directory); outputs go to that run directory "
                        "unless --out is given")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON and exit")
    docs = field_docs()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        doc = plain(docs.get(f.name, "")).replace("%", "%%")
        hint = hints[f.name]
        if hint is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=f"{doc} (default: {f.default})")
        elif f.name in CHOICES:
            p.add_argument(flag, dest=f.name, choices=CHOICES[f.name], default=argparse.SUPPRESS,
                           help=f"{doc} (default: {f.default})")
        else:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = len(args) < len(typing.get_args(hint))
            tname = (METAVARS.get(f.name) or (args[0] if args else hint).__name__.upper()) + (
                "|none" if optional else "")
            p.add_argument(flag, dest=f.name, metavar=tname, default=argparse.SUPPRESS,
                           help=f"{doc} (default: {'none' if f.default is None else f.default})")
    return p


def to_flags(values: Dict[str, Any]) -> List[str]:
    """The command-line flags that set these :class:`TrainConfig` values, e.g.
    ``{"total_steps": 3, "packed": True, "clip_high": None}`` -> ``["--total-steps", "3",
    "--packed", "--clip-high", "none"]`` (for launching ``fastrlhf train`` / torchrun)."""
    out: List[str] = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, "none" if v is None else str(v)]
    return out


def _run_dir_of(resume: str) -> str:
    """The run directory that holds ``resume`` (a run dir, or one of its checkpoints)."""
    resume = os.path.abspath(resume)
    if os.path.isdir(os.path.join(resume, "checkpoints")):
        return resume
    parent = os.path.dirname(resume)
    if os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent)
    return resume


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults < checkpoint config < --config file < flags; raises ValueError."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = {}
    resume = getattr(args, "resume", None)
    if resume is not None:
        from .checkpoint import find_checkpoint  # lazy: imports torch, only when resuming

        ckpt = find_checkpoint(resume)
        if ckpt is None:
            raise ValueError(f"--resume {resume!r}: no checkpoint found there")
        with open(os.path.join(ckpt, "config.json")) as f:
            merged.update(json.load(f))
        merged["out"] = _run_dir_of(resume)
    if getattr(args, "config", None) is not None:
        merged.update(load_config_file(args.config))
    merged.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_dict(merged)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``fastrlhf train`` and ``python -m fastrlhf.train``; returns the exit
    status (2 for a bad configuration, with the reason on stderr)."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"fastrlhf train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if cfg.backend == "triton" and "TRITON_INTERPRET" not in os.environ:
        import torch

        if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
            # Triton kernels on CPU tensors run in Triton's interpreter (slow, for testing).
            os.environ["TRITON_INTERPRET"] = "1"
    # transformers' own progress bar ("Writing model shards") would interleave with the run's
    # output; the env var must be set before huggingface_hub is imported.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from .ppo import train  # lazy: argument errors before the trainer's heavy imports

    previous = _on_sigterm_raise()
    try:
        train(cfg, resume=getattr(args, "resume", None))
    except ValueError as e:  # checked at start-up (world size, --model, resume directory)
        print(f"fastrlhf train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM (turned into Terminated below)
        print(interrupted_message(cfg.out, e), file=sys.stderr, flush=True)
        return 128 + getattr(e, "signum", signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run happens to be (like Ctrl-C's KeyboardInterrupt), so that
    both stop the run the same clean way."""

    signum = signal.SIGTERM


def _on_sigterm_raise():
    """Make SIGTERM raise :class:`Terminated` in the main thread; returns the previous handler
    (None when signals cannot be set here, e.g. outside the main thread)."""
    def handler(signum, frame):
        # a second SIGTERM (e.g. torchrun's escalation while this rank waits inside a C++
        # collective, where Python cannot raise) kills at once, as by default
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def interrupted_message(out: str, exc: BaseException) -> str:
    """The one line printed when a run is stopped by Ctrl-C or SIGTERM."""
    from .checkpoint import find_checkpoint  # lazy: imports torch, only after an interrupt

    what = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
    ckpt = find_checkpoint(out) if os.path.isdir(out) else None
    if ckpt is None:
        return (f"fastrlhf train: stopped ({what}) before the first checkpoint; nothing to "
                f"resume in {out} (run the same command again to start afresh)")
    return f"fastrlhf train: stopped ({what}); resume with: fastrlhf train --resume {out}"
