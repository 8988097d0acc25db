"""WebDatasetStream on real tar shards and a real DataLoader: splitting, resampling, bad data, resume."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from trainer.data import DataConfig, InputSpec, WebDatasetStream, build_stream

pytestmark = pytest.mark.unit

SPEC = InputSpec(16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
N_SHARDS, PER_SHARD = 6, 5


def jpeg_bytes(value: int, size: tuple[int, int] = (24, 20)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_shard(path: Path, keys: list[str], bad: set[str] = frozenset()) -> None:
    with TarWriter(str(path), encoder=False) as w:
        for i, key in enumerate(keys):
            image = b"\xff\xd8\xff\xe0 not a jpeg" if key in bad else jpeg_bytes(i)
            w.write({"__key__": key, "jpg": image, "txt": f"caption {key}".encode()})


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    root = tmp_path_factory.mktemp("shards")
    keys = []
    for s in range(N_SHARDS):
        shard_keys = [f"s{s}k{i}" for i in range(PER_SHARD)]
        write_shard(root / f"{s:03d}.tar", shard_keys)
        keys += shard_keys
    return str(root / f"{{000..{N_SHARDS - 1:03d}}}.tar"), keys


def stream(pattern: str, rank: int = 0, world_size: int = 1, **kw) -> WebDatasetStream:
    batch_size = kw.pop("batch_size", 4)
    cfg = DataConfig(kind="webdataset", shards=pattern, **{"num_workers": 2, "shuffle_buffer": 8, **kw})
    s = build_stream(cfg, SPEC, batch_size=batch_size, rank=rank, world_size=world_size, seed=7)
    assert isinstance(s, WebDatasetStream)
    return s


def test_two_ranks_two_workers_see_every_sample_once(shards):
    pattern, keys = shards
    seen = []
    for rank in (0, 1):
        s = stream(pattern, rank, 2)
        batches = list(s.iter_epoch())
        assert s.epoch == 1
        for b in batches:
            assert b.images.shape[1:] == (3, 16, 16) and b.images.dtype == torch.uint8
            assert b.spec == SPEC and b.model_input().dtype == torch.float32
            assert b.captions == [f"caption {k}" for k in b.keys]
        seen += [k for b in batches for k in b.keys]
    assert sorted(seen) == sorted(keys)  # exactly once: no duplicate, nothing missing


def test_epochs_reshuffle_and_images_are_normalised(shards):
    pattern, keys = shards
    s = stream(pattern, num_workers=0)
    first = [k for b in s.iter_epoch() for k in b.keys]
    second = [k for b in s.iter_epoch() for k in b.keys]
    assert sorted(first) == sorted(second) == sorted(keys)
    assert first != second
    batch = next(iter(stream(pattern, num_workers=0, shuffle_buffer=0)))
    raw = Image.open(io.BytesIO(jpeg_bytes(0))).convert("RGB")
    side = min(raw.size)
    box = ((raw.width - side) / 2, (raw.height - side) / 2, (raw.width + side) / 2, (raw.height + side) / 2)
    expected = np.asarray(raw.resize((16, 16), Image.Resampling.BICUBIC, box=box))
    k0 = next(i for i, k in enumerate(batch.keys) if k.endswith("k0"))  # every shard's k0 is jpeg_bytes(0)
    pixels = batch.model_input()[k0] * torch.tensor(SPEC.std).view(3, 1, 1)
    pixels = (pixels + torch.tensor(SPEC.mean).view(3, 1, 1)) * 255
    # simplejpeg and PIL (libjpeg-turbo both) may differ by a rounding step in the IDCT
    assert (pixels.permute(1, 2, 0) - torch.tensor(expected).float()).abs().max() <= 2
    assert torch.allclose(pixels.permute(1, 2, 0), batch.images[k0].permute(1, 2, 0).float(), atol=1e-3)


def test_resampled_orders_differ_per_rank_and_epoch_length_holds(shards):
    pattern, _ = shards
    kw = {"resampled": True, "epoch_samples": 40}
    orders = {
        rank: [k for b in stream(pattern, rank, 2, **kw).iter_epoch() for k in b.keys] for rank in (0, 1)
    }
    # ceil(40 / (2 ranks * 2 workers * 4)) = 3 full batches per worker -> 24 samples per rank
    assert len(orders[0]) == len(orders[1]) == 24
    assert orders[0] != orders[1]
    again = [k for b in stream(pattern, 0, 2, **kw).iter_epoch() for k in b.keys]
    assert again == orders[0]  # a function of (seed, epoch, rank, worker), not of the clock


def test_exact_resume_without_resampling(shards):
    pattern, _ = shards
    full = list(stream(pattern, augment="light").iter_epoch())
    first = stream(pattern, augment="light")
    it = first.iter_epoch()
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    it.close()
    resumed = stream(pattern, augment="light")
    resumed.load_state_dict(state)
    tail = list(resumed.iter_epoch())
    assert [b.keys for b in head + tail] == [b.keys for b in full]
    for got, want in zip(head + tail, full, strict=True):
        assert torch.equal(got.images, want.images)  # same crops and flips, bit for bit
    assert resumed.epoch == 1


def test_resampled_resume_does_not_replay(shards):
    pattern, _ = shards
    kw = {"resampled": True, "epoch_samples": 48}
    full = [b.keys for b in stream(pattern, **kw).iter_epoch()]
    first = stream(pattern, **kw)
    it = first.iter_epoch()
    head = [next(it).keys for _ in range(4)]
    state = first.state_dict()
    it.close()
    resumed = stream(pattern, **kw)
    resumed.load_state_dict(state)
    tail = [b.keys for b in resumed.iter_epoch()]
    assert head == full[:4]
    assert len(head) + len(tail) == len(full)  # the epoch keeps its length
    assert tail != full[: len(tail)] and tail != full[4:]  # neither replayed from the start nor copied


def test_truncated_tar_and_corrupt_jpeg_are_skipped_and_counted(tmp_path):
    write_shard(tmp_path / "0.tar", [f"a{i}" for i in range(4)])
    write_shard(tmp_path / "1.tar", [f"b{i}" for i in range(4)], bad={"b1"})
    for name, cut in (("2.tar", 0.5), ("3.tar", None)):
        write_shard(tmp_path / name, [f"{name[0]}c{i}" for i in range(4)])
        size = os.path.getsize(tmp_path / name)
        # 3.tar: cut on a block boundary after the first sample, which tarfile reads as a clean end
        with open(tmp_path / name, "r+b") as f:
            f.truncate(int(size * cut) if cut else 3 * 1024)
    s = stream(str(tmp_path / "{0..3}.tar"), shuffle_buffer=0)  # 2 workers: counters cross processes
    keys = [k for b in s.iter_epoch() for k in b.keys]
    assert set(keys) >= {"a0", "a1", "a2", "a3", "b0", "b2", "b3", "3c0"}
    assert "b1" not in keys and "3c3" not in keys and "2c3" not in keys
    counts = s.counters()
    assert counts["samples_skipped"] >= 1
    assert counts["shards_truncated"] == 2
    assert counts["shards_read"] == 2
    assert s.state_dict()["past_counters"] == counts  # carried into checkpoints


def test_missing_shard_and_rank_without_shard_fail_at_start(shards, tmp_path):
    pattern, _ = shards
    with pytest.raises(FileNotFoundError, match="006.tar"):
        stream(pattern.replace(f"{N_SHARDS - 1:03d}}}", "007}"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        stream(str(tmp_path / "nope.txt"))
    one = pattern.replace(f"{{000..{N_SHARDS - 1:03d}}}", "000")
    with pytest.raises(ValueError, match="rank 1 gets no shard"):
        stream(one, rank=1, world_size=2)
    with pytest.raises(ValueError, match="num_workers"):
        stream(one, num_workers=2)


def test_shard_list_file_and_weighted_sources(shards, tmp_path):
    pattern, keys = shards
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two sources in one list\n{pattern}\n")
    s = stream(str(listing), num_workers=0)
    assert sorted(k for b in s.iter_epoch() for k in b.keys) == sorted(keys)
    first = pattern.replace(f"{{000..{N_SHARDS - 1:03d}}}", "000")
    rest = pattern.replace("{000..", "{001..")
    cfg = DataConfig(
        kind="webdataset",
        sources=[{"shards": first, "weight": 1.0}, {"shards": rest, "weight": 3.0}],
        resampled=True,
        epoch_samples=400,
        num_workers=0,
    )
    mixed = build_stream(cfg, SPEC, batch_size=8, rank=0, world_size=1, seed=1)
    assert isinstance(mixed, WebDatasetStream)
    got = [k for b in mixed.iter_epoch() for k in b.keys]
    share = sum(k.startswith("s0") for k in got) / len(got)
    assert len(got) == 400 and 0.1 < share < 0.4  # weight 1 of 4 -> a quarter of the shard draws


def test_pipe_urls_pass_through_and_a_failing_one_is_counted(shards, tmp_path):
    pattern, keys = shards
    root = Path(pattern).parent
    listing = tmp_path / "pipes.txt"
    listing.write_text(f"pipe:cat {root}/{{000..005}}.tar\npipe:cat {root}/gone.tar\n")
    s = stream(str(listing), num_workers=0)
    assert sorted(k for b in s.iter_epoch() for k in b.keys) == sorted(keys)
    assert s.counters()["shards_failed"] == 1 and s.counters()["shards_read"] == N_SHARDS
