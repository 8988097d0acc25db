"""Whole-block local refinement after the demo's compensation (issue 21): does training attention as well as the
pruned MLP, block by block, lift the held-out fidelity of the r=1 start?

    .venv/bin/python -m tools.demo --out demo_out        # first: the shards and compensated_student.safetensors
    .venv/bin/python -m bench.block_refine --images 1024 --steps 300 --lr 3e-4 --scope block

From ``<out>/compensated_student.safetensors`` (closed form + 300 MLP refinement steps per block; ``--start``
picks another file of ``<out>``), each block in turn
is trained by Adam (cosine decay, ``--batch`` pictures per step) so that, fed the student's own hidden states, it
gives the teacher's block output on ``--images`` pictures of the demo's stream; then the states move on through
it. ``--scope block`` trains every parameter of the block, ``mlp`` only its MLP. Prints the CLS / patch cosine to
the teacher on the 64 held-out clip-art pictures before and after, their ratio, and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="the demo's output folder")
    parser.add_argument("--start", default="compensated_student.safetensors",
                        help="the student to refine, a file under --out (compensated_closed_form.safetensors: without "
                             "the MLP refinement)")
    parser.add_argument("--images", type=int, default=256, help="calibration pictures (half clip art)")
    parser.add_argument("--steps", type=int, default=100, help="Adam steps per block")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak lr (cosine decay to 0)")
    parser.add_argument("--batch", type=int, default=8, help="pictures per step")
    parser.add_argument("--scope", choices=("block", "mlp"), default="block")
    parser.add_argument("--results", type=Path, default=Path("bench/results/block_refine.json"),
                        help="JSON file of rows; this run's row replaces one of the same settings")
    return parser.parse_args(argv)


def train_block(block: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, args: argparse.Namespace,
                generator: torch.Generator) -> tuple[float, float]:
    """Fit ``block(inputs)`` to ``targets`` (relative MSE); returns the error on all pictures before and after."""
    params = list(block.parameters() if args.scope == "block" else block.mlp.parameters())
    block.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    scale = float(targets.var(dim=(0, 1)).mean())

    def error() -> float:
        with torch.no_grad():
            total = sum(float((block(x) - y).square().mean()) * len(x)
                        for x, y in zip(inputs.split(32), targets.split(32), strict=True))
        return total / len(inputs) / scale

    before = error()
    optimizer = torch.optim.Adam(params, lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    for _ in range(args.steps):
        idx = torch.randint(0, len(inputs), (args.batch,), generator=generator)
        loss = (block(inputs[idx]) - targets[idx]).square().mean() / scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    block.requires_grad_(False)
    return before, error()


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file

    from pruning import stem_states
    from tools import demo
    from trainer.eval import token_fidelity
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    args = parse_args(argv)
    start_file = args.out / args.start
    lists = [args.out / "shards" / name / "shards.txt" for name in ("train", "fashion")]
    heldout = args.out / "shards" / "heldout" / "00000.tar"
    if not all(p.is_file() for p in (start_file, heldout, *lists)):
        print(f"error: no demo output under {args.out}: run python -m tools.demo --out {args.out} first",
              file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    torch.manual_seed(0)
    teacher = load_dinov2_vits14().eval()
    student = demo.pruned_copy(teacher, demo.RATIO, demo.METHOD)
    student.load_state_dict(load_file(str(start_file)))
    student.eval()
    held = demo.read_shard_images(heldout, demo.FULL.heldout_images)

    reference = demo.heldout_features(teacher, held)

    def fidelity(model: torch.nn.Module) -> dict[str, float]:
        return {k: round(v, 4) for k, v in token_fidelity(demo.heldout_features(model, held), reference).items()}

    before = fidelity(student)
    calib = demo.mixed_calibration(*lists, args.images)
    batches = demo.normalised_batches(calib, 16)
    student_states = torch.cat([state.hidden for state in stem_states(teacher, "blocks.0", batches,
                                                                       lambda m, x: m.forward_features(x))])
    teacher_states = student_states.clone()
    generator = torch.Generator().manual_seed(0)
    tick, errors = time.perf_counter(), []
    for i, block in enumerate(student.blocks):
        with torch.no_grad():
            teacher_states = torch.cat([teacher.blocks[i](x) for x in teacher_states.split(32)])
        errors.append([round(e, 4) for e in train_block(block, student_states, teacher_states, args, generator)])
        with torch.no_grad():
            student_states = torch.cat([block(x) for x in student_states.split(32)])
        print(f"block {i}: relative error {errors[-1][0]} -> {errors[-1][1]}", flush=True)
    seconds = round(time.perf_counter() - tick, 1)
    after = fidelity(student)
    settings = {k: getattr(args, k) for k in ("start", "images", "steps", "lr", "batch", "scope")}
    row = {**settings, "before": before, "after": after, "seconds": seconds, "block_errors": errors,
           "ratio": {k: round(after[k] / before[k], 4) for k in before}}
    print(json.dumps({k: v for k, v in row.items() if k != "block_errors"}), flush=True)
    rows = json.loads(args.results.read_text())["rows"] if args.results.is_file() else []
    rows = [r for r in rows if {k: r.get(k) for k in settings} != settings] + [row]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"command": "python -m bench.block_refine [--start FILE] --images N "
                                        "--steps S --lr LR --batch B --scope block|mlp", "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
