"""Taylor scores collected by hooks equal |activation x gradient| computed by hand."""

import pytest
import torch
from pruning_helpers import prune_model
from timm.models.vision_transformer import VisionTransformer as TimmViT

from pruning import collect_taylor_scores, find_mlp_sites

pytestmark = pytest.mark.unit


def test_scores_match_hand_computed_activation_times_gradient():
    torch.manual_seed(0)
    model = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    batches = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]

    def loss_fn(m, x):
        return m(x).square().mean()

    before = {n: p.grad for n, p in model.named_parameters()}
    scores = collect_taylor_scores(model, batches, loss_fn)
    assert all(model.get_parameter(n).grad is g for n, g in before.items())

    expected = torch.zeros(128, dtype=torch.float64)
    for x in batches:
        acts = {}
        handle = model.blocks[1].mlp.fc2.register_forward_pre_hook(lambda _m, a, acts=acts: acts.setdefault("a", a[0]))
        loss = loss_fn(model, x)
        handle.remove()
        (grad,) = torch.autograd.grad(loss, acts["a"])
        expected += (acts["a"] * grad).abs().sum((0, 1)).double()
    torch.testing.assert_close(scores["blocks.1.mlp"], expected)
    assert set(scores) == {s.path for s in find_mlp_sites(model)}

    report = prune_model(model, num_keep=16, method="taylor", scores=scores)
    assert report.sites[1].kept == torch.sort(expected, descending=True, stable=True).indices[:16].tolist()
