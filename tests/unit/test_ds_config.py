"""The DeepSpeed config: ZeRO-3 holds at most two gathered blocks (the planner's GATHERED_BLOCKS)."""

from __future__ import annotations

import pytest
from torch import nn

from trainer.config import EngineConfig, OptimConfig

pytestmark = pytest.mark.unit


def test_zero3_bounds_gathered_parameters_to_two_blocks() -> None:
    from trainer.engines.deepspeed import _largest_block, ds_config

    blocks = [nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 8)), nn.Linear(8, 8)]
    numel = _largest_block(blocks)
    assert numel == 8 * 32 + 32 + 32 * 8 + 8
    engine, optim = EngineConfig(name="deepspeed", zero_stage=3, precision="bf16"), OptimConfig()
    student = ds_config(engine, optim, 2, stage=3, train=True, block_numel=numel)["zero_optimization"]
    assert student == {"stage": 3, "stage3_prefetch_bucket_size": numel, "stage3_max_live_parameters": 2 * numel,
                       "stage3_max_reuse_distance": numel, "sub_group_size": numel,
                       "reduce_bucket_size": 2 * numel}
    # The teacher has no backward: nothing it gathered is used again.
    teacher = ds_config(engine, optim, 2, stage=3, train=False, block_numel=numel)["zero_optimization"]
    assert teacher["stage3_max_reuse_distance"] == 0 and teacher["stage3_max_live_parameters"] == 2 * numel
    assert "sub_group_size" not in teacher and "reduce_bucket_size" not in teacher
    # ZeRO-2 gathers nothing; without a block size DeepSpeed's defaults stay.
    assert ds_config(engine, optim, 2, stage=2, train=True, block_numel=numel)["zero_optimization"] == {"stage": 2}
    assert ds_config(engine, optim, 2, stage=3, train=True)["zero_optimization"] == {"stage": 3}
