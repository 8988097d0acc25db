"""Adaptive per-block widths at a parameter budget: error curves from one calibration pass, then an exact allocation.

``Budget(ratio=R)`` keeps the hidden units of uniform ``ratio=R`` but chooses each block's width on a grid to
minimise the summed held-out error ``E ||s (y_w - y)||^2 / E ||h_out||^2`` of the compensated block on the original
model's hidden states. Nested selection orders make every width's refit a prefix of one Cholesky expansion
(``width_errors``); ``allocate`` is an exact knapsack over blocks, ties to the narrower width (docs/adaptive.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .blockwise import (
    BlockSource,
    BlockState,
    Calibration,
    Selection,
    _post_norm,
    branch_scale,
    calibration_states,
    materialize,
    prune_blocks,
    site_tensors,
)
from .fit import ActivationStats, holdout_mask
from .sites import MlpSite
from .surgery import PruneReport, keep_counts, prune_site_tensors


@dataclass(frozen=True)
class Budget:
    """Per-block widths with the parameter count of uniform ``ratio``; widths on a grid within [min, max]."""

    ratio: float
    grid: int = 64
    """Every width is a multiple of this (64: whole tiles for GPU kernels)."""
    min_width: int | None = None
    """Narrowest block (default: one grid step)."""
    max_width: int | None = None
    """Widest block (default: twice the uniform width, at most every unit): the statistics grow with its square."""

    def __post_init__(self) -> None:
        if not self.ratio > 0:
            raise ValueError(f"budget ratio must be > 0, got {self.ratio}")
        if self.grid < 1:
            raise ValueError(f"budget grid must be >= 1, got {self.grid}")
        low = self.grid if self.min_width is None else self.min_width
        if low < 1 or (self.max_width is not None and self.max_width < low):
            raise ValueError(f"budget widths need 1 <= min_width <= max_width, got {self.min_width}, {self.max_width}")

    def candidates(self, hidden: int, uniform: int) -> list[int]:
        """The widths a block of ``hidden`` units, ``uniform`` wide at the budget's ratio, may take."""
        low = self.grid if self.min_width is None else self.min_width
        high = min(hidden, 2 * uniform if self.max_width is None else self.max_width)
        widths = list(range(math.ceil(low / self.grid) * self.grid, high + 1, self.grid))
        if not widths:
            raise ValueError(f"budget: no multiple of {self.grid} between {low} and {high} for a block of "
                             f"{hidden} hidden units")
        return widths


@dataclass
class WidthCurve:
    """One block's error at each candidate width (see the module docstring)."""

    path: str
    widths: list[int]
    errors: list[float]
    unit_params: int
    """Parameters per kept hidden unit (input rows, their biases, the output column)."""


@dataclass
class WidthPlan:
    """What ``plan_widths`` decided: the widths, each block's selection order and the report's summary."""

    widths: list[int]
    orders: dict[str, torch.Tensor]
    summary: dict


def plan_widths(source: BlockSource, budget: Budget, method: str = "diversity", *, calibration: Calibration,
                calib_inputs: Sequence[torch.Tensor | BlockState], generator: torch.Generator | None = None,
                scores: Mapping[str, torch.Tensor] | None = None,
                progress: Callable[[str], None] | None = None) -> WidthPlan:
    """Measure every block's error curve on the original model's hidden states (one read of each block) and
    allocate the widths; prune next with ``prune_blocks(source, plan.widths, orders=plan.orders, ...)``."""
    if calibration is None or not calib_inputs:
        raise ValueError("a width budget measures each block's error on calibration images: give a Calibration "
                         "and calibration images")
    if calibration.holdout_fraction <= 0:
        raise ValueError("a width budget measures errors on held-out tokens: holdout_fraction must be > 0")
    if method == "activation":
        raise ValueError("a width budget ranks units by a weight order (diversity, l2, random, taylor): method "
                         "'activation' picks them inside the compensation, at given widths")
    tick = time.perf_counter()
    choose = Selection(source, method, generator, scores)
    layout, states = calibration_states(source, calibration, calib_inputs)
    uniform = keep_counts(source.sites, ratio=budget.ratio)
    curves, orders = [], {}
    for i, (site, block_path, inner) in enumerate(zip(source.sites, layout.blocks, layout.sites, strict=True)):
        widths = budget.candidates(site.hidden, uniform[site.path])
        with source.read(block_path) as tensors:
            own = site_tensors(site, tensors, inner.path)
            orders[site.path] = choose(i, site, own, widths[-1])
            block = materialize(source.tower.get_submodule(block_path), tensors, label=f"{block_path}.",
                                device=source.device)
        one, two = (sum(t.numel() for t in prune_site_tensors(site, own, torch.arange(n)).values()) for n in (1, 2))
        errors, states = _block_curve(block, inner, states, orders[site.path], widths, calibration, site.path,
                                      source.reduce)
        curves.append(WidthCurve(site.path, widths, errors, two - one))
        del block
        if progress is not None:
            progress(f"[{i + 1}/{len(source.sites)}] {site.path}: error at {len(widths)} widths "
                     f"({time.perf_counter() - tick:.1f} s)")
    chosen = allocate(curves, sum(uniform.values()))
    summary = {**asdict(budget), "uniform_units": sum(uniform.values()), "units": sum(chosen), "widths": chosen,
               "predicted_error": [c.errors[c.widths.index(w)] for c, w in zip(curves, chosen, strict=True)],
               "uniform_error": [c.errors[c.widths.index(uniform[c.path])] if uniform[c.path] in c.widths else None
                                 for c in curves],
               "curves": {c.path: {"widths": c.widths, "errors": c.errors} for c in curves},
               "seconds": round(time.perf_counter() - tick, 3)}
    return WidthPlan(chosen, orders, summary)


