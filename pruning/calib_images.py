"""Calibration images for ``python -m pruning prune --calibration``: an image folder, tar shards, or a tensor file.

A small reader of its own (``pruning`` does not import the trainer's data pipeline) that preprocesses as the
trainer evaluates; which images each source gives: docs/compensation.md, "Streaming".
"""

from __future__ import annotations

import io
import itertools
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
TENSOR_EXTS = (".pt", ".pth", ".safetensors")


@dataclass(frozen=True)
class ImageSpec:
    """Model input: square side in pixels, per-channel mean and std (of [0, 1] pixels)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def input_spec(model: torch.nn.Module, family: str) -> ImageSpec:
    """The input size and normalisation a timm (``pretrained_cfg``) or open_clip model expects; for timm
    the size the model was built for (``patch_embed.img_size``) wins over the stock weights' size."""
    if family == "timm":
        cfg = model.pretrained_cfg
        size = getattr(getattr(model, "patch_embed", None), "img_size", None) or cfg["input_size"]
    else:
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
    size = size[-1] if isinstance(size, tuple | list) else size
    return ImageSpec(int(size), tuple(cfg["mean"]), tuple(cfg["std"]))


def shard_paths(source: str) -> list[Path]:
    """Tar shard paths of ``a.tar``, ``dir/{000..009}.tar`` or ``x.tar::y.tar``; FileNotFoundError names a missing one."""
    from webdataset.shardlists import expand_urls  # the trainer's data.sources read shard specs the same way

    paths = [Path(p) for p in expand_urls(source)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"calibration shard not found: {path}")
    return paths


def rgb_on_white(img):  # PIL.Image.Image -> PIL.Image.Image (PIL is imported lazily here)
    """RGB of a decoded picture; transparent clip art goes on white, not on whatever the hidden pixels hold."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def preprocess(data: bytes, spec: ImageSpec) -> torch.Tensor:
    """Encoded image bytes -> normalised float32 [3, S, S]: central square, bicubic resize."""
    import numpy as np
    from PIL import Image

    img = rgb_on_white(Image.open(io.BytesIO(data)))
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    pixels = np.asarray(img.resize((spec.size, spec.size), Image.Resampling.BICUBIC, box=box), dtype=np.float32)
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1) / 255
    return (x - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)


def _folder_images(root: Path, count: int) -> Iterator[tuple[str, bytes]]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    if len(files) < count:
        raise ValueError(f"calibration folder {root}: {len(files)} images, {count} requested")
    stride = len(files) / count  # spread over the sorted list, so every sub-folder is sampled
    yield from ((str(path), path.read_bytes()) for path in (files[int(i * stride)] for i in range(count)))


def _shard_images(paths: list[Path]) -> Iterator[tuple[str, bytes]]:
    for path in paths:
        try:
            tar = tarfile.open(path)
        except tarfile.TarError as e:
            raise ValueError(f"calibration shard {path}: not a tar file ({e})") from e
        with tar:
            keys = set()
            for member in tar:
                key, _, ext = member.name.partition(".")
                if member.isfile() and ext.lower() in IMAGE_EXTS and key not in keys:  # one image per sample
                    keys.add(key)
                    yield f"{path}:{member.name}", tar.extractfile(member).read()  # type: ignore[union-attr]


def _tensor_file(path: Path, count: int, spec: ImageSpec) -> torch.Tensor:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if "images" not in tensors and len(tensors) != 1:
            raise ValueError(f"{path}: {len(tensors)} tensors and none named 'images'")
        images = tensors["images"] if "images" in tensors else next(iter(tensors.values()))
    else:
        images = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"{path}: expected one tensor of images, got {type(images).__name__}")
    want = (3, spec.size, spec.size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want or not images.is_floating_point():
        raise ValueError(f"{path}: expected float images [N, {', '.join(map(str, want))}] (already normalised), "
                         f"got {images.dtype} {tuple(images.shape)}")
    if images.shape[0] < count:
        raise ValueError(f"{path}: {images.shape[0]} images, {count} requested")
    return images[:count].float()


def load_calibration_images(source: str | Path, count: int, spec: ImageSpec) -> torch.Tensor:
    """``count`` normalised float32 images [count, 3, S, S] from a folder, tar shards or a tensor file."""
    if count < 1:
        raise ValueError(f"num_calib must be >= 1, got {count}")
    path = Path(source)
    if path.is_dir():
        items = _folder_images(path, count)
    elif path.suffix in TENSOR_EXTS:
        if not path.is_file():
            raise FileNotFoundError(f"calibration file not found: {path}")
        return _tensor_file(path, count, spec)
    else:
        items = _shard_images(shard_paths(str(source)))
    images = []
    for name, data in itertools.islice(items, count):
        try:
            images.append(preprocess(data, spec))
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ... for broken files
            raise ValueError(f"calibration image {name}: cannot decode ({e})") from e
    if len(images) < count:
        raise ValueError(f"calibration source {source}: {len(images)} images, {count} requested")
    return torch.stack(images)
