"""Re-evaluate a demo folder's models with the demo's current evaluation (issue 21: the linear probe's weight decay
validated on the train sample instead of a fixed 1e-4): the teacher, the plain pruned model, the compensated start
and any number of exports of that folder (``export``, ``export_<tag>`` from ``bench.demo_recipe``).

    .venv/bin/python -m bench.demo_probe /tmp/demo_final2 export export_seed1 --out /tmp/probe.json [--grid]

Prints one log line per model and writes the rows (``tools.report.ModelRow`` fields, 0-1) to ``--out``. ``--grid``
adds each model's 5-fold accuracy on the probe's train sample for the fixed 1e-4 of earlier sessions and every
candidate of ``trainer.eval.linear_probe.WEIGHT_DECAYS`` (a second feature extraction per model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file

    from tools.demo import (
        COMPENSATED_FILE,
        FASHION_MNIST,
        FULL,
        METHOD,
        RATIO,
        evaluate,
        fashion_features,
        fashion_subset,
        heldout_features,
        load_export,
        pruned_copy,
        read_shard_images,
    )
    from trainer.eval.linear_probe import WEIGHT_DECAYS, fold_accuracies
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    parser = argparse.ArgumentParser(prog="python -m bench.demo_probe", description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="a tools.demo output folder (shards, compensated start, exports)")
    parser.add_argument("exports", nargs="*", help="export folders inside it")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the rows")
    parser.add_argument("--grid", action="store_true", help="5-fold accuracy of each weight decay, 1e-4 included")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    heldout = read_shard_images(args.demo / "shards" / "heldout" / "00000.tar", FULL.heldout_images)
    fmnist = fashion_subset(FULL, FASHION_MNIST)
    teacher = load_dinov2_vits14().eval()
    teacher_feats = heldout_features(teacher, heldout)
    compensated = pruned_copy(teacher, RATIO, METHOD)  # the shapes; the weights are the saved start's
    compensated.load_state_dict(load_file(str(args.demo / COMPENSATED_FILE)), strict=True)
    models = {"teacher": teacher, "pruned": pruned_copy(teacher, RATIO, METHOD), "compensated": compensated}
    models.update({name: load_export(args.demo / name) for name in args.exports})
    rows, grid = {}, {}
    for name, model in models.items():
        rows[name] = evaluate(name, model.eval(), heldout, fmnist, teacher_feats, FULL)[0].__dict__
        if args.grid:
            train_f, _ = fashion_features(model, fmnist, FULL.knn_image_size)
            accuracy = fold_accuracies(train_f, fmnist["train_y"], (1e-4, *WEIGHT_DECAYS))
            grid[name] = {f"{wd:g}": acc for wd, acc in accuracy.items()}
            print(f"{name}: 5-fold accuracy by weight decay {grid[name]}", flush=True)
        args.out.write_text(json.dumps({"demo": str(args.demo), "rows": rows, "fivefold": grid}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
