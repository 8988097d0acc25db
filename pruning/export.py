"""Name the architecture of a checkpoint, and save/load pruned models in stock library formats.

Uniform widths are stock configs (EVA towers get a registered timm name); per-layer widths only
``load_pruned`` builds. The export format is in docs/pruning_stream.md ("Output").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .sites import MlpSite, find_mlp_sites
from .skeleton import parameters_on_meta
from .surgery import resize_mlps

OPEN_CLIP = "open_clip"
TIMM = "timm"
PRUNING_KEY = "dgmr_pruning"
"""Config key holding what pruning did: base model, per-site widths, registered timm names."""

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # a full CLIP state dict (open_clip's local-dir: name)
OPEN_CLIP_VISUAL_WEIGHTS = "open_clip_visual.safetensors"  # keys of model.visual.state_dict()
TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = "model.safetensors"

# Hub/location fields of a timm pretrained_cfg describe the base weights, not the pruned ones.
_TIMM_CFG_DROP = ("url", "hf_hub_id", "hf_hub_filename", "file", "source", "tag", "state_dict")


@dataclass
class Architecture:
    """A model named in open_clip or timm, built on the meta device: names and shapes, no memory."""

    family: str  # open_clip or timm
    name: str  # model name in that library
    model: nn.Module  # the whole model on meta (a CLIP model for open_clip)
    tower_path: str  # module path of the pruned tower in model: "visual" for open_clip, "" for timm
    kwargs: dict = field(default_factory=dict)  # a timm model's constructor arguments, kept in model_args

    @property
    def tower(self) -> nn.Module:
        return self.model.get_submodule(self.tower_path)

    def sites(self) -> list[MlpSite]:
        """MLP sites of the tower, paths relative to the tower."""
        return find_mlp_sites(self.tower)


RANDOM_INIT_WARNING = "No pretrained weights loaded for model"  # open_clip's, logged on the root logger


@contextlib.contextmanager
def weights_loaded_elsewhere() -> Iterator[None]:
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" (only it, only in this
    block): where our code fills the weights right after, users read it as "your checkpoint was ignored"."""

    def quiet(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(RANDOM_INIT_WARNING)

    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def resolve_architecture(model_name: str, kwargs: dict | None = None) -> Architecture:
    """Build ``open_clip:NAME``, ``timm:NAME`` or a bare name (open_clip first) with ``parameters_on_meta``;
    ``kwargs``: a timm model's constructor arguments."""
    family, _, name = model_name.partition(":") if ":" in model_name else ("", "", model_name)
    if family not in ("", OPEN_CLIP, TIMM):
        raise ValueError(f"model {model_name!r}: prefix must be 'open_clip:' or 'timm:'")
    import open_clip
    import timm

    kwargs = dict(kwargs or {})
    if family in ("", OPEN_CLIP) and open_clip.get_model_config(name) is not None:
        if kwargs:
            raise ValueError(f"model {model_name!r}: model keyword arguments apply to timm models; for open_clip "
                             "register a model config (--model-config)")
        with parameters_on_meta(), weights_loaded_elsewhere():
            model = open_clip.create_model(name, pretrained=None, device="meta")
        return Architecture(OPEN_CLIP, name, model, "visual")
    if family in ("", TIMM) and timm.is_model(name):
        try:
            with parameters_on_meta():
                model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as err:
            raise ValueError(f"timm model {name!r} does not take the keyword arguments {kwargs}: {err}") from None
        return Architecture(TIMM, name, model, "", kwargs)
    raise ValueError(f"model {model_name!r} is neither an open_clip model config nor a timm model name")


def build_initialized(arch: Architecture, seed: int) -> nn.Module:
    """The real model with its own init weights, seeded (dry runs and tests without a checkpoint)."""
    import open_clip
    import timm

    torch.manual_seed(seed)
    if arch.family == OPEN_CLIP:
        return open_clip.create_model(arch.name, pretrained=None)
    return timm.create_model(arch.name, pretrained=False, **arch.kwargs)


def mlp_ratio_for(width: int, hidden: int) -> float:
    """An mlp_ratio for which ``int(width * ratio) == hidden`` (open_clip and timm truncate)."""
    # hidden / width can land just below hidden after the product; the midpoint never does.
    ratio = (hidden + 0.5) / width
    if int(width * ratio) != hidden:
        raise ValueError(f"no mlp_ratio gives hidden {hidden} for width {width}")
    return ratio


def pruned_timm_name(base: str, hidden: int) -> str:
    """The registered timm name of ``base`` with every MLP ``hidden`` wide."""
    return f"{base}_dgmr_mlp{hidden}"


# Entrypoints need a module of their own: timm's registry records (and edits __all__ of) it.
_REGISTRY_MODULE = "pruning._registered_timm_models"


def register_pruned_timm_model(base: str, mlp_ratio: float, name: str) -> str:
    """Register timm model ``name`` = ``base`` built with ``mlp_ratio``; idempotent. Returns ``name``."""
    import timm
    from timm.models import register_model

    module = sys.modules.setdefault(_REGISTRY_MODULE, types.ModuleType(_REGISTRY_MODULE))
    known = module.__dict__.setdefault("ratios", {})
    if known.get(name) == (base, mlp_ratio) and timm.is_model(name):
        return name
    if not timm.is_model(base):
        raise ValueError(f"timm has no model named {base!r} (base of {name!r})")

    def entrypoint(pretrained: bool = False, **kwargs: object) -> nn.Module:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay")}
        return timm.create_model(base, pretrained=pretrained, mlp_ratio=mlp_ratio, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = _REGISTRY_MODULE
    register_model(entrypoint)
    known[name] = (base, mlp_ratio)
    return name


def register_pruned_timm_models(out_dir: str | os.PathLike) -> list[str]:
    """Register the timm names an exported open_clip config refers to; call before open_clip loads it."""
    config = _read_json(Path(out_dir) / OPEN_CLIP_CONFIG)
    entries = config.get(PRUNING_KEY, {}).get("timm_models", {})
    return [register_pruned_timm_model(e["base"], e["mlp_ratio"], name) for name, e in entries.items()]


def export_configs(arch: Architecture, widths: dict[str, int], *, visual_only: bool) -> tuple[str, dict, bool]:
    """(config file name, config, stock_buildable) for a tower whose site ``path -> hidden`` is ``widths``;
    ``stock_buildable`` claims the stock library builds them from the config alone (``check_stock_build``)."""
    sites = arch.sites()
    uniform = len(set(widths.values())) == 1 and len({s.width for s in sites}) == 1
    hidden, width = next(iter(widths.values())), sites[0].width
    record: dict = {"base_model": arch.name, "family": arch.family, "tower": arch.tower_path,
                    "mlp_hidden": dict(widths), "visual_only": visual_only}
    if arch.family == TIMM:
        config = {"architecture": arch.name, "num_classes": arch.model.num_classes,
                  "num_features": arch.model.num_features,
                  "pretrained_cfg": {k: v for k, v in arch.model.pretrained_cfg.items() if k not in _TIMM_CFG_DROP},
                  "model_args": {**arch.kwargs, **({"mlp_ratio": mlp_ratio_for(width, hidden)} if uniform else {})}}
        return TIMM_CONFIG, {**config, PRUNING_KEY: record}, uniform
    import open_clip

    model_cfg = open_clip.get_model_config(arch.name)  # a fresh copy
    if model_cfg is None:
        raise ValueError(f"open_clip has no model config named {arch.name!r}")
    vision_cfg = model_cfg["vision_cfg"]
    if uniform and vision_cfg.get("timm_model_name"):
        base = vision_cfg["timm_model_name"]
        name = vision_cfg["timm_model_name"] = pruned_timm_name(base, hidden)
        record["timm_models"] = {name: {"base": base, "mlp_ratio": mlp_ratio_for(width, hidden)}}
    elif uniform:
        vision_cfg["mlp_ratio"] = mlp_ratio_for(width, hidden)
    return OPEN_CLIP_CONFIG, {"model_cfg": model_cfg, PRUNING_KEY: record}, uniform


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"not a pruned model directory: {path} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def read_pruning_record(out_dir: str | os.PathLike) -> tuple[str, dict]:
    """(config file name, config) of an exported directory, open_clip or timm."""
    out_dir = Path(out_dir)
    for name in (OPEN_CLIP_CONFIG, TIMM_CONFIG):
        if (out_dir / name).is_file():
            config = _read_json(out_dir / name)
            if PRUNING_KEY in config:
                return name, config
    raise FileNotFoundError(f"{out_dir}: no {OPEN_CLIP_CONFIG} or {TIMM_CONFIG} with a {PRUNING_KEY!r} record")


def weights_file(family: str, visual_only: bool) -> str:
    """The export's weights file name: timm model, open_clip visual tower, or full CLIP."""
    if family != OPEN_CLIP:
        return TIMM_WEIGHTS
    return OPEN_CLIP_VISUAL_WEIGHTS if visual_only else OPEN_CLIP_WEIGHTS


def _build_stock(out_dir: Path, device: str | torch.device) -> tuple[nn.Module, dict]:
    """(the model the stock library builds from an export's config, without weights; the pruning record)."""
    import open_clip
    import timm

    _, config = read_pruning_record(out_dir)
    record = config[PRUNING_KEY]
    if record["family"] == OPEN_CLIP:
        register_pruned_timm_models(out_dir)
    with torch.device(device), weights_loaded_elsewhere():
        if record["family"] == OPEN_CLIP:
            model = open_clip.create_model(f"local-dir:{out_dir}", load_weights=False, device=device)
        else:
            model = timm.create_model(record["base_model"], pretrained=False, **config.get("model_args", {}))
    return model, record


def build_pruned(out_dir: str | os.PathLike, *, device: str | torch.device = "meta") -> nn.Module:
    """The pruned architecture of an export, without weights: whole model (open_clip) or timm model."""
    out_dir = Path(out_dir)
    model, record = _build_stock(out_dir, device)
    tower = model.get_submodule(record["tower"])
    missing = [s.path for s in find_mlp_sites(tower) if s.path not in record["mlp_hidden"]]
    if missing:
        raise ValueError(f"{out_dir}: no stored width for MLP site {missing[0]}")
    resize_mlps(tower, record["mlp_hidden"])  # values are overwritten by the load
    return model


def check_stock_build(out_dir: str | os.PathLike) -> bool:
    """Whether the stock library alone (no per-site shrinking) builds the stored widths."""
    model, record = _build_stock(Path(out_dir), "meta")
    built = {s.path: s.hidden for s in find_mlp_sites(model.get_submodule(record["tower"]))}
    return built == record["mlp_hidden"]


def load_pruned(out_dir: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Load an export: the CLIP model (full checkpoints), the visual tower (visual-only), or the timm model."""
    from safetensors.torch import load_file

    record = read_pruning_record(out_dir)[1][PRUNING_KEY]
    model = build_pruned(out_dir, device="cpu")
    target = model.visual if record["family"] == OPEN_CLIP and record["visual_only"] else model
    weights = Path(out_dir) / weights_file(record["family"], record["visual_only"])
    target.load_state_dict(load_file(weights), strict=True)
    return target.to(device)
