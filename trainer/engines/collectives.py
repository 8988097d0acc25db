"""Small helpers shared by the multi-process engines."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist

from trainer.dist import DistEnv


def mean_over_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """All-reduce average of a small tensor; returned on CPU."""
    buffer = values.detach().to(env.device, torch.float32).clone()
    torch_dist.all_reduce(buffer, op=torch_dist.ReduceOp.SUM)
    return (buffer / env.world_size).cpu()
