"""Held-out validation on 2 gloo ranks (FSDP2) gives the numbers of 1 process (single engine).

The same file is the worker: ``torchrun --nproc_per_node 2 <this file> OUT SHARDS...`` and the plain
``python <this file> OUT SHARDS...`` train the same tiny run (each rank its synthetic batch; the single
process their concatenation, so both take the same optimizer steps), validating at every step on an odd
number of held-out images (ranks hold 3 and 2: the short rank pads with a dummy forward) plus kNN, with
a cosine class term and a teacher-standardised patch term (its std is reduced over ranks).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from trainer.checkpoint import BEST, BEST_RECORD
from trainer.cli import load_config
from trainer.data import Batch, InputSpec, SyntheticStream
from trainer.dist import destroy_process_group, exit_process
from trainer.loop import train

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "configs" / "experiments" / "tiny_timm.yaml"
STEPS, BATCH = 3, 2


class SplitStream:
    """Step ``i``: rank r's synthetic batch ``i``, or every listed rank's batch ``i`` concatenated."""

    def __init__(self, spec: InputSpec, ranks: list[int], seed: int) -> None:
        self.streams = [SyntheticStream(spec, BATCH, rank=r, seed=seed) for r in ranks]

    def __iter__(self) -> Iterator[Batch]:
        for i in range(STEPS):
            parts = [s.batch_at(i) for s in self.streams]
            yield Batch(torch.cat([p.images for p in parts]), sum((p.captions for p in parts), []),
                        sum((p.keys for p in parts), []))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {"samples_skipped": 0}


def worker(out: Path, shards: list[str]) -> None:
    """Train and validate; each rank writes its validation numbers and where best/ ended up."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    val, knn_train, knn_eval = shards
    run_dir = out / f"run-world{world}"
    cfg = load_config(EXPERIMENT, [
        f"run.dir={run_dir}", f"run.steps={STEPS}", "run.log_every_steps=1",
        f"engine.name={'fsdp' if world > 1 else 'single'}", f"optim.batch_size_per_rank={BATCH * (3 - world)}",
        "optim.base_lr=0.05", "loss.cls_objective=cosine", "loss.patch_objective=mse_standardized",
        f"validation.shards={val}", "validation.every_steps=1", "validation.num_images=5", "validation.batch_size=2",
        f"validation.knn_train_shards={knn_train}", f"validation.knn_eval_shards={knn_eval}", "validation.knn_k=3",
    ])
    spec = InputSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # only the size matters for synthetic images
    result = train(cfg, stream=SplitStream(spec, [rank] if world > 1 else [0, 1], cfg.run.seed))
    best = run_dir / "checkpoints" / BEST / BEST_RECORD
    record = {"validation": {str(k): v for k, v in result.validation.items()},
              "best": json.loads(best.read_text()) if best.is_file() else None}
    (out / f"world{world}.rank{rank}.json").write_text(json.dumps(record))
    result.engine.close()
    destroy_process_group()
    exit_process(0)  # as python -m trainer ends: no interpreter teardown racing gloo's worker threads


def write_shards(root: Path, name: str, n_shards: int, per_shard: int) -> str:
    """Shards of red / blue noisy PNGs with a json label; returns the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    colours = {"blue": (30, 30, 200), "red": (200, 30, 30)}
    for s in range(n_shards):
        with TarWriter(str(root / f"{name}-{s}.tar"), encoder=False) as writer:
            for j in range(per_shard):
                i = s * per_shard + j
                label = sorted(colours)[i % 2]
                rng = np.random.default_rng(i + 100 * len(name))
                pixels = np.clip(np.array(colours[label]) + rng.integers(-40, 40, (36, 40, 3)), 0, 255)
                buf = io.BytesIO()
                Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
                writer.write({"__key__": f"{name}{i:04d}", "png": buf.getvalue(),
                              "json": json.dumps({"label": label}).encode()})
    return str(root / f"{name}-{{0..{n_shards - 1}}}.tar")


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("validation")
    shards = [write_shards(out / "shards", "val", 2, 3), write_shards(out / "shards", "knntrain", 2, 5),
              write_shards(out / "shards", "knneval", 1, 6)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    for command in ([str(torchrun), "--standalone", "--nproc_per_node", "2", __file__, str(out), *shards],
                    [sys.executable, __file__, str(out), *shards]):
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in out.glob("world*.json")}


def test_two_ranks_agree_with_each_other(records: dict[str, dict]) -> None:
    assert records["world2.rank0"] == records["world2.rank1"]


def test_two_ranks_give_the_numbers_of_one(records: dict[str, dict]) -> None:
    one, two = records["world1.rank0"]["validation"], records["world2.rank0"]["validation"]
    assert sorted(one) == sorted(two) == [str(s) for s in range(STEPS + 1)]
    for step in one:
        assert one[step]["images"] == two[step]["images"] == 5
        assert one[step]["knn_top1"] == two[step]["knn_top1"]
        assert one[step]["knn_top1_teacher"] == two[step]["knn_top1_teacher"]
        # Step 0: the same student, only the split and summation order differ (measured: <= 2e-16). Later
        # steps also carry the two engines' training steps, equal up to float reduction order (<= 7e-8).
        for key in ("cos_cls", "cos_patch", "loss", "loss_cls", "loss_patch"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-6, abs=1e-12), (step, key)


def test_best_is_the_best_logged_step_on_both(records: dict[str, dict]) -> None:
    for name in ("world1.rank0", "world2.rank0"):
        values = {int(s): v["cos_patch"] for s, v in records[name]["validation"].items()}
        assert records[name]["best"]["step"] == max(values, key=lambda s: (values[s], -s))


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
