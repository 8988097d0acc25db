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

import copy

import torch
from torch import nn

import pruning
from bench.adaptive import RESULTS
from bench.compensation import forward_features
from bench.width_rules import Draw, compare_rules, rule_parser
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
    prog = "bench.adaptive_propagated"
    parser = rule_parser(prog, __doc__.splitlines()[0], RESULTS / "adaptive_propagated.json")
    parser.add_argument("--gain-images", type=int, default=32, help="calibration pictures the gains are measured on")
    parser.add_argument("--alpha", type=float, default=0.1)
    args = parser.parse_args(argv)

    def propagated(draw: Draw) -> tuple[list[int], dict]:
        gains = propagation_gains(draw.teacher, draw.plan.orders, draw.uniform_width,
                                  draw.images[: args.gain_images], args.alpha)
        curves = [WidthCurve(path, c["widths"], [g * e for e in c["errors"]], 1)
                  for g, (path, c) in zip(gains, draw.plan.summary["curves"].items(), strict=True)]
        return allocate(curves, draw.plan.summary["uniform_units"]), {"gains": gains}

    return compare_rules(prog, args, {"propagated": propagated})


if __name__ == "__main__":
    raise SystemExit(main())
