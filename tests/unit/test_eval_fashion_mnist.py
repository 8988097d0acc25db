"""The idx reader on files written here (plain and gzipped), and on the Debian package where installed."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from trainer.eval import FASHION_MNIST_CLASSES, load_fashion_mnist, read_idx
from trainer.eval.fashion_mnist import DEFAULT_ROOT

pytestmark = pytest.mark.unit


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_split(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx(arr)
        (root / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)


def test_reads_plain_and_gzipped_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    _write_split(tmp_path, "train", images, labels, gz=False)
    _write_split(tmp_path, "t10k", images[:2], labels[:2], gz=True)
    x, y = load_fashion_mnist("train", tmp_path)
    assert x.dtype.is_floating_point is False and np.array_equal(x.numpy(), images)
    assert y.tolist() == [0, 9, 3, 3, 1]
    x, y = load_fashion_mnist("test", tmp_path)
    assert np.array_equal(x.numpy(), images[:2]) and y.tolist() == [0, 9]


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_fashion_mnist("train", tmp_path)
    bad = tmp_path / "bad"
    bad.write_bytes(_idx(np.zeros((2, 3), np.uint8))[:-1])
    with pytest.raises(ValueError, match="bad"):
        read_idx(bad)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", tmp_path)


@pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_debian_package():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10_000, 28, 28) and y.shape == (10_000,)
    assert sorted(y.unique().tolist()) == list(range(len(FASHION_MNIST_CLASSES)))
    assert np.bincount(y.numpy()).tolist() == [1000] * 10
