"""Export configs: stock ratios that give exact widths, registered timm names, real ViT-g configs."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from pruning.export import (
    OPEN_CLIP_CONFIG,
    PRUNING_KEY,
    check_stock_build,
    export_configs,
    mlp_ratio_for,
    read_pruning_record,
    register_pruned_timm_model,
    resolve_architecture,
)

pytestmark = pytest.mark.unit


def test_plain_ratio_truncates_which_is_why_mlp_ratio_for_exists():
    assert int(1408 * (960 / 1408)) == 959


@pytest.mark.parametrize("width", [64, 768, 1408, 1792])
def test_mlp_ratio_gives_every_width_exactly(width):
    for hidden in range(1, 9 * width):
        assert int(width * mlp_ratio_for(width, hidden)) == hidden


def test_registered_timm_name_builds_base_with_pruned_width():
    name = register_pruned_timm_model("vit_tiny_patch16_224", mlp_ratio_for(192, 100), "dgmr_test_vit_tiny_h100")
    assert register_pruned_timm_model("vit_tiny_patch16_224", mlp_ratio_for(192, 100), name) == name  # idempotent
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    assert {b.mlp.fc1.out_features for b in model.blocks} == {100}
    assert {b.mlp.fc2.in_features for b in model.blocks} == {100}
    with pytest.raises(ValueError, match="no_such_model"):
        register_pruned_timm_model("no_such_model", 1.0, "dgmr_test_none")


@pytest.mark.parametrize("model_name, hidden", [("ViT-g-14", 960), ("EVA02-E-14-plus", 1792)])
def test_uniform_width_of_big_models_is_a_stock_config(tmp_path, model_name, hidden):
    arch = resolve_architecture(model_name)
    widths = {s.path: hidden for s in arch.sites()}
    name, config, claimed = export_configs(arch, widths, visual_only=True)
    assert name == OPEN_CLIP_CONFIG and claimed
    (tmp_path / name).write_text(json.dumps(config))
    assert check_stock_build(tmp_path)
    assert read_pruning_record(tmp_path)[1][PRUNING_KEY]["mlp_hidden"] == widths


def test_unknown_model_and_missing_export_are_named():
    with pytest.raises(ValueError, match="no-such-net"):
        resolve_architecture("no-such-net")
    with pytest.raises(ValueError, match="prefix"):
        resolve_architecture("hf:thing")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_pruning_record("/nowhere")
