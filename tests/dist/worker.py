"""Run under torchrun (2 ranks, gloo): trains the same tiny run on several engines in one launch.

Usage: torchrun --nproc_per_node 2 tests/dist/worker.py OUT_DIR ENGINE_SPEC [ENGINE_SPEC ...]
with ENGINE_SPEC like ``fsdp``, ``deepspeed:2`` or ``deepspeed:3+bf16`` (bf16, activation
checkpointing, 2 accumulation steps). Each rank writes OUT_DIR/<spec without ':'>.rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from trainer.student import build_models
from trainer.cli import load_config
from trainer.config import TrainConfig
from trainer.data import Batch, InputSpec, SyntheticStream
from trainer.dist import destroy_process_group, exit_process
from trainer.loop import train
from trainer.models.registry import get_adapter

EXPERIMENT = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "tiny_timm.yaml"
STEPS = 20
BATCH = 4


class FixedStream:
    """The same batch forever: rank r's synthetic batch 0, or all ranks' batches concatenated."""

    def __init__(self, spec: InputSpec, ranks: list[int], seed: int) -> None:
        parts = [SyntheticStream(spec, BATCH, rank=r, seed=seed).batch_at(0) for r in ranks]
        self.batch = Batch(torch.cat([p.images for p in parts]), sum((p.captions for p in parts), []),
                           sum((p.keys for p in parts), []))

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {"samples_skipped": 0}


def config(run_dir: Path, engine: str, zero_stage: int, batch: int, bf16: bool) -> TrainConfig:
    """The shared tiny run: fp32, fixed data, lr high enough to move in 20 steps."""
    extra = ["engine.precision=bf16", "engine.activation_checkpointing=true", "optim.grad_accum_steps=2"]
    return load_config(EXPERIMENT, [
        f"run.dir={run_dir}", f"run.steps={STEPS}", "run.log_every_steps=1", f"engine.name={engine}",
        f"engine.zero_stage={zero_stage}", "engine.precision=fp32", f"optim.batch_size_per_rank={batch}",
        "optim.base_lr=0.05", "optim.warmup_steps=0", *(extra if bf16 else []),
    ])


def run(out_dir: Path, spec: str, ranks_in_stream: list[int], batch: int) -> dict:
    """Train one engine; return what the tests assert on (every rank calls every collective)."""
    base, _, variant = spec.partition("+")
    engine_name, _, stage = base.partition(":")
    cfg = config(out_dir / f"run-{spec.replace(':', '')}", engine_name, int(stage or 2), batch, variant == "bf16")
    adapter = get_adapter(cfg.model.family)
    reference_teacher, _, _ = build_models(cfg, adapter)
    adapter.strip_head(reference_teacher)
    spec_in = adapter.input_spec(reference_teacher)
    result = train(cfg, stream=FixedStream(spec_in, ranks_in_stream, cfg.run.seed))
    engine = result.engine
    after = engine.gather_teacher_state()  # in the dtype the engine stores (bf16 under DeepSpeed bf16)
    before = dict(reference_teacher.named_parameters())
    return {
        "losses": [result.losses[s] for s in range(STEPS)],
        "teacher_identical": sorted(after) == sorted(before)
        and all(torch.equal(after[n], before[n].detach().to(after[n].dtype)) for n in before),
        "teacher_local_numel": engine.teacher_local_numel(),
        "teacher_total_numel": sum(p.numel() for p in before.values()),
        "teacher_frozen": all(not p.requires_grad and p.grad is None for p in engine_teacher_params(engine)),
        "teacher_dtypes": sorted({str(p.dtype) for p in engine_teacher_params(engine)}),
        "student_dtypes": sorted({str(p.dtype) for p in engine.optimizer.param_groups[0]["params"]}),
        "run_dir": str(cfg.run.dir),
        "groups": [[g.get("decays"), g["weight_decay"], g["lr"]] for g in engine.optimizer.param_groups],
    }


def engine_teacher_params(engine: object) -> list[torch.nn.Parameter]:
    module = getattr(engine, "teacher_model", None) or engine.teacher_engine.module
    return list(module.parameters())


def main() -> None:
    out_dir, specs = Path(sys.argv[1]), sys.argv[2:]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    for spec in specs:
        # One process alone (the single engine) sees every rank's batch, as one batch of world * BATCH.
        ranks = [rank] if spec != "single" else list(range(2))
        batch = BATCH if spec != "single" else 2 * BATCH
        record = run(out_dir, spec, ranks, batch)
        (out_dir / f"{spec.replace(':', '')}.rank{rank}.json").write_text(json.dumps(record))
    del world
    destroy_process_group()
    exit_process(0)  # as python -m trainer ends: no interpreter teardown racing gloo's worker threads


if __name__ == "__main__":
    main()
