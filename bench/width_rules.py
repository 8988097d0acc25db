"""The harness of the issue-22 experiments: other rules for per-block widths against uniform and the product's.

Each draw takes ``--calib`` clip-art pictures (a seeded subset of ``--pool``), plans ``pruning.Budget`` on them
and asks every rule for its widths; uniform, adaptive (the product's plan) and each rule's widths are then pruned
and compensated with the plan's orders (output mode, class token balanced) and evaluated as in ``bench.adaptive``.
The JSON holds the rows, each draw's widths and the paired differences against uniform.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import pruning
from bench.adaptive import SEED, log, paired_difference, pairs, row
from bench.compensation import Evaluator, forward_features, load_images


@dataclass
class Draw:
    """What a rule sees of one calibration draw."""

    index: int
    teacher: nn.Module
    images: torch.Tensor
    """The draw's calibration pictures, normalised, 224 px."""
    batches: list[torch.Tensor]
    spare: torch.Tensor
    """The pool's other pictures (not the held-out ones), in the draw's seeded order."""
    budget: pruning.Budget
    calibration: pruning.Calibration
    plan: pruning.WidthPlan
    """The product's plan on these pictures (its orders serve every rule)."""

    @property
    def uniform_width(self) -> int:
        return self.plan.summary["uniform_units"] // len(self.plan.widths)


def compensated(draw: Draw, widths: list[int], planned: bool = True) -> nn.Module:
    """A copy of the teacher pruned to ``widths`` and compensated on the draw's pictures (``planned``: with the
    plan's selection orders; otherwise a fresh selection, as uniform pruning makes)."""
    model = copy.deepcopy(draw.teacher).eval()
    with torch.no_grad():
        pruning.prune_blocks(pruning.ModelSource(model, forward_features), widths, calibration=draw.calibration,
                             calib_inputs=draw.batches, orders=draw.plan.orders if planned else None)
    return model


Rule = Callable[[Draw], tuple[list[int], dict]]
"""A draw -> (widths, facts for the JSON)."""


def rule_parser(prog: str, description: str, out: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--calib", type=int, default=128, help="calibration pictures per draw")
    parser.add_argument("--pool", type=int, default=384, help="clip-art pictures the draws are taken from")
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--out", type=Path, default=out)
    return parser


def compare_rules(prog: str, args: argparse.Namespace, rules: dict[str, Rule]) -> int:
    """Run every draw (see the module docstring), rewriting ``args.out`` after each."""
    from tools.demo import FASHION_MNIST, FULL, fashion_subset
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    pool, heldout = load_images(args.pool, args.heldout, 1_000_000)
    sizes = FULL.__class__(**{**FULL.__dict__, "knn_train": 1000, "knn_test": 500})
    teacher = load_dinov2_vits14()
    evaluate = Evaluator(teacher, heldout, fashion_subset(sizes, FASHION_MNIST), 112)
    calibration = pruning.Calibration(balance_prefix=True)
    budget = pruning.Budget(ratio=args.ratio, grid=args.grid)
    rows, plans = [], {}
    for index in range(args.draws):
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(SEED + index))
        pick = order[: args.calib]
        batches = list(pool[pick].split(16))
        source = pruning.ModelSource(copy.deepcopy(teacher).eval(), forward_features)
        plan = pruning.plan_widths(source, budget, calibration=calibration, calib_inputs=batches)
        draw = Draw(index, teacher, pool[pick], batches, pool[order[args.calib:]], budget, calibration, plan)
        chosen = {"uniform": [draw.uniform_width] * len(plan.widths), "adaptive": plan.widths}
        plans[index] = {"adaptive": plan.widths}
        for name, rule in rules.items():
            tick = time.perf_counter()
            chosen[name], facts = rule(draw)
            plans[index] |= {name: chosen[name], f"{name}_s": round(time.perf_counter() - tick, 1), **facts}
            log(f"draw {index}: widths adaptive {plan.widths}, {name} {chosen[name]} ({plans[index][f'{name}_s']} s)")
        for kind, widths in chosen.items():
            model = compensated(draw, widths, planned=kind != "uniform")
            rows.append(row(args.ratio, kind, index, model, evaluate))
            r = rows[-1]
            log(f"draw {index} {kind}: CLS {r['cls_cosine']:.4f} patch {r['patch_cosine']:.4f} kNN {r['knn_top1']:.1f} "
                f"({time.perf_counter() - t0:.0f} s)")
        paired = {f"{kind} - uniform": paired_difference(pairs(rows, kind)) for kind in ("adaptive", *rules)}
        args.out.write_text(json.dumps({"command": f"python -m {prog} " + " ".join(sys.argv[1:]),
                                        "teacher": evaluate.teacher_row, "rows": rows, "plans": plans,
                                        "paired": paired, "elapsed_s": round(time.perf_counter() - t0)},
                                       indent=1) + "\n")
        print(json.dumps(paired, indent=1))
    return 0
