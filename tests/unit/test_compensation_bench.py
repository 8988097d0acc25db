"""bench.compensation's mixed calibration draws Fashion-MNIST images the kNN probe never sees; the kNN sweep's variants."""

import pytest
import torch

from bench.compensation import unused_indices

pytestmark = pytest.mark.unit


def test_calibration_indices_avoid_the_knn_sample_and_are_seeded():
    used = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:600]
    pick = unused_indices(1000, used, 300)
    assert len(pick) == 300 == len(set(pick.tolist()))
    assert not set(pick.tolist()) & set(used.tolist())
    assert torch.equal(pick, unused_indices(1000, used, 300))
    with pytest.raises(ValueError, match="only 400 training images"):
        unused_indices(1000, used, 401)


def test_draws_differ_by_seed_and_knn_sweep_variants_parse():
    from bench.compensation_knn import Variant

    used = torch.arange(0, 1000, 2)
    assert not torch.equal(unused_indices(1000, used, 50, seed=1), unused_indices(1000, used, 50, seed=7))
    assert Variant.parse("ridge=1e-2,clip=0,fm=512") == Variant(clip=0, fm=512, ridge=1e-2)
    assert Variant.parse("w224=0.25,clip112=64") == Variant(w224=0.25, clip112=64)
    assert Variant.parse("flip,seed=7,clipsize=224+112") == Variant(flip=True, seed=7, clipsize=(224, 112))
    with pytest.raises(ValueError, match="unknown setting 'foo=1'"):
        Variant.parse("foo=1")
    with pytest.raises(ValueError, match="at least one calibration image"):
        Variant.parse("clip=0,fm=0")
