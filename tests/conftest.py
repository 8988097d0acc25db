"""Shared test setup: offline hubs, DeepSpeed on CPU with a reusable op cache, tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_TIMM = REPO / "configs" / "experiments" / "tiny_timm.yaml"
TINY_OPEN_CLIP = REPO / "configs" / "experiments" / "tiny_open_clip_fsdp.yaml"

# Set before any test imports deepspeed or a model hub; subprocesses inherit them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


@pytest.fixture
def tiny_timm_yaml() -> Path:
    """Experiment YAML of the 2-block, width-64 timm ViT."""
    return TINY_TIMM


@pytest.fixture
def tiny_open_clip_yaml() -> Path:
    """Experiment YAML of the 2-block, width-64 open_clip image tower."""
    return TINY_OPEN_CLIP
