"""Model adapters: the head-stripped model returns exactly the tokens entering the final norm."""

from __future__ import annotations

import copy

import pytest
import torch

from trainer.cli import load_config
from trainer.config import ModelConfig
from trainer.models.registry import get_adapter

pytestmark = pytest.mark.unit


def build(yaml_path):
    cfg = load_config(yaml_path)
    adapter = get_adapter(cfg.model.family)
    torch.manual_seed(0)
    return adapter, adapter.build(cfg.model)


@pytest.mark.parametrize("which", ["tiny_timm_yaml", "tiny_open_clip_yaml"])
def test_stripped_model_returns_pre_norm_tokens(which: str, request: pytest.FixtureRequest) -> None:
    adapter, model = build(request.getfixturevalue(which))
    model.eval()
    original = copy.deepcopy(model)
    final_norm = original.norm if hasattr(original, "norm") else original.ln_post
    seen = []
    final_norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full_output = original(images)
        layout = adapter.strip_head(model)
        tokens = model(images)
    assert tokens.shape == (3, 1 + 16, 64)
    assert torch.equal(tokens, seen[0])
    # The removed parts, put back on the tokens, give the original output.
    removed = layout.removed
    with torch.no_grad():
        if "ln_post" in removed:
            rebuilt = removed["ln_post"](tokens)[:, 0] @ removed["proj"]
        else:
            rebuilt = removed["head"](removed["fc_norm"](removed["norm"](tokens)[:, 0]))
    torch.testing.assert_close(rebuilt, full_output, rtol=0, atol=1e-6)
    pooled, patches = layout.split(tokens)
    assert torch.equal(pooled, tokens[:, 0]) and torch.equal(patches, tokens[:, 1:])


@pytest.mark.parametrize("which", ["tiny_timm_yaml", "tiny_open_clip_yaml"])
def test_blocks_and_input_spec(which: str, request: pytest.FixtureRequest) -> None:
    adapter, model = build(request.getfixturevalue(which))
    assert len(adapter.blocks(model)) == 2
    spec = adapter.input_spec(model)
    assert spec.image_size == 32 and len(spec.mean) == len(spec.std) == 3


def test_unknown_family_and_missing_weights(tmp_path) -> None:
    with pytest.raises(ValueError, match="model.family"):
        get_adapter("hf")
    cfg = ModelConfig(family="timm", name="vit_tiny_patch16_224", pretrained=str(tmp_path / "none.pt"))
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        get_adapter("timm").build(cfg)


def test_pretrained_teacher_loads_exactly(tmp_path, tiny_timm_yaml) -> None:
    adapter, model = build(tiny_timm_yaml)
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    cfg = load_config(tiny_timm_yaml, [f"model.pretrained={path}", "run.seed=1"])
    torch.manual_seed(1)
    loaded = adapter.build(cfg.model)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_weights_of_another_architecture_are_one_line_naming_the_file(tiny_timm_yaml, tiny_open_clip_yaml,
                                                                       tmp_path) -> None:
    import dataclasses

    from safetensors.torch import save_file

    timm_cfg, clip_cfg = load_config(tiny_timm_yaml).model, load_config(tiny_open_clip_yaml).model
    _, timm_model = build(tiny_timm_yaml)
    wrong = tmp_path / "timm_tower.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, wrong)
    with pytest.raises(ValueError, match=rf"^model.pretrained: {wrong} does not fit open_clip '{clip_cfg.name}': \S"):
        get_adapter("open_clip").build(dataclasses.replace(clip_cfg, pretrained=str(wrong)))
    _, clip_tower = build(tiny_open_clip_yaml)
    other = tmp_path / "clip_tower.safetensors"
    save_file({k: v.contiguous() for k, v in clip_tower.state_dict().items()}, other)
    with pytest.raises(ValueError, match=rf"^model.pretrained: {other} does not fit timm '{timm_cfg.name}': \S") as err:
        get_adapter("timm").build(dataclasses.replace(timm_cfg, pretrained=str(other)))
    assert "\n" not in str(err.value)
