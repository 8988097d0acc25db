"""FSDP2 and DeepSpeed ZeRO-2/3 on 2 gloo ranks against the single-process loop, same seed and data.

One torchrun launch trains all three sharded engines (DeepSpeed's start-up is the slow part),
one plain process trains the ``single`` engine; the tests read what the ranks wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.dist

WORKER = Path(__file__).with_name("worker.py")
SHARDED = ("fsdp", "deepspeed2", "deepspeed3")
BF16 = ("fsdp+bf16", "deepspeed3+bf16")  # with activation checkpointing and 2 accumulation steps
SCALARS = ("loss/total", "loss/cls", "loss/patch", "opt/lr", "opt/weight_decay", "opt/grad_norm",
           "perf/images_per_s", "perf/samples_seen", "perf/step_time_s", "perf/memory_bytes",
           "data/samples_skipped")


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("engines")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    launches = [
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(WORKER), str(out), "fsdp", "deepspeed:2",
         "deepspeed:3", "fsdp+bf16", "deepspeed:3+bf16"],
        [sys.executable, str(WORKER), str(out), "single"],
    ]
    for command in launches:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    by_engine = {}
    for name in (*SHARDED, *BF16, "single"):
        by_engine[name] = [json.loads(p.read_text()) for p in sorted(out.glob(f"{name}.rank*.json"))]
    return by_engine


@pytest.mark.parametrize("engine", [*SHARDED, *BF16, "single"])
def test_loss_decreases_on_fixed_data(records: dict, engine: str) -> None:
    for record in records[engine]:
        losses = record["losses"]
        assert len(losses) == 20
        assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("engine", [*SHARDED, *BF16, "single"])
def test_teacher_bit_identical_and_frozen(records: dict, engine: str) -> None:
    for record in records[engine]:
        assert record["teacher_identical"]
        assert record["teacher_frozen"]


@pytest.mark.parametrize("engine", [*SHARDED, *BF16])
def test_frozen_teacher_is_stored_in_bf16_under_bf16(records: dict, engine: str) -> None:
    # No optimizer, so no fp32 master copy: half the teacher's memory. The student keeps fp32 masters.
    for record in records[engine]:
        assert record["teacher_dtypes"] == (["torch.bfloat16"] if engine in BF16 else ["torch.float32"])
        if engine.startswith("fsdp"):  # DeepSpeed keeps its fp32 masters inside its own optimizer wrapper
            assert record["student_dtypes"] == ["torch.float32"]


@pytest.mark.parametrize("engine", [*SHARDED, "single"])
def test_optimizer_groups_follow_the_schedule(records: dict, engine: str) -> None:
    # After the last of 20 steps: weight decay at its end value on matrices only, lr near 0.
    for record in records[engine]:
        (decays, wd, lr), (no_decays, no_wd, _) = record["groups"]
        assert decays is True and wd == pytest.approx(0.2)
        assert no_decays is False and no_wd == 0.0
        assert 0 < lr < 1e-4


@pytest.mark.parametrize("engine", [*SHARDED, *BF16])
def test_teacher_is_sharded(records: dict, engine: str) -> None:
    assert len(records[engine]) == 2
    for record in records[engine]:
        total, local = record["teacher_total_numel"], record["teacher_local_numel"]
        assert abs(local - total / 2) <= 0.02 * total, (local, total)


@pytest.mark.parametrize("engine", SHARDED)
def test_first_losses_match_single_process(records: dict, engine: str) -> None:
    reference = records["single"][0]["losses"][:5]
    for record in records[engine]:
        for got, want in zip(record["losses"][:5], reference, strict=True):
            assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("engine", SHARDED)
def test_tensorboard_has_every_scalar(records: dict, engine: str) -> None:
    run_dir = Path(records[engine][0]["run_dir"])
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert set(SCALARS) <= set(events.Tags()["scalars"])
    losses = [e.value for e in events.Scalars("loss/total")]
    assert losses == pytest.approx(records[engine][0]["losses"], rel=1e-6)
    assert (run_dir / "config.yaml").is_file()
