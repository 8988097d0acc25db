"""The demo's training stream: Fashion-MNIST images as unlabeled PNG shards outside the probe, mixed with clip art."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.demo import (
    CONFIG,
    data_overrides,
    fashion_stream_indices,
    run_objective,
    run_warmup_steps,
    tokens,
    training_image_size,
    write_image_shards,
)
from trainer.cli import load_config

pytestmark = pytest.mark.unit


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_grey_images_become_unlabeled_png_shards_that_decode_to_the_same_pixels(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    indices = torch.tensor([3, 10, 11, 40, 41, 59, 60])
    listing = write_image_shards(images, indices, tmp_path / "fashion", 3, "fashion-mnist-train")

    shards = [Path(line) for line in listing.read_text().split()]
    assert [s.name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert not list((tmp_path / "fashion").glob("*.tmp"))
    seen = []
    for shard in shards:
        members = _members(shard)
        keys = sorted({name.partition(".")[0] for name in members})
        for key in keys:
            assert set(members) >= {f"{key}.png", f"{key}.json"} and f"{key}.cls" not in members
            meta = json.loads(members[f"{key}.json"])
            assert set(meta) == {"source", "index"}  # no label, no caption naming the class
            pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(members[f"{key}.png"]))))
            j = int((indices == meta["index"]).nonzero())
            assert torch.equal(pixels, images[j])
            seen.append(meta["index"])
    assert seen == indices.tolist()


def test_the_trainers_decoder_reads_the_shards_as_rgb_pictures(tmp_path: Path) -> None:
    from tools.demo import read_shard_images

    images = torch.full((2, 28, 28), 200, dtype=torch.uint8)
    images[1] = 10
    listing = write_image_shards(images, torch.arange(2), tmp_path, 8, "x")
    decoded = read_shard_images(Path(listing.read_text().split()[0]), 2)
    assert decoded.shape == (2, 3, 224, 224) and decoded.dtype == torch.uint8
    assert decoded[0].float().mean() == pytest.approx(200, abs=1) and decoded[1].float().mean() == pytest.approx(10, abs=1)


def test_bad_images_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_image_shards(torch.zeros(2, 28, 28), torch.arange(2), Path("/nonexistent"), 4, "x")


def test_the_stream_draws_outside_the_probe_sample_reproducibly() -> None:
    probe = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:300]
    a = fashion_stream_indices(probe, 1000, 500)
    assert len(a) == 500 and len(set(a.tolist())) == 500
    assert not set(a.tolist()) & set(probe.tolist())
    assert torch.equal(a, a.sort().values) and torch.equal(a, fashion_stream_indices(probe, 1000, 500))
    assert not torch.equal(a, fashion_stream_indices(probe, 1000, 500, seed=5))
    with pytest.raises(ValueError, match="only 700 outside the probe"):
        fashion_stream_indices(probe, 1000, 701)


def test_sources_on_the_command_line_give_the_configs_weighted_mix(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "shards.txt", tmp_path / "b" / "shards.txt"
    cfg = load_config(CONFIG, data_overrides([(a, 1.0), (b, 3.0)]))
    assert cfg.data.shards == "" and cfg.data.resampled
    assert [(s.shards, s.weight) for s in cfg.data.sources] == [(str(a), 1.0), (str(b), 3.0)]
    one = load_config(CONFIG, data_overrides(a))
    assert one.data.shards == str(a) and one.data.sources == ()


def test_the_demo_config_leaves_the_warmup_to_the_trainers_default() -> None:
    cfg = load_config(CONFIG, ["run.steps=120", "prune.student_init=compensated.safetensors"])
    assert cfg.warmup_steps() == 24  # 20 % of the run: the recipe for compensated starts
    assert load_config(CONFIG, ["run.steps=120"]).warmup_steps() == 0  # --tiny: no compensated start


def test_the_demo_trains_at_224_px_and_keeps_the_dynamic_size_for_the_probe() -> None:
    cfg = load_config(CONFIG)
    assert cfg.data.image_size == training_image_size() == 224
    assert cfg.model.kwargs == {"img_size": 224, "dynamic_img_size": True}  # validation and export stay at 224
    assert tokens(224) == 257 and tokens(112) == 65


def test_the_report_reads_the_runs_warmup_and_loss_from_its_saved_config(tmp_path: Path) -> None:
    import yaml

    cfg = load_config(CONFIG, ["run.steps=240", "prune.student_init=compensated.safetensors"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert run_warmup_steps(tmp_path) == 48
    assert run_objective(tmp_path) == ("1 x mse (class token) + 1 x mse (patch tokens), before the final norm, "
                                       "+ 5 x relative MSE of the outputs of blocks 2, 5, 8")
