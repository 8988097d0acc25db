"""The trained student of a checkpoint, read one transformer block at a time (for ``python -m trainer export``).

The student's architecture is built on the meta device (shapes only). Its trained tensors are read from
the engine's files in groups, one block per group (DCP: a partial ``dcp.load`` of those keys; DeepSpeed:
``zero_to_fp32`` in lazy mode, materialised key by key), so the export holds at most one block of
weights, never the whole student. The parts ``strip_head`` removed (final norm, head) were never trained:
they come from the teacher's weight file, read by name; a teacher without a file (seeded random init)
is rebuilt whole to reproduce them, which only test-size models do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pruning.sites import find_mlp_sites
from pruning.stream import open_checkpoint
from pruning.surgery import keep_counts, prune_site
from trainer.config import TrainConfig
from trainer.models.meta import build_on_meta
from trainer.models.registry import get_adapter

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


def meta_student(cfg: TrainConfig) -> nn.Module:
    """The pruned student on the meta device, head included: shapes and config, no memory."""
    model = build_on_meta(cfg.model)
    sites = find_mlp_sites(model)
    counts = keep_counts(sites, cfg.prune.ratio, None)
    for site in sites:  # only widths matter: the trained values are read afterwards
        prune_site(model, site, torch.arange(counts[site.path]))
    return model


def student_layout(cfg: TrainConfig) -> StudentLayout:
    """The pruned student's tensors from shapes alone: meta build, pruned widths, head stripped."""
    adapter = get_adapter(cfg.model.family)
    model = meta_student(cfg)
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


def iter_student_tensors(cfg: TrainConfig, engine_format: str, engine_dir: Path,
                         layout: StudentLayout) -> Iterator[tuple[str, torch.Tensor]]:
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
    yield from _head_tensors(cfg, layout.head).items()


def _specs(model: nn.Module) -> dict[str, Spec]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _engine_reader(engine_format: str, path: Path):
    if engine_format == "dcp":
        return lambda group: _read_dcp(path, group)
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


def _head_tensors(cfg: TrainConfig, head: dict[str, Spec]) -> dict[str, torch.Tensor]:
    if not head:
        return {}
    if cfg.model.pretrained is None:
        torch.manual_seed(cfg.run.seed)  # the teacher's init, as build_models makes it
        state = get_adapter(cfg.model.family).build(cfg.model).state_dict()
        return {name: state[name].detach().clone() for name in head}
    source = open_checkpoint(cfg.model.pretrained)
    try:
        keys = set(source.keys())
        out = {}
        for name in head:
            # A whole CLIP file keeps the image tower under "visual."; timm files may carry "module.".
            found = next((k for k in (name, f"visual.{name}", f"module.{name}") if k in keys), None)
            if found is None:
                raise ValueError(f"model.pretrained: {cfg.model.pretrained} has no tensor {name} (needed for export)")
            out[name] = source.get(found).to(head[name][1])  # the dtype the built teacher holds
        return out
    finally:
        source.close()
