"""bench.compensation's mixed calibration draws Fashion-MNIST images the kNN probe never sees."""

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
