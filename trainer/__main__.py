"""``python -m trainer <experiment.yaml> [key=value ...]`` trains; ``python -m trainer export ...`` exports.

The first argument picks a subcommand when it names one; anything else is a training config.
"""

import sys

from trainer.cli import run_subcommand

if __name__ == "__main__":
    sys.exit(run_subcommand(sys.argv[1:]))