def prune_to_budget(source: BlockSource, budget: Budget, method: str = "diversity", *, calibration: Calibration,
                    calib_inputs: Sequence[torch.Tensor | BlockState], generator: torch.Generator | None = None,
                    scores: Mapping[str, torch.Tensor] | None = None,
                    progress: Callable[[str], None] | None = None) -> PruneReport:
    """``plan_widths`` then ``prune_blocks`` with compensation (for sources that need no widths up front)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    common = dict(calibration=calibration, calib_inputs=calib_inputs, generator=generator, scores=scores,
                  progress=progress)
    plan = plan_widths(source, budget, method, **common)
    report = prune_blocks(source, plan.widths, method, orders=plan.orders, **common)
    report.calibration["budget"] = plan.summary
    return report


def _block_curve(block: nn.Module, site: MlpSite, states: list[BlockState], order: torch.Tensor, widths: list[int],
                 calibration: Calibration, label: str, reduce: Callable[[ActivationStats], None]
                 ) -> tuple[list[float], list[BlockState]]:
    """Errors of ``block`` at each width on ``states``, and the block's outputs (the next states); ``s`` from
    ``branch_scale``, behind a post-norm times the norm's gain over the token's scale (first order)."""
    out = getattr(site.module(block), site.out_name)
    post_norm = _post_norm(block, site, states[0], label)
    end = out if post_norm is None else post_norm
    rows, hidden = out.weight.shape
    # Only the candidate units, in selection order; fp32 products (sums in fp64): half the time, ~1e-7 relative
    # per batch (the curves only rank widths).
    order = order.to(out.weight.device)
    fit, held = (ActivationStats(order.numel() + rows, product_dtype=torch.float32) for _ in range(2))
    energy, channel = ActivationStats(1), ActivationStats(rows)
    captured: dict[str, torch.Tensor] = {}
    handles = [out.register_forward_pre_hook(lambda _m, args: captured.__setitem__("a", args[0].detach())),
               out.register_forward_hook(lambda _m, _args, y: captured.__setitem__("y", y.detach()))]
    following, seen = [], 0
    try:
        with torch.no_grad():
            for state in states:
                o = state.run(block)
                a, y = captured["a"].reshape(-1, hidden), captured["y"].reshape(-1, rows)
                if not following:  # one probe per block: the factor is the same on every token
                    scale = branch_scale(block, end, state, label, output=o.hidden)
                    v = torch.where(scale.isfinite(), scale, torch.zeros_like(scale)).square().expand(1, rows)
                    if post_norm is not None:  # d LN(y) ~ gain / sigma_t * dy
                        sigma2 = y.double().var(-1, unbiased=False, keepdim=True) + post_norm.eps
                        v = v * post_norm.weight.detach().square() / sigma2
                    channel.update(v)
                joint = torch.cat([a[:, order], y], 1)
                mask = holdout_mask(seen, joint.shape[0], calibration.holdout_fraction).to(joint.device)
                seen += joint.shape[0]
                weights = torch.full((joint.shape[0],), float(state.weight), dtype=torch.float64, device=joint.device)
                fit.update(joint[~mask], weights[~mask])
                sq_norm = o.hidden.reshape(joint.shape[0], -1).double().square().sum(1)
                energy.update(sq_norm[mask, None], weights[mask])
                held.update(joint[mask], weights[mask])
                following.append(o)
    finally:
        for h in handles:
            h.remove()
    for stats in (fit, held, energy, channel):
        reduce(stats)
    if fit.count == 0 or held.count == 0:
        raise ValueError(f"{label}: not enough calibration tokens for the fit and the held-out split")
    errors = width_errors(fit, held, torch.arange(order.numel()), out.weight[:, order], out.bias, calibration.ridge,
                          widths, channel.mean())
    norm = float(energy.mean())
    return [e / norm for e in errors], following


def width_errors(fit: ActivationStats, held: ActivationStats, order: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, ridge: float, widths: Sequence[int],
                 channel_weight: torch.Tensor | None = None) -> list[float]:
    """Held-out squared error (mean over tokens, ``channel_weight``-weighted sum over channels) of the output Linear
    (``weight`` [D, H], ``bias``) refitted on the first ``w`` units of ``order``, for each ``w`` in ``widths``.

    ``fit`` / ``held`` hold rows ``[a, y]`` (all H inputs in index order, D targets); one ridge scale for every
    width: ``ridge`` times the candidates' mean variance (``fit_output_from_stats`` otherwise).
    """
    rows, hidden = weight.shape
    k = order.numel()
    if fit.size != hidden + rows or held.size != fit.size:
        raise ValueError(f"width errors: stats have {fit.size} columns, expected {hidden} inputs + {rows} targets")
    if not widths or min(widths) < 1 or max(widths) > k:
        raise ValueError(f"width errors: widths must be in [1, {k}] (the selection order's length)")
    device = fit.mean().device
    index = torch.cat([order.to(device), torch.arange(hidden, hidden + rows, device=device)])
    point = fit.mean() if bias is not None else torch.zeros(fit.size, dtype=torch.float64, device=device)
    moment = fit.covariance() + torch.outer(fit.mean() - point, fit.mean() - point)
    moment = moment[index][:, index]
    offset = (held.mean() - point)[index]
    second = (held.covariance()[index][:, index] + torch.outer(offset, offset))
    gram, cross = moment[:k, :k], moment[:k, k:]
    lam = ridge * gram.diagonal().mean()
    anchor = weight.detach().to(device=device, dtype=torch.float64)[:, order.to(device)].T
    chol = _cholesky(gram + lam * torch.eye(k, dtype=gram.dtype, device=device))
    # z: the refit's coefficients in the Cholesky basis; the refit on the first w units is z[:w] there.
    z = torch.linalg.solve_triangular(chol, cross + lam * anchor, upper=False)
    n = torch.linalg.solve_triangular(chol, second[:k, k:], upper=False)
    half = torch.linalg.solve_triangular(chol, second[:k, :k], upper=False)
    m = torch.linalg.solve_triangular(chol, half.T.contiguous(), upper=False)
    v = torch.ones(rows, dtype=torch.float64, device=device) if channel_weight is None else \
        channel_weight.to(device=device, dtype=torch.float64)
    zv = z * v
    linear = (zv * n).sum(1).cumsum(0)
    quadratic = (m * (zv @ z.T)).cumsum(0).cumsum(1).diagonal()
    total = float((second[k:, k:].diagonal() * v).sum()) - 2 * linear + quadratic
    return [max(float(total[w - 1]), 0.0) for w in widths]


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor; a matrix singular in fp64 (ridge 0, a constant unit) gets a tiny diagonal shift."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    jitter = 1e-12 * float(matrix.diagonal().abs().mean().clamp_min(1e-300))
    while int(info) != 0:
        chol, info = torch.linalg.cholesky_ex(matrix + jitter * torch.eye(matrix.shape[0], dtype=matrix.dtype,
                                                                          device=matrix.device))
        jitter *= 100
    return chol


def allocate(curves: Sequence[WidthCurve], total_units: int) -> list[int]:
    """Widths (one per curve) minimising the summed errors with as many units as the grid allows up to
    ``total_units``; exact dynamic programming over blocks, which must cost the same parameters per unit."""
    if len({c.unit_params for c in curves}) > 1:
        raise ValueError("budget: blocks differ in parameters per hidden unit; adaptive widths need blocks of "
                         "one shape")
    step = math.gcd(*[w for c in curves for w in c.widths])
    capacity = total_units // step
    narrowest = sum(c.widths[0] for c in curves)
    if narrowest > total_units:
        raise ValueError(f"budget: the narrowest widths already keep {narrowest} units, the budget allows "
                         f"{total_units}; lower min_width")
    best = np.full(capacity + 1, np.inf)  # least error of the blocks so far using exactly each capacity
    best[0] = 0.0
    choices = []
    for curve in curves:
        cost = [w // step for w in curve.widths]
        options = np.full((len(cost), capacity + 1), np.inf)
        for j, (c, e) in enumerate(zip(cost, curve.errors, strict=True)):
            if c <= capacity:
                options[j, c:] = best[: capacity + 1 - c] + e
        pick = options.argmin(0)  # the first (narrowest) of equal options
        choices.append(pick)
        best = options[pick, np.arange(capacity + 1)]
    widths, left = [], int(np.flatnonzero(np.isfinite(best)).max())
    for curve, pick in zip(reversed(curves), reversed(choices), strict=True):
        j = int(pick[left])
        widths.append(curve.widths[j])
        left -= curve.widths[j] // step
    return widths[::-1]
