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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from pruning import find_mlp_sites
from pruning.export import (
    OPEN_CLIP,
    OPEN_CLIP_VISUAL_WEIGHTS,
    OPEN_CLIP_WEIGHTS,
    PRUNING_KEY,
    TIMM,
    TIMM_WEIGHTS,
    Architecture,
    check_stock_build,
    export_configs,
    read_pruning_record,
    resolve_architecture,
)
from pruning.safetensors_stream import SafetensorsWriter
from pruning.stream import open_checkpoint
from trainer.checkpoint import CONFIG, ENGINE_DIR, resolve_checkpoint, validate
from trainer.config import TrainConfig, from_dict
from trainer.engines.base import read_student_state
from trainer.models.base import TokenLayout
from trainer.models.registry import get_adapter
from trainer.student import student_architecture


def build_student(cfg: TrainConfig) -> tuple[nn.Module, TokenLayout]:
    """The student's architecture (values to be loaded), head stripped as in training; the stripped parts hold
    the teacher's values (from ``model.pretrained``, or its seeded init)."""
    adapter = get_adapter(cfg.model.family)
    torch.manual_seed(cfg.run.seed)  # the teacher's init when there is no pretrained file, as build_models
    model = student_architecture(cfg.model, cfg.prune, adapter, on="real")
    layout = adapter.strip_head(model)
    teacher = _teacher_reader(cfg)
    try:
        head = _head_tensors(cfg, {k: (tuple(v.shape), v.dtype) for k, v in _removed_state(layout).items()}, teacher)
    finally:
        teacher.close()
    with torch.no_grad():
        for name, value in _removed_state(layout).items():
            value.copy_(head[name])
    return model, layout


