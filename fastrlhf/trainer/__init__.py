"""A compact PPO trainer on fastrlhf's ops: SFT warm start -> Bradley-Terry reward model -> PPO.

    from fastrlhf.trainer import TrainConfig, train
    summary = train(TrainConfig(out="runs/demo", total_steps=50))

Command line: ``fastrlhf train --help`` (or ``python -m fastrlhf.train``; ``torchrun ... -m
fastrlhf.train`` for data parallelism).  Start reading at :mod:`fastrlhf.trainer.ppo`.
"""

from .config import TrainConfig

__all__ = ["TrainConfig", "train", "main"]


def train(cfg, *, resume=None):
    """See :func:`fastrlhf.trainer.ppo.train` (imported lazily: it pulls in transformers)."""
    from .ppo import train as _train  # lazy: importing the config stays light
    return _train(cfg, resume=resume)


def main(argv):
    """``fastrlhf train`` entry point; see :func:`fastrlhf.trainer.cli.main`."""
    from .cli import main as _main  # lazy: importing the config stays light
    return _main(argv)
