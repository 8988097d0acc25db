"""Cost of adaptive widths at EVA-CLIP-E shapes: one block's error curve against its uniform output-mode refit.

One EVA02-E-14-plus MLP (width 1792, 15360 hidden units, GELU) on ``--tokens`` calibration tokens (64 pictures at
112 px = 4160): the diversity order, the curve statistics over the candidate units (up to twice the uniform width)
and ``pruning.budget.width_errors`` at every grid width, against the statistics and solve of the uniform refit
(``fit_output_from_stats`` at the uniform width). Wall time and the statistics' bytes; the curve pass also runs
each block once more (the block forward is not timed here: the same for both).

    .venv/bin/python -m bench.budget_scale   # -> bench/results/budget_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from pruning import Budget, select_mlp_channels
from pruning.budget import width_errors
from pruning.fit import ActivationStats, fit_output_from_stats
from pruning.surgery import num_keep_for_ratio

RESULTS = Path(__file__).resolve().parent / "results" / "budget_scale.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.budget_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1792)
    parser.add_argument("--hidden", type=int, default=15360)
    parser.add_argument("--tokens", type=int, default=4160)
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    g = torch.Generator().manual_seed(0)
    fc1 = torch.randn(args.hidden, args.width, generator=g) / args.width ** 0.5
    fc2 = torch.randn(args.width, args.hidden, generator=g) / args.hidden ** 0.5
    x = torch.randn(args.tokens, args.width, generator=g)
    a = torch.nn.functional.gelu(x @ fc1.T)
    y = a @ fc2.T
    held = torch.arange(args.tokens) % 5 == 4
    uniform = num_keep_for_ratio(args.width, args.ratio, args.hidden)
    widths = Budget(args.ratio).candidates(args.hidden, uniform)
    timings = {}

    start = time.perf_counter()
    order = select_mlp_channels(fc1, widths[-1])
    timings["select_max_width_s"] = time.perf_counter() - start

    start = time.perf_counter()
    fit, hold = (ActivationStats(widths[-1] + args.width, product_dtype=torch.float32) for _ in range(2))
    joint = torch.cat([a[:, order], y], 1)
    for chunk in range(0, args.tokens, 256):  # calibration batches
        rows = slice(chunk, chunk + 256)
        fit.update(joint[rows][~held[rows]])
        hold.update(joint[rows][held[rows]])
    timings["curve_stats_s"] = time.perf_counter() - start
    start = time.perf_counter()
    errors = width_errors(fit, hold, torch.arange(widths[-1]), fc2[:, order], None, 1e-3, widths)
    timings["curve_solve_s"] = time.perf_counter() - start

    start = time.perf_counter()
    keep = order[:uniform]
    ufit = ActivationStats(uniform + args.width)
    ujoint = torch.cat([a[:, keep], y], 1)
    for chunk in range(0, args.tokens, 256):
        rows = slice(chunk, chunk + 256)
        ufit.update(ujoint[rows][~held[rows]])
    timings["uniform_stats_s"] = time.perf_counter() - start
    start = time.perf_counter()
    fit_output_from_stats(ufit, fc2[:, keep], None)
    timings["uniform_solve_s"] = time.perf_counter() - start

    curve = timings["curve_stats_s"] + timings["curve_solve_s"]
    uniform_s = timings["uniform_stats_s"] + timings["uniform_solve_s"]
    result = {"shape": {"width": args.width, "hidden": args.hidden, "tokens": args.tokens, "uniform": uniform,
                        "candidates": f"{widths[0]}..{widths[-1]} step {widths[1] - widths[0]}"},
              "seconds": {k: round(v, 2) for k, v in timings.items()},
              "curve_over_uniform_fit": round(curve / uniform_s, 2),
              "curve_stats_bytes": 2 * 8 * (widths[-1] + args.width) ** 2,
              "uniform_stats_bytes": 8 * (uniform + args.width) ** 2,
              "errors_monotone": all(b <= a + 1e-9 * abs(a) for a, b in zip(errors, errors[1:], strict=False)),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"per block: curve {curve:.1f} s vs uniform refit {uniform_s:.1f} s = x{curve / uniform_s:.2f}; "
          f"x64 blocks: {64 * curve / 60:.1f} min of curves")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
