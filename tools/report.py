"""The demo's report: a markdown file and simple PNG charts drawn with PIL (matplotlib is not a dependency)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 60
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


@dataclass(frozen=True)
class ModelRow:
    """One evaluated model in the report's table."""

    name: str
    params: int
    mlp_widths: tuple[int, ...]
    knn_top1: float
    """kNN (k=20) top-1 accuracy on the Fashion-MNIST subset, 0-1."""
    linear_top1: float
    """Linear-probe top-1 accuracy on the same Fashion-MNIST features (probe fitted on the train subset, its L2
    strength chosen there by 5-fold validation), 0-1."""
    cls_cosine: float
    """Mean cosine of the CLS token to the teacher's on the held-out shard."""
    patch_cosine: float
    """Mean cosine of the patch tokens to the teacher's on the held-out shard."""
    knn_quick: float | None = None
    """kNN top-1 on the quick probe (a prefix of the probe's train and test samples), 0-1; None: not measured."""
    linear_quick: float | None = None
    """Linear-probe top-1 on the quick probe, 0-1."""
    linear_weight_decay: float | None = None
    """The probe's L2 strength, chosen on the train features (``trainer.eval.choose_weight_decay``)."""


def _canvas(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw, ImageFont.ImageFont]:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((LEFT, 12), title, fill="black", font=font)
    return image, draw, font


def _axes(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, lo: float, hi: float, label: str) -> None:
    x0, y0, x1, y1 = LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    for i in range(6):
        value = lo + (hi - lo) * i / 5
        y = y1 - (y1 - y0) * i / 5
        draw.line([(x0 - 4, y), (x0, y)], fill="black")
        draw.line([(x0 + 1, y), (x1, y)], fill=(225, 225, 225))
        draw.text((4, y - 6), f"{value:.3g}", fill="black", font=font)
    draw.text((4, TOP - 28), label, fill="black", font=font)


def _y(value: float, lo: float, hi: float) -> float:
    return HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * (value - lo) / ((hi - lo) or 1.0)


def line_chart(path: Path, title: str, series: dict[str, tuple[Sequence[float], Sequence[float]]],
               y_label: str, x_label: str, log_y: bool = False) -> Path:
    """One line per series (x values, y values); log_y plots log10 of positive values."""
    image, draw, font = _canvas(title)
    tf = (lambda v: math.log10(max(v, 1e-12))) if log_y else (lambda v: v)
    xs = [x for xv, _ in series.values() for x in xv]
    ys = [tf(y) for _, yv in series.values() for y in yv]
    if not xs:
        raise ValueError(f"{path}: no points to plot")
    x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
    pad = 0.05 * ((y_hi - y_lo) or 1.0)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    _axes(draw, font, y_lo, y_hi, f"log10 {y_label}" if log_y else y_label)
    span = (x_hi - x_lo) or 1.0
    for i, (name, (xv, yv)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = [(LEFT + (WIDTH - LEFT - RIGHT) * (x - x_lo) / span, _y(tf(y), y_lo, y_hi)) for x, y in zip(xv, yv, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([(px - 2, py - 2), (px + 2, py + 2)], fill=colour)
        draw.text((WIDTH - RIGHT - 150, TOP + 14 * i), name, fill=colour, font=font)
    draw.text((LEFT, HEIGHT - BOTTOM + 8), f"{x_lo:g}", fill="black", font=font)
    draw.text((WIDTH - RIGHT - 40, HEIGHT - BOTTOM + 8), f"{x_hi:g}", fill="black", font=font)
    draw.text(((WIDTH - len(x_label) * 6) // 2, HEIGHT - 30), x_label, fill="black", font=font)
    image.save(path)
    return path


def bar_chart(path: Path, title: str, groups: Sequence[str], series: dict[str, Sequence[float]],
              y_label: str, y_range: tuple[float, float] | None = None) -> Path:
    """Grouped bars: one group per label in ``groups``, one bar per series, values printed on top."""
    image, draw, font = _canvas(title)
    values = [v for vs in series.values() for v in vs]
    lo, hi = y_range if y_range is not None else (0.0, max(values) * 1.1 or 1.0)
    _axes(draw, font, lo, hi, y_label)
    group_w = (WIDTH - LEFT - RIGHT) / max(len(groups), 1)
    bar_w = 0.8 * group_w / max(len(series), 1)
    for s, (name, vs) in enumerate(series.items()):
        colour = COLOURS[s % len(COLOURS)]
        for g, value in enumerate(vs):
            x0 = LEFT + g * group_w + 0.1 * group_w + s * bar_w
            top = _y(min(max(value, lo), hi), lo, hi)
            draw.rectangle([(x0, top), (x0 + bar_w - 2, HEIGHT - BOTTOM)], fill=colour)
            if len(groups) * len(series) <= 12:
                draw.text((x0, top - 12), f"{value:.3g}", fill="black", font=font)
        if len(series) > 1:
            draw.text((WIDTH - RIGHT - 150, TOP + 14 * s), name, fill=colour, font=font)
    for g, label in enumerate(groups):
        draw.text((LEFT + g * group_w + 0.1 * group_w, HEIGHT - BOTTOM + 8), label[:14], fill="black", font=font)
    image.save(path)
    return path


def markdown_table(rows: Sequence[ModelRow]) -> str:
    """The teacher / pruned / ... table."""
    quick = any(r.knn_quick is not None for r in rows)
    lines = ["| model | params | MLP hidden per block | kNN top-1 (%) | linear probe top-1 (%) | CLS cosine "
             "| patch cosine |" + (" kNN quick (%) | linear quick (%) |" if quick else ""),
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if quick else "")]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    for r in rows:
        widths = sorted(set(r.mlp_widths))
        width = str(widths[0]) if len(widths) == 1 else f"{min(widths)}-{max(widths)}"
        lines.append(f"| {r.name} | {r.params / 1e6:.2f} M | {width} x {len(r.mlp_widths)} | "
                     f"{100 * r.knn_top1:.1f} | {100 * r.linear_top1:.1f} | {r.cls_cosine:.4f} | {r.patch_cosine:.4f} |"
                     + (f" {pct(r.knn_quick)} | {pct(r.linear_quick)} |" if quick else ""))
    return "\n".join(lines)
