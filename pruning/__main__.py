"""Command line: ``python -m pruning prune --model NAME [--checkpoint FILE] --ratio R --out DIR``.

``--calibration SOURCE --num-calib N`` adds closed-form compensation, streamed block by block
(image folder, tar shards ``dir/{00000..00009}.tar``, or a tensor file of normalised images).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .blockwise import Calibration
from .budget import Budget


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pruning", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser("prune", help="prune a checkpoint one block at a time into a loadable export")
    prune.add_argument("--model", required=True,
                       help="open_clip model config or timm model name; prefix open_clip: or timm: to choose")
    prune.add_argument("--checkpoint", type=Path, default=None,
                       help=".safetensors or .pt/.bin state dict (full CLIP or visual tower); "
                            "default: the model's own seeded init weights")
    widths = prune.add_mutually_exclusive_group(required=True)
    widths.add_argument("--ratio", type=float, help="kept hidden = int(ratio * block width), the paper's r")
    widths.add_argument("--num-keep", type=int, help="kept hidden units, the same for every block")
    widths.add_argument("--num-keep-json", type=Path,
                        help="JSON file: {site path: kept} (paths as in pruning_report.json) or a list, one per block")
    widths.add_argument("--budget", type=float,
                        help="per-block widths with the parameters of --ratio R, chosen to minimise the compensated "
                             "error measured on held-out calibration tokens (needs --calibration; docs/adaptive.md)")
    prune.add_argument("--grid", type=int, default=Budget.grid, help="with --budget: every width a multiple of this")
    prune.add_argument("--min-width", type=int, default=None, help="with --budget: narrowest block (default: --grid)")
    prune.add_argument("--max-width", type=int, default=None, help="with --budget: widest block (default: all units)")
    prune.add_argument("--method", default="diversity", choices=("diversity", "l2", "random"))
    prune.add_argument("--out", type=Path, required=True, help="output directory (created; must not exist)")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    prune.add_argument("--seed", type=int, default=0, help="seeds init weights (no --checkpoint) and --method random")
    prune.add_argument("--model-kwargs", type=json.loads, default=None,
                       help='timm model constructor arguments as JSON, e.g. \'{"img_size": 224}\'')
    prune.add_argument("--model-config", type=Path, action="append", default=[],
                       help="extra open_clip model config JSON to register first (name = file stem)")
    prune.add_argument("--quiet", action="store_true", help="no per-block progress lines")
    calib = prune.add_argument_group("closed-form compensation: each pruned block refitted to reproduce the original block's output (docs/compensation.md)")
    calib.add_argument("--calibration", default=None,
                       help="calibration images: a folder (searched recursively), webdataset tar shards "
                            "(a.tar, dir/{00000..00009}.tar, a.tar::b.tar) or a .pt/.safetensors tensor of "
                            "normalised images [N, 3, S, S]; turns compensation on")
    calib.add_argument("--num-calib", type=int, default=Calibration.num_images,
                       help=f"calibration images to use (default {Calibration.num_images})")
    calib.add_argument("--balance-prefix", action="store_true",
                       help="class/register tokens weigh as much as the patch tokens "
                            "of their image (CLS cosine 0.870 -> 0.900 on DINOv2, bench/compensation.py)")
    calib.add_argument("--ridge", type=float, default=Calibration.ridge,
                       help=f"ridge penalty relative to the mean variance of the fit's inputs (default {Calibration.ridge})")
    calib.add_argument("--calib-batch-size", type=int, default=Calibration.batch_size,
                       help="images per calibration forward")
    calib.add_argument("--calib-holdout", type=float, default=Calibration.holdout_fraction,
                       help="fraction of tokens held out of the fit for the report's errors "
                            f"(default {Calibration.holdout_fraction})")
    return parser


def _num_keep_from_json(path: Path) -> dict[str, int] | list[int]:
    if not path.is_file():
        raise FileNotFoundError(f"--num-keep-json file not found: {path}")
    widths = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(widths, (dict, list)):
        raise ValueError(f"{path}: expected a JSON object {{site path: kept}} or a list, got {type(widths).__name__}")
    return widths


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and return 2."""
    args = _parser().parse_args(argv)
    from .stream import prune_checkpoint

    try:
        if args.model_config:
            import open_clip

            for path in args.model_config:
                if not path.is_file():
                    raise FileNotFoundError(f"--model-config file not found: {path}")
                open_clip.add_model_config(path)
        num_keep = _num_keep_from_json(args.num_keep_json) if args.num_keep_json else args.num_keep
        calibration = None
        if args.calibration is not None:
            calibration = Calibration(ridge=args.ridge, holdout_fraction=args.calib_holdout,
                                      balance_prefix=args.balance_prefix, num_images=args.num_calib,
                                      batch_size=args.calib_batch_size)
        budget = None
        if args.budget is not None:
            if calibration is None:
                raise ValueError("--budget measures each block's error on calibration images: give --calibration")
            budget = Budget(ratio=args.budget, grid=args.grid, min_width=args.min_width, max_width=args.max_width)
        if args.model_kwargs is not None and not isinstance(args.model_kwargs, dict):
            raise ValueError(f"--model-kwargs: expected a JSON object, got {args.model_kwargs!r}")
        start = time.perf_counter()
        report = prune_checkpoint(
            args.model, args.out, checkpoint=args.checkpoint, ratio=args.ratio, num_keep=num_keep,
            method=args.method, overwrite=args.overwrite, seed=args.seed,
            progress=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
            calibration=calibration, images=args.calibration, budget=budget, model_kwargs=args.model_kwargs,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    before, after = report.model_params_before, report.model_params_after
    print(f"pruned {len(report.sites)} MLP blocks in {time.perf_counter() - start:.1f} s: tower parameters "
          f"{before:,} -> {after:,} ({100 * (1 - after / before):.1f}% fewer); wrote {args.out}")
    if args.calibration is not None:
        calib = report.calibration
        errors = [(s.recon_error_before, s.recon_error_after) for s in report.sites]
        mean = [sum(e[i] for e in errors) / len(errors) for i in (0, 1)] if errors[0][0] is not None else None
        print(f"compensated (ridge {calib['ridge']}) on {calib['num_images']} images; carried hidden "
              f"states {calib['hidden_state_bytes']:,} bytes"
              + (f"; mean held-out error {mean[0]:.4f} plain -> {mean[1]:.4f} compensated" if mean else ""))
        if budget is not None:
            plan = calib["budget"]
            print(f"budget r={budget.ratio:g}: {plan['units']:,} of {plan['uniform_units']:,} units, widths "
                  f"{plan['widths']}; predicted error {sum(plan['predicted_error']):.4g} (uniform widths "
                  f"{sum(e for e in plan['uniform_error'] if e is not None):.4g}); curves {plan['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
