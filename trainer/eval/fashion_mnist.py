"""Read Fashion-MNIST from its idx files (Debian ``dataset-fashion-mnist``), gzipped or not."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_PREFIX = {"train": "train", "test": "t10k"}
_UBYTE = 0x08  # idx type code of unsigned bytes, the only one the dataset uses


def read_idx(path: Path) -> np.ndarray:
    """The array stored in one idx file (``.gz`` read transparently); uint8 only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic {raw[:4].hex()})")
    if raw[2] != _UBYTE:
        raise ValueError(f"{path}: idx type 0x{raw[2]:02x} is not unsigned byte")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST: neither {root / stem} nor {root / stem}.gz exists (apt-get install dataset-fashion-mnist)"
    )


def load_fashion_mnist(split: str = "train", root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of ``split`` ('train': 60k, 'test': 10k)."""
    if split not in _PREFIX:
        raise ValueError(f"split: must be one of {sorted(_PREFIX)}, got {split!r}")
    root = Path(root) if root is not None else DEFAULT_ROOT
    images = read_idx(_find(root, f"{_PREFIX[split]}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{_PREFIX[split]}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split} in {root}: images {images.shape} do not match labels {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
