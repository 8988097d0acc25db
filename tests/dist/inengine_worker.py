"""Run under torchrun (2 ranks, gloo) for test_inengine_prune.py: several short trainings in one launch.

Usage: torchrun --nproc_per_node 2 tests/dist/inengine_worker.py OUT_DIR JOB_JSON [JOB_JSON ...]
Each job is a JSON object: name, family, model, pretrained, engine, zero_stage, in_engine, ratio,
method, student_init, compensate, calib_batches, ridge, calib_holdout, stream ("synthetic": batch i of rank r's
SyntheticStream instead of one fixed batch), train (false: the pruning pass only) (all optional). An in-engine job first prunes alone (engine set up, sharded build,
in-engine pruning, optimizer; no step): rank 0 writes OUT_DIR/<name>.pruned.safetensors (the gathered
student) and every rank OUT_DIR/<name>.prune.rank<r>.json (report, memory). Then every job trains
``STEPS`` steps through trainer.loop.train: OUT_DIR/<name>.rank<r>.json (losses, run_dir) and, from
rank 0, OUT_DIR/<name>.trained.safetensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from timm.models import build_model_with_cfg, register_model
from timm.models.eva import Eva
from torch import nn

from trainer.config import TrainConfig, from_dict
from trainer.data import InputSpec, SyntheticStream
from trainer.dist import destroy_process_group, exit_process, read_env
from trainer.engines.base import build_engine
from trainer.loop import train
from trainer.models.registry import get_adapter
from trainer.student import in_engine_build, prune_in_engine

TINY_EVA = "dgmr_test_inengine_eva"
STEPS = 3
BATCH = 4


@register_model
def dgmr_test_inengine_eva(pretrained: bool = False, **kwargs: object) -> nn.Module:
    """EVA02-E-14-plus's block design (post-norm, GELU fc1/fc2) at width 64, depth 2, with rotary
    embeddings so the model has real non-persistent buffers; headless by default."""
    args = {"img_size": 28, "patch_size": 14, "embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0,
            "use_post_norm": True, "use_rot_pos_emb": True, "ref_feat_shape": (2, 2), "global_pool": "token",
            "num_classes": 0}
    args.update(kwargs)
    # Through timm's builder so the model carries a pretrained_cfg, which the timm export records.
    return build_model_with_cfg(Eva, TINY_EVA, pretrained=pretrained, **args)


def config(out_dir: Path, job: dict, steps: int, lr: float) -> TrainConfig:
    prune = {"enabled": job.get("enabled", True), "ratio": job["ratio"], "method": job["method"],
             "in_engine": job["in_engine"],
             "student_init": job.get("student_init", ""), "taylor_batches": 2,
             "compensate": job.get("compensate", False), "calib_batches": job.get("calib_batches", 8),
             "ridge": job.get("ridge", 1e-3),
             "calib_holdout": job.get("calib_holdout", 0.2), "budget": job.get("budget"),
             "budget_grid": job.get("budget_grid", 64)}
    return from_dict({
        "run": {"dir": str(out_dir / f"run-{job['name']}"), "steps": steps, "log_every_steps": 1, "seed": 0},
        "model": {"family": job["family"], "name": job["model"], "pretrained": job["pretrained"]},
        "prune": prune,
        "optim": {"base_lr": lr, "batch_size_per_rank": BATCH, "warmup_steps": 0, "grad_clip": 1.0},
        "engine": {"name": job["engine"], "zero_stage": job.get("zero_stage", 2), "precision": "fp32"},
        "checkpoint": {"resume": "none", "every_steps": 1000},
    })


def prune_only(out_dir: Path, job: dict, rank: int) -> None:
    """The in-engine pruning pass alone, as the loop runs it; the student is gathered before any step."""
    cfg = config(out_dir, job, STEPS, 0.05)
    env = read_env()
    engine = build_engine(cfg.engine, cfg.optim, env)
    cfg, build = in_engine_build(cfg, get_adapter(cfg.model.family), stream(job, rank), env.device)
    engine.setup_sharded(build.skeletons())
    report, extra = prune_in_engine(engine, build, stream(job, rank), env.device)
    student = engine.gather_student_state()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in student.items()}, out_dir / f"{job['name']}.pruned.safetensors")
    # The final norm left both models with strip_head; it must hold the checkpoint's values, not meta tensors.
    reference = get_adapter(cfg.model.family).build(cfg.model)
    norms = [get_adapter(cfg.model.family).final_norm(layout) for layout in (build.teacher_layout, build.student_layout)]
    want = {k: v for k, v in reference.state_dict().items()}
    prefix = "trunk." if job["family"] == "open_clip" and hasattr(reference, "trunk") else ""
    norm_name = "ln_post" if job["family"] == "open_clip" and not prefix else prefix + "norm"
    norms_loaded = all(torch.equal(v, want[f"{norm_name}.{k}"]) for norm in norms for k, v in norm.state_dict().items())
    record = {"report": report.to_dict(), **extra, "student_keys": sorted(student), "norms_loaded": norms_loaded,
              "norm_tensors": sum(len(n.state_dict()) for n in norms)}
    (out_dir / f"{job['name']}.prune.rank{rank}.json").write_text(json.dumps(record))
    engine.close()


def stream(job: dict, rank: int) -> object:
    """Rank ``rank``'s synthetic batch 0, every step (the Taylor batches too); seed 0, as the runs.

    ``stream: synthetic`` in the job: rank ``rank``'s SyntheticStream (batch i at step i), seed 0.
    """
    from worker import FixedStream  # tests/dist/worker.py

    if job.get("stream") == "synthetic":
        return SyntheticStream(InputSpec(image_size(job), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), BATCH, rank=rank, seed=0)
    return FixedStream(InputSpec(image_size(job), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), [rank], 0)


def image_size(job: dict) -> int:
    return 32 if job["family"] == "open_clip" else 28


def run(out_dir: Path, job: dict, rank: int) -> None:
    cfg = config(out_dir, job, STEPS, 0.05)
    result = train(cfg, stream=stream(job, rank))
    student = result.engine.gather_student_state()
    record = {"losses": [result.losses[s] for s in range(STEPS)], "run_dir": str(cfg.run.dir),
              "teacher_local_numel": result.engine.teacher_local_numel()}
    if rank == 0:
        save_file({k: v.contiguous() for k, v in student.items()}, out_dir / f"{job['name']}.trained.safetensors")
    (out_dir / f"{job['name']}.rank{rank}.json").write_text(json.dumps(record))
    result.engine.close()


def launch(out_dir: Path, jobs: list[dict]) -> None:
    """Run ``jobs`` in one torchrun launch of this worker on 2 gloo ranks (the tests' entry); fail with its output."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", __file__, str(out_dir),
               *(json.dumps(j) for j in jobs)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def main() -> None:
    out_dir, jobs = Path(sys.argv[1]), [json.loads(a) for a in sys.argv[2:]]
    rank = int(os.environ.get("RANK", 0))
    torch.set_num_threads(1)
    for job in jobs:
        if job["in_engine"]:
            prune_only(out_dir, job, rank)
        if job.get("train", True):
            run(out_dir, job, rank)
    destroy_process_group()
    exit_process(0)  # as python -m trainer ends: no interpreter teardown racing gloo's worker threads


if __name__ == "__main__":
    main()
