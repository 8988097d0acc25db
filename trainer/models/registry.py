"""Family name -> adapter."""

from trainer.models.base import ModelAdapter
from trainer.models.open_clip_family import OpenClipAdapter
from trainer.models.timm_family import TimmAdapter

ADAPTERS: dict[str, ModelAdapter] = {"open_clip": OpenClipAdapter(), "timm": TimmAdapter()}


def get_adapter(family: str) -> ModelAdapter:
    """The adapter for ``model.family``."""
    if family not in ADAPTERS:
        raise ValueError(f"model.family: unknown family {family!r}, known: {sorted(ADAPTERS)}")
    return ADAPTERS[family]
