"""Zero-shot classification with an open_clip model: class names x prompt templates -> text classifier."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.eval.progress import progress

Template = str | Callable[[str], str]
"""``"a photo of a {}."`` or a function of the class name, as open_clip's template lists use."""

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")


def _fill(template: Template, name: str) -> str:
    return template(name) if callable(template) else template.format(name)


@torch.no_grad()
def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Unit-norm class embeddings [D, C]: per class, the renormalised mean of its prompts' text embeddings."""
    if not classnames:
        raise ValueError("classnames: empty")
    if not templates:
        raise ValueError("templates: empty")
    columns = []
    for name in classnames:
        tokens = tokenizer([_fill(t, name) for t in templates]).to(device)
        text = F.normalize(model.encode_text(tokens).float(), dim=-1)
        columns.append(F.normalize(text.mean(dim=0), dim=0))
    return torch.stack(columns, dim=1)


def zero_shot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Cosine scores [N, C] of image features [N, D] against a classifier [D, C]."""
    if image_features.shape[-1] != classifier.shape[0]:
        raise ValueError(f"classifier: dim {classifier.shape[0]} != image feature dim {image_features.shape[-1]}")
    return F.normalize(image_features.float(), dim=-1) @ classifier.to(image_features.device)


@torch.no_grad()
def zero_shot_predict(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    classifier: torch.Tensor,
    device: torch.device | str = "cpu",
    total_batches: int | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """Scores [N, C] for normalised image batches run through ``model.encode_image``."""
    model.eval()
    scores = []
    for images in progress(batches, total_batches, "zero-shot", enabled=show_progress):
        features = model.encode_image(images.to(device, non_blocking=True))
        scores.append(zero_shot_logits(features, classifier.to(device)).cpu())
    if not scores:
        raise ValueError("batches: no images to classify")
    return torch.cat(scores)
