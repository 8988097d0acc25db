"""The demo's calibration pictures span shards in order, and its compensated copy is the block-wise driver's."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from tools.demo import calibration_images, mixed_calibration, pruned_copy, read_shard_images
from trainer.data.make_shards import write_shards

pytestmark = pytest.mark.unit


def test_calibration_pictures_continue_into_the_next_shard(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = tmp_path / "pics" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    shards = write_shards(tmp_path / "pics", tmp_path / "shards", shard_size=4)
    listing = tmp_path / "shards.txt"
    listing.write_text("\n".join(str(s) for s in shards))
    got = calibration_images(listing, 5)
    assert got.shape[0] == 5
    assert torch.equal(got[:4], read_shard_images(shards[0], 4))
    assert torch.equal(got[4:], read_shard_images(shards[1], 1))
    assert calibration_images(listing, 3).shape[0] == 3
    mixed = mixed_calibration(listing, listing, 4, fashion_share=0.25)  # 3 of the first list, 1 of the second
    assert torch.equal(mixed[:3], got[:3]) and torch.equal(mixed[3:], got[:1])
    assert torch.equal(mixed_calibration(listing, listing, 4), torch.cat([got[:2], got[:2]]))


def test_compensated_copy_is_the_block_wise_output_fit():
    import timm

    from pruning import ModelSource, keep_counts, prune_blocks
    from tools.demo import CALIBRATION, normalised_batches

    torch.manual_seed(0)
    teacher = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, embed_dim=32, depth=2,
                                num_heads=2, init_values=0.5, num_classes=0).eval()
    pictures = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    got = pruned_copy(teacher, 1.0, "diversity", compensate_on=pictures)
    want = copy.deepcopy(teacher)
    source = ModelSource(want, forward=lambda m, x: m.forward_features(x))
    assert CALIBRATION.balance_prefix and CALIBRATION.refine_steps > 0
    prune_blocks(source, keep_counts(source.sites, 1.0), calibration=CALIBRATION,
                 calib_inputs=list(normalised_batches(pictures, 16)), generator=torch.Generator().manual_seed(0))
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    plain = pruned_copy(teacher, 1.0, "diversity")
    assert not torch.equal(plain.blocks[1].mlp.fc2.weight, got.blocks[1].mlp.fc2.weight)


def test_calibration_bench_variants_parse():
    from bench.demo_calibration import parse_variant

    assert parse_variant("clip=576,fm=192,stride=4,ridge=1e-2") == {
        "clip": 576, "fm": 192, "method": "activation", "stride": 4, "ridge": 1e-2, "steps": 300, "lr": 1e-3}
    assert parse_variant("method=diversity,steps=0")["method"] == "diversity"
    with pytest.raises(ValueError, match="unknown setting 'foo=1'"):
        parse_variant("foo=1")
