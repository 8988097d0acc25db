"""Surgery on every MLP layout: keep-all is the identity, pruning equals zeroing the dropped units."""

import copy

import pytest
import torch
from layouts import KINDS, tiny_model
from pruning_helpers import prune_model
from timm.models.eva import Eva
from torch import nn

from pruning import find_mlp_sites, select_mlp_channels
from pruning.surgery import prune_site

pytestmark = pytest.mark.unit


def tiny(kind: str) -> tuple[nn.Module, torch.Tensor, str]:
    model, shape, layout = tiny_model(kind)
    return model, torch.randn(shape), layout


def mask_dropped_units(model: nn.Module, keep: dict[str, torch.Tensor]) -> None:
    """Zero the output weights of the hidden units not kept: the pruned model's masked twin."""
    for site in find_mlp_sites(model):
        out = getattr(site.module(model), site.out_name)
        dropped = torch.ones(site.hidden, dtype=torch.bool)
        dropped[keep[site.path]] = False
        with torch.no_grad():
            out.weight[:, dropped] = 0


@pytest.mark.parametrize("kind", KINDS)
def test_sites_found_with_their_layout(kind):
    model, _, layout = tiny(kind)
    sites = find_mlp_sites(model)
    assert len(sites) == 2
    assert {s.layout for s in sites} == {layout}
    for site in sites:
        assert site.selection_rows(getattr(site.module(model), site.in_names[0]).weight).shape == (site.hidden, site.width)


@pytest.mark.parametrize("kind", KINDS)
def test_keeping_every_unit_is_the_identity(kind):
    model, image, _ = tiny(kind)
    model.eval()
    pruned = copy.deepcopy(model)
    report = prune_model(pruned, num_keep=max(s.hidden for s in find_mlp_sites(model)))
    assert report.model_params_after == report.model_params_before
    with torch.no_grad():
        assert torch.equal(pruned(image), model(image))


@pytest.mark.parametrize("method", ["diversity", "l2", "random"])
@pytest.mark.parametrize("kind", KINDS)
def test_pruned_equals_original_with_dropped_units_zeroed(kind, method):
    model, image, _ = tiny(kind)
    model.eval()
    pruned = copy.deepcopy(model)
    report = prune_model(pruned, num_keep=13, method=method, generator=torch.Generator().manual_seed(0))
    assert report.widths == [13, 13]
    masked = copy.deepcopy(model)
    mask_dropped_units(masked, {s.path: torch.tensor(s.kept) for s in report.sites})
    for site in find_mlp_sites(pruned):
        mlp = site.module(pruned)
        assert getattr(mlp, site.out_name).weight.shape[1] == 13
        assert all(isinstance(getattr(mlp, n), nn.Linear) for n in site.in_names)
    with torch.no_grad():
        torch.testing.assert_close(pruned(image), masked(image), rtol=1e-5, atol=1e-5)
    assert report.model_params_after < report.model_params_before
    assert report.model_params_after == sum(p.numel() for p in pruned.parameters())


def test_gated_halves_keep_the_same_units():
    model, _, _ = tiny("eva_glu_fused")
    site = find_mlp_sites(model)[0]
    fc1 = site.module(model).fc1.weight.detach().clone()
    keep = torch.tensor([5, 1, 9])
    new_site = prune_site(model, site, keep)
    w = new_site.module(model).fc1.weight
    sorted_keep = keep.sort().values
    assert torch.equal(w[:3], fc1[sorted_keep])
    assert torch.equal(w[3:], fc1[sorted_keep + site.hidden])


def test_ratio_is_relative_to_block_width():
    model, _, _ = tiny("timm_vit")  # width 64, hidden 256
    report = prune_model(model, ratio=1.0)
    assert report.widths == [64, 64]
    with pytest.raises(ValueError, match="keeps 320 hidden units"):
        prune_model(tiny("timm_vit")[0], ratio=5.0)


def test_hidden_norm_is_sliced_with_the_units():
    model = Eva(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=0,
                swiglu_mlp=True, scale_mlp=True)
    site = find_mlp_sites(model)[0]
    assert site.norm_name == "norm"
    norm_weight = torch.randn(site.hidden)
    with torch.no_grad():
        site.module(model).norm.weight.copy_(norm_weight)
    prune_site(model, site, torch.tensor([3, 0, 7]))
    assert torch.equal(site.module(model).norm.weight.detach(), norm_weight[[0, 3, 7]])
    model(torch.randn(1, 3, 32, 32))


def test_selection_is_what_select_returns_on_the_gate_half():
    model, _, _ = tiny("dinov2_w12")
    sites = find_mlp_sites(model)
    expected = select_mlp_channels(model.blocks[0].w12.weight[:48], 10)
    report = prune_model(model, num_keep=10)
    assert report.sites[0].kept == expected.tolist()
    assert sites[0].path == "blocks.0"


def test_bad_prune_arguments():
    model, _, _ = tiny("timm_vit")
    with pytest.raises(ValueError, match="exactly one"):
        prune_model(model)
    with pytest.raises(ValueError, match="unknown MLP sites"):
        prune_model(model, num_keep={"blocks.9.mlp": 3})
    site = find_mlp_sites(model)[0]
    with pytest.raises(ValueError, match="distinct"):
        prune_site(model, site, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"in \[0, 256\)"):
        prune_site(model, site, torch.tensor([256]))
    with pytest.raises(ValueError, match="no MLP block"):
        find_mlp_sites(nn.Sequential(nn.Linear(3, 3)))
