"""Recipe sweep for the demo's distillation (issue 21): from the demo's compensated start, rows that differ in
one thing (input size, lr, objective, ...) and are compared in the same training-time budget.

    .venv/bin/python -m tools.demo --out demo_out      # first: shards, compensated_student.safetensors
    .venv/bin/python -m bench.demo_sweep --rows base224 size112            # the rows of ROWS, in order
    .venv/bin/python -m bench.demo_sweep --row "name=x steps=300 set=optim.base_lr=3.2e-4 set=data.image_size=112"

Every row is the demo's run (``tools.demo.launch_training``: 2 ranks x 4 images, FSDP2 on gloo, the mixed
stream, the trainer's default warm-up for compensated starts), plus the trainer's held-out validation at the
model's size (224 px, the 64 held-out clip-art pictures) ``--val-points`` times along the run, then the export
(``python -m trainer export``) evaluated by ``tools.demo.evaluate`` on the quick probe (Fashion-MNIST 1,000 /
300 at 112 px; ``--full-probe``: the demo's 3,000 / 1,500). A row's budget is its step count, chosen so that
the rows take about the same training time on a quiet machine (the measured seconds per step are recorded:
on a shared machine compare the validation at equal wall time, not only at the end).

Writes ``--results`` (default ``bench/results/demo_sweep.json``) after every row, merging with the rows
already there (a row of the same name is replaced).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.recovery import row_words

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "demo_sweep.json"
SMALL = ["model.kwargs.dynamic_img_size=true", "data.image_size=112"]
"""Training at 112 px (the demo's config since this sweep): timm resamples the 224 px position embedding per
batch, the weights keep their size."""
AT224 = ["data.image_size=0"]
"""Training at the teacher's 224 px."""
ROWS: dict[str, tuple[int, list[str]]] = {
    "base224": (60, AT224),
    "size112": (240, SMALL),
    "blocks224": (60, [*AT224, "loss.block_weight=5", "loss.blocks=[2,5,8]"]),
    "size112_lr1e-5": (240, [*SMALL, "optim.base_lr=3.2e-4"]),
    "size112_lr2.5e-6": (240, [*SMALL, "optim.base_lr=8e-5"]),
}
"""name -> (steps, trainer overrides). Peak lr = base_lr * 8 / 256 at the demo's 2 x 4 images (1.6e-4: 5e-6)."""


def parse_row(text: str) -> tuple[str, int, list[str]]:
    """``name=.. steps=.. [set=KEY=VALUE ...]`` -> (name, steps, overrides)."""
    name, steps, overrides = "", 0, []
    for key, value in row_words(text, ("name", "steps", "set")):
        if key == "name":
            name = value
        elif key == "steps":
            steps = int(value)
        elif "=" not in value:
            raise ValueError(f"--row {text!r}: set={value!r} is not set=KEY=VALUE")
        else:
            overrides.append(value)
    if not name or steps < 1:
        raise ValueError(f"--row {text!r}: name and steps >= 1 are required")
    return name, steps, overrides


def run_row(name: str, steps: int, overrides: list[str], ctx: dict, args: argparse.Namespace) -> dict:
    """Train, validate along the way, export and evaluate one row; its record."""
    from tools.demo import (
        MIX_WEIGHTS,
        evaluate,
        export_student,
        launch_training,
        load_export,
        read_curves,
        run_warmup_steps,
        validation_overrides,
        validation_trace,
    )

    out = args.out
    run_dir, export_dir = out / "sweep" / name / "run", out / "sweep" / name / "export"
    validation = validation_overrides(ctx["heldout_shard"], ctx["sizes"].heldout_images, steps // args.val_points)
    sources = [(ctx["train_list"], MIX_WEIGHTS["clipart"]), (ctx["fashion_list"], MIX_WEIGHTS["fashion"])]
    train_s = launch_training(run_dir, sources, steps, 2, ctx["sizes"].batch_size_per_rank, ctx["start"],
                              overrides=[*validation, *overrides])
    t0 = time.perf_counter()
    export = export_student(run_dir, export_dir)
    row = evaluate(name, load_export(export), ctx["heldout"], ctx["fmnist"], ctx["teacher_feats"], ctx["sizes"])[0]
    curves = read_curves(run_dir)
    loss = curves["loss/total"][1]
    warmup = run_warmup_steps(run_dir)
    step_s = curves_step_seconds(run_dir)
    return {"name": name, "steps": steps, "overrides": overrides, "warmup_steps": warmup,
            "train_s": round(train_s, 1), "seconds_per_step": step_s, "eval_s": round(time.perf_counter() - t0, 1),
            "row": row.__dict__, "validation": validation_trace(curves),
            "loss": {"first": loss[0], "max_during_warmup": max(loss[: max(1, warmup)]), "last": loss[-1]}}


def curves_step_seconds(run_dir: Path) -> float | None:
    """Median ``perf/step_time_s`` of the run (training only, validation excluded), from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    if "perf/step_time_s" not in acc.Tags()["scalars"]:
        return None
    values = sorted(e.value for e in acc.Scalars("perf/step_time_s"))
    return round(values[len(values) // 2], 3)


def main(argv: list[str] | None = None) -> int:
    from tools.demo import (
        COMPENSATED_FILE,
        FASHION_MNIST,
        FULL,
        build_fashion_shards,
        fashion_subset,
        heldout_features,
        log,
        read_shard_images,
    )
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    parser = argparse.ArgumentParser(prog="python -m bench.demo_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=[], choices=sorted(ROWS), help="rows of ROWS, in order")
    parser.add_argument("--row", action="append", default=[], help="'name=.. steps=.. set=KEY=VALUE ...'")
    parser.add_argument("--val-points", type=int, default=4, help="validations along each run (and step 0)")
    parser.add_argument("--full-probe", action="store_true", help="the demo's 3,000 / 1,500 probe")
    parser.add_argument("--out", type=Path, default=REPO / "demo_out", help="the demo's output folder")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    plan = [(name, *ROWS[name]) for name in args.rows] + [parse_row(text) for text in args.row]
    if not plan:
        parser.error("no rows: give --rows and/or --row")
    start = args.out / COMPENSATED_FILE
    if not start.is_file():
        print(f"error: {start} not found: run python -m tools.demo --out {args.out} first", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    sizes = FULL if args.full_probe else replace(FULL, knn_train=FULL.quick_train, knn_test=FULL.quick_test)
    heldout_shard = args.out / "shards" / "heldout" / "00000.tar"
    heldout = read_shard_images(heldout_shard, sizes.heldout_images)
    # The stream's Fashion-MNIST images stay outside the demo's full probe sample, whatever probe is evaluated.
    fmnist = fashion_subset(sizes, FASHION_MNIST)
    fashion_list = build_fashion_shards(args.out, FASHION_MNIST, FULL, fashion_subset(FULL, FASHION_MNIST)["train_index"])
    teacher = load_dinov2_vits14().eval()
    teacher_feats = heldout_features(teacher, heldout)
    ctx = {"sizes": sizes, "heldout": heldout, "heldout_shard": heldout_shard, "fmnist": fmnist, "start": start,
           "train_list": args.out / "shards" / "train" / "shards.txt", "fashion_list": fashion_list,
           "teacher_feats": teacher_feats}
    record = json.loads(args.results.read_text()) if args.results.is_file() else {
        "bench": "demo_sweep", "question": "issue 21: which recipe moves the demo's recovered cosine furthest in "
        "the same training time?", "start": str(start), "rows": []}
    record["probe"] = (f"Fashion-MNIST {sizes.knn_train} train / {sizes.knn_test} test at {sizes.knn_image_size} px "
                       "(the demo's sample, seed 0), kNN k=20 and the linear probe on the CLS token")
    record["heldout"] = f"{sizes.heldout_images} held-out clip-art pictures at 224 px (validation and final row)"
    for name, steps, overrides in plan:
        log(f"sweep row {name}: {steps} steps, {overrides}")
        result = run_row(name, steps, overrides, ctx, args)
        result["command"] = "python -m bench.demo_sweep " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        record["rows"] = [r for r in record["rows"] if r["name"] != name] + [result]
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(record, indent=1))
        row = result["row"]
        log(f"sweep row {name}: CLS {row['cls_cosine']:.4f} patch {row['patch_cosine']:.4f} kNN "
            f"{100 * row['knn_top1']:.1f} linear {100 * row['linear_top1']:.1f}; train {result['train_s']:.0f} s, "
            f"{result['seconds_per_step']} s/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
