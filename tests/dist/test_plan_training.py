"""``plan --cpu`` against measured training: 2 gloo ranks, ViT-B-32 in-engine r=1, bf16, a few AdamW steps."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

GIB = 1024**3


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_cpu_mode_predicts_measured_training(tmp_path: Path, engine: str) -> None:
    """The training phase (student gradients, AdamW moments, gathered blocks, activations) on top of the
    pruned models: each rank's peak RssAnon within 10 % of the plan. Before the host allocator setting
    (trainer.dist) and the ZeRO-3 bounds (trainer.engines.deepspeed.ds_config) these ranks measured
    1.36-1.50 (FSDP2) and 1.58-1.64 GiB (ZeRO-3) against 0.93 and 1.16 planned."""
    from bench.full_size import BASE_CONFIG, Launch, torchrun, write_random_checkpoint
    from tools.plan import cpu_peak_per_rank

    ckpt = tmp_path / "vit_b_32.safetensors"
    write_random_checkpoint("ViT-B-32", ckpt, whole_clip=False)
    engine_args = ["engine.name=fsdp"] if engine == "fsdp" else ["engine.name=deepspeed", "engine.zero_stage=3"]
    args = [f"run.dir={tmp_path / 'run'}", "run.steps=3", "run.log_every_steps=1", "model.family=open_clip",
            "model.name=ViT-B-32", f"model.pretrained={ckpt}", "prune.in_engine=true", "prune.ratio=1",
            *engine_args, "engine.precision=bf16", "data.kind=synthetic", "optim.batch_size_per_rank=2",
            "checkpoint.every_minutes=0", "checkpoint.every_steps=1000"]
    launch = Launch(torchrun(args), tmp_path / "log", 8 * GIB, torchrun=True)
    assert launch.wait(600) == 0, launch.text()[-3000:]
    measured = launch.peaks()["peak_rss_anon_gib"]
    planned = cpu_peak_per_rank(str(BASE_CONFIG), args, world_size=2)
    assert set(measured) == {0, 1} and "train" in planned["phases"]
    for rank, peak in measured.items():
        assert abs(peak / planned["peak_gib"] - 1) <= 0.10, (rank, peak, planned)
