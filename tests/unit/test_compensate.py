"""Closed-form compensation: exact where the removed units are affine in the kept ones, identity when
nothing is removed, the folded layer equals the explicit regression, and every layout runs."""

import copy

import pytest
import torch
from layouts import KINDS, TinyDinov2Blocks, tiny_model
from pruning_helpers import fit_compensation, prune_and_compensate, prune_model
from timm.layers import Mlp
from timm.models.eva import Eva
from torch import nn

from pruning import ActivationStats, collect_taylor_scores, find_mlp_sites
from pruning.fit import (
    compensate_site,
    fit_compensation_from_stats,
    reconstruction_error,
    removed_units,
)

pytestmark = pytest.mark.unit


def tiny(kind: str) -> tuple[nn.Module, list[torch.Tensor]]:
    """A 2-block model of one MLP layout and calibration batches for it."""
    model, shape, _ = tiny_model(kind)
    if kind == "dinov2_w12":
        shape = (2, 17, 32)
    return model.eval(), [torch.randn(shape) for _ in range(4)]


def run(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


def site_inputs(model: nn.Module, batches: list[torch.Tensor], site_index: int = 0) -> torch.Tensor:
    """Every token's input to the output Linear of one site, [tokens, hidden]."""
    site = find_mlp_sites(model)[site_index]
    seen = []
    handle = getattr(site.module(model), site.out_name).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().reshape(-1, site.hidden)))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("mode", ["teacher", "sequential"])
@pytest.mark.parametrize("bias", [True, False])
def test_units_affine_in_the_kept_ones_are_reconstructed_exactly(bias, mode):
    # Without an activation every hidden unit is affine in the 6-dim input (linear without
    # bias), so any 6 independent units determine the other 14.
    torch.manual_seed(0)
    model = nn.Sequential(*[Mlp(6, 20, act_layer=nn.Identity, bias=bias) for _ in range(2)]).double()
    batches = [torch.randn(4, 10, 6, dtype=torch.float64) for _ in range(3)]
    pruned = copy.deepcopy(model)
    report = prune_and_compensate(pruned, batches, run, num_keep=6, mode=mode, ridge=0.0)
    assert report.widths == [6, 6]
    assert all((pruned[i].fc2.bias is None) == (not bias) for i in range(2))
    probe = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(pruned(probe), model(probe))
    for site in report.sites:
        assert site.recon_error_before > 0.1
        assert site.recon_error_after < 1e-6


@pytest.mark.parametrize("mode", ["teacher", "sequential"])
def test_duplicated_gated_units_are_folded_back_exactly(mode):
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
    report = prune_and_compensate(pruned, batches, run, num_keep=8, mode=mode, ridge=0.0)
    for site in report.sites:
        assert sorted(k % 8 for k in site.kept) == list(range(8))
        assert site.recon_error_after < 1e-5
    probe = torch.randn(3, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(probe), model(probe))


@pytest.mark.parametrize("mode", ["teacher", "sequential"])
@pytest.mark.parametrize("kind", KINDS)
def test_keeping_every_unit_is_the_identity(kind, mode):
    model, batches = tiny(kind)
    pruned = copy.deepcopy(model)
    hidden = max(s.hidden for s in find_mlp_sites(model))
    report = prune_and_compensate(pruned, batches, run, num_keep=hidden, mode=mode)
    assert report.model_params_after == report.model_params_before
    assert [(s.recon_error_before, s.recon_error_after) for s in report.sites] == [(0.0, 0.0)] * 2
    with torch.no_grad():
        assert torch.equal(pruned(batches[0]), model(batches[0]))


