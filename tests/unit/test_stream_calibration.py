"""Streaming compensation (``prune_checkpoint(calibration=...)``): one block in memory at a time, and the
export equals in-memory ``prune_and_compensate`` on the same model, images and settings."""

from __future__ import annotations

import copy
import io
import json
import tarfile

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image
from pruning_helpers import prune_and_compensate, prune_and_compensate_blocks, prune_checkpoint, prune_model
from safetensors.torch import load_file, save_file
from timm.models import register_model
from timm.models.eva import Eva
from torch import nn

from pruning.blockwise import materialize_outside, stem_states
from pruning.calib_images import ImageSpec, load_calibration_images, shard_paths
from pruning.export import OPEN_CLIP_VISUAL_WEIGHTS, OPEN_CLIP_WEIGHTS, TIMM_WEIGHTS, load_pruned
from pruning.sites import find_mlp_sites
from pruning.skeleton import parameters_on_meta
from pruning.stream import REPORT_JSON, REPORT_MD

pytestmark = pytest.mark.unit

CLIP_NAME = "dgmr-test-calib-vit"
CLIP_CONFIG = {"embed_dim": 32,
               "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "patch_size": 8},
               "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


@register_model
def dgmr_test_calib_dinov2(pretrained: bool = False, **kwargs: object) -> nn.Module:
    """DINOv2 ViT design (layer scale, patch 14) at 28 px, width 64, depth 3."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    kwargs.setdefault("num_classes", 0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, embed_dim=64, depth=3,
                             num_heads=2, init_values=0.3, **kwargs)


@register_model
def dgmr_test_calib_vit(pretrained: bool = False, **kwargs: object) -> nn.Module:
    """timm ViT (no layer scale, class token, norm_pre=False) at 32 px, width 64, depth 3."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    kwargs.setdefault("num_classes", 0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                             depth=3, num_heads=2, **kwargs)


@register_model
def dgmr_test_calib_eva_post(pretrained: bool = False, **kwargs: object) -> nn.Module:
    """EVA02-E's design (timm's EVA-CLIP-E trunk: post-norm blocks, no rotary embedding) at 32 px, width 64."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    kwargs.setdefault("num_classes", 0)
    return timm.create_model("eva02_enormous_patch14_clip_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=64, depth=3, num_heads=2, **{"mlp_ratio": 4.0, **kwargs})


@register_model
def dgmr_test_calib_eva_post_rope(pretrained: bool = False, **kwargs: object) -> nn.Module:
    """The same with a rotary embedding: its tables are non-persistent buffers outside the blocks."""
    return dgmr_test_calib_eva_post(use_rot_pos_emb=True, ref_feat_shape=(4, 4), **kwargs)


@pytest.fixture(scope="module", autouse=True)
def clip_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / f"{CLIP_NAME}.json"
    path.write_text(json.dumps(CLIP_CONFIG))
    open_clip.add_model_config(path)


def _randomise_biases(model: nn.Module) -> nn.Module:
    # Stock inits zero the biases: give them values so the intercepts are exercised.
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def tiny(kind: str) -> tuple[str, nn.Module, nn.Module, int]:
    """(CLI model name, whole model, tower, image size) of a seeded tiny model."""
    torch.manual_seed(0)
    if kind == "open_clip":
        model = _randomise_biases(open_clip.create_model(CLIP_NAME, pretrained=None))
        return CLIP_NAME, model, model.visual, 32
    name = {"dinov2": "dgmr_test_calib_dinov2", "timm_vit": "dgmr_test_calib_vit"}[kind]
    model = _randomise_biases(timm.create_model(name, pretrained=False))
    return f"timm:{name}", model, model, 28 if kind == "dinov2" else 32


def in_memory_forward(kind: str):
    return (lambda m, x: m(x)) if kind == "open_clip" else (lambda m, x: m.forward_features(x))


def written(out, kind: str) -> dict[str, torch.Tensor]:
    """The exported tower's tensors (a full CLIP checkpoint is written whole; its visual part)."""
    if kind != "open_clip":
        return load_file(out / TIMM_WEIGHTS)
    if (out / OPEN_CLIP_VISUAL_WEIGHTS).is_file():
        return load_file(out / OPEN_CLIP_VISUAL_WEIGHTS)
    return {k[len("visual."):]: v for k, v in load_file(out / OPEN_CLIP_WEIGHTS).items() if k.startswith("visual.")}


@pytest.mark.parametrize("kind", ["timm_vit", "dinov2", "open_clip"])
def test_streamed_compensation_equals_in_memory(tmp_path, kind):
    name, model, tower, size = tiny(kind)
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(model.state_dict(), ckpt)
    images = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    out = tmp_path / "out"
    report = prune_checkpoint(name, out, checkpoint=ckpt, ratio=0.5, calibration=images, ridge=1e-2,
                              calib_batch_size=2, holdout_fraction=0.25)

    expected_tower = copy.deepcopy(tower)
    expected = prune_and_compensate(expected_tower, list(images.split(2)), in_memory_forward(kind), ratio=0.5,
                                    ridge=1e-2, holdout_fraction=0.25)
    got = written(out, kind)
    want = expected_tower.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # Compensation changed every output Linear: plain pruning differs there and only there.
    plain = copy.deepcopy(tower)
    prune_model(plain, ratio=0.5)
    outs = {f"{s.path}.{s.out_name}.{p}" for s in find_mlp_sites(tower) for p in ("weight", "bias")}
    for key, value in plain.state_dict().items():
        assert torch.equal(got[key], value) != (key in outs), key
    assert [s.kept for s in report.sites] == [s.kept for s in expected.sites]
    assert (report.model_params_before, report.model_params_after) == (expected.model_params_before,
                                                                      expected.model_params_after)
    for s, e in zip(report.sites, expected.sites, strict=True):
        assert s.recon_error_before == pytest.approx(e.recon_error_before, rel=1e-5)
        assert s.recon_error_after == pytest.approx(e.recon_error_after, rel=1e-5)

    summary = json.loads((out / REPORT_JSON).read_text())
    assert summary["stock_loadable"] is True
    calib = summary["calibration"]
    assert (calib["ridge"], calib["num_images"], calib["batch_size"]) == (1e-2, 6, 2)
    tokens = (size // (8 if kind != "dinov2" else 14)) ** 2 + 1
    assert calib["hidden_state_bytes"] == 2 * 6 * tokens * 64 * 4  # both streams carried
    assert [(s["recon_error_before"], s["recon_error_after"]) for s in summary["sites"]] == \
        [(s.recon_error_before, s.recon_error_after) for s in report.sites]
    md = (out / REPORT_MD).read_text()
    assert "compensation: each block refitted to the original block's output, ridge 0.01" in md
    assert f"{report.sites[0].recon_error_before:.4f} | {report.sites[0].recon_error_after:.4f} |" in md

    # The export builds from its stock config (uniform widths) and computes what the in-memory model computes.
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    loaded = load_pruned(out)
    loaded = loaded.visual if kind == "open_clip" else loaded
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), expected_tower(x), rtol=1e-5, atol=1e-5)


