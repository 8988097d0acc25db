"""Local refinement of the compensated MLPs on the demo's DINOv2 ViT-S/14 at r=1 (issue 21): held-out clip-art
cosine and wall time of each setting against the closed form alone, in the same process.

    .venv/bin/python -m tools.demo --out demo_out        # first: the shards
    .venv/bin/python -m bench.refine --variants 300:1e-3:512 600:1e-3:512 300:1e-3:1024

A variant is ``steps:lr:images`` (calibration pictures of the demo's mixed stream, half clip art, half
Fashion-MNIST; ``tools.demo.CALIBRATION`` otherwise). Rows: CLS / patch cosine to the teacher's tokens on the
64 held-out pictures at 224 px, seconds of ``pruned_copy`` (prune + compensate + refine), and the ratio of
each to the closed form's on the same pictures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="the demo's output folder (shards)")
    parser.add_argument("--variants", nargs="+", default=["300:1e-3:512"], help="steps:lr:images")
    parser.add_argument("--results", type=Path, default=Path("bench/results/refine.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from tools import demo
    from trainer.eval import token_fidelity
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    args = parse_args(argv)
    train_list = args.out / "shards" / "train" / "shards.txt"
    fashion_list = args.out / "shards" / "fashion" / "shards.txt"
    heldout = args.out / "shards" / "heldout" / "00000.tar"
    if not all(p.is_file() for p in (train_list, fashion_list, heldout)):
        print(f"error: no demo shards under {args.out}: run python -m tools.demo --out {args.out} first",
              file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    teacher = load_dinov2_vits14().eval()
    held = demo.read_shard_images(heldout, demo.FULL.heldout_images)

    reference = demo.heldout_features(teacher, held)

    def measure(steps: int, lr: float, images: int) -> dict:
        calib = demo.mixed_calibration(train_list, fashion_list, images)
        calibration = dataclasses.replace(demo.CALIBRATION, refine_steps=steps, refine_lr=lr)
        start = time.perf_counter()
        student = demo.pruned_copy(teacher, demo.RATIO, demo.METHOD, compensate_on=calib, calibration=calibration)
        seconds = time.perf_counter() - start
        fid = token_fidelity(demo.heldout_features(student, held), reference)
        return {"steps": steps, "lr": lr, "images": images, "seconds": round(seconds, 1),
                "cls": round(fid["cls_cosine"], 4), "patch": round(fid["patch_cosine"], 4)}

    rows, closed_form = [], {}
    for variant in args.variants:
        steps, lr, images = variant.split(":")
        if images not in closed_form:
            closed_form[images] = measure(0, 1e-3, int(images))
        base = closed_form[images]
        row = measure(int(steps), float(lr), int(images))
        row["vs_closed_form"] = {key: round(row[key] / base[key], 3) for key in ("cls", "patch", "seconds")}
        row["closed_form"] = base
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"command": "python -m bench.refine --variants " + " ".join(args.variants),
                                        "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
