"""GPU tier: selection on CUDA tensors gives the CPU result (skipped without CUDA)."""

import pytest
import torch

from pruning import select_mlp_channels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_selection_matches_cpu(dtype):
    w = torch.randn(3072, 768, generator=torch.Generator().manual_seed(0)).to(dtype)
    cpu = select_mlp_channels(w, 768)
    gpu = select_mlp_channels(w.cuda(), 768)
    assert gpu.is_cuda
    assert torch.equal(gpu.cpu(), cpu)
