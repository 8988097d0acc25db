"""``python -m trainer <experiment.yaml> [key=value ...]`` trains; ``python -m trainer export ...`` exports.

The first argument picks a subcommand when it names one; anything else is a training config.
"""

from trainer.cli import run_subcommand
from trainer.dist import exit_process

if __name__ == "__main__":
    import sys

    exit_process(run_subcommand(sys.argv[1:]))
