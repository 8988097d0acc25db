"""Compensation: each pruned block's output Linear is refitted so that the block's output
matches the original block's output (``pruning.blockwise``); exact cases, the fit's algebra, refusals."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from layouts import tiny_model
from pruning_helpers import calibrate_blocks, prune_and_compensate_blocks
from timm.models.eva import Eva

from pruning import ActivationStats, Calibration
from pruning.blockwise import stem_states
from pruning.fit import fit_output_from_stats, output_fit_error

pytestmark = pytest.mark.unit


def tiny_dinov2(hidden: int = 256) -> torch.nn.Module:
    """DINOv2 design (layer scale, patch 14) at 28 px, width 64, depth 3, with random biases."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, embed_dim=64, depth=3,
                              num_heads=2, init_values=0.3, mlp_ratio=hidden / 64, num_classes=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def images(count: int, size: int = 28, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_removed_units_repeating_kept_ones_give_back_the_original_tower():
    # Units 64..255 repeat units 0..63 in fc1: once one copy of each is kept, every removed unit is
    # a kept one, the original block output is reachable, and every block's inputs stay the original's.
    model = tiny_dinov2()
    with torch.no_grad():
        for block in model.blocks:
            for copy_start in (64, 128, 192):
                block.mlp.fc1.weight[copy_start:copy_start + 64] = block.mlp.fc1.weight[:64]
                block.mlp.fc1.bias[copy_start:copy_start + 64] = block.mlp.fc1.bias[:64]
    pruned = copy.deepcopy(model)
    report = prune_and_compensate_blocks(pruned, images(64).split(16), forward=lambda m, x: m.forward_features(x),
                                         num_keep=64, ridge=0.0)
    probe = images(4, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(pruned.forward_features(probe), model.forward_features(probe),
                                   rtol=1e-4, atol=1e-4)
    for site in report.sites:
        assert sorted(k % 64 for k in site.kept) == list(range(64))
        assert site.recon_error_before > 0.1
        assert site.recon_error_after < 1e-4


def test_keeping_every_unit_keeps_the_tower():
    model = tiny_dinov2(hidden=128)
    pruned = copy.deepcopy(model)
    prune_and_compensate_blocks(pruned, images(64).split(16), num_keep=128, ridge=0.0)
    probe = images(4, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(pruned(probe), model(probe), rtol=1e-4, atol=1e-4)


def test_first_block_target_is_the_unpruned_fc2_output():
    # Both streams are equal at block 0: the target of the refit is the original fc2's output (LayerScale
    # divided out), so the refitted fc2 is the ridge regression of it on the kept units, anchored at the
    # plain pruned weights.
    model = tiny_dinov2()
    batches = images(24).split(8)
    fc2 = model.blocks[0].mlp.fc2
    seen: list[torch.Tensor] = []
    handle = fc2.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, 256)))
    with torch.no_grad():
        for batch in batches:
            model.forward_features(batch)
    handle.remove()
    acts = torch.cat(seen).double()
    pruned = copy.deepcopy(model)
    report = prune_and_compensate_blocks(pruned, batches, num_keep=40, ridge=1e-2, holdout_fraction=0.0)
    kept = torch.tensor(report.sites[0].kept).sort().values
    stats = ActivationStats(40 + fc2.out_features)
    stats.update(torch.cat([acts[:, kept], acts @ fc2.weight.double().T + fc2.bias.double()], 1))
    weight, bias = fit_output_from_stats(stats, fc2.weight[:, kept], fc2.bias, ridge=1e-2)
    new = pruned.blocks[0].mlp.fc2
    torch.testing.assert_close(new.weight.double(), weight, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(new.bias.double(), bias, rtol=1e-3, atol=1e-5)


def test_states_from_two_input_sizes_calibrate_one_tower():
    # A copy of the tower built for 42 px shares the blocks' weights: its stem feeds the same blocks.
    tower = tiny_dinov2()
    small_stem = copy.deepcopy(tower)
    small_stem.set_input_size(img_size=(42, 42))
    states = (stem_states(tower, "blocks.0", images(16).split(8), lambda m, x: m.forward_features(x))
              + stem_states(small_stem, "blocks.0", images(16, size=42).split(8), lambda m, x: m.forward_features(x)))
    assert {s.hidden.shape[1] for s in states} == {5, 10}
    report = calibrate_blocks(tower, states, num_keep=40, ridge=1e-2)
    assert report.widths == [40, 40, 40]
    assert all(s.recon_error_after < s.recon_error_before for s in report.sites)


@pytest.mark.parametrize("bias", [True, False])
def test_output_fit_is_least_squares_and_its_error_is_the_direct_one(bias):
    torch.manual_seed(0)
    a = torch.randn(500, 6, dtype=torch.float64) + 0.5
    y = a @ torch.randn(6, 3, dtype=torch.float64) + torch.randn(500, 3, dtype=torch.float64) * 0.1
    y = y + (torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) if bias else 0)
    stats = ActivationStats(9)
    for chunk in torch.cat([a, y], 1).split(128):
        stats.update(chunk)
    anchor = torch.randn(3, 6, dtype=torch.float64)
    weight, shift = fit_output_from_stats(stats, anchor, torch.zeros(3) if bias else None, ridge=0.0)
    design = torch.cat([a, torch.ones(500, 1, dtype=torch.float64)], 1) if bias else a
    solution = torch.linalg.lstsq(design, y).solution
    torch.testing.assert_close(weight, solution[:6].T)
    if bias:
        torch.testing.assert_close(shift, solution[6])
    else:
        assert shift is None
    new = a @ weight.T + (shift if bias else 0)
    assert output_fit_error(stats, weight, shift) == pytest.approx(float((new - y).norm() / y.norm()), rel=1e-9)
    # The ridge pulls towards the anchor.
    far, _ = fit_output_from_stats(stats, anchor, None, ridge=1e6)
    torch.testing.assert_close(far, anchor, rtol=1e-4, atol=1e-4)


