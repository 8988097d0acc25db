"""Overhead of our training loop against a bare hand-written PyTorch loop doing the same math.

Same tiny timm ViT teacher and pruned student, same synthetic batches, one process on CPU,
engine ``single``, fp32. The bare loop: teacher forward under no_grad, student forward, the two
MSE terms, backward, grad clipping, AdamW with the scheduled lr / weight decay, zero_grad.
Ours: ``trainer.loop.train`` (schedules, engine protocol, loss dict, TensorBoard every
``LOG_EVERY`` steps). Both loops pull batches from the same timestamping stream, so a step is
the time between two batch requests, set-up excluded. Time per step = the best window of
``LOG_EVERY`` consecutive steps (each window holds exactly one logging step), over 3 runs of
each loop, interleaved: the machine is shared, and the best window is the least disturbed.

    .venv/bin/python bench/overhead.py   ->  prints the ratio, writes bench/results/overhead.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# bench/select.py would shadow the stdlib module `select` (torch imports it): drop this folder from the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.cli import load_config  # noqa: E402
from trainer.data import Batch, SyntheticStream  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.models.registry import get_adapter  # noqa: E402
from trainer.schedule import lr_at, peak_lr, weight_decay_at  # noqa: E402
from trainer.student import build_models  # noqa: E402
from trainer.task import freeze_teacher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOG_EVERY = 20
WINDOWS = 3
STEPS = LOG_EVERY * WINDOWS + 1  # the last step only closes the last window
BATCH = 32
REPEATS = 3


class TimedStream(SyntheticStream):
    """SyntheticStream that notes when each batch is requested."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.times: list[float] = []

    def __iter__(self) -> Iterator[Batch]:
        for batch in super().__iter__():
            self.times.append(time.perf_counter())
            yield batch


def best_window_step_s(times: list[float]) -> float:
    """Per-step time of the fastest window of LOG_EVERY steps starting at a multiple of LOG_EVERY."""
    return min((times[k + LOG_EVERY] - times[k]) / LOG_EVERY for k in range(0, len(times) - LOG_EVERY, LOG_EVERY))


def config(run_dir: str):
    return load_config(REPO / "configs" / "experiments" / "tiny_timm.yaml", [
        f"run.dir={run_dir}", f"run.steps={STEPS}", f"run.log_every_steps={LOG_EVERY}", "engine.name=single",
        "engine.precision=fp32", f"optim.batch_size_per_rank={BATCH}",
    ])


def ours() -> float:
    """Best-window step time of trainer.loop.train."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = config(run_dir)
        adapter = get_adapter(cfg.model.family)
        stream = TimedStream(adapter.input_spec(build_models(cfg, adapter)[0]), BATCH)
        train(cfg, stream=stream)
        return best_window_step_s(stream.times)


def bare() -> float:
    """Best-window step time of the hand-written loop."""
    cfg = config("unused")
    adapter = get_adapter(cfg.model.family)
    teacher, student, _ = build_models(cfg, adapter)
    freeze_teacher(teacher)
    adapter.strip_head(teacher), adapter.strip_head(student)
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.0, betas=(0.9, 0.95))
    stream = TimedStream(adapter.input_spec(teacher), BATCH)
    o = cfg.optim
    peak = peak_lr(o.base_lr, BATCH)
    for step, batch in zip(range(STEPS), stream, strict=False):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak=peak, warmup_steps=cfg.warmup_steps(), total_steps=STEPS)
        opt.param_groups[0]["weight_decay"] = weight_decay_at(step, start=o.weight_decay_start,
                                                              end=o.weight_decay_end, total_steps=STEPS)
        with torch.no_grad():
            target = teacher(batch.images)
        tokens = student(batch.images)
        loss = F.mse_loss(tokens[:, 0], target[:, 0]) + F.mse_loss(tokens[:, 1:], target[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    next(iter(stream))  # closes the last step's window, as the training loop's extra fetch does
    return best_window_step_s(stream.times)


def main() -> None:
    torch.set_num_threads(1)  # two shared cores: one thread per loop is the steadiest measure
    bare_times, ours_times = [], []
    for _ in range(REPEATS):
        bare_times.append(bare())
        ours_times.append(ours())
    bare_step, ours_step = min(bare_times), min(ours_times)
    result = {
        "model": "timm vit_tiny depth 2 width 64, 32 px, student prune ratio 1.0, fp32, engine single",
        "batch": BATCH, "log_every_steps": LOG_EVERY, "steps_per_run": STEPS, "repeats": REPEATS,
        "torch_threads": torch.get_num_threads(),
        "bare_step_s": bare_step, "ours_step_s": ours_step,
        "bare_images_per_s": BATCH / bare_step, "ours_images_per_s": BATCH / ours_step,
        "ratio_ours_over_bare": ours_step / bare_step, "target_ratio": 1.10,
        "bare_step_s_per_run": bare_times, "ours_step_s_per_run": ours_times,
    }
    out = REPO / "bench" / "results" / "overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"bare {BATCH / bare_step:.1f} img/s, ours {BATCH / ours_step:.1f} img/s, "
          f"time per step ours/bare = {ours_step / bare_step:.3f} (target <= 1.10) -> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
