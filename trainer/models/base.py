"""What the trainer needs to know about a model family, behind one small interface.

The distillation target is the token sequence leaving the last transformer block, i.e. the
input of the final norm. ``strip_head`` replaces the final norm, pooling and head by identities,
so ``model(images)`` returns those tokens: the model's own forward still runs end to end, which
the engines' parameter gathering (ZeRO-3, FSDP2) relies on, and no compute goes into a head the
loss never sees. The removed parts are handed back, to put back for export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.data import InputSpec


@dataclass
class TokenLayout:
    """How to read [B, L, D] tokens: prefix (class/register) tokens first, then patches."""

    num_prefix_tokens: int
    """Class and register tokens in front of the patch tokens."""
    pooled_is_class_token: bool
    """True: the pooled feature is token 0; False: the mean of the patch tokens."""
    removed: dict[str, object] = field(default_factory=dict, repr=False)
    """Final norm / pooling / head parts taken out by strip_head, by attribute path."""

    def split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, D], patches [B, P, D])."""
        patches = tokens[:, self.num_prefix_tokens:]
        pooled = tokens[:, 0] if self.pooled_is_class_token else patches.mean(dim=1)
        return pooled, patches


class ModelAdapter(Protocol):
    """One model family: how to build it and where its blocks and head are."""

    def build(self, cfg: ModelConfig) -> nn.Module:
        """The vision tower in fp32 on CPU, with the configured weights (or random init)."""
        ...

    def input_spec(self, model: nn.Module) -> InputSpec:
        """Image size and normalisation the model expects."""
        ...

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """Transformer blocks in order: the units for sharding and activation checkpointing."""
        ...

    def strip_head(self, model: nn.Module) -> TokenLayout:
        """Make ``model(images)`` return the tokens before the final norm; say how to read them."""
        ...

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        """Recompute every block in backward."""
        ...

    def final_norm(self, layout: TokenLayout) -> nn.Module:
        """The final norm ``strip_head`` removed (Identity if none): what users' features pass through."""
        ...


def first_line(err: BaseException) -> str:
    """The first informative line of a load_state_dict error (its first line only names the module)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else (lines[0] if lines else "")