@pytest.mark.parametrize("mode", ["teacher", "sequential"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_layout_prunes_to_the_shapes_of_plain_pruning(kind, mode):
    model, batches = tiny(kind)
    plain = copy.deepcopy(model)
    expected = prune_model(plain, num_keep=13)
    report = prune_and_compensate(model, batches, run, num_keep=13, mode=mode)
    # Diversity reads fc_in only, which compensation never changes: the same units in both modes.
    assert [s.kept for s in report.sites] == [s.kept for s in expected.sites]
    assert report.model_params_after == expected.model_params_after
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    for site in report.sites:
        assert 0 < site.recon_error_after < 2 and 0 < site.recon_error_before < 2
        # Random gated units are nearly uncorrelated: with ~100 fit tokens the regression can only
        # overfit, so the held-out gain is asserted for plain MLPs (non-zero-mean GELU units) alone.
        if kind in ("open_clip", "timm_vit", "eva_plain"):
            assert site.recon_error_after < site.recon_error_before
    with torch.no_grad():
        assert torch.isfinite(model(batches[0])).all()


def test_sequential_matches_teacher_on_the_first_block_only():
    model, batches = tiny("timm_vit")
    teacher, sequential = copy.deepcopy(model), copy.deepcopy(model)
    prune_and_compensate(teacher, batches, run, num_keep=16, mode="teacher")
    prune_and_compensate(sequential, batches, run, num_keep=16, mode="sequential")
    assert torch.equal(teacher.blocks[0].mlp.fc2.weight, sequential.blocks[0].mlp.fc2.weight)
    assert torch.equal(teacher.blocks[0].mlp.fc2.bias, sequential.blocks[0].mlp.fc2.bias)
    assert not torch.equal(teacher.blocks[1].mlp.fc2.weight, sequential.blocks[1].mlp.fc2.weight)
    assert torch.equal(teacher.blocks[1].mlp.fc1.weight, sequential.blocks[1].mlp.fc1.weight)


def test_folded_layer_equals_the_explicit_regression():
    model, batches = tiny("timm_vit")
    site = find_mlp_sites(model)[0]
    acts = site_inputs(model, batches)
    fc2 = copy.deepcopy(model.blocks[0].mlp.fc2).double()
    kept = torch.tensor([200, 3, 77, 15, 150, 31, 9, 120, 64, 250])  # unsorted on purpose
    stats = ActivationStats(site.hidden)
    stats.update(acts)
    new_site = compensate_site(model, site, kept, stats, ridge=1e-2)
    assert new_site.hidden == 10
    b, c = fit_compensation(acts, kept.sort().values, ridge=1e-2)
    probe = torch.randn(7, site.hidden, dtype=torch.float64)
    order = kept.sort().values
    removed = removed_units(order, site.hidden)
    explicit = probe[:, order] @ fc2.weight[:, order].T + (probe[:, order] @ b.T + c) @ fc2.weight[:, removed].T \
        + fc2.bias
    with torch.no_grad():
        folded = model.blocks[0].mlp.fc2(probe[:, order].float())
    torch.testing.assert_close(folded.double(), explicit, rtol=1e-5, atol=1e-5)


def test_fit_is_centred_ridge_regression_with_a_relative_penalty():
    torch.manual_seed(0)
    acts = torch.randn(300, 9, dtype=torch.float64) @ torch.randn(9, 9, dtype=torch.float64) + 5.0
    kept = torch.tensor([7, 0, 4, 2])
    b, c = fit_compensation(acts, kept, ridge=0.1)
    centred = acts - acts.mean(0)
    removed = torch.tensor([1, 3, 5, 6, 8])
    gram = centred[:, kept].T @ centred[:, kept] / 300
    expected = torch.linalg.solve(gram + 0.1 * gram.diagonal().mean() * torch.eye(4),
                                  centred[:, kept].T @ centred[:, removed] / 300).T
    torch.testing.assert_close(b, expected)
    torch.testing.assert_close(c, acts[:, removed].mean(0) - expected @ acts[:, kept].mean(0))


def test_exact_affine_fit_without_ridge():
    torch.manual_seed(0)
    kept_acts = torch.randn(50, 4, dtype=torch.float64)
    true_b, true_c = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    acts = torch.cat([kept_acts, kept_acts @ true_b.T + true_c], dim=1)  # units 4..6 are removed
    b, c = fit_compensation(acts, torch.arange(4), ridge=0.0)
    torch.testing.assert_close(b, true_b)
    torch.testing.assert_close(c, true_c)
    b, c = fit_compensation(acts, torch.arange(4), ridge=0.0, intercept=False)
    assert torch.equal(c, torch.zeros(3, dtype=torch.float64))


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
    kept = torch.tensor([1, 4])
    for got, want in zip(fit_compensation_from_stats(stats, kept), fit_compensation(acts, kept), strict=True):
        torch.testing.assert_close(got, want)


def test_reconstruction_error_matches_the_direct_computation():
    torch.manual_seed(0)
    acts = torch.randn(40, 8, dtype=torch.float64).relu()
    weight, bias = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    kept = torch.tensor([1, 2, 6])
    new_weight, new_bias = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    stats = ActivationStats(8)
    stats.update(acts)
    reference = acts @ weight.T + bias
    pruned = acts[:, kept] @ new_weight.T + new_bias
    direct = float((pruned - reference).norm() / reference.norm())
    assert reconstruction_error(stats, weight, bias, kept, new_weight, new_bias) == pytest.approx(direct, rel=1e-9)


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
    with pytest.raises(ValueError, match="mode must be one of"):
        prune_and_compensate(model, batches, run, num_keep=8, mode="student")
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
    site = find_mlp_sites(model)[0]
    with pytest.raises(ValueError, match="blocks.0.mlp: activation stats have 8 units"):
        compensate_site(model, site, torch.arange(4), ActivationStats(8))
    stats = ActivationStats(8)
    stats.update(torch.randn(10, 8))
    with pytest.raises(ValueError, match="do not map"):
        reconstruction_error(stats, torch.ones(3, 8), None, torch.arange(2), torch.ones(3, 4), None)
    assert site.hidden == 256 and site.module(model).fc2.in_features == 256  # the failed calls pruned nothing


def test_bfloat16_model_keeps_its_dtype_and_no_holdout_reports_no_error():
    model, batches = tiny("timm_vit")
    model = model.to(torch.bfloat16)
    batches = [b.to(torch.bfloat16) for b in batches]
    report = prune_and_compensate(model, batches, run, num_keep=13, mode="sequential", holdout_fraction=0.0)
    assert [(s.recon_error_before, s.recon_error_after) for s in report.sites] == [(None, None)] * 2
    fc2 = model.blocks[1].mlp.fc2
    assert fc2.weight.dtype == fc2.bias.dtype == torch.bfloat16 and fc2.in_features == 13
    with torch.no_grad():
        assert torch.isfinite(model(batches[0]).float()).all()


@pytest.mark.parametrize("bias", [True, False])
def test_corrected_fit_recovers_a_known_map_from_pruned_inputs_onto_original_units(bias):
    # Rows [t, s]: t (all 10 original units) is exactly G s + g in the 4 kept units s of the pruned model,
    # so with ridge 0 the folded layer is W G (+ W g): the original output from the pruned inputs, exactly.
    from pruning.fit import corrected_compensation

    torch.manual_seed(0)
    model = nn.Sequential(Mlp(3, 10, bias=bias)).double()
    site = find_mlp_sites(model)[0]
    kept = torch.tensor([7, 1, 4, 2])
    s = torch.randn(200, 4, dtype=torch.float64)
    gain = torch.randn(10, 4, dtype=torch.float64)
    shift = torch.randn(10, dtype=torch.float64) if bias else torch.zeros(10, dtype=torch.float64)
    t = s @ gain.T + shift
    fit, held = ActivationStats(14), ActivationStats(14)
    fit.update(torch.cat([t, s], 1)[:150])
    held.update(torch.cat([t, s], 1)[150:])
    fc2 = copy.deepcopy(model[0].fc2)
    before, after = corrected_compensation(model, site, kept, fit, held, ridge=0.0)
    new = model[0].fc2
    assert new.in_features == 4 and (new.bias is None) == (not bias)
    torch.testing.assert_close(new(s), fc2(t))
    assert after < 1e-6 < before
    with pytest.raises(ValueError, match="joint stats have 14 columns, expected 10 \\+ 3"):
        corrected_compensation(nn.Sequential(Mlp(3, 10)).double(), site, kept[:3], fit, held)


def test_corrected_fit_on_identical_inputs_is_the_teacher_fit():
    from pruning.fit import corrected_compensation

    torch.manual_seed(0)
    model = nn.Sequential(Mlp(6, 20)).double()
    acts = torch.randn(300, 20, dtype=torch.float64).relu() + torch.randn(300, 1, dtype=torch.float64)
    kept = torch.tensor([3, 11, 0, 17, 9, 5])
    order = kept.sort().values
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    stats, joint = ActivationStats(20), ActivationStats(26)
    stats.update(acts)
    joint.update(torch.cat([acts, acts[:, order]], 1))
    compensate_site(a, find_mlp_sites(a)[0], kept, stats, ridge=0.05)
    corrected_compensation(b, find_mlp_sites(b)[0], kept, joint, None, ridge=0.05)
    torch.testing.assert_close(b[0].fc2.weight, a[0].fc2.weight)
    torch.testing.assert_close(b[0].fc2.bias, a[0].fc2.bias)


def test_float32_products_stay_close_to_float64():
    torch.manual_seed(0)
    acts = torch.randn(500, 16, dtype=torch.float64) * 3 + 2
    exact, fast = ActivationStats(16), ActivationStats(16, torch.float32)
    for chunk in acts.split(100):
        exact.update(chunk)
        fast.update(chunk)
    assert fast.outer.dtype == torch.float64
    torch.testing.assert_close(fast.covariance(), exact.covariance(), rtol=1e-5, atol=1e-5)
