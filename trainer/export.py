"""``python -m trainer export <checkpoint or run dir> --out <dir> [--which latest|best]``: the trained student.

The checkpoint is a directory with a manifest (``step-N`` or ``best``), or a run directory (or its
``checkpoints/``) of which ``--which`` picks the newest complete checkpoint or the best-validated one.

The output is what ``python -m pruning prune`` writes (pruning/export.py): timm ``config.json`` +
``model.safetensors``, or open_clip ``open_clip_config.json`` + the visual tower's weights, so the
student loads like any pruned export. The student is rebuilt from the checkpoint's own config (the
teacher's source and seed give the final norm / head that training never touched, and the pruned
widths), its trained weights are read from the engine's files (engines/base.read_student_state), and
the parts ``strip_head`` took out are put back.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from torch import nn

import pruning
from pruning.export import (
    OPEN_CLIP,
    OPEN_CLIP_VISUAL_WEIGHTS,
    PRUNING_KEY,
    TIMM,
    TIMM_WEIGHTS,
    Architecture,
    check_stock_build,
    export_configs,
    resolve_architecture,
)
from pruning.safetensors_stream import SafetensorsWriter
from pruning.sites import find_mlp_sites
from trainer.checkpoint import CONFIG, ENGINE_DIR, resolve_checkpoint, validate
from trainer.config import TrainConfig, from_dict
from trainer.engines.base import read_student_state
from trainer.export_stream import iter_student_tensors, meta_student, student_layout
from trainer.models.base import TokenLayout
from trainer.models.registry import get_adapter


def build_student(cfg: TrainConfig) -> tuple[nn.Module, TokenLayout]:
    """The student's architecture with the teacher's weights, head stripped as in training (one model in memory)."""
    adapter = get_adapter(cfg.model.family)
    torch.manual_seed(cfg.run.seed)  # as build_models: the same init weights when there is no pretrained file
    model = adapter.build(cfg.model)
    # Only the widths matter here (the trained values are loaded next): the cheap method gives the same ones.
    pruning.prune_model(model, ratio=cfg.prune.ratio, method="random", generator=torch.Generator().manual_seed(0))
    return model, adapter.strip_head(model)


def restore_head(model: nn.Module, layout: TokenLayout) -> None:
    """Put back what ``strip_head`` removed (final norm, pooling, head), by attribute path."""
    for path, value in layout.removed.items():
        owner, _, name = path.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, name, value)


def trained_student(checkpoint: str | Path) -> tuple[nn.Module, TrainConfig]:
    """(student with trained weights and its head back, config of the run) from a complete checkpoint."""
    checkpoint = Path(checkpoint)
    manifest = validate(checkpoint)
    cfg = from_dict(yaml.safe_load((checkpoint / CONFIG).read_text()))
    model, layout = build_student(cfg)
    state = read_student_state(manifest.engine_format, checkpoint / ENGINE_DIR, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: student weights do not match the architecture of its config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    restore_head(model, layout)
    return model.eval(), cfg


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                      which: str = "latest") -> Path:
    """Write the student of ``checkpoint`` (see ``resolve_checkpoint`` for ``which``) to ``out_dir``
    (assembled beside it, renamed when complete)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory exists: {out_dir} (pass --overwrite)")
    checkpoint = resolve_checkpoint(checkpoint, which)
    manifest = validate(checkpoint)
    cfg = from_dict(yaml.safe_load((checkpoint / CONFIG).read_text()))
    model = meta_student(cfg)  # shapes for the configs; the weights stream below, one block at a time
    widths = {s.path: s.hidden for s in find_mlp_sites(model)}
    if cfg.model.family == TIMM:
        arch = Architecture(TIMM, cfg.model.name, model, "")
        config_name, config, claimed = export_configs(arch, widths, visual_only=False)
        # The architecture keyword arguments of the run (depth, img_size, ...) are part of the model.
        config["model_args"] = {**cfg.model.kwargs, "num_classes": model.num_classes, **config["model_args"]}
        config[PRUNING_KEY]["model_args"] = config["model_args"]
        weights = TIMM_WEIGHTS
    else:
        if cfg.model.kwargs:
            raise ValueError(f"{checkpoint}: model.kwargs {cfg.model.kwargs} cannot be expressed in an open_clip "
                             "export config")
        arch = resolve_architecture(f"{OPEN_CLIP}:{cfg.model.name}")
        config_name, config, claimed = export_configs(arch, widths, visual_only=True)
        weights = OPEN_CLIP_VISUAL_WEIGHTS
    layout = student_layout(cfg)
    if {name for name, _, _ in layout.specs()} != set(model.state_dict()):
        raise ValueError(f"{checkpoint}: cannot split the student of family {cfg.model.family} into blocks")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with SafetensorsWriter(tmp / weights, layout.specs(), metadata={"format": "pt"}) as writer:
            for key, tensor in iter_student_tensors(cfg, manifest.engine_format, checkpoint / ENGINE_DIR, layout):
                writer.write(key, tensor)
        (tmp / config_name).write_text(json.dumps(config, indent=2))
        config[PRUNING_KEY]["stock_loadable"] = claimed and check_stock_build(tmp)
        config[PRUNING_KEY]["trainer_checkpoint"] = str(Path(checkpoint).resolve())
        (tmp / config_name).write_text(json.dumps(config, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str]) -> int:
    """``export`` subcommand; user errors print one line and return 2."""
    parser = argparse.ArgumentParser(prog="python -m trainer export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a complete checkpoint directory (runs/x/checkpoints/step-00001000, "
                        "runs/x/checkpoints/best) or a run directory, see --which")
    parser.add_argument("--which", choices=("latest", "best"), default="latest",
                        help="for a run directory: the newest complete checkpoint or the best-validated one")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite, which=args.which)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0
