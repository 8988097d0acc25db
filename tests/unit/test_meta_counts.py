"""Meta-device builds of the full-size towers: exact parameter counts, before and after r=1 pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from pruning_helpers import prune_model

from trainer.config import ModelConfig
from trainer.models.meta import FULL_SIZE, build_on_meta, param_count, pruned_param_count, tower_shapes
from trainer.models.registry import get_adapter

pytestmark = pytest.mark.unit

# (visual params, after r=1, paper's rounded figure after r=1 in billions, digits it is given to)
KNOWN = {
    "EVA02-E-14-plus": (4_350_556_928, 1_237_515_008, 1.2, 1),
    "ViT-g-14": (1_012_645_632, 478_993_152, 0.48, 2),
    "ViT-bigG-14": (1_844_907_264, 801_785_088, None, None),
}

TINY = {
    "timm plain": ModelConfig(family="timm", name="vit_tiny_patch16_224",
                              kwargs={"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}),
    "timm swiglu + mlp norm": ModelConfig(family="timm", name="eva02_tiny_patch14_224",
                                          kwargs={"img_size": 28, "depth": 2}),
    "timm fused glu": ModelConfig(family="timm", name="vit_tiny_patch16_224",
                                  kwargs={"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64,
                                          "num_heads": 2, "mlp_layer": "glu"}),
    "open_clip": ModelConfig(family="open_clip", name="ViT-Tiny-8"),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_counts_on_meta(name: str) -> None:
    model = build_on_meta(FULL_SIZE[name])
    assert all(p.is_meta for p in model.parameters())
    full, pruned, paper, digits = KNOWN[name]
    assert param_count(model) == full
    assert pruned_param_count(model, 1.0) == pruned
    if paper is not None:
        assert round(pruned / 1e9, digits) == paper


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0])
def test_count_matches_real_prune(name: str, ratio: float) -> None:
    cfg = TINY[name]
    if cfg.kwargs.get("mlp_layer") == "glu":
        from timm.layers import GluMlp

        cfg = ModelConfig(family=cfg.family, name=cfg.name, kwargs={**cfg.kwargs, "mlp_layer": GluMlp})
    torch.manual_seed(0)
    model = get_adapter(cfg.family).build(cfg)
    predicted = pruned_param_count(model, ratio)
    report = prune_model(copy.deepcopy(model), ratio=ratio, method="random",
                         generator=torch.Generator().manual_seed(0))
    assert predicted == report.model_params_after
    assert report.model_params_after <= report.model_params_before


def test_tower_shapes_match_real_pruned_blocks() -> None:
    cfg = TINY["open_clip"]
    teacher, student = tower_shapes(cfg, 0.5)
    adapter = get_adapter(cfg.family)
    model = adapter.build(cfg)
    adapter.strip_head(model)
    pruned = copy.deepcopy(model)
    prune_model(pruned, ratio=0.5, method="l2")
    assert (teacher.params, student.params) == (param_count(model), param_count(pruned))
    assert teacher.block_params == max(param_count(b) for b in adapter.blocks(model))
    assert student.block_params == max(param_count(b) for b in adapter.blocks(pruned))
    assert (teacher.blocks, teacher.width, teacher.mlp_hidden, student.mlp_hidden) == (2, 64, 256, 32)
    assert teacher.tokens == model(torch.randn(1, 3, 32, 32)).shape[1] == 17
    assert teacher.image_size == 32


def test_ratio_beyond_hidden_names_ratio() -> None:
    with pytest.raises(ValueError, match="ratio"):
        tower_shapes(TINY["open_clip"], 5.0)
