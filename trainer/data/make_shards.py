"""Write an image folder as img2dataset-style webdataset shards: KEY.jpg/.png/.webp, KEY.txt, KEY.json.

    python -m trainer.data.make_shards /data/imagenet/train /data/shards/imagenet --shard-size 1000

Works on an ImageNet-style folder (one subfolder per class) and on nested category trees such as
Debian's openclipart-png (/usr/share/openclipart/png). Image bytes are copied, never re-encoded.
The caption is a sibling ``<image stem>.txt`` when there is one, else the folder path in words;
the json holds {"label", "path", "caption"}. Each shard is written under a temporary name and
renamed when complete, so a killed run leaves no half shard under a final name. ``shards.txt`` in
the output folder lists the shards (usable as ``data.shards``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

from webdataset import TarWriter

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def find_images(root: Path) -> Iterator[Path]:
    """Image files under ``root`` in a stable (sorted, depth-first) order."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(folder) / name


def caption_for(path: Path, label: str) -> str:
    """The text beside the image if any, else the label with separators as spaces."""
    text = path.with_suffix(".txt")
    if text.is_file():
        return text.read_text(encoding="utf-8", errors="replace").strip()
    return " ".join(label.replace("_", " ").replace("-", " ").replace("/", " ").split())


def write_shards(root: Path, out: Path, shard_size: int, prefix: str = "", max_images: int = 0) -> list[Path]:
    """Write shards of ``shard_size`` samples from the images under ``root``; returns the shard paths."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder does not exist: {root}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    writer: TarWriter | None = None
    tmp = final = out
    for count, path in enumerate(find_images(root)):
        if max_images and count >= max_images:
            break
        if count % shard_size == 0:
            if writer is not None:
                writer.close()
                os.replace(tmp, final)
                shards.append(final)
            final = out / f"{prefix}{count // shard_size:05d}.tar"
            tmp = final.with_name(final.name + ".tmp")
            writer = TarWriter(str(tmp), encoder=False)
        rel = path.relative_to(root)
        label = rel.parent.as_posix() if rel.parent != Path(".") else ""
        caption = caption_for(path, label)
        meta = {"label": label, "path": rel.as_posix(), "caption": caption}
        assert writer is not None
        writer.write(
            {
                "__key__": f"{count:09d}",
                IMAGE_SUFFIXES[path.suffix.lower()]: path.read_bytes(),
                "txt": caption.encode("utf-8"),
                "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
            }
        )
    if writer is not None:
        writer.close()
        os.replace(tmp, final)
        shards.append(final)
    if not shards:
        raise ValueError(f"no .jpg/.jpeg/.png/.webp image under {root}")
    listing = out / f"{prefix}shards.txt"
    tmp_listing = listing.with_name(listing.name + ".tmp")
    tmp_listing.write_text("".join(f"{s.resolve()}\n" for s in shards), encoding="utf-8")
    os.replace(tmp_listing, listing)
    return shards


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; prints one line per shard written."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer.data.make_shards", description=__doc__.splitlines()[0]
    )
    parser.add_argument("root", type=Path, help="image folder (class subfolders or nested categories)")
    parser.add_argument("out", type=Path, help="output folder for the .tar shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--prefix", default="", help="shard file name prefix")
    parser.add_argument("--max-images", type=int, default=0, help="stop after this many images (0: all)")
    args = parser.parse_args(argv)
    shards = write_shards(args.root, args.out, args.shard_size, args.prefix, args.max_images)
    for shard in shards:
        print(shard)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
