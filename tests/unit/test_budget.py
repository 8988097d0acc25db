"""Adaptive widths at a parameter budget: the error curves, the allocation and the plan's pruning."""

from __future__ import annotations

import itertools

import pytest
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer as TimmViT

import pruning
from pruning.budget import WidthCurve, allocate, width_errors
from pruning.fit import ActivationStats
from tests.layouts import KINDS, tiny_model


def _stats(rows: torch.Tensor) -> ActivationStats:
    stats = ActivationStats(rows.shape[1])
    stats.update(rows)
    return stats


@pytest.mark.parametrize("with_bias", [True, False])
def test_width_errors_equal_a_direct_refit_at_every_width(with_bias):
    g = torch.Generator().manual_seed(0)
    hidden, rows, ridge = 24, 6, 1e-2
    a = torch.randn(500, hidden, generator=g, dtype=torch.float64) @ torch.randn(hidden, hidden, generator=g,
                                                                                  dtype=torch.float64) + 0.3
    y = a @ torch.randn(hidden, rows, generator=g, dtype=torch.float64) + 0.1 * torch.randn(500, rows, generator=g)
    weight = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    bias = torch.randn(rows, generator=g, dtype=torch.float64) if with_bias else None
    fit_a, fit_y, held_a, held_y = a[:400], y[:400], a[400:], y[400:]
    order = torch.randperm(hidden, generator=g)[:20]
    widths = [2, 5, 12, 20]
    channel = torch.rand(rows, generator=g, dtype=torch.float64) + 0.5
    got = width_errors(_stats(torch.cat([fit_a, fit_y], 1)), _stats(torch.cat([held_a, held_y], 1)), order, weight,
                       bias, ridge, widths, channel)
    # The refit written out on the tokens themselves, one ridge scale from the 20 candidate units.
    centre_a = fit_a.mean(0) if with_bias else torch.zeros(hidden, dtype=torch.float64)
    centre_y = fit_y.mean(0) if with_bias else torch.zeros(rows, dtype=torch.float64)
    xa, xy = fit_a - centre_a, fit_y - centre_y
    lam = ridge * (xa[:, order].square().mean(0)).mean()
    for width, value in zip(widths, got, strict=True):
        k = order[:width]
        gram = xa[:, k].T @ xa[:, k] / len(xa) + lam * torch.eye(width, dtype=torch.float64)
        new_w = torch.linalg.solve(gram, xa[:, k].T @ xy / len(xa) + lam * weight[:, k].T).T
        residual = (held_y - centre_y) - (held_a[:, k] - centre_a[k]) @ new_w.T
        expected = (residual.square() * channel).sum(1).mean()
        assert value == pytest.approx(float(expected), rel=1e-8)


def test_allocation_is_the_exhaustive_optimum_and_uses_the_budget():
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        curves = [WidthCurve(f"b{i}", [8, 16, 24, 32], sorted(torch.rand(4, generator=g).tolist(), reverse=True), 3)
                  for i in range(4)]
        if trial % 2:  # an error that rises with width (held-out noise): the budget is still spent
            curves[0].errors[-1] = 2.0
        total = 72 + 8 * (trial % 3)
        got = allocate(curves, total)
        combos = [c for c in itertools.product(*[cv.widths for cv in curves]) if sum(c) <= total]
        most = max(sum(c) for c in combos)

        def cost(combo, curves=curves):
            return sum(cv.errors[cv.widths.index(w)] for cv, w in zip(curves, combo, strict=True))

        best = min(cost(c) for c in combos if sum(c) == most)
        assert sum(got) == most
        assert cost(got) == pytest.approx(best)


def test_allocation_refuses_an_unreachable_budget_and_mixed_block_shapes():
    curves = [WidthCurve("a", [16, 32], [1.0, 0.5], 3), WidthCurve("b", [16, 32], [1.0, 0.5], 3)]
    with pytest.raises(ValueError, match="narrowest widths already keep 32 units"):
        allocate(curves, 24)
    with pytest.raises(ValueError, match="parameters per hidden unit"):
        allocate([curves[0], WidthCurve("b", [16, 32], [1.0, 0.5], 5)], 48)


