"""Local refinement of compensated MLPs (``Calibration.refine_steps``, pruning/refine.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from layouts import tiny_model
from test_output_compensation import images, tiny_dinov2, tiny_post_norm_eva
from torch import nn

from pruning import ActivationStats, Calibration, ModelSource, keep_counts, prune_blocks
from pruning.refine import TokenPairs, refine_mlp, weighted_error

pytestmark = pytest.mark.unit


def compensate(model: nn.Module, batches: list[torch.Tensor], keep: int, **settings) -> nn.Module:
    """A compensated copy of ``model`` (every fit token used), refined when ``settings`` ask for it."""
    pruned = copy.deepcopy(model)
    source = ModelSource(pruned)
    calibration = Calibration(holdout_fraction=0.0, **settings)
    with torch.no_grad():  # as the demo and the CLI call it: the refinement must turn gradients on itself
        prune_blocks(source, keep_counts(source.sites, num_keep=keep), calibration=calibration, calib_inputs=batches)
    return pruned


def relative_error(model: nn.Module, reference: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        pairs = [(model(x), reference(x)) for x in batches]
    return float(sum((a - b).square().sum() for a, b in pairs) / sum(b.square().sum() for _, b in pairs)) ** 0.5


@pytest.mark.parametrize("kind", ["open_clip", "timm_vit", "eva_swiglu", "eva_glu_fused", "dinov2", "post_norm"])
def test_refinement_brings_every_layout_closer_to_the_original_on_its_calibration_images(kind):
    if kind == "dinov2":
        model, batches = tiny_dinov2(), list(images(32).split(8))
    elif kind == "post_norm":
        model, batches = tiny_post_norm_eva(), list(images(32, size=32).split(8))
    else:
        model, shape, _ = tiny_model(kind)
        model.eval()
        batches = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    closed = compensate(model, batches, keep=16)
    # The post-norm's Jacobian makes its steps stiffer: a lower rate, more steps.
    steps, lr = (200, 1e-3) if kind == "post_norm" else (60, 3e-3)
    refined = compensate(model, batches, keep=16, refine_steps=steps, refine_lr=lr, refine_batch_tokens=256)
    assert {k: v.shape for k, v in refined.state_dict().items()} == {k: v.shape for k, v in closed.state_dict().items()}
    before, after = relative_error(closed, model, batches), relative_error(refined, model, batches)
    assert after < 0.9 * before, (before, after)


def test_refinement_is_deterministic_and_off_by_default():
    model, batches = tiny_dinov2(), list(images(16).split(8))
    first = compensate(model, batches, keep=16, refine_steps=5)
    second = compensate(model, batches, keep=16, refine_steps=5)
    closed = compensate(model, batches, keep=16)
    for name, tensor in first.state_dict().items():
        torch.testing.assert_close(tensor, second.state_dict()[name], rtol=0, atol=0)
    assert not torch.equal(first.blocks[0].mlp.fc1.weight, closed.blocks[0].mlp.fc1.weight)
    assert Calibration().refine_steps == 0


def test_reported_error_after_refinement_is_the_held_out_error_of_the_trained_mlp():
    model, batches = tiny_dinov2(), list(images(32).split(8))
    pruned = copy.deepcopy(model)
    source = ModelSource(pruned)
    calibration = Calibration(holdout_fraction=0.25, refine_steps=40, refine_lr=3e-3, refine_batch_tokens=256)
    report = prune_blocks(source, keep_counts(source.sites, num_keep=16), calibration=calibration,
                          calib_inputs=batches)
    closed = prune_blocks(ModelSource(copy.deepcopy(model)), keep_counts(source.sites, num_keep=16),
                          calibration=Calibration(holdout_fraction=0.25), calib_inputs=batches)
    # Block 0 sees the same inputs and targets in both runs: its held-out error is comparable, and training
    # every layer on 75 % of the tokens lowers it on the other 25 %.
    assert report.sites[0].recon_error_before == closed.sites[0].recon_error_before
    assert report.sites[0].recon_error_after < closed.sites[0].recon_error_after


def test_refine_mlp_lowers_the_weighted_error_and_keeps_dtype():
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 8))
    x = torch.randn(2048, 8)
    with torch.no_grad():
        pairs = TokenPairs(x, wide(x), torch.ones(2048))
    narrow = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).to(torch.bfloat16)
    channels = torch.ones(8)
    before = weighted_error(narrow.float(), pairs, channels)
    narrow = narrow.to(torch.bfloat16)
    refine_mlp(narrow, pairs, channels, steps=200, lr=1e-2, batch_tokens=256, generator=torch.Generator())
    assert all(p.dtype == torch.bfloat16 for p in narrow.parameters())
    assert weighted_error(narrow.float(), pairs, channels) < 0.5 * before
    zero = TokenPairs(x, torch.zeros(2048, 8), torch.ones(2048))
    with pytest.raises(ValueError, match="zero on every token"):
        refine_mlp(narrow, zero, channels, steps=1, lr=1e-3, batch_tokens=4, generator=torch.Generator())


def test_refinement_is_refused_where_statistics_are_reduced_across_processes():
    class SharedSource(ModelSource):
        def reduce(self, stats: ActivationStats) -> None:  # what an engine's rank source does
            pass

    model = tiny_dinov2()
    source = SharedSource(copy.deepcopy(model))
    with pytest.raises(ValueError, match="refine_steps: refinement runs in one process"):
        prune_blocks(source, keep_counts(source.sites, num_keep=16), calibration=Calibration(refine_steps=1),
                     calib_inputs=list(images(8).split(8)))


@pytest.mark.parametrize("settings", [{"refine_steps": -1}, {"refine_lr": 0.0}, {"refine_batch_tokens": 0}])
def test_bad_refinement_settings_are_refused(settings):
    with pytest.raises(ValueError, match="refinement needs"):
        Calibration(**settings)
