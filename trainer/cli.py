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
import json
import os
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from trainer.config import TrainConfig, from_dict
from trainer.data.config import DataConfig
from trainer.data.shards import check_rank_share, resolve_sources


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
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiment YAML, e.g. configs/experiments/tiny_timm.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.base_lr=1e-4")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    return load_config(args.config, args.overrides)


def _export(argv: list[str]) -> int:
    from pruning.export import weights_loaded_elsewhere
    from trainer.export import main

    with weights_loaded_elsewhere():  # the export rebuilds towers and loads the trained weights itself
        return main(argv)


def _plan(argv: list[str]) -> int:
    from tools.plan import main

    return main(argv)


SUBCOMMANDS = {"export": _export, "plan": _plan}
"""First-argument name -> entry taking the remaining arguments and returning the exit status."""


EPILOG = """subcommands (a first argument naming one selects it):
  python -m trainer export <checkpoint | run dir> --out <dir> [--which latest|best]
  python -m trainer plan <experiment.yaml> [key=value ...]

errors in the input print one line (error: ...) and exit with status 2; --debug (or TRAINER_DEBUG=1)
shows the traceback instead. Ctrl-C / SIGTERM during training: the step in progress finishes, a
checkpoint is saved, and the run exits with status 130; the same command resumes it."""

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)
"""Errors in what the user gave (config, paths, files): one line, not a traceback."""
DEBUG_FLAG, DEBUG_ENV = "--debug", "TRAINER_DEBUG"
ERROR_CHARS = 2000
"""A user error longer than this (a strict load listing every key) is cut; --debug shows all of it."""


def one_line_errors(entry: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run a command-line ``entry``; a user error becomes ``error: ...`` on one line and status 2.

    ``--debug`` anywhere in ``argv`` (removed before ``entry`` sees it) or ``TRAINER_DEBUG=1`` lets the
    exception through with its traceback. A Ctrl-C before training has taken its signals over (imports,
    config, model build) ends with one line and status 130 as well.
    """
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return entry(argv)
    except USER_ERRORS as err:
        if debug:
            raise
        text = " ".join(str(err).split()) or type(err).__name__
        if len(text) > ERROR_CHARS:
            text = text[:ERROR_CHARS] + f" ... ({DEBUG_FLAG} shows all)"
        print(f"error: {text}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def run_subcommand(argv: list[str]) -> int:
    """Dispatch ``python -m trainer``: a subcommand, or training (the default)."""
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    from trainer.loop import main

    return main(parse_args(argv))


# Preflight: checks of a training config that need files but no model, run before anything is built.
#
# Building the teacher and student takes seconds to minutes on every rank; a data layout that leaves
# a rank without shards, or a teacher file that cannot be read, used to surface only afterwards, as a
# traceback per rank under gloo's "Connection closed by peer". Each check here reads only file names,
# shard lists and file headers, gives the same verdict on every rank, and raises one error naming the
# config key and the file.

ZIP_MAGIC = b"PK\x03\x04"
"""First bytes of ``torch.save``'s (zip) format."""


def preflight(cfg: TrainConfig, world_size: int) -> None:
    """Raise ValueError / FileNotFoundError for a problem ``cfg`` would hit only after the models are built."""
    check_data_layout(cfg.data, world_size)
    check_weights_file("model.pretrained", cfg.model.pretrained)
    if cfg.prune.student_init:
        from trainer.student import student_init_file

        check_weights_file("prune.student_init", str(student_init_file(cfg)))


def check_data_layout(data: DataConfig, world_size: int) -> None:
    """Every shard exists and, without resampling, every rank and every DataLoader worker gets a shard.

    Shards are dealt round robin, so the last rank gets the fewest: checking it checks them all, and
    every rank reaches the same verdict.
    """
    if data.kind != "webdataset":
        return
    key = "data.shards" if data.shards else "data.sources"
    spec = data.shards or " :: ".join(s.shards for s in data.sources)
    sources = resolve_sources(data)  # FileNotFoundError naming a missing shard or list file
    if data.resampled:
        return
    n_shards = sum(len(urls) for urls, _ in sources)
    check_rank_share(n_shards, world_size - 1, world_size, data.num_workers, label=f"{key} {spec}")


def check_weights_file(key: str, path: str | None) -> None:
    """``path`` (config ``key``) is a readable, complete weights file; None passes (random init).

    Complete means: a .safetensors file holds every byte its header points to; a ``torch.save`` zip
    has its central directory (the end of the file). Older pickle files are checked for presence only.
    """
    if path is None:
        return
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{key}: no such file {path}")
    if not os.access(file, os.R_OK):
        raise ValueError(f"{key}: {path} is not readable (permission denied)")
    size = file.stat().st_size
    if size == 0:
        raise ValueError(f"{key}: {path} is empty")
    if file.suffix == ".safetensors":
        _check_safetensors(key, file, size)
        return
    with open(file, "rb") as f:
        magic = f.read(len(ZIP_MAGIC))
    if magic == ZIP_MAGIC and not zipfile.is_zipfile(file):
        raise ValueError(f"{key}: {path} is truncated or damaged (a torch.save archive without its end, "
                         f"{size} bytes)")


def _check_safetensors(key: str, file: Path, size: int) -> None:
    """The header parses and the last tensor ends inside the file."""
    with open(file, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise ValueError(f"{key}: {file} is not a safetensors file or is truncated ({size} bytes)")
        try:
            header = json.loads(f.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            raise ValueError(f"{key}: {file} has an unreadable safetensors header") from None
    if 8 + header_len + end > size:
        raise ValueError(f"{key}: {file} is truncated ({size} bytes, its header needs {8 + header_len + end})")
