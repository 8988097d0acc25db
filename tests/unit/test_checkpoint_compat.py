"""Resume compatibility: a checkpoint from before a config key existed still resumes; a real change does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.checkpoint import check_compatible
from trainer.config import TrainConfig

pytestmark = pytest.mark.unit


def test_a_saved_section_missing_a_newer_key_is_completed_with_its_default() -> None:
    config = TrainConfig().to_dict()
    older = {**config, "prune": {k: v for k, v in config["prune"].items() if k != "student_init"}}
    check_compatible(older, config, Path("ckpt"))  # no error: the missing key means its default


def test_a_changed_prune_setting_is_refused() -> None:
    config = TrainConfig().to_dict()
    other = {**config, "prune": {**config["prune"], "ratio": 2.0}}
    with pytest.raises(ValueError, match="ckpt: written for prune=.*ratio.*2.0"):
        check_compatible(other, config, Path("ckpt"))
