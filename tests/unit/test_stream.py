"""Streaming checkpoint pruning: exports load with stock open_clip / timm and equal in-memory pruning."""

from __future__ import annotations

import json

import open_clip
import pytest
import timm
import torch
from pruning_helpers import prune_checkpoint, prune_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models import register_model
from timm.models.eva import Eva
from torch import nn

from pruning.export import (
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_VISUAL_WEIGHTS,
    OPEN_CLIP_WEIGHTS,
    PRUNING_KEY,
    TIMM_WEIGHTS,
    load_pruned,
    pruned_timm_name,
    register_pruned_timm_models,
)
from pruning.stream import REPORT_JSON, REPORT_MD

pytestmark = pytest.mark.unit

TINY_VIT = "dgmr-test-tiny-vit"
TINY_EVA = "dgmr-test-tiny-eva"
_TEXT = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
TINY_CONFIGS = {
    # Block width 64, MLP 256: open_clip's own VisionTransformer (c_fc/c_proj).
    TINY_VIT: {"embed_dim": 32, "text_cfg": _TEXT,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8}},
    # EVA02-E-14-plus in small: a timm Eva trunk (post-norm blocks, GELU fc1/fc2) in CustomTextCLIP.
    TINY_EVA: {"embed_dim": 32, "text_cfg": _TEXT, "custom_text": True,
               "vision_cfg": {"image_size": 28, "timm_model_name": "dgmr_test_eva_postnorm_tiny",
                              "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None}},
}


@register_model
def dgmr_test_eva_postnorm_tiny(pretrained: bool = False, **kwargs: object) -> nn.Module:
    """eva02_enormous_patch14_clip_224's block design at width 64, depth 2, MLP ratio 4."""
    args = {"img_size": 28, "patch_size": 14, "embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0,
            "use_post_norm": True, "global_pool": "token"}
    args.update({k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")})
    return Eva(**args)


@pytest.fixture(scope="module", autouse=True)
def tiny_configs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in TINY_CONFIGS.items():
        path = directory / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)


def seeded_open_clip(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None).eval()


def images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", ["full", "visual", "visual_prefixed"])
def test_open_clip_export_loads_with_stock_open_clip_and_equals_in_memory_pruning(tmp_path, layout):
    model = seeded_open_clip(TINY_VIT)
    if layout == "full":
        ckpt = tmp_path / "ckpt.safetensors"
        save_file(model.state_dict(), ckpt)
    elif layout == "visual":
        ckpt = tmp_path / "visual.pt"
        torch.save(model.visual.state_dict(), ckpt)
    else:
        ckpt = tmp_path / "visual_prefixed.bin"
        torch.save({"state_dict": {f"module.visual.{k}": v for k, v in model.visual.state_dict().items()}}, ckpt)
    out = tmp_path / "out"
    report = prune_checkpoint(TINY_VIT, out, checkpoint=ckpt, ratio=1.0)

    if layout == "full":
        loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
        assert preprocess is not None
    else:  # the documented stock recipe for a visual-only export
        loaded = open_clip.create_model(f"local-dir:{out}", load_weights=False)
        loaded.visual.load_state_dict(load_file(out / OPEN_CLIP_VISUAL_WEIGHTS))
    expected = prune_model(model.visual, ratio=1.0)
    loaded.eval()
    x = images(32)
    torch.testing.assert_close(loaded.visual(x), model.visual(x), rtol=0, atol=0)
    assert report.to_dict() == expected.to_dict()
    assert [s.hidden_after for s in report.sites] == [64, 64]
    config = json.loads((out / OPEN_CLIP_CONFIG).read_text())
    assert config["model_cfg"]["vision_cfg"]["mlp_ratio"] == 64.5 / 64
    assert config[PRUNING_KEY]["stock_loadable"] is True
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS if layout == "full" else OPEN_CLIP_VISUAL_WEIGHTS,
         REPORT_JSON, REPORT_MD])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_full_clip_text_tower_is_copied_unchanged(tmp_path):
    model = seeded_open_clip(TINY_VIT)
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(model.state_dict(), ckpt)
    prune_checkpoint(TINY_VIT, tmp_path / "out", checkpoint=ckpt, ratio=0.5)
    with safe_open(tmp_path / "out" / OPEN_CLIP_WEIGHTS, framework="pt") as f:
        for key, value in model.state_dict().items():
            if not key.startswith("visual.transformer.resblocks"):
                assert torch.equal(f.get_tensor(key), value), key


def test_keep_all_reproduces_the_checkpoint_bit_for_bit_in_bf16(tmp_path):
    model = seeded_open_clip(TINY_VIT)
    state = {k: v.bfloat16() for k, v in model.visual.state_dict().items()}
    ckpt = tmp_path / "visual.safetensors"
    save_file(state, ckpt)
    report = prune_checkpoint(TINY_VIT, tmp_path / "out", checkpoint=ckpt, num_keep=256)
    written = load_file(tmp_path / "out" / OPEN_CLIP_VISUAL_WEIGHTS)
    assert written.keys() == state.keys()
    for key, value in state.items():
        assert written[key].dtype == torch.bfloat16 and torch.equal(written[key], value), key
    assert report.model_params_after == report.model_params_before


