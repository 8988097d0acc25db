"""Closed-form compensation (each pruned block refitted to the original block's output): exact where the
removed units are affine in the kept ones, the ridge fit is the stated formula, every selection method and
dtype runs, and bad input is refused before anything is pruned."""

import copy

import pytest
import torch
from layouts import TinyDinov2Blocks, tiny_model
from pruning_helpers import prune_and_compensate
from timm.layers import Mlp
from timm.models.eva import Eva
from torch import nn

from pruning import ActivationStats, collect_taylor_scores, find_mlp_sites
from pruning.fit import fit_output_from_stats

pytestmark = pytest.mark.unit


def tiny(kind: str) -> tuple[nn.Module, list[torch.Tensor]]:
    """A 2-block model of one MLP layout and calibration batches for it."""
    model, shape, _ = tiny_model(kind)
    return model.eval(), [torch.randn(shape) for _ in range(4)]


def run(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


@pytest.mark.parametrize("bias", [True, False])
def test_units_affine_in_the_kept_ones_are_reconstructed_exactly(bias):
    # Without an activation every hidden unit is affine in the 6-dim input (linear without
    # bias), so any 6 independent units determine the other 14.
    torch.manual_seed(0)
    model = nn.Sequential(*[Mlp(6, 20, act_layer=nn.Identity, bias=bias) for _ in range(2)]).double()
    batches = [torch.randn(4, 10, 6, dtype=torch.float64) for _ in range(3)]
    pruned = copy.deepcopy(model)
    report = prune_and_compensate(pruned, batches, run, num_keep=6, ridge=0.0)
    assert report.widths == [6, 6]
    assert all((pruned[i].fc2.bias is None) == (not bias) for i in range(2))
    probe = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(pruned(probe), model(probe))
    for site in report.sites:
        assert site.recon_error_before > 0.1
        assert site.recon_error_after < 1e-6


def test_duplicated_gated_units_are_folded_back_exactly():
    # Units 8..15 repeat units 0..7 in both gate and value halves: each removed copy equals a kept unit.
    model = TinyDinov2Blocks(dim=32, hidden=16, depth=2)
    with torch.no_grad():
        for block in model.blocks:
            w, b = block.w12.weight, block.w12.bias
            for half in (0, 16):
                w[half + 8:half + 16] = w[half:half + 8]
                b[half + 8:half + 16] = b[half:half + 8]
    batches = [torch.randn(2, 17, 32) for _ in range(3)]
    pruned = copy.deepcopy(model)
    report = prune_and_compensate(pruned, batches, run, num_keep=8, ridge=0.0)
    for site in report.sites:
        assert sorted(k % 8 for k in site.kept) == list(range(8))
        assert site.recon_error_after < 1e-5
    probe = torch.randn(3, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(probe), model(probe), rtol=1e-4, atol=1e-4)


def test_fit_is_centred_ridge_regression_anchored_at_the_pruned_weights():
    torch.manual_seed(0)
    a = torch.randn(300, 4, dtype=torch.float64) @ torch.randn(4, 4, dtype=torch.float64) + 5.0
    y = a @ torch.randn(4, 3, dtype=torch.float64) + torch.randn(300, 3, dtype=torch.float64)
    anchor = torch.randn(3, 4, dtype=torch.float64)
    stats = ActivationStats(7)
    stats.update(torch.cat([a, y], 1))
    weight, bias = fit_output_from_stats(stats, anchor, torch.zeros(3), ridge=0.1)
    ca, cy = a - a.mean(0), y - y.mean(0)
    gram = ca.T @ ca / 300
    lam = 0.1 * gram.diagonal().mean()
    expected = (cy.T @ ca / 300 + lam * anchor) @ torch.linalg.inv(gram + lam * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(weight, expected)
    torch.testing.assert_close(bias, y.mean(0) - expected @ a.mean(0))


def test_streamed_statistics_equal_one_pass():
    torch.manual_seed(0)
    acts = torch.randn(120, 6, dtype=torch.float64) * 0.01 + 1e3  # large mean, small spread
    stats = ActivationStats(6)
    for chunk in acts.split(50):
        stats.update(chunk.reshape(5, -1, 6))
    assert stats.count == 120
    torch.testing.assert_close(stats.mean(), acts.mean(0))
    torch.testing.assert_close(stats.covariance(), torch.cov(acts.T, correction=0))
    whole = ActivationStats(6)
    whole.update(acts)
    anchor = torch.randn(2, 4, dtype=torch.float64)
    for got, want in zip(fit_output_from_stats(stats, anchor, torch.zeros(2)),
                         fit_output_from_stats(whole, anchor, torch.zeros(2)), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", ["l2", "random", "taylor"])
def test_every_selection_method_is_compensated(method):
    model, batches = tiny("timm_vit")
    scores = None
    if method == "taylor":
        scores = collect_taylor_scores(model, batches[:1], lambda m, x: m(x).square().mean())
    report = prune_and_compensate(model, batches, run, num_keep=13, method=method, scores=scores,
                                  generator=torch.Generator().manual_seed(0))
    assert report.widths == [13, 13]
    assert all(s.recon_error_after < s.recon_error_before for s in report.sites)


def test_hidden_layernorm_is_refused_naming_the_site():
    model = Eva(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=0,
                swiglu_mlp=True, scale_mlp=True)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp: compensation is not defined with a LayerNorm"):
        prune_and_compensate(model, [torch.randn(1, 3, 32, 32)], run, num_keep=8)


def test_bad_arguments():
    model, batches = tiny("timm_vit")
    with pytest.raises(ValueError, match="holdout_fraction"):
        prune_and_compensate(model, batches, run, num_keep=8, holdout_fraction=1.0)
    with pytest.raises(ValueError, match="ridge"):
        prune_and_compensate(model, batches, run, num_keep=8, ridge=-1.0)
    with pytest.raises(ValueError, match="exactly one"):
        prune_and_compensate(model, batches, run)
    with pytest.raises(ValueError, match="needs scores for site blocks.0.mlp"):
        prune_and_compensate(model, batches, run, num_keep=8, method="taylor")
    with pytest.raises(ValueError, match="the forward never reached blocks.0"):
        prune_and_compensate(model, batches, lambda m, b: None, num_keep=8, holdout_fraction=0.0)
    with pytest.raises(ValueError, match="no tokens"):
        ActivationStats(4).mean()
    with pytest.raises(ValueError, match="expected last dimension 4"):
        ActivationStats(4).update(torch.zeros(2, 5))
    stats = ActivationStats(8)
    stats.update(torch.randn(10, 8))
    with pytest.raises(ValueError, match="stats have 8 columns, expected 4 inputs \\+ 3 targets"):
        fit_output_from_stats(stats, torch.ones(3, 4), None)
    site = find_mlp_sites(model)[0]
    assert site.hidden == 256 and site.module(model).fc2.in_features == 256  # the failed calls pruned nothing


def test_bfloat16_model_keeps_its_dtype_and_no_holdout_reports_no_error():
    model, batches = tiny("timm_vit")
    model = model.to(torch.bfloat16)
    batches = [b.to(torch.bfloat16) for b in batches]
    report = prune_and_compensate(model, batches, run, num_keep=13, holdout_fraction=0.0)
    assert [(s.recon_error_before, s.recon_error_after) for s in report.sites] == [(None, None)] * 2
    fc2 = model.blocks[1].mlp.fc2
    assert fc2.weight.dtype == fc2.bias.dtype == torch.bfloat16 and fc2.in_features == 13
    with torch.no_grad():
        assert torch.isfinite(model(batches[0]).float()).all()


def test_float32_products_stay_close_to_float64():
    torch.manual_seed(0)
    acts = torch.randn(500, 16, dtype=torch.float64) * 3 + 2
    exact, fast = ActivationStats(16), ActivationStats(16, torch.float32)
    for chunk in acts.split(100):
        exact.update(chunk)
        fast.update(chunk)
    assert fast.outer.dtype == torch.float64
    torch.testing.assert_close(fast.covariance(), exact.covariance(), rtol=1e-5, atol=1e-5)
