"""make_shards on real image folders: ImageNet-style and nested categories, read back by the stream."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data import DataConfig, InputSpec, build_stream
from trainer.data.make_shards import main

pytestmark = pytest.mark.unit


def make_folder(root: Path) -> dict[str, bytes]:
    """Two classes of JPEGs, a nested category of transparent PNGs, one image with its own caption."""
    files = {}
    rng = np.random.default_rng(0)
    for rel in (
        "n01440764/a.jpg",
        "n01440764/b.JPEG",
        "n02102040/c.jpg",
        "art/animals/birds/d.png",
        "art/e.png",
    ):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "RGBA" if rel.endswith(".png") else "RGB"
        Image.fromarray(rng.integers(0, 255, (20, 30, len(mode)), dtype=np.uint8), mode).save(path)
        files[rel] = path.read_bytes()
    (root / "n02102040/c.txt").write_text("a springer spaniel on grass\n")
    (root / "notes.md").write_text("not an image")
    return files


def test_cli_writes_readable_img2dataset_style_shards(tmp_path, capsys):
    files = make_folder(tmp_path / "images")
    out = tmp_path / "shards"
    assert main([str(tmp_path / "images"), str(out), "--shard-size", "2"]) == 0
    shards = sorted(out.glob("*.tar"))
    assert [s.name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert not list(out.glob("*.tmp"))
    printed = capsys.readouterr()
    assert printed.out == f"5 images -> 3 shard(s) of up to 2 in {out} (list: {out / 'shards.txt'})\n"
    # 3 shards cannot feed 2 ranks x 2 DataLoader workers: said on stderr, with a size that would
    assert printed.err.startswith("warning: 3 shard(s) for 5 images") and "--shard-size 1 " in printed.err
    samples = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    assert len(samples) == 5
    by_path = {json.loads(s["json"])["path"]: s for s in samples.values()}
    assert set(by_path) == set(files)
    for rel, data in files.items():
        ext = "png" if rel.endswith(".png") else "jpg"
        assert by_path[rel][ext] == data  # original bytes, not re-encoded
    assert by_path["n02102040/c.jpg"]["txt"] == b"a springer spaniel on grass"
    assert by_path["art/animals/birds/d.png"]["txt"] == b"art animals birds"
    assert json.loads(by_path["n01440764/a.jpg"]["json"])["label"] == "n01440764"

    cfg = DataConfig(kind="webdataset", shards=str(out / "shards.txt"), num_workers=0, shuffle_buffer=0)
    spec = InputSpec(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    stream = build_stream(cfg, spec, batch_size=5, rank=0, world_size=1, seed=0)
    (batch,) = list(stream.iter_epoch())
    assert batch.images.shape == (5, 3, 16, 16)
    assert sorted(batch.captions) == sorted(json.loads(s["json"])["caption"] for s in samples.values())
    assert stream.counters()["samples_skipped"] == 0


def test_module_runs_as_a_command_and_rejects_a_missing_folder(tmp_path):
    make_folder(tmp_path / "images")
    cmd = [sys.executable, "-m", "trainer.data.make_shards", str(tmp_path / "images"), str(tmp_path / "o")]
    done = subprocess.run([*cmd, "--shard-size", "10", "--max-images", "3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with tarfile.open(tmp_path / "o" / "00000.tar") as tar:
        assert len(tar.getnames()) == 9  # 3 samples x (image, txt, json)
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("3 images -> 1 shard(s)")
    done = subprocess.run([sys.executable, "-m", "trainer.data.make_shards", str(tmp_path / "missing"),
                           str(tmp_path / "o2")], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (2, f"error: image folder does not exist: {tmp_path / 'missing'}\n")
    assert not (tmp_path / "o2").exists()


def test_a_non_empty_output_folder_needs_overwrite(tmp_path, capsys):
    make_folder(tmp_path / "images")
    out = tmp_path / "shards"
    assert main([str(tmp_path / "images"), str(out), "--shard-size", "1"]) == 0
    assert len(list(out.glob("*.tar"))) == 5 and "warning" not in capsys.readouterr().err
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert main([str(tmp_path / "images"), str(out), "--shard-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: output folder {out} is not empty (6 entries); pass --overwrite to replace its shards, " \
                  "or choose another folder\n"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched

    (out / "notes.txt").write_text("mine")
    assert main([str(tmp_path / "images"), str(out), "--shard-size", "2", "--overwrite"]) == 0
    # the 5 one-image shards are gone, not left behind beside the 3 new ones; other files stay
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "notes.txt",
                                                      "shards.txt"]
    assert len((out / "shards.txt").read_text().splitlines()) == 3


def test_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "trainer.data.make_shards", str(tmp_path / "missing"), str(tmp_path / "o")]
    done = subprocess.run([*cmd, "--debug"], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" in done.stderr and "FileNotFoundError" in done.stderr