def test_a_torch_checkpoint_streams_like_in_memory(tmp_path):
    name, model, tower, size = tiny("dinov2")
    ckpt = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), ckpt)
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    out = tmp_path / "out"
    report = prune_checkpoint(name, out, checkpoint=ckpt, num_keep=40, calibration=images, calib_batch_size=3)
    expected_tower = copy.deepcopy(tower)
    expected = prune_and_compensate_blocks(expected_tower, images.split(3), num_keep=40)
    got = written(out, "dinov2")
    for key, value in expected_tower.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert [e for s in report.sites for e in (s.recon_error_before, s.recon_error_after)] == pytest.approx(
        [e for s in expected.sites for e in (s.recon_error_before, s.recon_error_after)], rel=1e-5)
    calib = json.loads((out / REPORT_JSON).read_text())["calibration"]
    assert calib["hidden_state_bytes"] == 2 * 4 * 5 * 64 * 4  # both streams carried


@pytest.mark.parametrize("name", ["dgmr_test_calib_eva_post", "dgmr_test_calib_eva_post_rope"])
def test_output_mode_streams_post_norm_blocks_like_in_memory(tmp_path, name):
    # EVA attention keeps a zero k_bias as a non-persistent buffer (and rope its tables): in no
    # checkpoint, so the streamed blocks and stem must take them from the build.
    torch.manual_seed(0)
    model = _randomise_biases(timm.create_model(name, pretrained=False))
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(model.state_dict(), ckpt)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = tmp_path / "out"
    report = prune_checkpoint(f"timm:{name}", out, checkpoint=ckpt, num_keep=40, calibration=images,
                              calib_batch_size=2)
    expected = copy.deepcopy(model)
    prune_and_compensate_blocks(expected, images.split(2), num_keep=40,
                                forward=lambda m, x: m.forward_features(x))
    got = written(out, "timm_vit")
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert all(s.recon_error_after < s.recon_error_before for s in report.sites)


