"""Command line: ``python -m pruning prune --model NAME [--checkpoint FILE] --ratio R --out DIR``
(``--calibration SOURCE`` adds closed-form compensation; docs/pruning_stream.md)."""

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
    prune = parser.add_subparsers(dest="command", required=True).add_parser(
        "prune", help="prune a checkpoint one block at a time into a loadable export")
    add = prune.add_argument
    add("--model", required=True, help="open_clip config or timm model name (prefix open_clip: / timm:)")
    add("--checkpoint", type=Path,
        help=".safetensors or .pt/.bin state dict (full CLIP or visual tower); default: seeded init weights")
    widths = prune.add_mutually_exclusive_group(required=True).add_argument
    widths("--ratio", type=float, help="kept hidden = int(ratio * block width), the paper's r")
    widths("--num-keep", type=int, help="kept hidden units, the same for every block")
    widths("--num-keep-json", type=Path,
           help="JSON file: {site path: kept} (paths as in pruning_report.json) or a list, one per block")
    widths("--budget", type=float, help="per-block widths at the parameters of --ratio R that minimise the "
                                        "held-out compensated error (needs --calibration; docs/adaptive.md)")
    add("--grid", type=int, default=Budget.grid, help="with --budget: every width a multiple of this")
    add("--min-width", type=int, help="with --budget: narrowest block (default: --grid)")
    add("--max-width", type=int, help="with --budget: widest block (default: all units)")
    add("--method", default="diversity", choices=("diversity", "l2", "random", "activation"),
        help="activation: DGMR on calibration activations (needs --calibration; docs/compensation.md)")
    add("--out", type=Path, required=True, help="output directory (created; must not exist)")
    add("--overwrite", action="store_true", help="replace an existing --out")
    add("--seed", type=int, default=0, help="seeds init weights (no --checkpoint) and --method random")
    add("--model-kwargs", type=json.loads,
        help="""timm model constructor arguments as JSON, e.g. '{"img_size": 224}'""")
    add("--model-config", type=Path, action="append", default=[],
        help="extra open_clip model config JSON to register first (name = file stem)")
    add("--quiet", action="store_true", help="no per-block progress lines")
    calib = prune.add_argument_group("closed-form compensation: each pruned block refitted to reproduce the "
                                     "original block's output (docs/compensation.md)").add_argument
    calib("--calibration", help="calibration images, turns compensation on: a folder (searched recursively), "
                                "webdataset tar shards (a.tar, dir/{00000..00009}.tar, a.tar::b.tar) or a "
                                ".pt/.safetensors tensor of normalised images [N, 3, S, S]")
    calib("--num-calib", type=int, default=Calibration.num_images, help="images to use (default %(default)s)")
    calib("--balance-prefix", action="store_true",
          help="class/register tokens weigh as much as their image's patch tokens (CLS cosine 0.870 -> 0.900 "
               "on DINOv2, bench/compensation.py)")
    calib("--ridge", type=float, default=Calibration.ridge,
          help="ridge penalty relative to the mean variance of the fit's inputs (default %(default)s)")
    calib("--calib-batch-size", type=int, default=Calibration.batch_size, help="images per forward")
    calib("--calib-holdout", type=float, default=Calibration.holdout_fraction,
          help="fraction of tokens held out of the fit for the report's errors (default %(default)s)")
    calib("--refine-steps", type=int, default=Calibration.refine_steps,
          help="then train each pruned MLP this many Adam steps on its block's tokens (default %(default)s: off; "
               "300 on the demo's DINOv2: held-out cosine 0.872 -> 0.914)")
    calib("--refine-lr", type=float, default=Calibration.refine_lr, help="its peak lr (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and return 2."""
    args = _parser().parse_args(argv)
    from .stream import prune_checkpoint

    try:
        for path in args.model_config:
            import open_clip

            if not path.is_file():
                raise FileNotFoundError(f"--model-config file not found: {path}")
            open_clip.add_model_config(path)
        num_keep = args.num_keep
        if args.num_keep_json:
            if not args.num_keep_json.is_file():
                raise FileNotFoundError(f"--num-keep-json file not found: {args.num_keep_json}")
            num_keep = json.loads(args.num_keep_json.read_text(encoding="utf-8"))
            if not isinstance(num_keep, (dict, list)):
                raise ValueError(f"{args.num_keep_json}: expected a JSON object {{site path: kept}} or a "
                                 f"list, got {type(num_keep).__name__}")
        calibration = None if args.calibration is None else Calibration(
            ridge=args.ridge, holdout_fraction=args.calib_holdout, balance_prefix=args.balance_prefix,
            num_images=args.num_calib, batch_size=args.calib_batch_size, refine_steps=args.refine_steps,
            refine_lr=args.refine_lr)
        if args.budget is not None and calibration is None:
            raise ValueError("--budget measures each block's error on calibration images: give --calibration")
        if args.method == "activation" and calibration is None:
            raise ValueError("--method activation ranks units on calibration activations: give --calibration")
        budget = None if args.budget is None else Budget(ratio=args.budget, grid=args.grid,
                                                         min_width=args.min_width, max_width=args.max_width)
        if args.model_kwargs is not None and not isinstance(args.model_kwargs, dict):
            raise ValueError(f"--model-kwargs: expected a JSON object, got {args.model_kwargs!r}")
        start = time.perf_counter()
        report = prune_checkpoint(
            args.model, args.out, checkpoint=args.checkpoint, ratio=args.ratio, num_keep=num_keep,
            method=args.method, overwrite=args.overwrite, seed=args.seed,
            progress=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
            calibration=calibration, images=args.calibration, budget=budget, model_kwargs=args.model_kwargs)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    before, after, sites = report.model_params_before, report.model_params_after, report.sites
    print(f"pruned {len(sites)} MLP blocks in {time.perf_counter() - start:.1f} s: tower parameters "
          f"{before:,} -> {after:,} ({100 * (1 - after / before):.1f}% fewer); wrote {args.out}")
    calib = report.calibration
    if calibration is not None:
        mean = ("" if sites[0].recon_error_before is None else
                f"; mean held-out error {sum(s.recon_error_before for s in sites) / len(sites):.4f} plain -> "
                f"{sum(s.recon_error_after for s in sites) / len(sites):.4f} compensated")
        print(f"compensated (ridge {calib['ridge']}) on {calib['num_images']} images; carried hidden "
              f"states {calib['hidden_state_bytes']:,} bytes{mean}")
    if budget is not None:
        plan = calib["budget"]
        print(f"budget r={budget.ratio:g}: {plan['units']:,} of {plan['uniform_units']:,} units, widths "
              f"{plan['widths']}; predicted error {sum(plan['predicted_error']):.4g} (uniform widths "
              f"{sum(e for e in plan['uniform_error'] if e is not None):.4g}); "
              f"curves {plan['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
