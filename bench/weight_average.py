"""Would an average of the student's weights help the demo (issue 21's EMA question)? Averages of a run's saved
checkpoints, evaluated like the demo's rows.

    .venv/bin/python -m bench.demo_recipe 240 avg checkpoint.every_steps=20 checkpoint.keep_last=13
    .venv/bin/python -m bench.weight_average demo_out/run_avg --out bench/results/weight_average.json

An EMA of the weights with a half-life of ``h`` steps is, up to the checkpoints' spacing, the average of the
saved checkpoints weighted by ``0.5 ** (steps back / h)``; a uniform average of the last ``k`` checkpoints is the
other usual form (stochastic weight averaging). Each candidate: held-out clip-art CLS / patch cosine to the teacher
(64 pictures at 224 px); the final checkpoint and the best candidate also get the demo's kNN and linear probe.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tools.demo import FASHION_MNIST, FULL, evaluate, fashion_subset, heldout_features, read_shard_images


def checkpoint_states(run: Path) -> tuple[list[tuple[int, dict[str, torch.Tensor]]], torch.nn.Module]:
    """(step, student state dict) of every complete checkpoint of ``run``, oldest first, and the last student (to
    load averages into)."""
    from trainer.checkpoint import complete_checkpoints, validate
    from trainer.export import trained_student

    states, model = [], None
    for path in reversed(complete_checkpoints(run / "checkpoints")):
        model, _ = trained_student(path)
        states.append((validate(path).step, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    if model is None:
        raise FileNotFoundError(f"{run / 'checkpoints'}: no complete checkpoint")
    return states, model


def weighted_average(states: list[tuple[int, dict[str, torch.Tensor]]], weights: list[float]
                     ) -> dict[str, torch.Tensor]:
    """The weighted mean of floating-point tensors (others from the last state)."""
    total = sum(weights)
    last = states[-1][1]
    return {k: (sum(w * s[k].double() for w, (_, s) in zip(weights, states, strict=True)) / total).to(v.dtype)
            if v.is_floating_point() else v for k, v in last.items()}


def candidates(states: list[tuple[int, dict]], uniform: list[int], half_lives: list[float]) -> dict[str, list[float]]:
    """Name -> weight per checkpoint: the last one alone, uniform over the last k, EMA-like with half-life h."""
    steps = [step for step, _ in states]
    out = {"final": [0.0] * (len(steps) - 1) + [1.0]}
    for k in uniform:
        if 1 < k <= len(steps):
            out[f"uniform_last_{k}"] = [float(i >= len(steps) - k) for i in range(len(steps))]
    for h in half_lives:
        out[f"ema_half_life_{h:g}"] = [0.5 ** ((steps[-1] - s) / h) for s in steps]
    return out


def main(argv: list[str] | None = None) -> int:
    from trainer.eval import token_fidelity
    from trainer.models.dinov2_onnx import load_dinov2_vits14

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench/results/weight_average.json"))
    parser.add_argument("--uniform", type=int, nargs="+", default=[2, 3, 4, 6, 8, 13])
    parser.add_argument("--half-lives", type=float, nargs="+", default=[10, 20, 40, 80])
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    demo = Path("demo_out").resolve()
    heldout = read_shard_images(demo / "shards" / "heldout" / "00000.tar", FULL.heldout_images)
    teacher = load_dinov2_vits14().eval()

    teacher_feats = heldout_features(teacher, heldout)
    start = time.perf_counter()
    states, student = checkpoint_states(args.run)
    rows = {}
    for name, weights in candidates(states, args.uniform, args.half_lives).items():
        student.load_state_dict(weighted_average(states, weights))
        fid = token_fidelity(heldout_features(student, heldout), teacher_feats)
        rows[name] = {"weights": weights, "cls_cosine": fid["cls_cosine"],
                      "patch_cosine": fid["patch_cosine"]}
        print(f"{name}: CLS {fid['cls_cosine']:.4f} patch {fid['patch_cosine']:.4f}", flush=True)
    best = max((n for n in rows if n != "final"), key=lambda n: rows[n]["patch_cosine"] + rows[n]["cls_cosine"])
    fmnist = fashion_subset(FULL, FASHION_MNIST)
    for name in ("final", best):
        student.load_state_dict(weighted_average(states, rows[name]["weights"]))
        row = evaluate(name, student, heldout, fmnist, teacher_feats, FULL)[0]
        rows[name].update(knn=row.knn_top1, linear=row.linear_top1)
    record = {"run": str(args.run), "checkpoint_steps": [s for s, _ in states], "best": best, "rows": rows,
              "seconds": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
