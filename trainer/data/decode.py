"""Image bytes -> the teacher's input size: decode (scaled down in the JPEG decoder), crop, resize."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import torch
from PIL import Image

from pruning.calib_images import rgb_on_white

from .base import InputSpec

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes JPEG too, about a third slower (bench/data.py)
    simplejpeg = None

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "caption")
LIGHT_AREA = (0.8, 1.0)
LIGHT_RATIO = (3 / 4, 4 / 3)


def decode_rgb(data: bytes, ext: str, min_side: int, jpeg: str = "simplejpeg") -> Image.Image:
    """Decode to RGB at the smallest scale whose both sides are still >= ``min_side`` (JPEG DCT scaling)."""
    if ext in ("jpg", "jpeg") and jpeg == "simplejpeg" and simplejpeg is not None:
        try:
            h, w = simplejpeg.decode_jpeg_header(data)[:2]
            # only power-of-two DCT scaling, like PIL's draft: libjpeg's m/8 steps blur more for no gain
            f = 1
            while f < 8 and min(h, w) >= 2 * f * min_side:
                f *= 2
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-h // f), min_width=-(-w // f))
            return Image.fromarray(arr)
        except ValueError:
            pass  # CMYK, progressive oddities, a PNG named .jpg: PIL knows more formats; it raises if bad
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (min_side, min_side))
    return rgb_on_white(img)


def crop_resize(img: Image.Image, size: int, rng: random.Random | None = None) -> np.ndarray:
    """[size, size, 3] uint8: the central square (or, with ``rng``, a random crop + flip) resized bicubic."""
    w, h = img.size
    flip = False
    if rng is None:
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    else:
        area = min(w, h) ** 2 * rng.uniform(*LIGHT_AREA)
        ratio = np.exp(rng.uniform(np.log(LIGHT_RATIO[0]), np.log(LIGHT_RATIO[1])))
        cw, ch = min(w, (area * ratio) ** 0.5), min(h, (area / ratio) ** 0.5)
        x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        box = (x, y, x + cw, y + ch)
        flip = rng.random() < 0.5
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def caption_of(sample: dict) -> str:
    """The sample's caption: its .txt, else a json 'caption'/'label' field, else ''."""
    for ext in CAPTION_EXTS:
        if ext in sample:
            return sample[ext].decode("utf-8", errors="replace").strip()
    if "json" in sample:
        meta = json.loads(sample["json"])
        if isinstance(meta, dict):
            for key in ("caption", "label"):
                if key in meta:
                    return str(meta[key])
    return ""


class SampleDecoder:
    """Raw tar sample -> (uint8 image [S,S,3], caption, key); raises on a bad image so the handler counts it."""

    def __init__(self, spec: InputSpec, augment: str, jpeg: str = "simplejpeg") -> None:
        self.size = spec.image_size
        self.augment = augment
        self.jpeg = jpeg

    def __call__(self, sample: dict, rng: random.Random | None = None) -> tuple[np.ndarray, str, str]:
        """``rng`` draws the light augmentation; the caller seeds it per sample so a replay can skip samples."""
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image")
        img = decode_rgb(sample[ext], ext, self.size, self.jpeg)
        crop_rng = rng if self.augment == "light" else None
        return crop_resize(img, self.size, crop_rng), caption_of(sample), sample["__key__"]


def to_chw(images: list[np.ndarray]) -> torch.Tensor:
    """[H,W,3] uint8 images -> one uint8 [B,3,H,W] tensor, stored channels-last.

    Stacking is then a plain copy (a transposing copy of bytes costs several times more), and
    ``normalise`` turns it into contiguous float32 on the training device in the same pass.
    (Building it in shared memory up front, to spare the DataLoader's copy, measured no gain.)
    """
    h, w, c = images[0].shape
    out = torch.empty((len(images), h, w, c), dtype=torch.uint8)
    np.stack(images, out=out.numpy())
    return out.permute(0, 3, 1, 2)
