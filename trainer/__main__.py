"""``python -m trainer <experiment.yaml> [key=value ...]``: parse and validate, then train."""

from trainer.cli import parse_args
from trainer.loop import main

if __name__ == "__main__":
    main(parse_args())
