"""Command line: ``python -m trainer <experiment.yaml> [key=value ...]`` -> a validated TrainConfig.

``python -m trainer export <checkpoint | run dir> --out <dir> [--which latest|best]`` and
``python -m trainer plan <yaml>`` are subcommands (``SUBCOMMANDS``): a first
argument naming one selects it, anything else is the training command.

An experiment YAML may list ``defaults:`` (paths relative to itself, merged in order, each of
which may list its own); the file's own keys override them, and ``key=value`` overrides win last.
Dotted keys reach nested sections (``optim.base_lr=1e-4``); values are parsed as YAML.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from trainer.config import TrainConfig, from_dict


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged mapping of ``path`` and its ``defaults:`` chain."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path in _seen:
        raise ValueError(f"{path}: 'defaults' cycle through {[str(p) for p in _seen]}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    defaults = data.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list):
        raise ValueError(f"{path}: 'defaults' must be a list of YAML paths")
    merged: dict[str, Any] = {}
    for default in defaults:
        merged = deep_merge(merged, load_yaml_tree(path.parent / default, (*_seen, path)))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings; the value is parsed as YAML (``1e-4``, ``true``, ``[0.9, 0.99]``)."""
    out = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {key}: {'.'.join(parts[:i + 1])} is not a section")
            node[part] = child = dict(child)
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ValueError(f"override {key}: cannot parse value {raw!r}: {err}") from None
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """YAML chain + overrides -> validated TrainConfig (ValueError naming the key on any problem)."""
    return from_dict(apply_overrides(load_yaml_tree(path), overrides or []))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line into a TrainConfig."""
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML, e.g. configs/experiments/tiny_timm.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.base_lr=1e-4")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    return load_config(args.config, args.overrides)


def _export(argv: list[str]) -> int:
    from trainer.export import main

    return main(argv)


def _plan(argv: list[str]) -> int:
    from trainer.plan import main

    return main(argv)


SUBCOMMANDS = {"export": _export, "plan": _plan}
"""First-argument name -> entry taking the remaining arguments and returning the exit status."""


def run_subcommand(argv: list[str]) -> int:
    """Dispatch ``python -m trainer``: a subcommand, or training (the default)."""
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    from trainer.loop import main

    main(parse_args(argv))
    return 0
