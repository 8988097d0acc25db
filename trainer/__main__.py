"""``python -m trainer <experiment.yaml> [key=value ...]`` trains; ``python -m trainer export ...`` exports.

The first argument picks a subcommand when it names one; anything else is a training config.
User errors print one line and exit 2 (``--debug`` or ``TRAINER_DEBUG=1``: the traceback).
"""

from trainer.cli import one_line_errors, run_subcommand
from trainer.dist import exit_process

if __name__ == "__main__":
    import sys

    exit_process(one_line_errors(run_subcommand, sys.argv[1:]))
