"""Issue 22 experiment: weigh each block's error curve by how much a change of its output reaches the tower's output.

``pruning.budget`` sums per-block errors relative to each block's own output energy. Here each block ``b`` also
gets a measured gain ``g_b``: on calibration pictures, block ``b``'s MLP output is moved a fraction ``alpha`` of
the way to its plain pruned output at the uniform width (first units of its selection order), and
``g_b = (relative change of the final tokens) / (relative change of block b's output)``. The widths then minimise
``sum_b g_b e_b(w_b)`` (``pruning.budget.allocate``) and are pruned and compensated with the plan's orders. Rows:
uniform, adaptive (the product's rule), propagated (this rule), same calibration draw, same evaluation as
``bench.adaptive``.

    .venv/bin/python -m bench.adaptive_propagated --draws 3   # -> bench/results/adaptive_propagated.json
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
from torch import nn

import pruning
from bench.adaptive import RESULTS, SEED, log, mean_sd, row
from bench.compensation import Evaluator, forward_features, load_images
from pruning.budget import WidthCurve, allocate
from pruning.surgery import prune_site


def propagation_gains(tower: nn.Module, orders: dict[str, torch.Tensor], width: int, images: torch.Tensor,
                      alpha: float = 0.1) -> list[float]:
    """``g_b`` for every block (see the module docstring), on ``images`` through ``forward_features``."""
    sites = pruning.find_mlp_sites(tower)
    blocks = [tower.get_submodule(s.path.rpartition(".")[0]) for s in sites]
    seen: dict[int, torch.Tensor] = {}
    keeps = [b.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            clean_final = forward_features(tower, images)
            clean = dict(seen)
            gains = []
            for i, site in enumerate(sites):
                mlp = site.module(tower)
                small = copy.deepcopy(mlp)
                prune_site(small, pruning.MlpSite(**{**vars(site), "path": ""}), orders[site.path][:width])
                hook = mlp.register_forward_hook(lambda _m, args, y, small=small: y + alpha * (small(args[0]) - y))
                try:
                    final = forward_features(tower, images)
                finally:
                    hook.remove()
                local = (seen[i] - clean[i]).square().sum() / clean[i].square().sum()
                reach = (final - clean_final).square().sum() / clean_final.square().sum()
                gains.append(float(reach / local))
    finally:
        for h in keeps:
            h.remove()
    return gains


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.adaptive_propagated", description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--pool", type=int, default=384)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--gain-images", type=int, default=32, help="calibration pictures the gains are measured on")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "adaptive_propagated.json")
    args = parser.parse_args(argv)

    from tools.demo import FASHION_MNIST, FULL, fashion_subset
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    pool, heldout = load_images(args.pool, args.heldout, 1_000_000)
    sizes = FULL.__class__(**{**FULL.__dict__, "knn_train": 1000, "knn_test": 500})
    teacher = load_dinov2_vits14()
    evaluate = Evaluator(teacher, heldout, fashion_subset(sizes, FASHION_MNIST), 112)
    calibration = pruning.Calibration(balance_prefix=True)
    rows, gains_by_draw = [], {}
    for draw in range(args.draws):
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(SEED + draw))[: args.calib]
        batches = list(pool[pick].split(16))
        base = copy.deepcopy(teacher).eval()
        source = pruning.ModelSource(base, forward_features)
        plan = pruning.plan_widths(source, pruning.Budget(ratio=args.ratio, grid=args.grid), calibration=calibration,
                                   calib_inputs=batches)
        uniform_width = plan.summary["uniform_units"] // len(source.sites)
        gains = propagation_gains(teacher, plan.orders, uniform_width, pool[pick][: args.gain_images], args.alpha)
        curves = [WidthCurve(path, c["widths"], [g * e for e in c["errors"]], 1)
                  for g, (path, c) in zip(gains, plan.summary["curves"].items(), strict=True)]
        propagated = allocate(curves, plan.summary["uniform_units"])
        gains_by_draw[draw] = {"gains": gains, "adaptive": plan.widths, "propagated": propagated}
        log(f"draw {draw}: gains {[round(g, 3) for g in gains]}; widths adaptive {plan.widths}, "
            f"propagated {propagated}")
        for kind, widths, orders in (("uniform", [uniform_width] * len(source.sites), None),
                                     ("adaptive", plan.widths, plan.orders), ("propagated", propagated, plan.orders)):
            model = copy.deepcopy(teacher).eval()
            with torch.no_grad():
                pruning.prune_blocks(pruning.ModelSource(model, forward_features), widths, calibration=calibration,
                                     calib_inputs=batches, orders=orders)
            rows.append(row(args.ratio, kind, draw, model, evaluate))
            r = rows[-1]
            log(f"draw {draw} {kind}: CLS {r['cls_cosine']:.4f} patch {r['patch_cosine']:.4f} kNN {r['knn_top1']:.1f} "
                f"({time.perf_counter() - t0:.0f} s)")
        paired = {f"{kind} - uniform": {m: mean_sd([a[m] - u[m] for a in rows for u in rows if a["kind"] == kind
                                                     and u["kind"] == "uniform" and a["draw"] == u["draw"]])
                                        for m in ("cls_cosine", "patch_cosine", "knn_top1")}
                  for kind in ("adaptive", "propagated")}
        args.out.write_text(json.dumps({"command": "python -m bench.adaptive_propagated " + " ".join(sys.argv[1:]),
                                        "teacher": evaluate.teacher_row, "rows": rows, "plans": gains_by_draw,
                                        "paired": paired, "elapsed_s": round(time.perf_counter() - t0)},
                                       indent=1) + "\n")
        print(json.dumps(paired, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
