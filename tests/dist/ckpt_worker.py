"""Checkpoint test runs, one process per rank (torchrun, or plain python for one rank).

Usage: ckpt_worker.py OUT_DIR JOB [JOB ...], JOB = JSON {"name", "engine", "zero_stage", "run_dir",
"steps", "overrides": [...], "batch_sleep_s", "state_sleep_s"}. Jobs run in order; each rank writes
OUT_DIR/<name>.rank<r>.json with its losses once the job is done (rank 0 also the trained student's
full state, OUT_DIR/<name>.student.pt), and OUT_DIR/pid.rank<r> at start (the tests kill a rank by it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from trainer.cli import load_config
from trainer.data import Batch, InputSpec
from trainer.dist import destroy_process_group, exit_process
from trainer.loop import train

EXPERIMENT = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "tiny_timm.yaml"
GLOBAL_BATCH = 8


class GlobalBatchStream:
    """Batch ``i`` is one global batch of random images from (seed, i); rank r of W takes its slice.

    The same global batches at any world size: what a resume at another world size must reproduce.
    Sleeps make a run slow enough to be killed mid-way (``batch_sleep_s``) or mid-save (``state_sleep_s``,
    paid in ``state_dict``, which the trainer calls while its temporary checkpoint directory exists).
    """

    def __init__(self, spec: InputSpec, rank: int, world: int, seed: int, batch_sleep_s: float,
                 state_sleep_s: float) -> None:
        self.spec, self.rank, self.world, self.seed = spec, rank, world, seed
        self.batch_sleep_s, self.state_sleep_s = batch_sleep_s, state_sleep_s
        self.next_batch = 0

    def __iter__(self) -> Iterator[Batch]:
        per_rank = GLOBAL_BATCH // self.world
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.next_batch)
            size = self.spec.image_size
            images = torch.randn(GLOBAL_BATCH, 3, size, size, generator=g)[self.rank * per_rank:][:per_rank]
            self.next_batch += 1
            time.sleep(self.batch_sleep_s)
            yield Batch(images, ["synthetic"] * per_rank, [""] * per_rank)

    def state_dict(self) -> dict:
        time.sleep(self.state_sleep_s)
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict) -> None:
        self.next_batch = int(state["next_batch"])

    def counters(self) -> dict[str, int]:
        return {"samples_skipped": 0}


def run(job: dict, rank: int, world: int, out_dir: Path) -> dict[int, float]:
    cfg = load_config(EXPERIMENT, [
        f"run.dir={job['run_dir']}", f"run.steps={job['steps']}", "run.log_every_steps=1",
        f"engine.name={job['engine']}", f"engine.zero_stage={job.get('zero_stage', 2)}",
        f"optim.batch_size_per_rank={GLOBAL_BATCH // world}", "optim.base_lr=0.05", "optim.warmup_steps=2",
        "checkpoint.every_steps=2", "checkpoint.keep_last=10", *job.get("overrides", []),
    ])
    spec = InputSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    stream = GlobalBatchStream(spec, rank, world, cfg.run.seed, job.get("batch_sleep_s", 0.0),
                               job.get("state_sleep_s", 0.0))
    result = train(cfg, stream=stream)
    student = result.engine.gather_student_state()  # a collective: every rank
    if rank == 0:
        torch.save(student, out_dir / f"{job['name']}.student.pt")
    result.engine.close()
    return result.losses


def main() -> None:
    out_dir, jobs = Path(sys.argv[1]), [json.loads(j) for j in sys.argv[2:]]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    (out_dir / f"pid.rank{rank}").write_text(str(os.getpid()))
    for job in jobs:
        losses = run(job, rank, world, out_dir)
        (out_dir / f"{job['name']}.rank{rank}.json").write_text(json.dumps({str(k): v for k, v in losses.items()}))
    destroy_process_group()
    exit_process(0)  # as python -m trainer ends: no interpreter teardown racing gloo's worker threads


if __name__ == "__main__":
    main()