def tiny_post_norm_eva(norm_layer=None) -> torch.nn.Module:
    """EVA02-E's block design (post-norm: LayerNorm on the attention and MLP outputs) at width 64, with
    random norm gains and biases so the pull-back through the norm is not the identity."""
    torch.manual_seed(0)
    extra = {} if norm_layer is None else {"norm_layer": norm_layer}
    tower = Eva(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=0, use_post_norm=True,
                use_rot_pos_emb=True, ref_feat_shape=(4, 4), **extra)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return tower.eval()


def test_post_norm_tower_with_repeated_units_is_given_back():
    # Post-norm blocks: the target passes back through the LayerNorm after the MLP. Removed units that
    # repeat kept ones make the original MLP output reachable, and the pull-back must land on it exactly.
    model = tiny_post_norm_eva()
    with torch.no_grad():
        for block in model.blocks:
            hidden = block.mlp.fc1.out_features // 4
            for copy_start in range(hidden, 4 * hidden, hidden):
                block.mlp.fc1.weight[copy_start:copy_start + hidden] = block.mlp.fc1.weight[:hidden]
                block.mlp.fc1.bias[copy_start:copy_start + hidden] = block.mlp.fc1.bias[:hidden]
    pruned = copy.deepcopy(model)
    report = prune_and_compensate_blocks(pruned, images(64, size=32).split(16), num_keep=64,
                                         ridge=0.0)
    probe = images(4, size=32, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(pruned(probe), model(probe), rtol=1e-4, atol=1e-4)
    for site in report.sites:
        assert sorted(k % 64 for k in site.kept) == list(range(64))
        assert site.recon_error_before > 0.1 and site.recon_error_after < 1e-4


def test_post_norm_keep_all_is_identity_and_compensation_beats_plain_pruning():
    model = tiny_post_norm_eva()
    kept_all = copy.deepcopy(model)
    prune_and_compensate_blocks(kept_all, images(64, size=32).split(16), num_keep=256, ridge=0.0)
    probe = images(32, size=32, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(kept_all(probe), model(probe), rtol=1e-4, atol=1e-4)
        reference = model.forward_features(probe)
    from pruning_helpers import prune_model

    plain, compensated = copy.deepcopy(model), copy.deepcopy(model)
    prune_model(plain, num_keep=64)
    prune_and_compensate_blocks(compensated, images(128, size=32).split(32), num_keep=64)
    with torch.no_grad():
        errors = {name: float((m.forward_features(probe) - reference).norm() / reference.norm())
                  for name, m in (("plain", plain), ("compensated", compensated))}
    assert errors["compensated"] < 0.8 * errors["plain"], errors


def test_norm_pullback_is_a_gauss_newton_step_through_the_norm():
    from pruning.blockwise import norm_pullback

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(16, eps=1e-5).double().requires_grad_(False)
    norm.weight.uniform_(0.5, 2.0)
    norm.bias.normal_()
    y_ref = torch.randn(200, 16, dtype=torch.float64) * 3 + 1
    for size in (1e-2, 1e-3):
        y_true = y_ref + size * torch.randn_like(y_ref)
        got = norm_pullback(norm, y_ref, norm(y_true))
        miss = float((norm(got) - norm(y_true)).norm() / (norm(y_true) - norm(y_ref)).norm())
        assert miss < 30 * size  # second order: the miss shrinks with the step
    # Reaching the reference output is no step; mean and scale of each token are not moved.
    torch.testing.assert_close(norm_pullback(norm, y_ref, norm(y_ref)), y_ref)
    moved = norm_pullback(norm, y_ref, norm(y_ref) + torch.randn_like(y_ref))
    torch.testing.assert_close(moved.mean(-1), y_ref.mean(-1))
    torch.testing.assert_close(((moved - y_ref) * (y_ref - y_ref.mean(-1, keepdim=True))).sum(-1),
                               torch.zeros(200, dtype=torch.float64), atol=1e-9, rtol=0)


def test_post_norm_that_is_not_a_layernorm_is_refused_naming_the_block():
    from timm.layers import RmsNorm

    tower = tiny_post_norm_eva(norm_layer=RmsNorm)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp.*post-norm"):
        prune_and_compensate_blocks(tower, images(8, size=32).split(4), num_keep=40)


def test_calibration_carries_both_streams():
    from pruning.blockwise import BlockCalibration

    model, shape, _ = tiny_model("timm_vit")
    states = stem_states(model, "blocks.0", [torch.randn(shape)])
    one_stream = sum(s.hidden.numel() * s.hidden.element_size() for s in states)
    assert one_stream > 0 and BlockCalibration(states, Calibration()).hidden_state_bytes() == 2 * one_stream


@pytest.mark.parametrize("kind", ["open_clip", "timm_vit", "eva_plain", "eva_swiglu", "eva_glu_fused"])
def test_every_block_layout_keeps_all_as_identity_and_prunes_to_plain_shapes(kind):
    from pruning_helpers import prune_model

    model, shape, _ = tiny_model(kind)
    model.eval()
    # Enough tokens (20 x 2 x 17, 80 % fitted) for the 256 kept units of every block to be determined.
    batches = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    hidden = max(p.shape[0] for n, p in model.named_parameters() if n.endswith(("fc1.weight", "c_fc.weight",
                                                                                  "fc1_g.weight")))
    hidden = hidden // 2 if kind == "eva_glu_fused" else hidden
    everything = copy.deepcopy(model)
    prune_and_compensate_blocks(everything, batches, num_keep=hidden, ridge=0.0)
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        torch.testing.assert_close(everything(probe), model(probe), rtol=1e-3, atol=1e-4)
    pruned, plain = copy.deepcopy(model), copy.deepcopy(model)
    prune_and_compensate_blocks(pruned, batches[:4], num_keep=24)
    prune_model(plain, num_keep=24)
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_weighted_statistics_equal_repeated_tokens():
    torch.manual_seed(0)
    x = torch.randn(40, 5, dtype=torch.float64) + 3
    counts = torch.randint(0, 4, (40,))
    weighted, repeated = ActivationStats(5), ActivationStats(5)
    for rows, w in zip(x.split(16), counts.split(16), strict=True):
        weighted.update(rows, w.double())
    repeated.update(x.repeat_interleave(counts, 0))
    assert weighted.count == repeated.count == int(counts.sum())
    torch.testing.assert_close(weighted.mean(), repeated.mean())
    torch.testing.assert_close(weighted.covariance(), repeated.covariance())
    with pytest.raises(ValueError, match="non-negative"):
        weighted.update(x[:2], torch.tensor([1.0, -1.0]))


class TokenwiseBlock(torch.nn.Module):
    """A pre-norm residual MLP block with no attention: every token is processed on its own."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        from timm.layers import Mlp

        self.norm = torch.nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class TokenwiseTower(torch.nn.Module):
    """Blocks of ``TokenwiseBlock`` on [batch, tokens, dim] with one class token first."""

    num_prefix_tokens = 1

    def __init__(self, dim: int = 16, hidden: int = 48, depth: int = 2) -> None:
        super().__init__()
        self.blocks = torch.nn.Sequential(*[TokenwiseBlock(dim, hidden) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_balanced_prefix_tokens_count_like_repeated_class_tokens():
    # Tokens do not mix in this tower, so weighting each class token by T - 1 must equal an unweighted
    # fit on sequences where the class token is repeated T - 1 times.
    torch.manual_seed(0)
    tower = TokenwiseTower().eval()
    batches = [torch.randn(3, 6, 16) for _ in range(8)]
    repeated = [torch.cat([b[:, :1].repeat(1, 5, 1), b[:, 1:]], 1) for b in batches]
    balanced_tower, repeated_tower, plain_tower = copy.deepcopy(tower), copy.deepcopy(tower), copy.deepcopy(tower)
    prune_and_compensate_blocks(balanced_tower, batches, num_keep=12, holdout_fraction=0.0,
                                balance_prefix=True)
    prune_and_compensate_blocks(repeated_tower, repeated, num_keep=12, holdout_fraction=0.0)
    prune_and_compensate_blocks(plain_tower, batches, num_keep=12, holdout_fraction=0.0)
    for name, value in repeated_tower.state_dict().items():
        torch.testing.assert_close(balanced_tower.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(plain_tower.blocks[1].mlp.fc2.weight, balanced_tower.blocks[1].mlp.fc2.weight)


def test_prefix_counts_and_refusals():
    from pruning.blockwise import BlockCalibration
    from pruning.sites import prefix_token_count

    model, shape, _ = tiny_model("open_clip")
    assert prefix_token_count(model) == 1
    assert prefix_token_count(tiny_dinov2()) == 1
    registers = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, embed_dim=64,
                                  depth=1, num_heads=2, num_classes=0)
    assert prefix_token_count(registers) == 5
    with pytest.raises(ValueError, match="cannot tell"):
        prefix_token_count(torch.nn.Sequential())
    states = stem_states(model, "transformer.resblocks.0", [torch.randn(shape)])
    with pytest.raises(ValueError, match="prefix token count must be >= 0"):
        BlockCalibration(states, Calibration(), prefix_tokens=-1)


def test_empty_calibration_batches_add_nothing_and_none_at_all_is_refused():
    model = tiny_dinov2(hidden=128)
    batches = images(16).split(8)
    with_empty, plain = copy.deepcopy(model), copy.deepcopy(model)
    calibrate_blocks(with_empty, stem_states(with_empty, "blocks.0", [images(0), *batches]), num_keep=40)
    calibrate_blocks(plain, stem_states(plain, "blocks.0", batches), num_keep=40)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(with_empty.state_dict()[key], value, rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match="no batch with any image"):
        calibrate_blocks(copy.deepcopy(model), stem_states(model, "blocks.0", [images(0)]), num_keep=40)


def test_stats_rebased_onto_one_shift_add_up_to_the_stats_of_all_tokens():
    # What in-engine block-wise calibration all-reduces: each rank's moments about a common shift.
    x = torch.randn(300, 5, dtype=torch.float64) * 2 + 7
    whole = ActivationStats(5)
    whole.update(x)
    parts = [ActivationStats(5) for _ in range(3)]
    for part, chunk in zip(parts, (x[:40], x[40:200], x[200:]), strict=True):
        part.update(chunk)
    empty = ActivationStats(5)  # a rank without tokens contributes zeros
    shift = torch.full((5,), 3.0, dtype=torch.float64)
    for part in (*parts, empty):
        part.rebase(shift)
    total = ActivationStats(5)
    total.rebase(shift)
    total.count = sum(p.count for p in (*parts, empty))
    total.sum = sum(p.sum for p in (*parts, empty))
    total.outer = sum(p.outer for p in (*parts, empty))
    torch.testing.assert_close(total.mean(), whole.mean())
    torch.testing.assert_close(total.covariance(), whole.covariance())
    with pytest.raises(ValueError, match=r"shift: expected shape \(5,\)"):
        total.rebase(torch.zeros(4))


def test_batch_weight_counts_like_repeating_the_batch():
    from dataclasses import replace

    model = tiny_dinov2(hidden=128)
    first, second = images(8), images(8, seed=3)
    weighted, repeated = copy.deepcopy(model), copy.deepcopy(model)
    states = stem_states(weighted, "blocks.0", [first, second])
    states[1] = replace(states[1], weight=2.0)
    calibrate_blocks(weighted, states, num_keep=40, holdout_fraction=0)
    calibrate_blocks(repeated, stem_states(repeated, "blocks.0", [first, second, second]), num_keep=40,
                     holdout_fraction=0)
    for key, value in repeated.state_dict().items():
        torch.testing.assert_close(weighted.state_dict()[key], value, rtol=1e-4, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="batch weights must be > 0"):
        calibrate_blocks(copy.deepcopy(model), [replace(states[0], weight=0.0)], num_keep=40)


def test_a_fit_with_fewer_tokens_than_kept_units_warns_once(caplog):
    # 5 tokens per 28 px picture: 8 pictures give 32 fit tokens for 64 kept units + a bias (underdetermined),
    # 64 pictures give 256.
    forward = lambda m, x: m.forward_features(x)  # noqa: E731
    with caplog.at_level("WARNING", logger="pruning.blockwise"):
        prune_and_compensate_blocks(tiny_dinov2(), images(8).split(4), forward=forward, num_keep=64)
    warned = [r for r in caplog.records if "underdetermined" in r.getMessage()]
    assert len(warned) == 1 and "32 calibration tokens for 64 kept units" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="pruning.blockwise"):
        prune_and_compensate_blocks(tiny_dinov2(), images(64).split(16), forward=forward, num_keep=64)
    assert not [r for r in caplog.records if "underdetermined" in r.getMessage()]
    # Tokens, not weights, bound the fit: with the class token balanced, 16 pictures weigh 102 but are 64 tokens.
    caplog.clear()
    with caplog.at_level("WARNING", logger="pruning.blockwise"):
        prune_and_compensate_blocks(tiny_dinov2(), images(16).split(8), forward=forward, num_keep=64,
                                    balance_prefix=True)
    assert any("64 calibration tokens for 64 kept units" in r.getMessage() for r in caplog.records)
