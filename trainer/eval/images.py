"""Held-out pictures for evaluation: webdataset tar shards, a shard list, or a folder of image files."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from trainer.data.decode import IMAGE_EXTS, crop_resize, decode_rgb


def _shards(path: Path) -> list[Path] | None:
    """The tar shards ``path`` names (a .tar, a shards.txt list, a folder holding .tar files), else None."""
    if path.is_file() and path.suffix == ".tar":
        return [path]
    if path.is_file() and path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        # Relative entries are relative to the list (write_shards writes absolute ones).
        return [p if p.is_absolute() else path.parent / p for p in map(Path, lines)]
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
        return tars or None
    return None


def _tar_images(shards: list[Path]) -> Iterator[tuple[bytes, str]]:
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"shard not found: {shard}")
        with tarfile.open(shard) as tar:
            for member in tar:
                ext = member.name.rpartition(".")[2].lower()
                key_ext = member.name.partition(".")[2].lower()
                if member.isfile() and (key_ext in IMAGE_EXTS or ext in IMAGE_EXTS):
                    data = tar.extractfile(member)
                    assert data is not None
                    yield data.read(), ext


def _folder_images(root: Path) -> Iterator[tuple[bytes, str]]:
    from trainer.data.make_shards import find_images

    for file in find_images(root):
        yield file.read_bytes(), file.suffix.lower().lstrip(".")


def read_heldout_images(path: str | Path, image_size: int, limit: int = 0) -> torch.Tensor:
    """uint8 [N, S, S, 3]: the first ``limit`` (0: all) pictures, decoded to RGB and centre-cropped to S px.

    ``path``: a ``.tar`` shard, a ``shards.txt`` list of them, a folder of ``.tar`` shards, or a folder
    of image files (read in sorted order). Transparent pictures are put on white, as in training.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"held-out images not found: {path}")
    if limit < 0:
        raise ValueError(f"limit: must be >= 0, got {limit}")
    shards = _shards(path)
    if shards is None and not path.is_dir():
        raise ValueError(f"{path}: expected a .tar shard, a .txt shard list or a folder")
    source = _tar_images(shards) if shards is not None else _folder_images(path)
    images = []
    for data, ext in source:
        images.append(crop_resize(decode_rgb(data, ext, image_size), image_size))
        if len(images) == limit:
            break
    if not images:
        raise ValueError(f"{path}: no .jpg/.jpeg/.png/.webp pictures")
    return torch.from_numpy(np.stack(images))
