"""``bench.block_refine``: one block trained towards another block's outputs, whole or its MLP only."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from bench.block_refine import train_block

pytestmark = pytest.mark.unit


class Block(nn.Module):
    """A residual block with an ``attn`` and an ``mlp``, the attribute the MLP-only scope trains."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


def fit(scope: str) -> tuple[Block, dict[str, torch.Tensor], float, float]:
    torch.manual_seed(0)
    student, teacher = Block(), Block()
    inputs = torch.randn(16, 5, 8)
    with torch.no_grad():
        targets = teacher(inputs)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = argparse.Namespace(scope=scope, lr=1e-2, steps=60, batch=4)
    before, after = train_block(student, inputs, targets, args, torch.Generator().manual_seed(0))
    return student, start, before, after


def test_whole_block_moves_towards_the_target_and_is_left_frozen() -> None:
    student, start, before, after = fit("block")
    assert after < 0.5 * before
    assert not torch.equal(student.attn.weight, start["attn.weight"])
    assert not any(p.requires_grad for p in student.parameters())


def test_mlp_scope_leaves_the_rest_of_the_block_alone() -> None:
    student, start, before, after = fit("mlp")
    assert after < before
    assert torch.equal(student.attn.weight, start["attn.weight"])
    assert torch.equal(student.attn.bias, start["attn.bias"])
    assert not torch.equal(student.mlp[0].weight, start["mlp.0.weight"])
