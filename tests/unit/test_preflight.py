"""Checks before any model is built (trainer/cli.py) and the quieted open_clip warning."""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from pruning.export import RANDOM_INIT_WARNING, weights_loaded_elsewhere
from trainer.cli import check_data_layout, check_weights_file
from trainer.data.config import DataConfig
from trainer.models import open_clip_family  # noqa: F401 - registers configs/open_clip (ViT-Tiny-8)

pytestmark = pytest.mark.unit


def test_weights_file_complete_truncated_missing(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(64, 64), "b": torch.randn(10)}
    save_file(tensors, tmp_path / "w.safetensors")
    torch.save(tensors, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        check_weights_file("model.pretrained", str(tmp_path / name))  # complete: passes
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=rf"^model.pretrained: {tmp_path / f'cut-{name}'} is truncated"):
            check_weights_file("model.pretrained", str(tmp_path / f"cut-{name}"))
    with pytest.raises(FileNotFoundError, match=rf"^model.pretrained: no such file {tmp_path / 'nope.pt'}$"):
        check_weights_file("model.pretrained", str(tmp_path / "nope.pt"))
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        check_weights_file("model.pretrained", str(tmp_path / "empty.bin"))
    check_weights_file("model.pretrained", None)  # random init


def test_data_layout_is_checked_for_the_last_rank(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")  # names only: no shard is opened
    spec = str(tmp_path / "{00000..00002}.tar")
    check_data_layout(DataConfig(kind="webdataset", shards=spec, num_workers=1), world_size=3)
    with pytest.raises(ValueError, match=rf"^data.shards {tmp_path}/\{{00000..00002\}}.tar: 3 shard\(s\) for "
                                         r"world_size 4: rank 3 gets no shard"):
        check_data_layout(DataConfig(kind="webdataset", shards=spec, num_workers=1), world_size=4)
    with pytest.raises(ValueError, match=r"rank 1 gets 1 shard\(s\) but data.num_workers is 2"):
        check_data_layout(DataConfig(kind="webdataset", shards=spec, num_workers=2), world_size=2)
    check_data_layout(DataConfig(kind="webdataset", shards=spec, resampled=True, epoch_samples=8), world_size=8)
    with pytest.raises(FileNotFoundError, match="00003.tar"):
        check_data_layout(DataConfig(kind="webdataset", shards=str(tmp_path / "{00000..00003}.tar")), 1)


def test_random_init_warning_is_dropped_only_inside_the_block(caplog: pytest.LogCaptureFixture) -> None:
    def warned() -> bool:
        caplog.clear()
        open_clip.create_model("ViT-Tiny-8", pretrained=None)
        return any(r.getMessage().startswith(RANDOM_INIT_WARNING) for r in caplog.records)

    with caplog.at_level(logging.WARNING):
        assert warned()  # open_clip's own behaviour: what the block must hide
        with weights_loaded_elsewhere():
            assert not warned()
        assert warned()
