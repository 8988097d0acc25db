"""Method ``activation``: DGMR's greedy Gram-Schmidt on calibration activations, made inside the compensation
step (``pruning.select.activation_order``, ``BlockCalibration``); the greedy against a brute-force forward
selection, exact recovery, the driver's choice against the statistics computed here, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from pruning_helpers import prune_and_compensate
from test_output_compensation import images, tiny_dinov2

import pruning
from pruning.select import activation_order

pytestmark = pytest.mark.unit


def centred_moments(acts: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, y = acts - acts.mean(0), target - target.mean(0)
    return a.T @ a / len(a), a.T @ y / len(a)


def brute_force_forward_selection(acts: torch.Tensor, target: torch.Tensor, count: int) -> list[int]:
    """Each step adds the unit whose least-squares fit (with an intercept) of ``target`` leaves the least error."""
    a, y = acts - acts.mean(0), target - target.mean(0)
    chosen: list[int] = []
    for _ in range(count):
        errors = {}
        for unit in range(acts.shape[1]):
            if unit not in chosen:
                sub = a[:, chosen + [unit]]
                coef = torch.linalg.lstsq(sub, y).solution
                errors[unit] = float((y - sub @ coef).square().sum())
        chosen.append(min(errors, key=errors.get))
    return chosen


def test_the_greedy_is_forward_selection_for_the_least_squares_fit():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 12, dtype=torch.float64, generator=gen)
    acts = torch.randn(300, 6, dtype=torch.float64, generator=gen) @ mix  # correlated units, rank 6
    acts += 0.05 * torch.randn(300, 12, dtype=torch.float64, generator=gen)
    target = acts @ torch.randn(12, 5, dtype=torch.float64, generator=gen) + 3.0
    gram, cross = centred_moments(acts, target)
    assert activation_order(gram, cross, 8, ridge=0.0).tolist() == brute_force_forward_selection(acts, target, 8)


def test_a_target_made_of_a_few_units_is_found_and_fitted_exactly():
    gen = torch.Generator().manual_seed(1)
    acts = torch.randn(200, 10, dtype=torch.float64, generator=gen)
    wanted = [7, 2, 5]
    target = acts[:, wanted] @ torch.randn(3, 4, dtype=torch.float64, generator=gen)
    gram, cross = centred_moments(acts, target)
    order = activation_order(gram, cross, 3, ridge=0.0)
    assert sorted(order.tolist()) == sorted(wanted)
    # Keeping more than the target needs: the rest have nothing left to explain and are still distinct units.
    longer = activation_order(gram, cross, 10, ridge=0.0)
    assert sorted(longer.tolist()) == list(range(10)) and longer[:3].tolist() == order.tolist()


def test_units_spanned_by_the_kept_ones_are_taken_last():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(100, 3, dtype=torch.float64, generator=gen)
    acts = torch.cat([base, base[:, :1] * 2.0, torch.zeros(100, 1, dtype=torch.float64)], dim=1)  # 3 repeats 0
    gram, cross = centred_moments(acts, base @ torch.ones(3, 2, dtype=torch.float64))
    order = activation_order(gram, cross, 5, ridge=1e-3).tolist()
    assert sorted(order[:3]) in ([0, 1, 2], [1, 2, 3]) and sorted(order) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("stride", [1, 2])
def test_prune_blocks_picks_the_units_of_its_own_block_statistics(stride: int):
    # Block 0 sees the teacher's inputs, so its refit target is the original fc2 output: the choice is
    # activation_order on the covariance of (fc2 inputs, fc2 outputs) of the teacher's tokens, of every
    # stride-th calibration batch.
    model = tiny_dinov2()
    batches = list(images(32).split(8))
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    fc2 = model.blocks[0].mlp.fc2
    hook = fc2.register_forward_hook(lambda _m, args, out: captured.append((args[0].flatten(0, 1),
                                                                              out.flatten(0, 1))))
    with torch.no_grad():
        for x in batches[::stride]:
            model.forward_features(x)
    hook.remove()
    acts, outs = (torch.cat(t).double() for t in zip(*captured, strict=True))
    gram, cross = centred_moments(acts, outs)
    want = activation_order(gram, cross, 64, ridge=1e-3)

    pruned = copy.deepcopy(model)
    source = pruning.ModelSource(pruned, lambda m, x: m.forward_features(x))
    calibration = pruning.Calibration(holdout_fraction=0.0, selection_stride=stride)
    report = pruning.prune_blocks(source, pruning.keep_counts(source.sites, num_keep=64), "activation",
                                  calibration=calibration, calib_inputs=batches)
    assert report.method == "activation"
    assert report.sites[0].kept == want.tolist()
    assert all(len(s.kept) == 64 == s.hidden_after for s in report.sites)
    kept = torch.tensor(report.sites[0].kept).sort().values
    torch.testing.assert_close(pruned.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight[kept])


def test_activation_beats_diversity_on_the_held_out_tokens_of_a_tiny_dinov2():
    model = tiny_dinov2()
    batches = list(images(48).split(8))
    errors = {}
    for method in ("activation", "diversity"):
        report = prune_and_compensate(copy.deepcopy(model), batches, forward=lambda m, x: m.forward_features(x),
                                      num_keep=48, method=method)
        errors[method] = sum(s.recon_error_after for s in report.sites)
    assert errors["activation"] < errors["diversity"], errors


def test_activation_is_refused_without_calibration_data():
    model = tiny_dinov2()
    source = pruning.ModelSource(model)
    with pytest.raises(ValueError, match="method='activation' ranks the units on calibration activations"):
        pruning.prune_blocks(source, pruning.keep_counts(source.sites, 1.0), "activation")
    with pytest.raises(ValueError, match="prune with pruning.prune_blocks and a pruning.Calibration"):
        pruning.select_mlp_channels(model.blocks[0].mlp.fc1.weight, 8, "activation")
    with pytest.raises(ValueError, match="selection_stride must be >= 1"):
        pruning.Calibration(selection_stride=0)
    with pytest.raises(ValueError, match="a width budget ranks units by a weight order"):
        pruning.plan_widths(source, pruning.Budget(1.0), "activation", calibration=pruning.Calibration(),
                            calib_inputs=list(images(8).split(8)))


def test_trainer_config_takes_activation_only_with_calibration_data():
    from trainer.config import from_dict

    assert from_dict({"prune": {"method": "activation", "in_engine": True, "compensate": True}}).prune.method \
        == "activation"
    assert from_dict({"prune": {"method": "activation", "student_init": "s.safetensors"}}).prune.method \
        == "activation"
    with pytest.raises(ValueError, match="prune.method: activation ranks units on calibration activations"):
        from_dict({"prune": {"method": "activation"}})
    with pytest.raises(ValueError, match="prune.method: activation cannot plan prune.budget"):
        from_dict({"prune": {"method": "activation", "in_engine": True, "compensate": True, "budget": 1.0}})
