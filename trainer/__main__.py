"""``python -m trainer <experiment.yaml> [key=value ...]`` trains; ``python -m trainer export ...`` exports.

The first argument picks a subcommand when it names one; anything else is a training config.
User errors print one line and exit 2 (``--debug`` or ``TRAINER_DEBUG=1``: the traceback).
"""

import os

# Before torch is imported (it reads this once): host tensors of 2 MB and more are 2 MB-aligned and advised
# as transparent huge pages. CPU ranks hand large tensors back to the system when freed
# (trainer.dist.host_allocator_for_cpu_ranks), so each step faults their pages in again: huge pages cut the
# system time that costs (ViT-B-32 FSDP2, 10 steps on 2 ranks: 12.9-15.8 -> 8.1-9.2 s, peak unchanged).
# THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from trainer.cli import one_line_errors, run_subcommand  # noqa: E402
from trainer.dist import exit_process  # noqa: E402

if __name__ == "__main__":
    import sys

    exit_process(one_line_errors(run_subcommand, sys.argv[1:]))