def test_eva_tower_loads_through_registered_timm_name(tmp_path):
    model = seeded_open_clip(TINY_EVA)
    out = tmp_path / "out"
    report = prune_checkpoint(TINY_EVA, out, ratio=1.5)  # own init weights, same seed
    config = json.loads((out / OPEN_CLIP_CONFIG).read_text())
    name = pruned_timm_name("dgmr_test_eva_postnorm_tiny", 96)
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == name
    assert register_pruned_timm_models(out) == [name] and timm.is_model(name)
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    loaded.eval()
    expected = prune_model(model.visual, ratio=1.5)
    assert report.to_dict() == expected.to_dict()
    assert [type(b.mlp.fc1) for b in loaded.visual.trunk.blocks] == [nn.Linear, nn.Linear]
    assert loaded.visual.trunk.blocks[0].mlp.fc1.out_features == 96
    x = images(28)
    torch.testing.assert_close(loaded.encode_image(x), model.encode_image(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "eva02_tiny_patch14_224"])
def test_timm_export_loads_with_stock_timm_local_dir(tmp_path, name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    ckpt = tmp_path / "timm.safetensors"
    save_file(model.state_dict(), ckpt)
    out = tmp_path / "out"
    report = prune_checkpoint(f"timm:{name}", out, checkpoint=ckpt, ratio=1.0, method="l2")
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    expected = prune_model(model, ratio=1.0, method="l2")
    assert report.to_dict() == expected.to_dict()
    assert (out / TIMM_WEIGHTS).is_file()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_per_layer_widths_need_load_pruned_and_say_so(tmp_path):
    model = seeded_open_clip(TINY_VIT)
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(model.state_dict(), ckpt)
    widths = {"transformer.resblocks.0.mlp": 40, "transformer.resblocks.1.mlp": 100}
    out = tmp_path / "out"
    report = prune_checkpoint(TINY_VIT, out, checkpoint=ckpt, num_keep=widths, method="random", seed=3)
    record = json.loads((out / OPEN_CLIP_CONFIG).read_text())[PRUNING_KEY]
    assert record["mlp_hidden"] == widths and record["stock_loadable"] is False
    summary = json.loads((out / REPORT_JSON).read_text())
    assert summary["stock_loadable"] is False and "load_pruned" in summary["how_to_load"]
    with pytest.raises(Exception, match="size mismatch"):
        open_clip.create_model(f"local-dir:{out}")
    loaded = load_pruned(out).eval()
    expected = prune_model(model.visual, num_keep=widths, method="random",
                           generator=torch.Generator().manual_seed(3))
    assert report.to_dict() == expected.to_dict()
    x = images(32)
    torch.testing.assert_close(loaded.encode_image(x), model.encode_image(x), rtol=0, atol=0)


def _no_output(tmp_path, out):
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_checkpoint_of_another_architecture_names_the_tensor(tmp_path):
    state = seeded_open_clip(TINY_VIT).visual.state_dict()
    missing = dict(state)
    del missing["transformer.resblocks.1.mlp.c_fc.bias"]
    save_file(missing, tmp_path / "missing.safetensors")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"'transformer\.resblocks\.1\.mlp\.c_fc\.bias' is missing"):
        prune_checkpoint(TINY_VIT, out, checkpoint=tmp_path / "missing.safetensors", ratio=1.0)
    wrong = dict(state)
    wrong["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3, 64)
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match=r"'transformer\.resblocks\.0\.attn\.in_proj_weight' has shape \(3, 64\)"):
        prune_checkpoint(TINY_VIT, out, checkpoint=tmp_path / "wrong.safetensors", ratio=1.0)
    _no_output(tmp_path, out)


def test_truncated_or_foreign_checkpoints_fail_clearly_and_leave_nothing(tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(seeded_open_clip(TINY_VIT).state_dict(), ckpt)
    data = ckpt.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="truncated"):
        prune_checkpoint(TINY_VIT, out, checkpoint=tmp_path / "cut.safetensors", ratio=1.0)
    torch.save(seeded_open_clip(TINY_VIT).state_dict(), tmp_path / "ckpt.pt")
    pt = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(pt[: len(pt) // 2])
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        prune_checkpoint(TINY_VIT, out, checkpoint=tmp_path / "cut.pt", ratio=1.0)
    (tmp_path / "notes.bin").write_text("hello")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        prune_checkpoint(TINY_VIT, out, checkpoint=tmp_path / "notes.bin", ratio=1.0)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        prune_checkpoint(TINY_VIT, out, checkpoint=tmp_path / "nothing.safetensors", ratio=1.0)
    _no_output(tmp_path, out)


def test_bad_widths_and_existing_output_are_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="keeps 320 hidden units but the MLP has only 256"):
        prune_checkpoint(TINY_VIT, out, ratio=5.0)
    with pytest.raises(ValueError, match=r"in \[1, 256\], got 257"):
        prune_checkpoint(TINY_VIT, out, num_keep=257)
    with pytest.raises(ValueError, match="unknown MLP sites"):
        prune_checkpoint(TINY_VIT, out, num_keep={"blocks.0.mlp": 3})
    with pytest.raises(ValueError, match="taylor needs activations"):
        prune_checkpoint(TINY_VIT, out, ratio=1.0, method="taylor")
    _no_output(tmp_path, out)
    prune_checkpoint(TINY_VIT, out, ratio=1.0)
    with pytest.raises(FileExistsError, match="overwrite"):
        prune_checkpoint(TINY_VIT, out, ratio=0.5)
    prune_checkpoint(TINY_VIT, out, ratio=0.5, overwrite=True)
    assert [s["hidden_after"] for s in json.loads((out / REPORT_JSON).read_text())["sites"]] == [32, 32]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
