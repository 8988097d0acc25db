"""TensorBoard scalars and a progress line, written by rank 0 only; other ranks are silent."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from pruning import PruneReport


def memory_bytes() -> int:
    """CUDA max allocated on GPU, else the process's resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    import resource

    return resident_pages * resource.getpagesize()


class Metrics:
    """Rank 0: SummaryWriter under ``run_dir/tensorboard`` and a progress line on stderr."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, resumed_at: int = 0) -> None:
        self.enabled = enabled
        self.resumed_at = resumed_at
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # Points an interrupted run logged after step ``resumed_at`` are purged: no duplicates in the curves.
            purge_step = resumed_at + 1 if resumed_at else None
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)

    def log_config(self, config: dict, hparams: dict[str, float | int | str | bool]) -> None:
        """The resolved config as text (YAML) and the flat scalar settings as hparams."""
        if self.writer is None or self.resumed_at:  # written once, by the run that started at step 0
            return
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        self.writer.add_hparams(hparams, {"hparam/final_loss": float("nan")}, run_name=".")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Scalars at ``step`` (the optimizer step count) plus a progress line with ETA."""
        if self.writer is None:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        elapsed = time.perf_counter() - self.start
        done = step - self.resumed_at  # steps this process ran: a resumed run's rate starts at its resume
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        print(f"step {step}/{self.total_steps} loss {scalars['loss/total']:.5g} "
              f"lr {scalars['opt/lr']:.3g} {scalars['perf/images_per_s']:.1f} img/s "
              f"eta {eta:.0f}s", file=sys.stderr, flush=True)

    def log_validation(self, step: int, values: dict[str, float], record: Any) -> None:
        """Held-out values as ``val/<name>`` scalars and a progress line with the step-0 and best values.

        ``record``: a trainer.validate.FidelityRecord (metric, start, best, best_step), already updated.
        """
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"val/{name}", value, step)
        start = "n/a" if record.start is None else f"{record.start:.5g}"
        print(f"val step {step}/{self.total_steps} cos_cls {values['cos_cls']:.5g} cos_patch {values['cos_patch']:.5g} "
              f"loss {values['loss']:.5g}" + (f" knn_top1 {values['knn_top1']:.4g}" if "knn_top1" in values else "")
              + f" | {record.metric} start {start} best {record.best:.5g} @ step {record.best_step}",
              file=sys.stderr, flush=True)

    def close(self, summary: dict | None) -> None:
        """Flush events; rank 0 also prints a one-line JSON summary (None: a stopped run, no summary)."""
        if self.writer is None:
            return
        self.writer.flush()
        self.writer.close()
        if summary is not None:
            print(json.dumps(summary), flush=True)


def flat_hparams(config: dict, prefix: str = "") -> dict[str, float | int | str | bool]:
    """Nested config -> {'optim.base_lr': 6e-5, ...} with only TensorBoard-hparam-able values."""
    out: dict[str, float | int | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif value is None:
            out[name] = "none"
        else:
            out[name] = str(value)
    return out


def width_chart(widths: list[int], before: list[int], *, height: int = 160) -> torch.Tensor:
    """A [3, H, W] uint8 bar chart of kept width per block (grey: width before, blue: kept)."""
    bar, gap = 12, 4
    image = torch.full((3, height, max(1, len(widths)) * (bar + gap) + gap), 255, dtype=torch.uint8)
    top = max(before + widths + [1])
    for i, (w, b) in enumerate(zip(widths, before, strict=True)):
        left = gap + i * (bar + gap)
        for value, colour in ((b, (200, 200, 200)), (w, (31, 119, 180))):
            rows = max(1, round(value / top * (height - 2)))
            image[:, height - rows:, left:left + bar] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
    return image


def log_prune_report(metrics: object, report: PruneReport) -> None:
    """TensorBoard (rank 0): the report as a markdown table and a bar chart of kept width per block."""
    writer = getattr(metrics, "writer", None)
    if writer is None:
        return
    lines = [f"method **{report.method}**, parameters {report.model_params_before:,} -> {report.model_params_after:,}",
             "", "| # | site | hidden before | hidden after | first kept |", "|---|---|---|---|---|"]
    for i, site in enumerate(report.sites):
        head = ", ".join(map(str, site.kept[:8])) + (", ..." if len(site.kept) > 8 else "")
        lines.append(f"| {i} | `{site.path}` | {site.hidden_before} | {site.hidden_after} | {head} |")
    writer.add_text("prune/report", "\n".join(lines), 0)
    if report.sites:
        chart = width_chart(report.widths, [s.hidden_before for s in report.sites])
        writer.add_image("prune/kept_width_per_block", chart, 0, dataformats="CHW")
