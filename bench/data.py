"""Images/s of the webdataset pipeline against a bare loop doing the same reads, decodes and resizes.

    .venv/bin/python -m bench.data [--images 512] [--workers 2] [--size 224] [--repeats 3]

Both read the same tar shards with the same number of processes: the pipeline through
WebDatasetStream (DataLoader workers, shard split, shuffle buffer, decode, crop/resize,
uint8 batching, hand-over to the training process; normalising is the training device's job), the bare loop as a process pool where each process
opens its shards with tarfile and calls the same decode and crop/resize functions. Also times JPEG
decode alone with simplejpeg and with PIL (both with DCT downscaling). Rates are given per wall
second and per CPU second (all processes of the run: robust on a machine shared with other jobs).
Prints the ratios and writes
bench/results/data.json. Best of ``--repeats`` for every figure (bare and pipeline runs alternate), same shards.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import platform
import resource
import tarfile
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from webdataset import TarWriter

from trainer.data import DataConfig, InputSpec, WebDatasetStream
from trainer.data.decode import crop_resize, decode_rgb

RESULTS = Path(__file__).parent / "results" / "data.json"
SHARD_SIZE = 32


def photo_like(rng: np.random.Generator) -> bytes:
    """A JPEG of LAION-like size (shorter side 300-500 px) with smooth content plus grain."""
    h, w = int(rng.integers(300, 500)), int(rng.integers(400, 700))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [np.sin(x / rng.uniform(20, 80) + c) * np.cos(y / rng.uniform(20, 80)) for c in range(3)], -1
    )
    pixels = np.clip(127 + 100 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(root: Path, n_images: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(0, n_images, SHARD_SIZE):
        path = root / f"{s // SHARD_SIZE:05d}.tar"
        with TarWriter(str(path), encoder=False) as w:
            for i in range(s, min(s + SHARD_SIZE, n_images)):
                w.write({"__key__": f"{i:09d}", "jpg": photo_like(rng), "txt": f"image {i}".encode()})
        paths.append(str(path))
    return paths


def bare_shard(args: tuple[str, int, str]) -> int:
    """One process's work in the bare loop: every JPEG of one shard decoded and resized."""
    path, size, jpeg = args
    n = 0
    with tarfile.open(path) as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                data = tar.extractfile(member).read()
                crop_resize(decode_rgb(data, "jpg", size, jpeg), size)
                n += 1
    return n


class Run(NamedTuple):
    seconds: float
    cpu_seconds: float  # this process and its reaped children: fair on a machine shared with others
    images: int
    first_batch_s: float


def cpu_now() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_bare(paths: list[str], size: int, workers: int, jpeg: str) -> Run:
    start, cpu = time.perf_counter(), cpu_now()
    with mp.get_context("fork").Pool(workers) as pool:
        n = sum(pool.map(bare_shard, [(p, size, jpeg) for p in paths], chunksize=1))
    return Run(time.perf_counter() - start, cpu_now() - cpu, n, 0.0)


def time_pipeline(pattern: str, spec: InputSpec, workers: int, jpeg: str) -> Run:
    """One epoch through WebDatasetStream, including its worker start-up."""
    cfg = DataConfig(kind="webdataset", shards=pattern, num_workers=workers, shuffle_buffer=64)
    stream = WebDatasetStream(cfg, spec, batch_size=32, rank=0, world_size=1, seed=0, jpeg=jpeg)
    start, cpu = time.perf_counter(), cpu_now()
    n, first = 0, 0.0
    for batch in stream.iter_epoch():
        first = first or time.perf_counter() - start
        n += len(batch)
    return Run(time.perf_counter() - start, cpu_now() - cpu, n, first)


def time_decode(blobs: list[bytes], size: int, jpeg: str) -> float:
    start = time.perf_counter()
    for data in blobs:
        decode_rgb(data, "jpg", size, jpeg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = InputSpec(args.size, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(Path(tmp), args.images)
        pattern = str(Path(tmp) / f"{{00000..{len(paths) - 1:05d}}}.tar")
        blobs = []
        for p in paths[:2]:
            with tarfile.open(p) as tar:
                blobs += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
        for jpeg in ("pil", "simplejpeg"):
            seconds = min(time_decode(blobs, args.size, jpeg) for _ in range(args.repeats))
            rows[f"decode_only_{jpeg}_img_per_s"] = len(blobs) / seconds
            # bare and pipeline runs alternate so that load from other processes hits both alike
            runs: dict[str, list[Run]] = {"bare": [], "pipeline": []}
            for _ in range(args.repeats):
                runs["bare"].append(time_bare(paths, args.size, args.workers, jpeg))
                runs["pipeline"].append(time_pipeline(pattern, spec, args.workers, jpeg))
            for name, timings in runs.items():
                assert all(r.images == args.images for r in timings), (name, timings)
                rows[f"{name}_{jpeg}_img_per_s"] = args.images / min(r.seconds for r in timings)
                rows[f"{name}_{jpeg}_img_per_cpu_s"] = args.images / min(r.cpu_seconds for r in timings)
            # start-up (worker fork, shuffle buffer fill, first decodes) is paid once per epoch
            rows[f"pipeline_{jpeg}_first_batch_s"] = min(r.first_batch_s for r in runs["pipeline"])
    for jpeg in ("pil", "simplejpeg"):
        for unit in ("s", "cpu_s"):
            pipe, bare = rows[f"pipeline_{jpeg}_img_per_{unit}"], rows[f"bare_{jpeg}_img_per_{unit}"]
            rows[f"ratio_pipeline_over_bare_{jpeg}_per_{unit}"] = pipe / bare
    rows["ratio_simplejpeg_over_pil_decode_only"] = (
        rows["decode_only_simplejpeg_img_per_s"] / rows["decode_only_pil_img_per_s"]
    )
    result = {
        "images": args.images,
        "workers": args.workers,
        "size": args.size,
        "repeats": args.repeats,
        "machine": f"{platform.machine()} {mp.cpu_count()} cpu, torch {torch.__version__}",
        **{k: round(v, 3) for k, v in rows.items()},
    }
    for key, value in result.items():
        print(f"{key:44s} {value}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
