"""Write an image folder as img2dataset-style webdataset shards: KEY.jpg/.png/.webp, KEY.txt, KEY.json.

    python -m trainer.data.make_shards /data/imagenet/train /data/shards/imagenet --shard-size 1000

Works on an ImageNet-style folder (one subfolder per class) and on nested category trees such as
Debian's openclipart-png (/usr/share/openclipart/png). Image bytes are copied, never re-encoded.
The caption is a sibling ``<image stem>.txt`` when there is one, else the folder path in words;
the json holds {"label", "path", "caption"}. Each shard is written under a temporary name and
renamed when complete, so a killed run leaves no half shard under a final name. ``shards.txt`` in
the output folder lists the shards (usable as ``data.shards``).

The command prints one summary line, warns when there are too few shards to give every rank and
DataLoader worker one (training without ``data.resampled`` needs ranks x data.num_workers), and
refuses an output folder that already holds files unless ``--overwrite`` is given (then the old
shards and list of the same prefix are removed first). Errors: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from webdataset import TarWriter

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
TYPICAL_RANKS, TYPICAL_WORKERS = 2, 2
"""The smallest multi-rank run (2 ranks, data.num_workers' default 2): fewer shards than their product warn."""


@dataclass(frozen=True)
class ShardSet:
    """What one make_shards run wrote."""

    shards: list[Path]
    images: int


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
    return write_shard_set(root, out, shard_size, prefix, max_images).shards


def write_shard_set(root: Path, out: Path, shard_size: int, prefix: str = "", max_images: int = 0) -> ShardSet:
    """``write_shards``, also counting the images written (for the summary line)."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder does not exist: {root}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    writer: TarWriter | None = None
    tmp = final = out
    images = 0
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
        images = count + 1
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
    return ShardSet(shards, images)


def own_files(out: Path, prefix: str) -> list[Path]:
    """Files a make_shards run with ``prefix`` writes in ``out``: shards, their temporaries, the list."""
    pattern = re.compile(re.escape(prefix) + r"(\d{5,}\.tar(\.tmp)?|shards\.txt(\.tmp)?)")
    return [p for p in out.iterdir() if p.is_file() and pattern.fullmatch(p.name)]


def prepare_output(out: Path, prefix: str, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``; then remove the old shards so none is left stale."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"output folder {out} is a file")
    present = list(out.iterdir())
    if not present:
        return
    if not overwrite:
        raise FileExistsError(f"output folder {out} is not empty ({len(present)} entries); "
                              "pass --overwrite to replace its shards, or choose another folder")
    for old in own_files(out, prefix):
        old.unlink()


def too_few_shards(written: ShardSet) -> str | None:
    """A warning when the shards cannot give two ranks with two DataLoader workers one each, else None."""
    needed = TYPICAL_RANKS * TYPICAL_WORKERS
    if len(written.shards) >= needed or written.images < needed:
        return None
    return (f"warning: {len(written.shards)} shard(s) for {written.images} images: without data.resampled, "
            f"training needs ranks x data.num_workers shards ({TYPICAL_RANKS} x {TYPICAL_WORKERS} = {needed}); "
            f"--shard-size {max(1, written.images // needed)} would give {needed}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: one summary line; user errors one line and status 2 (trainer.cli)."""
    from trainer.cli import one_line_errors

    return one_line_errors(_main, sys.argv[1:] if argv is None else list(argv))


def _main(argv: list[str]) -> int:
    """Parse, check the output folder, write, summarise."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer.data.make_shards", description=__doc__.splitlines()[0]
    )
    parser.add_argument("root", type=Path, help="image folder (class subfolders or nested categories)")
    parser.add_argument("out", type=Path, help="output folder for the .tar shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--prefix", default="", help="shard file name prefix")
    parser.add_argument("--max-images", type=int, default=0, help="stop after this many images (0: all)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output folder, replacing its shards of this prefix")
    args = parser.parse_args(argv)
    if not args.root.is_dir():  # before the output folder is looked at: the likelier mistake first
        raise FileNotFoundError(f"image folder does not exist: {args.root}")
    prepare_output(args.out, args.prefix, args.overwrite)
    written = write_shard_set(args.root, args.out, args.shard_size, args.prefix, args.max_images)
    warning = too_few_shards(written)
    if warning:
        print(warning, file=sys.stderr)
    listing = args.out / f"{args.prefix}shards.txt"
    print(f"{written.images} images -> {len(written.shards)} shard(s) of up to {args.shard_size} in {args.out} "
          f"(list: {listing})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
