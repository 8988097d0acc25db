"""Feature extraction and student-vs-teacher token fidelity on a tiny timm ViT."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from trainer.data.base import InputSpec
from trainer.eval import extract_features, image_batches, model_fidelity, token_fidelity
from trainer.models.dinov2_onnx import forward_tokens

pytestmark = pytest.mark.unit

SPEC = InputSpec(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=32, patch_size=8,
        embed_dim=32, depth=2, num_heads=2, init_values=1.0,  # DINOv2's 1e-5 would hide any MLP change
    ).eval()


def _images() -> torch.Tensor:
    return torch.randint(0, 256, (10, 20, 20), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_image_batches_resize_normalise_and_split():
    batches = list(image_batches(_images(), SPEC, batch_size=4))
    assert [b.shape for b in batches] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    white = next(image_batches(torch.full((1, 5, 5, 3), 255, dtype=torch.uint8), SPEC, 1))
    assert torch.allclose(white, torch.full_like(white, 2.0))  # (1 - 0.5) / 0.25
    with pytest.raises(ValueError, match="images"):
        next(image_batches(torch.zeros(2, 5, 5), SPEC, 1))


def test_extract_features_shapes():
    feats = extract_features(_tiny_vit(), image_batches(_images(), SPEC, 4), forward_tokens, keep_patches=True)
    assert feats.cls.shape == (10, 32) and feats.patches.shape == (10, 16, 32)
    assert extract_features(_tiny_vit(), image_batches(_images(), SPEC, 4), forward_tokens).patches is None


def test_model_against_itself_is_one_and_a_perturbed_copy_is_lower():
    teacher = _tiny_vit()
    same = model_fidelity(teacher, teacher, image_batches(_images(), SPEC, 4), forward_tokens)
    assert same["cls_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert same["patch_cosine"] == pytest.approx(1.0, abs=1e-9)

    student = copy.deepcopy(teacher)
    with torch.no_grad():
        fc1 = student.blocks[1].mlp.fc1.weight
        fc1.add_(torch.randn(fc1.shape, generator=torch.Generator().manual_seed(2)) * fc1.std() * 3)
    changed = model_fidelity(student, teacher, image_batches(_images(), SPEC, 4), forward_tokens)
    assert changed["cls_cosine"] < 0.9999 and changed["patch_cosine"] < 0.9999

    # The streaming form and the stored-features form agree.
    s = extract_features(student, image_batches(_images(), SPEC, 3), forward_tokens, keep_patches=True)
    t = extract_features(teacher, image_batches(_images(), SPEC, 3), forward_tokens, keep_patches=True)
    stored = token_fidelity(s, t)
    assert stored["cls_cosine"] == pytest.approx(changed["cls_cosine"], abs=1e-6)
    assert stored["patch_cosine"] == pytest.approx(changed["patch_cosine"], abs=1e-6)


def test_plain_progress_line_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # makes `import tqdm` fail
    extract_features(_tiny_vit(), image_batches(_images(), SPEC, 5), forward_tokens, total_batches=2)
    assert "features: done (2)" in capsys.readouterr().err
