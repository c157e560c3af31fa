"""The PPO trainer's command line as a module (the same as ``fastrlhf train``)::

    python -m fastrlhf.train [flags]
    torchrun --nproc_per_node=N -m fastrlhf.train [flags]

See :mod:`fastrlhf.trainer.cli`.
"""

import sys

from fastrlhf.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
