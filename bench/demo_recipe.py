"""One distillation run from the demo's compensated start, with held-out validation along the way (issue 21):
how a recipe (lr, warm-up, ...) moves the held-out cosine during the first steps, and the demo's evaluation
of its export at the end.

    .venv/bin/python -m tools.demo --out demo_out          # first: shards, compensated_student.safetensors
    .venv/bin/python -m bench.demo_recipe 120 lr2e-5 optim.base_lr=6.4e-4
    .venv/bin/python -m bench.demo_recipe 120 lr5e-6 optim.base_lr=1.6e-4

Arguments: steps, a tag (``<out>/run_<tag>``, ``<out>/export_<tag>``, ``<out>/recovered_<tag>.json``) and trainer
overrides applied after the demo's own. Everything else is the demo's: the mixed training stream
(``tools.demo.launch_training``, 2 ranks x 4 images at 224 px, the trainer's warm-up for compensated starts:
20 % of the run), the trainer's validation on the 64 held-out clip-art pictures every 20 steps (CLS / patch cosine, read from its
log and TensorBoard), ``python -m trainer export`` and ``tools.demo.evaluate`` (3,000 / 1,500 probe).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tools.demo import (
    COMPENSATED_FILE,
    FASHION_MNIST,
    FULL,
    MIX_WEIGHTS,
    build_fashion_shards,
    evaluate,
    export_student,
    fashion_subset,
    heldout_features,
    launch_training,
    load_export,
    read_curves,
    read_shard_images,
    run_warmup_steps,
    validation_overrides,
    validation_trace,
)


def main(argv: list[str]) -> int:
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    steps, tag, overrides = int(argv[0]), argv[1], argv[2:]
    out = Path("demo_out").resolve()
    start = out / COMPENSATED_FILE
    if not start.is_file():
        print(f"error: {start} not found: run python -m tools.demo --out demo_out first", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    sizes = FULL
    train_list = out / "shards" / "train" / "shards.txt"
    heldout_shard = out / "shards" / "heldout" / "00000.tar"
    heldout = read_shard_images(heldout_shard, sizes.heldout_images)
    fmnist = fashion_subset(sizes, FASHION_MNIST)
    fashion_list = build_fashion_shards(out, FASHION_MNIST, sizes, fmnist["train_index"])
    teacher = load_dinov2_vits14().eval()
    teacher_feats = heldout_features(teacher, heldout)
    run_dir = out / f"run_{tag}"
    validation = validation_overrides(heldout_shard, sizes.heldout_images, 20)
    train_s = launch_training(run_dir, [(train_list, MIX_WEIGHTS["clipart"]), (fashion_list, MIX_WEIGHTS["fashion"])],
                              steps, 2, sizes.batch_size_per_rank, start, overrides=[*validation, *overrides])
    export = export_student(run_dir, out / f"export_{tag}")
    row = evaluate("recovered", load_export(export), heldout, fmnist, teacher_feats, sizes)[0]
    curves = read_curves(run_dir)
    loss = curves["loss/total"][1]
    warmup = run_warmup_steps(run_dir)
    record = {"steps": steps, "warmup_steps": warmup, "overrides": overrides, "train_s": train_s,
              "row": row.__dict__,
              "validation": validation_trace(curves),
              "loss": {"first": loss[0], "max_during_warmup": max(loss[: max(1, warmup)]),
                       "last": loss[-1]}}
    (out / f"recovered_{tag}.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
