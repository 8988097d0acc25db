"""Issue 22 experiment: weigh each block's error by the Gauss-Newton curvature of the final token directions.

``pruning.budget`` weighs a block's MLP output error by its LayerScale and divides by the block's output energy.
Here every output channel ``c`` of block ``b``'s MLP gets ``G_b[c] = E ||d f / d y_b[c]||^2``: how much a change
of that channel moves the direction of the tower's final tokens ``f`` (the quantity the cosine rows measure), the
diagonal of ``J^T J`` estimated with random projections ``u`` (``E_u (J^T u)^2``). CLS and patch tokens weigh
half each, as in the cosine rows. The curve ``e_b(w) = E sum_c G_b[c] (y_w - y)_c^2`` (no energy division: the
weights carry the scale) is computed with ``pruning.budget.width_errors`` from the same statistics as the
product's; ``allocate`` then chooses the widths. Rows: uniform, adaptive (the product's rule), fisher (this
rule), same calibration draw and evaluation as ``bench.adaptive``.

    .venv/bin/python -m bench.adaptive_fisher --draws 3   # -> bench/results/adaptive_fisher.json
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import pruning
from bench.adaptive import RESULTS, SEED
from bench.compensation import forward_features
from bench.width_rules import Draw, compare_rules, rule_parser
from pruning.budget import WidthCurve, allocate, width_errors
from pruning.fit import ActivationStats, holdout_mask


def _out_linears(tower: nn.Module) -> list[tuple[pruning.MlpSite, nn.Linear]]:
    return [(s, getattr(s.module(tower), s.out_name)) for s in pruning.find_mlp_sites(tower)]


def curvature(tower: nn.Module, images: torch.Tensor, projections: int, generator: torch.Generator
              ) -> list[torch.Tensor]:
    """``G_b`` [D] for every block: mean over tokens of ``E_u (d <u, f/|f|> / d y_b)^2``, CLS and patches half each."""
    tower = copy.deepcopy(tower).eval().requires_grad_(False)  # gradients to the activations only
    linears = _out_linears(tower)
    outputs: dict[int, torch.Tensor] = {}

    def keep(i: int):
        def hook(_m, _a, y):
            y.retain_grad()
            outputs[i] = y
        return hook

    handles = [lin.register_forward_hook(keep(i)) for i, (_, lin) in enumerate(linears)]
    totals = [torch.zeros(lin.out_features, dtype=torch.float64) for _, lin in linears]
    count = 0
    try:
        for batch in images.split(8):
            outputs.clear()
            tokens = forward_features(tower, batch.clone().requires_grad_(True))
            direction = tokens / tokens.norm(dim=-1, keepdim=True)
            n_tok = direction.shape[1]
            weight = torch.full((n_tok, 1), (0.5 / (n_tok - 1)) ** 0.5)
            weight[0] = 0.5 ** 0.5
            for p in range(projections):
                u = torch.randn(direction.shape, generator=generator)
                for y in outputs.values():
                    y.grad = None
                (direction * u * weight).sum().backward(retain_graph=p < projections - 1)
                for i, y in outputs.items():
                    totals[i] += y.grad.double().square().reshape(-1, y.shape[-1]).mean(0)
                count += 1
    finally:
        for h in handles:
            h.remove()
    return [t / count for t in totals]


def curves(tower: nn.Module, batches: list[torch.Tensor], orders: dict[str, torch.Tensor], widths: list[int],
           channel_weights: list[torch.Tensor], ridge: float, holdout: float) -> list[WidthCurve]:
    """Each block's error at ``widths`` on the original model's states, channels weighted by ``channel_weights``."""
    linears = _out_linears(tower)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [lin.register_forward_hook(lambda _m, args, y, i=i: captured.__setitem__(i, (args[0], y)))
               for i, (_, lin) in enumerate(linears)]
    stats = [[ActivationStats(widths[-1] + lin.out_features, product_dtype=torch.float32) for _ in range(2)]
             for _, lin in linears]
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                forward_features(tower, batch)
                for i, (site, _) in enumerate(linears):
                    a, y = captured[i]
                    joint = torch.cat([a.reshape(-1, a.shape[-1])[:, orders[site.path][: widths[-1]]],
                                       y.reshape(-1, y.shape[-1])], 1)
                    mask = holdout_mask(seen, joint.shape[0], holdout)
                    stats[i][0].update(joint[~mask])
                    stats[i][1].update(joint[mask])
                seen += joint.shape[0]
    finally:
        for h in handles:
            h.remove()
    out = []
    for (site, lin), (fit, held), v in zip(linears, stats, channel_weights, strict=True):
        order = orders[site.path][: widths[-1]]
        errors = width_errors(fit, held, torch.arange(order.numel()), lin.weight[:, order], lin.bias, ridge, widths, v)
        out.append(WidthCurve(site.path, widths, errors, 1))
    return out


def fisher_widths(draw: Draw, images: int = 32, projections: int = 4) -> tuple[list[int], dict]:
    """The curvature rule's widths for a draw (curvature on its first ``images`` pictures), and its facts."""
    weights = curvature(draw.teacher, draw.images[:images], projections,
                        torch.Generator().manual_seed(SEED + draw.index))
    widths = draw.budget.candidates(pruning.find_mlp_sites(draw.teacher)[0].hidden, draw.uniform_width)
    found = curves(draw.teacher, draw.batches, draw.plan.orders, widths, weights, draw.calibration.ridge,
                   draw.calibration.holdout_fraction)
    return allocate(found, draw.plan.summary["uniform_units"]), {
        "curvature_mean": [float(w.mean()) for w in weights], "fisher_curves": {c.path: c.errors for c in found}}


def main(argv: list[str] | None = None) -> int:
    prog = "bench.adaptive_fisher"
    parser = rule_parser(prog, __doc__.splitlines()[0], RESULTS / "adaptive_fisher.json")
    parser.add_argument("--fisher-images", type=int, default=32, help="calibration pictures the curvature uses")
    parser.add_argument("--projections", type=int, default=4)
    args = parser.parse_args(argv)

    def fisher(draw: Draw) -> tuple[list[int], dict]:
        return fisher_widths(draw, args.fisher_images, args.projections)

    return compare_rules(prog, args, {"fisher": fisher})


if __name__ == "__main__":
    raise SystemExit(main())