def test_balanced_prefix_streams_like_in_memory(tmp_path):
    name, model, tower, size = tiny("dinov2")
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(model.state_dict(), ckpt)
    images = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    out = tmp_path / "out"
    prune_checkpoint(name, out, checkpoint=ckpt, num_keep=40, calibration=images,
                     calib_batch_size=2, balance_prefix=True)
    expected_tower, unbalanced = copy.deepcopy(tower), copy.deepcopy(tower)
    prune_and_compensate_blocks(expected_tower, images.split(2), num_keep=40, balance_prefix=True)
    prune_and_compensate_blocks(unbalanced, images.split(2), num_keep=40)
    got = written(out, "dinov2")
    for key, value in expected_tower.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.allclose(got["blocks.1.mlp.fc2.weight"], unbalanced.blocks[1].mlp.fc2.weight, atol=1e-5)
    assert json.loads((out / REPORT_JSON).read_text())["calibration"]["prefix_tokens_balanced"] == 1


def test_images_and_recorded_stem_states_calibrate_alike_with_rope_kwargs():
    # Eva passes its rotary embedding to every block as a keyword: the recorded block-0 arguments carry it.
    torch.manual_seed(0)
    model = _randomise_biases(Eva(img_size=28, patch_size=7, embed_dim=64, depth=2, num_heads=2, num_classes=0,
                                  use_rot_pos_emb=True, ref_feat_shape=(4, 4)))
    images = list(torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1)).split(2))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    want = prune_and_compensate(a, images, lambda m, x: m.forward_features(x), num_keep=70)
    got = prune_and_compensate_blocks(b, stem_states(b, "blocks.0", images), num_keep=70)
    assert [vars(s) for s in got.sites] == [vars(s) for s in want.sites]
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key
    states = stem_states(model, "blocks.0", images[:1])
    assert states[0].kwargs["rope"] is not None
    # Its rotary tables are built at construction, absent from checkpoints: a stem built all on meta is
    # refused by name; built with real buffers (as the streaming CLI builds) it gives the model's own states.
    def build() -> nn.Module:
        return Eva(img_size=28, patch_size=7, embed_dim=64, depth=2, num_heads=2, num_classes=0,
                   use_rot_pos_emb=True, ref_feat_shape=(4, 4))

    with torch.device("meta"):
        meta = build()
    with pytest.raises(ValueError, match=r"rope\.\w+: a non-persistent buffer .* meta"):
        materialize_outside(meta, "blocks", lambda n: model.state_dict()[n])
    with parameters_on_meta():
        skeleton = build()
    stem = materialize_outside(skeleton, "blocks", lambda n: model.state_dict()[n])
    streamed = stem_states(stem, "blocks.0", images[:1])
    assert torch.equal(streamed[0].hidden, states[0].hidden)
    assert torch.equal(streamed[0].kwargs["rope"], states[0].kwargs["rope"])