def _removed_state(layout: TokenLayout) -> dict[str, torch.Tensor]:
    """The tensors ``strip_head`` took out, by their names in the full model."""
    state = {}
    for path, part in layout.removed.items():
        if isinstance(part, nn.Module):
            state.update({f"{path}.{k}": v for k, v in part.state_dict().items()})
        elif isinstance(part, torch.Tensor):
            state[path] = part.data
    return state


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
                      which: str = "latest", visual_only: bool = False) -> Path:
    """Write the student of ``checkpoint`` (see ``resolve_checkpoint`` for ``which``) to ``out_dir``
    (assembled beside it, renamed when complete).

    An open_clip teacher whose weights hold a whole CLIP gives a whole CLIP: the trained image tower plus the
    teacher's text tower, logit scale and projections, unchanged, which stock open_clip loads for zero-shot
    use (``create_model_and_transforms("local-dir:<out>")``); ``visual_only`` (or a tower-only teacher file)
    writes the image tower alone.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory exists: {out_dir} (pass --overwrite)")
    checkpoint = resolve_checkpoint(checkpoint, which)
    manifest = validate(checkpoint)
    cfg = from_dict(yaml.safe_load((checkpoint / CONFIG).read_text()))
    # Shapes for the configs; the weights stream below, one block at a time.
    model = student_architecture(cfg.model, cfg.prune, get_adapter(cfg.model.family), on="meta")
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
    layout = student_layout(cfg)
    if {name for name, _, _ in layout.specs()} != set(model.state_dict()):
        raise ValueError(f"{checkpoint}: cannot split the student of family {cfg.model.family} into blocks")
    teacher = _teacher_reader(cfg)
    try:
        # The rest of a whole CLIP (text tower, logit scale, projections) comes from the teacher unchanged.
        keys = list(teacher.keys())
        # A tower-only teacher file has no "visual." keys: all of it is the tower, none of it the rest of a CLIP
        # (before this check such an export carried the whole teacher tower again under its bare names).
        whole_clip = any(k.startswith("visual.") for k in keys)
        rest = [] if cfg.model.family == TIMM or visual_only or not whole_clip else [
            k for k in keys if not k.startswith("visual.")]
        if cfg.model.family != TIMM:
            config_name, config, claimed = export_configs(arch, widths, visual_only=not rest)
            weights = OPEN_CLIP_WEIGHTS if rest else OPEN_CLIP_VISUAL_WEIGHTS
        prefix = "visual." if rest else ""
        specs = [(prefix + n, shape, dtype) for n, shape, dtype in layout.specs()]
        specs += [(k, *teacher.meta(k)) for k in rest]
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        _write_export(cfg, manifest, checkpoint, layout, teacher, specs, prefix, rest, tmp, weights)
    finally:
        teacher.close()
    try:
        (tmp / config_name).write_text(json.dumps(config, indent=2))
        config[PRUNING_KEY]["stock_loadable"] = claimed and check_stock_build(tmp)
        config[PRUNING_KEY]["text_tower"] = "the teacher's, unchanged" if rest else None
        config[PRUNING_KEY]["trainer_checkpoint"] = str(Path(checkpoint).resolve())
        config[PRUNING_KEY]["trainer_step"] = manifest.step
        (tmp / config_name).write_text(json.dumps(config, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_export(cfg: TrainConfig, manifest: object, checkpoint: Path, layout: StudentLayout, teacher: object,
                  specs: list, prefix: str, rest: list[str], tmp: Path, weights: str) -> None:
    """The export's weights file: the student one block at a time, then the teacher's other CLIP tensors."""
    try:
        with SafetensorsWriter(tmp / weights, specs, metadata={"format": "pt"}) as writer:
            tensors = iter_student_tensors(cfg, manifest.engine_format, checkpoint / ENGINE_DIR, layout, teacher)
            for key, tensor in tensors:
                writer.write(prefix + key, tensor)
            for key in rest:
                writer.write(key, teacher.get(key))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str]) -> int:
    """``export`` subcommand; user errors print one line and return 2."""
    parser = argparse.ArgumentParser(prog="python -m trainer export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a complete checkpoint directory (runs/x/checkpoints/step-00001000, "
                        "runs/x/checkpoints/best) or a run directory, see --which")
    parser.add_argument("--which", choices=("latest", "best"), default="latest",
                        help="for a run directory: the newest complete checkpoint or the best-validated one")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--visual-only", action="store_true",
                        help="open_clip: write the image tower alone (default: a whole CLIP when the teacher's "
                             "weights hold one, for zero-shot use)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite, which=args.which,
                                visual_only=args.visual_only)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    record = read_pruning_record(out)[1][PRUNING_KEY]
    step = record["trainer_step"]
    print(f"exported step {step} ({record['trainer_checkpoint']}) -> {out}")
    if step == 0:
        print("warning: step 0 is the student before any distillation (pruned, and compensated if configured)",
              file=sys.stderr)
    return 0


Spec = tuple[tuple[int, ...], torch.dtype]


@dataclass
class StudentLayout:
    """Which tensors the export writes, in which groups, and where each group comes from."""

    trained_groups: list[dict[str, Spec]]
    """Trained tensors (the engine's keys), one dict per transformer block, then one for the rest."""
    head: dict[str, Spec]
    """Untrained tensors that ``strip_head`` removed, as keys of the full (exported) model."""

    def specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of every exported tensor, in the order ``iter_student_tensors`` yields them."""
        groups = [*self.trained_groups, self.head]
        return [(name, shape, dtype) for group in groups for name, (shape, dtype) in group.items()]


def student_layout(cfg: TrainConfig) -> StudentLayout:
    """The pruned student's tensors from shapes alone: meta build, pruned widths, head stripped."""
    adapter = get_adapter(cfg.model.family)
    model = student_architecture(cfg.model, cfg.prune, adapter, on="meta")
    full = _specs(model)
    adapter.strip_head(model)
    trained = _specs(model)
    block_names = {id(block) for block in adapter.blocks(model)}
    prefixes = [name + "." for name, module in model.named_modules() if id(module) in block_names]
    groups = [{k: v for k, v in trained.items() if k.startswith(prefix)} for prefix in prefixes]
    in_blocks = {k for group in groups for k in group}
    groups.append({k: v for k, v in trained.items() if k not in in_blocks})
    head = {k: v for k, v in full.items() if k not in trained}
    return StudentLayout([g for g in groups if g], head)


def iter_student_tensors(cfg: TrainConfig, engine_format: str, engine_dir: Path, layout: StudentLayout,
                         teacher: object) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the exported student in ``layout.specs()`` order, at most one group in memory."""
    reader = _engine_reader(engine_format, engine_dir)
    for group in layout.trained_groups:
        tensors = reader(group)
        for name, (shape, _) in group.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"{engine_dir}: {name} has shape {tuple(tensors[name].shape)} in the checkpoint, "
                                 f"the student of its config has {shape}")
            yield name, tensors[name]
        del tensors
    yield from _head_tensors(cfg, layout.head, teacher).items()


def _specs(model: nn.Module) -> dict[str, Spec]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _engine_reader(engine_format: str, path: Path):
    if engine_format == "dcp":
        return lambda group: _read_dcp(path, group)
    if engine_format == "safetensors":  # a student never trained (run.steps=0 on DeepSpeed)
        from safetensors import safe_open

        from trainer.engines.base import frozen_student_files

        where = {}
        for file in frozen_student_files(path):
            with safe_open(file, "pt") as f:
                where.update(dict.fromkeys(f.keys(), file))

        def read(group: dict[str, Spec]) -> dict[str, torch.Tensor]:
            out = {}
            for name in group:
                if name not in where:
                    raise ValueError(f"{path}: the student checkpoint has no tensor {name}")
                with safe_open(where[name], "pt") as f:
                    out[name] = f.get_tensor(name)
            return out

        return read
    if engine_format == "deepspeed":
        from trainer.engines.deepspeed import read_fp32_student

        lazy = read_fp32_student(path, lazy=True)
        return lambda group: {name: _materialise(lazy, name, path) for name in group}
    raise ValueError(f"{path}: unknown engine checkpoint format {engine_format!r}")


def _read_dcp(path: Path, group: dict[str, Spec]) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    from trainer.engines.base import _single_process_quiet

    state = {"model": {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in group.items()}}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=True)  # only these keys are read
    return state["model"]


def _materialise(lazy: dict, name: str, path: Path) -> torch.Tensor:
    if name not in lazy:
        raise ValueError(f"{path}: the DeepSpeed checkpoint has no tensor {name}")
    value = lazy[name]
    return value.contiguous() if not isinstance(value, torch.Tensor) else value  # GatheredTensor -> tensor


def _teacher_reader(cfg: TrainConfig) -> object:
    """The teacher's weights by name (a ``pruning.stream`` reader): ``model.pretrained``, or, without a file,
    the seeded init the run built (a whole CLIP for open_clip; test-size models only)."""
    if cfg.model.pretrained is not None:
        return open_checkpoint(cfg.model.pretrained)
    from pruning.stream import StateDictSource

    torch.manual_seed(cfg.run.seed)  # the teacher's init, as build_models makes it
    if cfg.model.family == OPEN_CLIP:
        import open_clip

        from pruning.export import weights_loaded_elsewhere

        with weights_loaded_elsewhere():
            model = open_clip.create_model(cfg.model.name, pretrained=None, **cfg.model.kwargs)
    else:
        model = get_adapter(cfg.model.family).build(cfg.model)
    return StateDictSource({k: v.detach() for k, v in model.state_dict().items()}, f"<{cfg.model.name} init>")


def _head_tensors(cfg: TrainConfig, head: dict[str, Spec], teacher: object) -> dict[str, torch.Tensor]:
    """The tensors ``strip_head`` removed (never trained), from the teacher's weights."""
    keys = set(teacher.keys())
    out = {}
    for name in head:
        # A whole CLIP file keeps the image tower under "visual."; timm files may carry "module.".
        found = next((k for k in (name, f"visual.{name}", f"module.{name}") if k in keys), None)
        if found is None:
            raise ValueError(f"model.pretrained: {cfg.model.pretrained} has no tensor {name} (needed for export)")
        out[name] = teacher.get(found).to(head[name][1])  # the dtype the built teacher holds
    return out
