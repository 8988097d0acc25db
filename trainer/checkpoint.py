"""Checkpoints on disk: layout, atomic commit, the ``latest`` pointer, discovery, validation, rotation.

Layout of ``<run.dir>/checkpoints/`` (a filesystem every rank sees):

    step-00000040/          one complete checkpoint; the number is the global step
      engine/               the engine's own sharded format (DCP for single/fsdp, DeepSpeed's for deepspeed)
      rank-00000.pt ...     per rank: data-stream state and RNG states
      config.yaml           resolved config of the run that wrote it
      manifest.json         written last: format, step, samples, world size, engine format, size of every file
    latest                  name of the newest complete checkpoint, replaced after the rename
    best/                   a complete checkpoint of the step with the best held-out value (+ best.json);
                            never rotated away; .best-previous/ only between the two renames of a swap
    .tmp-step-00000050/     a save in progress, or one killed mid-way: never read, removed by the next save

A save writes everything under the temporary name; once every rank has finished, rank 0 writes
the manifest, renames the directory and then replaces ``latest``. A kill at any point leaves
the previous complete checkpoint as the newest one with a manifest.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as torch_dist
import yaml

from trainer.config import CheckpointConfig
from trainer.data import BatchStream
from trainer.dist import DistEnv

log = logging.getLogger(__name__)

FORMAT = "dgmr-trainer-checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
BEST = "best"
BEST_PREVIOUS = ".best-previous"
BEST_RECORD = "best.json"
ENGINE_DIR = "engine"
CONFIG = "config.yaml"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^step-(\d{8,})$")
# Sections whose change makes the student or its meaning different: a resume across them is refused.
MUST_MATCH = ("model", "prune")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


@dataclass(frozen=True)
class Manifest:
    """What manifest.json says about a complete checkpoint."""

    format: str
    step: int
    """Optimizer steps done; the schedules (pure functions of the step) continue from here."""
    samples_seen: int
    """Images consumed over all ranks up to ``step``."""
    world_size: int
    engine_format: str
    """'dcp' (single, fsdp: interchangeable) or 'deepspeed'."""
    files: dict[str, int]
    """Every file under the checkpoint (relative path -> bytes) except the manifest itself."""


class Stateful(Protocol):
    """Trainer-side state saved in every rank file beside the data stream and RNGs (loss statistics, records)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Where the run stands; restored by ``resume``."""

    step: int = 0
    samples_seen: int = 0


def validate(path: str | os.PathLike) -> Manifest:
    """The manifest of the complete checkpoint at ``path``; a clear error naming the path or file otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{path}: not a complete checkpoint of this trainer ({MANIFEST} is missing)")
    try:
        data = json.loads(manifest_path.read_text())
        manifest = Manifest(**data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{manifest_path}: unreadable manifest: {err}") from None
    if manifest.format != FORMAT:
        raise ValueError(f"{manifest_path}: foreign checkpoint format {manifest.format!r} (expected {FORMAT!r})")
    for rel, size in manifest.files.items():
        file = path / rel
        if not file.is_file():
            raise ValueError(f"{file}: missing from checkpoint {path}")
        actual = file.stat().st_size
        if actual != size:
            raise ValueError(f"{file}: truncated or altered ({actual} bytes, manifest says {size})")
    return manifest


def best_checkpoint(root: Path) -> Path | None:
    """``root/best``, or the previous best left by a kill between the two renames of a swap; None if neither."""
    for candidate in (root / BEST, root / BEST_PREVIOUS):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def resolve_checkpoint(path: str | os.PathLike, which: str = "latest") -> Path:
    """A checkpoint directory as given, or ``which`` ('latest' | 'best') of a run directory or its checkpoints/."""
    path = Path(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if (path / MANIFEST).is_file() or not (complete_checkpoints(root) or best_checkpoint(root)):
        validate(path)  # a checkpoint, or the error that names what is wrong with it
        return path
    if which == "best":
        best = best_checkpoint(root)
        if best is None:
            raise FileNotFoundError(f"{root}: no best checkpoint (validation off, or no validation yet)")
        return best
    if which != "latest":
        raise ValueError(f"which: must be 'latest' or 'best', got {which!r}")
    for candidate in complete_checkpoints(root):
        try:
            validate(candidate)
            return candidate
        except ValueError as err:
            log.warning("skipping %s: %s; trying the previous one", candidate, err)
    raise FileNotFoundError(f"{root}: no complete checkpoint")


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoint directories under ``root``, newest step first (not validated)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def choose(cfg: CheckpointConfig, root: Path) -> tuple[Path, Manifest] | None:
    """The checkpoint ``checkpoint.resume`` names: None to start fresh."""
    if cfg.resume == "none":
        return None
    if cfg.resume != "auto":
        return Path(cfg.resume), validate(cfg.resume)
    for candidate in complete_checkpoints(root):
        try:
            return candidate, validate(candidate)
        except ValueError as err:
            log.warning("checkpoint.resume=auto: skipping %s: %s; trying the previous one", candidate, err)
    return None


def check_compatible(saved_config: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Refuse a resume whose student differs (model, pruning); other sections may change.

    Each saved section is completed with today's defaults first, so a checkpoint written before a key
    was added (with that key's default meaning) still resumes.
    """
    for section in MUST_MATCH:
        saved = _with_defaults(section, saved_config.get(section))
        if saved != config.get(section):
            raise ValueError(f"{path}: written for {section}={saved_config.get(section)} but the run has "
                             f"{section}={config.get(section)}; resume needs the same {', '.join(MUST_MATCH)}")


def _with_defaults(section: str, saved: Any) -> Any:
    """A saved config section as today's dataclass would write it (unknown keys left to fail the compare)."""
    from trainer.config import from_dict

    if not isinstance(saved, dict):
        return saved
    try:
        return from_dict({section: saved}).to_dict()[section]
    except ValueError:
        return saved


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Saves every ``every_steps`` and at the end, keeps the last ``keep_last``, resumes per ``resume``."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, env: DistEnv, config: dict[str, Any],
                 stateful: dict[str, Stateful] | None = None) -> None:
        self.cfg, self.env, self.config = cfg, env, config
        self.root = run_dir / "checkpoints"
        self.stateful = stateful or {}
        """Saved under 'trainer' in every rank file; identical on all ranks by construction."""

    def resume(self, engine: Any, stream: BatchStream) -> TrainState:
        """Restore engine, stream and RNGs from the chosen checkpoint (a collective); fresh state if none."""
        chosen = choose(self.cfg, self.root)
        if chosen is None:
            return TrainState()
        path, manifest = chosen
        check_compatible(yaml.safe_load((path / CONFIG).read_text()), self.config, path)
        if manifest.engine_format != engine.checkpoint_format:
            raise ValueError(f"{path}: written by a {manifest.engine_format!r} engine, this run's engine saves "
                             f"{engine.checkpoint_format!r}")
        engine.load(path / ENGINE_DIR, saved_world_size=manifest.world_size)
        same_world = manifest.world_size == self.env.world_size
        # Another world size: ranks cannot be mapped one to one; the data stream decides what it can keep.
        source = self.env.rank if same_world else self.env.rank % manifest.world_size
        ranked = torch.load(path / rank_file(source), weights_only=False)
        stream.load_state_dict(ranked["data"])
        if same_world:
            set_rng_state(ranked["rng"])
        saved_trainer = ranked.get("trainer", {})  # absent in checkpoints written before it existed
        for key, obj in self.stateful.items():
            if key in saved_trainer:
                obj.load_state_dict(saved_trainer[key])
        if self.env.is_main:
            log.warning("resumed from %s at step %d (written by %d rank(s), now %d)", path, manifest.step,
                        manifest.world_size, self.env.world_size)
        return TrainState(manifest.step, manifest.samples_seen)

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.cfg.every_steps == 0 or step == total_steps

    def _prepare(self, tmp: Path) -> None:
        """Rank 0: remove stale temporary directories and create ``tmp``."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()

    def _write(self, tmp: Path, state: TrainState, engine: Any, stream: BatchStream) -> None:
        """Every file of a complete checkpoint of ``state`` under ``tmp``, manifest last (a collective)."""
        if self.env.is_main:
            self._prepare(tmp)
        _barrier()
        engine.save(tmp / ENGINE_DIR)
        trainer = {key: obj.state_dict() for key, obj in self.stateful.items()}
        torch.save({"data": stream.state_dict(), "rng": rng_state(), "trainer": trainer},
                   tmp / rank_file(self.env.rank))
        _barrier()
        if self.env.is_main:
            (tmp / CONFIG).write_text(yaml.safe_dump(self.config, sort_keys=False))
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = Manifest(FORMAT, state.step, state.samples_seen, self.env.world_size,
                                engine.checkpoint_format, files)
            _write_atomic(tmp / MANIFEST, json.dumps(asdict(manifest), indent=1))

    def save(self, state: TrainState, engine: Any, stream: BatchStream) -> Path:
        """Write a complete checkpoint of ``state`` atomically (a collective); returns its path."""
        name = checkpoint_name(state.step)
        tmp, final = self.root / (TMP_PREFIX + name), self.root / name
        self._write(tmp, state, engine, stream)
        if self.env.is_main:
            if final.exists():  # the same step saved again (a rerun of the last step): the new one wins
                shutil.rmtree(final)
            tmp.rename(final)
            _write_atomic(self.root / LATEST, name + "\n")
            for old in complete_checkpoints(self.root)[self.cfg.keep_last:]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def save_best(self, state: TrainState, engine: Any, stream: BatchStream, record: dict[str, Any],
                  source: Path | None = None) -> Path:
        """Keep the checkpoint of ``state.step`` as ``best/`` with ``record`` in best.json (a collective).

        ``source``: the checkpoint this same step just saved, taken by hard links (no second engine save);
        None: a fresh save. Built under a temporary name; the old best is swapped out only once it is complete.
        """
        tmp, best, previous = self.root / (TMP_PREFIX + BEST), self.root / BEST, self.root / BEST_PREVIOUS
        if source is None:
            self._write(tmp, state, engine, stream)
        elif self.env.is_main:
            self._prepare(tmp)
            tmp.rmdir()
            shutil.copytree(source, tmp, copy_function=_link_or_copy)
        if self.env.is_main:
            _write_atomic(tmp / BEST_RECORD, json.dumps({"step": state.step, **record}, indent=1))
            if best.exists():
                if previous.exists():
                    shutil.rmtree(previous)
                best.rename(previous)
            tmp.rename(best)
            shutil.rmtree(previous, ignore_errors=True)
        _barrier()
        return best


def _link_or_copy(src: str, dst: str) -> None:
    # Checkpoint files are never modified after the commit, so best/ may share them with step-N.
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)
