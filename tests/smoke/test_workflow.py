"""The workflow as a user runs it, with the real CLIs, on a tiny random open_clip CLIP:
make shards -> prune with compensation -> distill on 2 ranks from the prune output -> Ctrl-C -> resume ->
export a whole CLIP -> load it in stock open_clip in a fresh process -> zero-shot and kNN eval with teacher columns.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import trainer.models.open_clip_family  # noqa: F401  registers ViT-Tiny-8 (configs/open_clip)

pytestmark = pytest.mark.smoke

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "experiments" / "tiny_open_clip_fsdp.yaml"
MODEL_CONFIG = REPO / "configs" / "open_clip" / "ViT-Tiny-8.json"
STEPS = 200  # the first launch is stopped long before; the resumed one is told to end sooner
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def distill(run_dir: Path, shards: Path, pretrained: Path, pruned: Path, port: int, steps: int,
            logs: Path) -> list[subprocess.Popen]:
    """``python -m trainer`` on 2 ranks in one process group, as torchrun starts them."""
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "trainer", str(CONFIG), f"run.dir={run_dir}", f"run.steps={steps}",
           "run.log_every_steps=1", f"model.pretrained={pretrained}", f"prune.student_init={pruned}",
           "data.kind=webdataset", f"data.shards={shards}", "data.num_workers=1", "data.shuffle_buffer=8",
           "prune.ratio=0.5", "optim.base_lr=1e-3", "optim.warmup_steps=2"]
    procs: list[subprocess.Popen] = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        with open(logs / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                          process_group=procs[0].pid if procs else 0))
    return procs


def finish(procs: list[subprocess.Popen], logs: Path) -> tuple[list[int], str]:
    try:
        codes = [p.wait(timeout=300) for p in procs]
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        pytest.fail((logs / "rank0.err").read_text()[-4000:])
    return codes, (logs / "rank0.err").read_text()


def test_prune_distill_stop_resume_export_evaluate(tmp_path: Path) -> None:
    gen = np.random.default_rng(0)
    # 1. Pictures -> webdataset shards.
    for i in range(48):
        folder = tmp_path / "images" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gen.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    made = run("-m", "trainer.data.make_shards", str(tmp_path / "images"), str(tmp_path / "shards"),
               "--shard-size", "8")
    assert "48 images -> 6 shard(s)" in made.stdout + made.stderr
    shards = tmp_path / "shards" / "shards.txt"
    tars = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))

    # 2. The user's teacher: a whole CLIP checkpoint; pruned with compensation, streamed block by block.
    torch.manual_seed(7)
    clip = open_clip.create_model("ViT-Tiny-8", pretrained=None)
    teacher = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, teacher)
    pruned = tmp_path / "pruned"
    pruning = run("-m", "pruning", "prune", "--model", "ViT-Tiny-8", "--model-config", str(MODEL_CONFIG),
                  "--checkpoint", str(teacher), "--ratio", "0.5", "--out", str(pruned), "--calibration",
                  "::".join(tars[:2]), "--num-calib", "16", "--calib-batch-size", "4", "--quiet")
    assert "compensated (ridge 0.001) on 16 images" in pruning.stdout
    assert "No pretrained weights loaded" not in pruning.stderr  # weights came from --checkpoint

    # 3. Distill on 2 ranks from the prune output directory; Ctrl-C once training runs; the same command resumes.
    run_dir, port = tmp_path / "run", 29900 + os.getpid() % 90
    procs = distill(run_dir, shards, teacher, pruned, port, STEPS, tmp_path / "stop")
    deadline = time.monotonic() + 240
    while not re.search(r"^step 3/", (tmp_path / "stop" / "rank0.err").read_text(), re.M):
        assert all(p.poll() is None for p in procs), (tmp_path / "stop" / "rank0.err").read_text()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(procs[0].pid, signal.SIGINT)
    codes, err = finish(procs, tmp_path / "stop")
    assert codes == [130, 130], err[-3000:]
    stopped = int(re.search(r"stopped at step (\d+); resume with the same command", err).group(1))
    assert "Traceback" not in err and "No pretrained weights loaded" not in err
    steps = stopped + 3
    procs = distill(run_dir, shards, teacher, pruned, port + 1, steps, tmp_path / "resume")
    codes, err = finish(procs, tmp_path / "resume")
    assert codes == [0, 0], err[-3000:]
    assert f"at step {stopped}" in err and re.search(rf"^step {steps}/{steps} ", err, re.M)

    # 4. Export a whole CLIP and load it with stock open_clip in a fresh process.
    exported = tmp_path / "export"
    done = run("-m", "trainer", "export", str(run_dir), "--out", str(exported))
    assert f"exported step {steps} " in done.stdout
    probe = ("import sys, open_clip, torch; m, _, pre = open_clip.create_model_and_transforms(sys.argv[1]); "
             "t = open_clip.get_tokenizer(sys.argv[1])(['a shirt']); "
             "print(tuple(m.encode_image(torch.zeros(1, 3, 32, 32)).shape), tuple(m.encode_text(t).shape))")
    assert run("-c", probe, f"local-dir:{exported}").stdout.strip() == "(1, 32) (1, 32)"

    # 5. Zero-shot and kNN, teacher columns from the run's own teacher file.
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = gen.integers(0, 10, n)
        write_idx(fashion / f"{prefix}-labels-idx1-ubyte", labels)
        write_idx(fashion / f"{prefix}-images-idx3-ubyte", gen.integers(0, 255, (n, 28, 28)))
    results = tmp_path / "eval.json"
    table = run("-m", "trainer.eval", str(exported), "--teacher", "pretrained", "--knn", "--zero-shot", "--k", "3",
                "--fashion-mnist", str(fashion), "--train-images", "0", "--test-images", "0", "--json", str(results))
    assert "| metric | student | teacher | difference |" in table.stdout and "zero-shot top-1" in table.stdout
    got = json.loads(results.read_text())
    for entry in (got, got["teacher_baseline"]):
        assert 0.0 <= entry["knn_top1"] <= 1.0 and 0.0 <= entry["zero_shot_top1"] <= 1.0
    assert got["teacher_baseline"]["params"] > got["params"]
