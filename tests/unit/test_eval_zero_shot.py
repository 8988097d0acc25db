"""Zero-shot plumbing on a tiny randomly initialised open_clip CLIP with its own tokenizer (no download)."""

from __future__ import annotations

import open_clip
import pytest
import torch

from trainer.eval import zero_shot_classifier, zero_shot_logits, zero_shot_predict

pytestmark = pytest.mark.unit

CLASSES = ["cat", "dog", "ship"]


@pytest.fixture(scope="module")
def clip_and_tokenizer():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    ).eval()
    return model, open_clip.tokenizer.SimpleTokenizer(context_length=16)


def test_classifier_is_unit_norm_per_class(clip_and_tokenizer):
    model, tokenizer = clip_and_tokenizer
    classifier = zero_shot_classifier(model, tokenizer, CLASSES, ["a photo of a {}.", lambda c: f"itap of a {c}"])
    assert classifier.shape == (16, 3)
    assert torch.allclose(classifier.norm(dim=0), torch.ones(3), atol=1e-6)


def test_single_template_column_equals_the_text_embedding(clip_and_tokenizer):
    model, tokenizer = clip_and_tokenizer
    classifier = zero_shot_classifier(model, tokenizer, CLASSES, ["a photo of a {}."])
    with torch.no_grad():
        text = model.encode_text(tokenizer(["a photo of a dog."]), normalize=True)[0]
    assert torch.allclose(classifier[:, 1], text, atol=1e-6)
    # An image embedding equal to a class's text embedding (scaled, to show scale does not matter) picks it.
    images = torch.stack([classifier[:, 2] * 5, classifier[:, 0], classifier[:, 1] * 0.1])
    assert zero_shot_logits(images, classifier).argmax(dim=1).tolist() == [2, 0, 1]


def test_predict_on_images(clip_and_tokenizer):
    model, tokenizer = clip_and_tokenizer
    classifier = zero_shot_classifier(model, tokenizer, CLASSES)
    batches = [torch.randn(4, 3, 32, 32), torch.randn(1, 3, 32, 32)]
    scores = zero_shot_predict(model, batches, classifier, show_progress=False)
    assert scores.shape == (5, 3)
    with torch.no_grad():
        direct = model.encode_image(batches[1], normalize=True) @ classifier
    assert torch.allclose(scores[4:], direct, atol=1e-5)
    with pytest.raises(ValueError, match="classnames"):
        zero_shot_classifier(model, tokenizer, [])
