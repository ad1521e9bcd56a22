"""``python -m offsite.cli``: the ``offsite`` command, for launchers that start modules.

``torchrun --nproc_per_node 2 -m offsite.cli finetune ...`` and ``accelerate launch -m
offsite.cli finetune ...`` run it this way (see :mod:`offsite.training.distributed`).
"""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
