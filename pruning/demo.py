"""`make demo`: prune every MLP of an open_clip ViT with DGMR and print what was kept.

Builds the named open_clip model with its own initial weights (nothing is downloaded), prunes
its visual tower in memory and prints per-block widths and parameter counts.

    python -m pruning.demo [--model ViT-B-32] [--ratio 1.0] [--method diversity]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from .select import METHODS
from .surgery import PruneReport, prune_model


def format_report(report: PruneReport, seconds: float) -> str:
    """A per-block table and the totals, for a terminal."""
    lines = [f"{'block':<36} {'hidden':>13} {'params':>23}"]
    for site in report.sites:
        lines.append(f"{site.path:<36} {site.hidden_before:>6} -> {site.hidden_after:<5}"
                     f" {site.params_before:>10,} -> {site.params_after:<10,}")
    before, after = report.model_params_before, report.model_params_after
    lines.append(f"visual tower: {before:,} -> {after:,} parameters "
                 f"({100 * (before - after) / before:.1f}% fewer), method {report.method}, "
                 f"selection + surgery {seconds:.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prune an open_clip ViT's MLPs and print the widths.")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (built, not downloaded)")
    parser.add_argument("--ratio", type=float, default=1.0, help="kept hidden units = int(ratio * width)")
    parser.add_argument("--method", default="diversity", choices=METHODS[:3])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip  # imported late: it is slow to import and only the demo needs it here

    torch.manual_seed(args.seed)
    model = open_clip.create_model(args.model, pretrained=None)
    start = time.perf_counter()
    report = prune_model(model.visual, ratio=args.ratio, method=args.method,
                         generator=torch.Generator().manual_seed(args.seed))
    print(format_report(report, time.perf_counter() - start))


if __name__ == "__main__":
    main()
