"""``python -m trainer.eval MODEL [...]``: see trainer/eval/cli.py."""

import sys

from trainer.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
