"""GPU tier: ViT-g-14 teacher + r=1 student, single engine, bf16: trains, and the planner predicts its memory.

Not yet run on a GPU (written without one): the tolerances below come from the byte model in
docs/planner.md, not from a measurement; adjust them from the first real run and say so there.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tools.plan import plan_row
from trainer.cli import load_config
from trainer.loop import train
from trainer.models.meta import tower_shapes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parents[2]
BATCH = 32
STEPS = 20


def test_vit_g_single_bf16_memory_matches_plan(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "experiments" / "vit_g_14_r1_fsdp.yaml", [
        f"run.dir={tmp_path}", f"run.steps={STEPS}", "run.log_every_steps=1", "engine.name=single",
        "engine.precision=bf16", "engine.activation_checkpointing=false", f"optim.batch_size_per_rank={BATCH}",
        "optim.warmup_steps=2", "prune.method=l2", "data.kind=synthetic", "data.shards=", "data.num_workers=0"])
    torch.cuda.reset_peak_memory_stats()
    result = train(cfg)
    peak = torch.cuda.max_memory_allocated()
    steady = torch.cuda.memory_allocated()
    assert len(result.losses) == STEPS and all(math.isfinite(v) for v in result.losses.values())

    teacher, student = tower_shapes(cfg.model, cfg.prune.ratio)
    row = plan_row(teacher, student, "single", 0, "bf16", 1, BATCH,
                   torch.cuda.get_device_properties(0).total_memory, reserve=0)
    # Between steps (gradients set to None, no activations): fp32 student weights and moments, fp32 teacher.
    states = row.student.params + row.student.optimizer + row.teacher.total
    assert abs(steady - states) / states < 0.03, (steady, states)
    # The planner adds gradients (set to None between steps) and activations at their peaks together and
    # its activations are 4-10 % high, so the expected peak is ~0.89 of the plan: above 0.8, at most 1.1.
    assert 0.8 * row.total_at_batch <= peak <= 1.1 * row.total_at_batch, (peak, row.total_at_batch)
