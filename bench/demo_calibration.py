"""Recipes for the demo's compensated start (issue 21): each variant prunes the demo's DINOv2 ViT-S/14 at r=1 with
compensation and refinement on calibration pictures of the demo's stream, then evaluates it as the demo does
(Fashion-MNIST kNN and linear probe on 3,000 / 1,500 at 112 px, cosine on the 64 held-out clip-art pictures).

    .venv/bin/python -m tools.demo --out demo_out        # first: the shards
    .venv/bin/python -m bench.demo_calibration clip=576,fm=192,stride=4,ridge=1e-2 clip=256,fm=256,stride=2

A variant is ``key=value`` pairs: ``clip`` / ``fm`` (clip-art / Fashion-MNIST pictures, the first of each stream),
``method`` (default activation), ``stride`` (selection_stride, default 2), ``ridge`` (1e-3), ``steps`` (refinement,
300), ``lr`` (refinement, 1e-3); the rest is ``tools.demo.CALIBRATION``. Rows: the four measures and the seconds of
prune + compensate + refine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

KEYS = {"clip": int, "fm": int, "method": str, "stride": int, "ridge": float, "steps": int, "lr": float}


def parse_variant(text: str) -> dict:
    """``clip=576,fm=192,stride=4`` -> the settings, defaults filled in."""
    settings = {"clip": 256, "fm": 256, "method": "activation", "stride": 2, "ridge": 1e-3, "steps": 300, "lr": 1e-3}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in KEYS:
            raise ValueError(f"unknown setting {part!r}; expected one of {sorted(KEYS)}")
        settings[key] = KEYS[key](value)
    return settings


def main(argv: list[str] | None = None) -> int:
    from tools import demo
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="the demo's output folder (shards)")
    parser.add_argument("--results", type=Path, default=Path("bench/results/demo_calibration.json"))
    args = parser.parse_args(argv)
    variants = [(text, parse_variant(text)) for text in args.variants]
    shards = args.out / "shards"
    train_list, fashion_list = shards / "train" / "shards.txt", shards / "fashion" / "shards.txt"
    if not (train_list.is_file() and fashion_list.is_file()):
        print(f"error: no demo shards under {args.out}: run python -m tools.demo --out {args.out} first",
              file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    teacher = load_dinov2_vits14().eval()
    heldout = demo.read_shard_images(shards / "heldout" / "00000.tar", demo.FULL.heldout_images)
    fmnist = demo.fashion_subset(demo.FULL, demo.FASHION_MNIST)
    _, teacher_features, _ = demo.evaluate("teacher", teacher, heldout, fmnist, None, demo.FULL)
    rows = []
    for text, v in variants:
        calib = torch.cat([demo.calibration_images(train_list, v["clip"]), demo.calibration_images(fashion_list, v["fm"])])
        calibration = dataclasses.replace(demo.CALIBRATION, selection_stride=v["stride"], ridge=v["ridge"],
                                          refine_steps=v["steps"], refine_lr=v["lr"])
        start = time.perf_counter()
        model = demo.pruned_copy(teacher, demo.RATIO, v["method"], compensate_on=calib, calibration=calibration)
        seconds = time.perf_counter() - start
        row, _, _ = demo.evaluate(text, model, heldout, fmnist, teacher_features, demo.FULL)
        rows.append({"spec": text, "seconds": round(seconds), "cls": round(row.cls_cosine, 4),
                     "patch": round(row.patch_cosine, 4), "knn": round(100 * row.knn_top1, 1),
                     "linear": round(100 * row.linear_top1, 1)})
        print(rows[-1], flush=True)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"command": "python -m bench.demo_calibration " + " ".join(args.variants),
                                            "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