def _images(shape, count=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


@pytest.mark.parametrize("kind", KINDS)
def test_budget_spends_the_uniform_parameters_on_every_layout(kind):
    model, shape, _ = tiny_model(kind)
    model.eval()
    source = pruning.ModelSource(model)
    uniform = pruning.keep_counts(source.sites, 0.5 if kind == "dinov2_w12" else 1.0)
    budget = pruning.Budget(ratio=0.5 if kind == "dinov2_w12" else 1.0, grid=8)
    before = source.params_before
    calibration = pruning.Calibration()
    plan = pruning.plan_widths(source, budget, calibration=calibration, calib_inputs=_images(shape))
    assert all(w % 8 == 0 for w in plan.widths)
    assert sum(plan.widths) == sum(uniform.values()) // 8 * 8
    for site, width in zip(source.sites, plan.widths, strict=True):
        # The diversity order is nested: its prefix is the selection made for the width itself.
        rows = site.selection_rows(getattr(site.module(model), site.in_names[0]).weight)
        assert torch.equal(plan.orders[site.path][:width], pruning.select_mlp_channels(rows, width))
    chosen = sum(plan.summary["predicted_error"])
    if all(e is not None for e in plan.summary["uniform_error"]) and sum(uniform.values()) % 8 == 0:
        assert chosen <= sum(plan.summary["uniform_error"]) + 1e-12
    report = pruning.prune_blocks(source, plan.widths, orders=plan.orders, calibration=calibration,
                                  calib_inputs=_images(shape))
    assert report.widths == plan.widths
    assert [s.kept[:3] for s in report.sites] == [plan.orders[s.path][:3].tolist() for s in source.sites]
    per_unit = (before - report.model_params_after) / (sum(s.hidden for s in source.sites) - sum(plan.widths))
    assert per_unit == int(per_unit)
    with torch.no_grad():
        assert torch.isfinite(model(_images(shape, 1)[0])).all()


def test_budget_moves_units_to_the_block_that_needs_them():
    """A block whose MLP writes (almost) nothing to the residual stream (LayerScale ~0) needs no width: the
    allocation gives it the narrowest width and the others the units."""
    torch.manual_seed(0)
    tower = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=0,
                    init_values=1.0).eval()
    with torch.no_grad():
        tower.blocks[1].ls2.gamma.fill_(1e-4)
    source = pruning.ModelSource(tower)
    report = pruning.prune_to_budget(source, pruning.Budget(ratio=1.0, grid=16), calibration=pruning.Calibration(),
                                     calib_inputs=_images((2, 3, 32, 32)))
    widths = report.calibration["budget"]["widths"]
    assert widths[1] == 16 and sum(widths) == 3 * 64
    assert report.calibration["budget"]["predicted_error"][1] < 1e-6


def test_post_norm_blocks_get_curves():
    torch.manual_seed(0)
    tower = Eva(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0,
                use_post_norm=True).eval()
    source = pruning.ModelSource(tower)
    plan = pruning.plan_widths(source, pruning.Budget(ratio=1.0, grid=16), calibration=pruning.Calibration(),
                               calib_inputs=_images((2, 3, 32, 32)))
    curves = plan.summary["curves"]
    assert sum(plan.widths) == 128
    for curve in curves.values():  # more units, smaller error (the fit set is large enough here)
        assert curve["errors"][0] > curve["errors"][-1] >= 0


def test_budget_refuses_what_it_cannot_measure():
    model, shape, _ = tiny_model("timm_vit")
    source = pruning.ModelSource(model.eval())
    with pytest.raises(ValueError, match="holdout_fraction must be > 0"):
        pruning.plan_widths(source, pruning.Budget(ratio=1.0, grid=8),
                            calibration=pruning.Calibration(holdout_fraction=0), calib_inputs=_images(shape))
    with pytest.raises(ValueError, match="budget ratio must be > 0"):
        pruning.Budget(ratio=0)
    with pytest.raises(ValueError, match="no multiple of 64 between 16 and 48"):
        pruning.Budget(ratio=1.0, min_width=16, max_width=48).candidates(256, 64)
    with pytest.raises(ValueError, match="give a Calibration and calibration images"):
        pruning.prune_to_budget(source, pruning.Budget(ratio=1.0, grid=8), calibration=None, calib_inputs=[])


def test_block_curve_is_the_layer_scaled_refit_error_over_the_block_output_energy():
    """A DINOv2 block (LayerScale gamma on the MLP branch): the plan's error at width w is
    E_held ||gamma * (y_w - y)||^2 / E_held ||h_out||^2, y_w the least-squares refit on the first w units of the
    block's order (ridge 0) fitted on the other tokens."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, embed_dim=64, depth=2,
                              num_heads=2, init_values=0.3, mlp_ratio=2, num_classes=0).eval()
    with torch.no_grad():
        model.blocks[0].ls2.gamma.uniform_(0.2, 2.0)  # unequal per channel: the probe must find each one
    # 24 images x 17 tokens: more fit tokens than units, so every width's least squares is determined.
    batches = list(torch.randn(24, 3, 56, 56, generator=torch.Generator().manual_seed(1)).split(8))
    plan = pruning.plan_widths(pruning.ModelSource(model), pruning.Budget(1.0, grid=16),
                               calibration=pruning.Calibration(ridge=0.0, holdout_fraction=0.25),
                               calib_inputs=batches)
    block, fc2 = model.blocks[0], model.blocks[0].mlp.fc2
    seen: dict[str, list[torch.Tensor]] = {"a": [], "y": [], "o": []}
    hooks = [fc2.register_forward_pre_hook(lambda _m, args: seen["a"].append(args[0].reshape(-1, 128))),
             fc2.register_forward_hook(lambda _m, _a, y: seen["y"].append(y.reshape(-1, 64))),
             block.register_forward_hook(lambda _m, _a, o: seen["o"].append(o.reshape(-1, 64)))]
    with torch.no_grad():
        for batch in batches:
            model.forward_features(batch)
    for h in hooks:
        h.remove()
    a, y, o = (torch.cat(seen[k]).double() for k in ("a", "y", "o"))
    held = pruning.fit.holdout_mask(0, a.shape[0], 0.25)
    gamma = block.ls2.gamma.detach().double()
    curve = plan.summary["curves"]["blocks.0.mlp"]
    order = plan.orders["blocks.0.mlp"]
    for width, error in zip(curve["widths"], curve["errors"], strict=True):
        design = torch.cat([a[:, order[:width]], torch.ones(a.shape[0], 1, dtype=torch.float64)], 1)
        solution = torch.linalg.lstsq(design[~held], y[~held]).solution
        residual = gamma * (design[held] @ solution - y[held])
        want = float(residual.square().sum(1).mean() / o[held].square().sum(1).mean())
        assert error == pytest.approx(want, rel=1e-3, abs=1e-9), width
