"""Does local refinement shrink every block's error by the same factor at every width (issue 22)?

Adaptive widths are planned from closed-form error curves. If refinement (``Calibration.refine_steps``) divides
each block's held-out error by about one factor, whatever the block and width, the plan made from the closed-form
curves is also the plan for refined students, and curves measured after refinement would not change it. This
prunes the demo's DINOv2 ViT-S/14 uniformly at several widths, compensated in closed form and then refined, on
the same calibration pictures as ``bench.adaptive``'s draw 0, and prints each block's held-out error
(``SiteReport.recon_error_after``) for both and their ratio, with the end CLS / patch cosine of each student.

    .venv/bin/python -m bench.refined_width_errors --out bench/results/refined_width_errors.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import pruning
from bench.adaptive import RESULTS, SEED
from bench.compensation import forward_features, load_images


def block_errors(teacher: torch.nn.Module, width: int, batches: list[torch.Tensor], refine_steps: int
                 ) -> tuple[torch.nn.Module, list[float], float]:
    """A uniform compensated copy at ``width``, its per-block held-out errors and the seconds it took."""
    model = copy.deepcopy(teacher).eval()
    source = pruning.ModelSource(model, forward_features)
    start = time.perf_counter()
    report = pruning.prune_blocks(source, [width] * len(source.sites),
                                  calibration=pruning.Calibration(balance_prefix=True, refine_steps=refine_steps),
                                  calib_inputs=batches)
    return model, [s.recon_error_after for s in report.sites], time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    from trainer.eval import extract_features, token_fidelity
    from trainer.models.dinov2_onnx import forward_tokens, load_dinov2_vits14

    parser = argparse.ArgumentParser(prog="python -m bench.refined_width_errors", description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256, 384, 576, 768])
    parser.add_argument("--refine-steps", type=int, default=300)
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--pool", type=int, default=384)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "refined_width_errors.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    pool, heldout = load_images(args.pool, args.heldout, 1_000_000)
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(SEED))[: args.calib]
    batches = list(pool[pick].split(16))
    teacher = load_dinov2_vits14().eval()

    def features(model: torch.nn.Module):
        return extract_features(model, heldout.split(16), forward_tokens,
                                keep_patches=True, show_progress=False)

    teacher_feats = features(teacher)
    rows = []
    for width in args.widths:
        row: dict = {"width": width}
        for kind, steps in (("closed_form", 0), ("refined", args.refine_steps)):
            model, errors, seconds = block_errors(teacher, width, batches, steps)
            fid = token_fidelity(features(model), teacher_feats)
            row[kind] = {"errors": errors, "cls_cosine": fid["cls_cosine"], "patch_cosine": fid["patch_cosine"],
                         "seconds": round(seconds, 1)}
        row["ratio"] = [r / c for r, c in zip(row["refined"]["errors"], row["closed_form"]["errors"], strict=True)]
        rows.append(row)
        print(f"width {width}: error ratio refined / closed form per block "
              f"{' '.join(f'{r:.2f}' for r in row['ratio'])}; CLS/patch cosine closed "
              f"{row['closed_form']['cls_cosine']:.4f}/{row['closed_form']['patch_cosine']:.4f}, refined "
              f"{row['refined']['cls_cosine']:.4f}/{row['refined']['patch_cosine']:.4f}", flush=True)
    ratios = [r for row in rows for r in row["ratio"]]
    summary = {"ratio_mean": statistics.mean(ratios), "ratio_sd": statistics.stdev(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"notes": {"calibration": f"{args.calib} clip-art pictures (bench.adaptive draw 0), "
                                              "output mode, class token balanced, ridge 1e-3",
                                              "refine_steps": args.refine_steps}, "summary": summary, "rows": rows},
                                   indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