def _png(color: tuple[int, ...], size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_sources_folder_shards_and_tensor_file_agree(tmp_path):
    spec = ImageSpec(16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    rng = np.random.default_rng(0)
    pictures = []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(buf, format="PNG")
        pictures.append(buf.getvalue())
    folder = tmp_path / "imgs"
    for i, data in enumerate(pictures):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{i % 2}" / f"{i:02d}.png").write_bytes(data)
    for shard in range(2):
        with tarfile.open(tmp_path / f"s-{shard:03d}.tar", "w") as tar:
            for i in range(3 * shard, 3 * shard + 3):
                for name, data in ((f"{i:05d}.png", pictures[i]), (f"{i:05d}.txt", b"caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    # Folder order: c0/00, c0/02, c0/04, c1/01, c1/03, c1/05; all six -> the same set as the shards.
    from_folder = load_calibration_images(folder, 6, spec)
    from_shards = load_calibration_images(str(tmp_path / "s-{000..001}.tar"), 6, spec)
    assert from_folder.shape == (6, 3, 16, 16)
    torch.testing.assert_close(from_folder, from_shards[[0, 2, 4, 1, 3, 5]], rtol=0, atol=0)
    torch.testing.assert_close(load_calibration_images(f"{tmp_path}/s-000.tar::{tmp_path}/s-001.tar", 4, spec),
                               from_shards[:4], rtol=0, atol=0)
    assert load_calibration_images(folder, 2, spec).shape[0] == 2  # spread: c0/00 and c1/01
    torch.testing.assert_close(load_calibration_images(folder, 2, spec), from_folder[[0, 3]], rtol=0, atol=0)
    save_file({"images": from_shards}, tmp_path / "pre.safetensors")
    torch.testing.assert_close(load_calibration_images(tmp_path / "pre.safetensors", 5, spec), from_shards[:5])

    # Normalisation and transparency: a solid colour maps to (c/255 - mean) / std; clear pixels are white.
    solid = tmp_path / "solid"
    solid.mkdir()
    (solid / "a.png").write_bytes(_png((255, 0, 51), (40, 24)))
    (solid / "b.png").write_bytes(_png((0, 0, 0, 0), (8, 8), mode="RGBA"))
    got = load_calibration_images(solid, 2, spec)
    want_a = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    want_b = (1 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    torch.testing.assert_close(got[0], want_a.view(3, 1, 1).expand(3, 16, 16))
    torch.testing.assert_close(got[1], want_b.view(3, 1, 1).expand(3, 16, 16))

    for name in ("x8a", "x8b", "x9a", "x9b", "x10a", "x10b"):
        (tmp_path / f"{name}.tar").touch()
    assert shard_paths(f"{tmp_path}/x{{8..10}}{{a,b}}.tar") == [tmp_path / f"{n}.tar" for n in
                                                             ("x8a", "x8b", "x9a", "x9b", "x10a", "x10b")]
    with pytest.raises(ValueError, match="6 images, 7 requested"):
        load_calibration_images(folder, 7, spec)
    with pytest.raises(FileNotFoundError, match="s-002.tar"):
        load_calibration_images(str(tmp_path / "s-{000..002}.tar"), 2, spec)
    with pytest.raises(ValueError, match=r"expected float images \[N, 3, 8, 8\]"):
        load_calibration_images(tmp_path / "pre.safetensors", 2, ImageSpec(8, spec.mean, spec.std))


def test_calibrated_cli_errors_leave_nothing(tmp_path):
    name, model, _, size = tiny("timm_vit")
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(model.state_dict(), ckpt)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"expected normalised images \[N, 3, 32, 32\]"):
        prune_checkpoint(name, out, checkpoint=ckpt, ratio=0.5, calibration=torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        prune_checkpoint(name, out, checkpoint=ckpt, ratio=0.5, calibration=torch.zeros(2, 3, 32, 32), ridge=-1.0)
    with pytest.raises(ValueError, match="not enough calibration tokens|no held-out token"):
        prune_checkpoint(name, out, checkpoint=ckpt, ratio=0.5, calibration=torch.zeros(1, 3, 32, 32),
                         holdout_fraction=0.01)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_refinement_streams_like_in_memory(tmp_path):
    from pruning import Calibration, ModelSource, keep_counts, prune_blocks
    from pruning.__main__ import main

    name, model, tower, size = tiny("dinov2")
    ckpt, calib = tmp_path / "ckpt.safetensors", tmp_path / "calib.safetensors"
    save_file(model.state_dict(), ckpt)
    images = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    save_file({"images": images}, calib)
    out = tmp_path / "out"
    assert main(["prune", "--model", name, "--checkpoint", str(ckpt), "--num-keep", "40", "--calibration",
                 str(calib), "--num-calib", "6", "--calib-batch-size", "2", "--refine-steps", "5", "--refine-lr", "2e-3", "--quiet",
                 "--out", str(out)]) == 0
    expected, closed = copy.deepcopy(tower), copy.deepcopy(tower)
    for target, steps in ((expected, 5), (closed, 0)):
        source = ModelSource(target)
        prune_blocks(source, keep_counts(source.sites, num_keep=40), calib_inputs=list(images.split(2)),
                     calibration=Calibration(batch_size=2, refine_steps=steps, refine_lr=2e-3))
    got = written(out, "dinov2")
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert not torch.allclose(got["blocks.0.mlp.fc1.weight"], closed.blocks[0].mlp.fc1.weight, atol=1e-4)
    assert json.loads((out / REPORT_JSON).read_text())["calibration"]["refine_steps"] == 5
    assert "then each MLP refined 5 steps at lr 0.002" in (out / REPORT_MD).read_text()
