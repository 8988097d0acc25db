"""Full-size towers built on the meta device (shapes, no memory) and parameter counting after pruning.

Selection needs real weight values, so counts after pruning come from ``num_keep`` arithmetic: every
tensor a site slices has a size proportional to the site's hidden width (``MlpSite.parameter_names``),
which is exactly what ``pruning.prune_blocks`` leaves for a uniform ratio.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

import pruning
from pruning import find_mlp_sites
from trainer.config import ModelConfig
from trainer.models.registry import get_adapter

FULL_SIZE: dict[str, ModelConfig] = {
    "EVA02-E-14-plus": ModelConfig(family="open_clip", name="EVA02-E-14-plus"),
    "ViT-g-14": ModelConfig(family="open_clip", name="ViT-g-14"),
    "ViT-bigG-14": ModelConfig(family="open_clip", name="ViT-bigG-14"),
}
"""The supported full-size teachers (image towers), by open_clip name."""


@dataclass(frozen=True)
class TowerShape:
    """What memory planning needs to know about a vision tower."""

    params: int
    """Parameters the engines hold: the tower without final norm / head (``strip_head``), after pruning."""
    params_with_head: int
    """All parameters of the tower, after pruning."""
    blocks: int
    """Transformer blocks."""
    block_params: int
    """Parameters of the largest block (the unit that is gathered whole under ZeRO-3 / FSDP)."""
    tokens: int
    """Sequence length T entering the blocks (prefix + patch tokens)."""
    width: int
    """Block width D."""
    mlp_hidden: int
    """MLP hidden width H of the widest block."""
    image_size: int
    """Input image side in pixels."""


def build_on_meta(cfg: ModelConfig) -> nn.Module:
    """The tower of ``cfg`` with every tensor on the meta device; ``cfg.pretrained`` is ignored."""
    adapter = get_adapter(cfg.family)
    kwargs = dict(cfg.kwargs)
    if cfg.family == "open_clip":
        # open_clip moves the built model to ``device`` (cpu by default), which a meta tensor cannot do.
        kwargs["device"] = "meta"
    meta_cfg = ModelConfig(family=cfg.family, name=cfg.name, kwargs=kwargs, pretrained=None)
    with torch.device("meta"):
        return adapter.build(meta_cfg)


def parameters_on_meta() -> contextlib.AbstractContextManager[None]:
    """Build models inside this context to get parameters on meta and real buffers (sharded construction)."""
    return pruning.parameters_on_meta("model.kwargs: a dtype / precision cast is not supported with prune.in_engine")


def build_skeleton(cfg: ModelConfig) -> nn.Module:
    """The tower of ``cfg`` with parameters on meta and real buffers (rotary tables, k_bias): the shape of
    the model for sharded construction, where every rank fills only its own parameter shards.
    ``cfg.pretrained`` is ignored (the caller reads it shard by shard)."""
    adapter = get_adapter(cfg.family)
    with parameters_on_meta():
        return adapter.build(ModelConfig(family=cfg.family, name=cfg.name, kwargs=dict(cfg.kwargs), pretrained=None))


def param_count(model: nn.Module) -> int:
    """Number of parameters (works on meta tensors)."""
    return sum(p.numel() for p in model.parameters())


def removed_by_site(model: nn.Module, ratio: float) -> dict[str, int]:
    """Parameters pruning at ``ratio`` would remove, per MLP site path."""
    removed = {}
    widths = pruning.keep_counts(find_mlp_sites(model), ratio)
    for site in find_mlp_sites(model):
        keep = widths[site.path]
        tensors = dict(site.module(model).named_parameters())
        gone = 0
        for name in site.parameter_names():
            if name in tensors:  # bias-free layers have no bias tensor
                numel = tensors[name].numel()
                assert numel % site.hidden == 0, (site.path, name)
                gone += numel - numel // site.hidden * keep
        removed[site.path] = gone
    return removed


def pruned_param_count(model: nn.Module, ratio: float) -> int:
    """Parameters left after pruning at ``ratio``, without selecting anything."""
    return param_count(model) - sum(removed_by_site(model, ratio).values())


def tower_shapes(cfg: ModelConfig, ratio: float) -> tuple[TowerShape, TowerShape]:
    """(teacher, student pruned at ``ratio``) shapes from one meta build of ``cfg``."""
    adapter = get_adapter(cfg.family)
    model = build_on_meta(cfg)
    sites = find_mlp_sites(model)
    names = {id(m): n for n, m in model.named_modules()}
    blocks = adapter.blocks(model)
    prefixes = [names[id(block)] + "." for block in blocks]
    block_params = [param_count(block) for block in blocks]
    teacher_removed = {s.path: 0 for s in sites}
    student_removed = removed_by_site(model, ratio)
    with_head = param_count(model)
    seen: dict[str, int] = {}
    # The block input length counts prefix tokens as the family builds them, so ask the model itself.
    hook = blocks[0].register_forward_pre_hook(lambda _m, args: seen.setdefault("tokens", args[0].shape[1]) and None)
    size = adapter.input_spec(model).image_size
    adapter.strip_head(model)
    with torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    hook.remove()
    stripped = param_count(model)

    def shape(removed: dict[str, int], hidden: int) -> TowerShape:
        per_block = [n - sum(v for p, v in removed.items() if p.startswith(prefix))
                     for n, prefix in zip(block_params, prefixes, strict=True)]
        gone = sum(removed.values())
        return TowerShape(params=stripped - gone, params_with_head=with_head - gone, blocks=len(blocks),
                          block_params=max(per_block), tokens=int(seen["tokens"]), width=sites[0].width,
                          mlp_hidden=hidden, image_size=size)

    student_hidden = max(pruning.keep_counts(sites, ratio).values())
    return shape(teacher_removed, max(s.hidden for s in sites)), shape(student_removed, student_hidden)
