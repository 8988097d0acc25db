"""Issue 22 experiment: choose among a few width allocations by the compensated tower's fidelity on validation
pictures.

The per-block curves predict little of the final token fidelity (docs/adaptive.md). Here the plan's curves give a
family of allocations between uniform and the product's (the widths confined to bands around the uniform width:
[uniform / 2, 2 x uniform], [2/3, 4/3] and [5/6, 7/6] of it), plus the curvature rule of ``bench.adaptive_fisher``;
each candidate is pruned and compensated on the draw's calibration pictures, and the one with the best mean of
CLS and patch cosine to the teacher on ``--val`` other pool pictures (never the held-out ones) is the rule's
widths. Uniform is a candidate too, so the rule can only lose through validation noise.

    .venv/bin/python -m bench.adaptive_selected --draws 3   # -> bench/results/adaptive_selected.json
"""

from __future__ import annotations

import torch

import pruning
from bench.adaptive import RESULTS, log
from bench.adaptive_fisher import fisher_widths
from bench.width_rules import Draw, compare_rules, compensated, rule_parser
from pruning.budget import WidthCurve, allocate


def banded(plan: pruning.WidthPlan, low: int, high: int) -> list[int]:
    """The plan's allocation with every width confined to [low, high]."""
    bands = []
    for path, c in plan.summary["curves"].items():
        keep = [j for j, w in enumerate(c["widths"]) if low <= w <= high]
        bands.append(WidthCurve(path, [c["widths"][j] for j in keep], [c["errors"][j] for j in keep], 1))
    return allocate(bands, plan.summary["uniform_units"])


def features(model: torch.nn.Module, images: torch.Tensor):  # -> trainer.eval.Features
    """Final tokens (CLS and patches) of normalised pictures."""
    from trainer.eval import extract_features
    from trainer.models.dinov2_onnx import forward_tokens

    return extract_features(model.eval(), images.split(16), forward_tokens, keep_patches=True, show_progress=False)


def main(argv: list[str] | None = None) -> int:
    prog = "bench.adaptive_selected"
    parser = rule_parser(prog, __doc__.splitlines()[0], RESULTS / "adaptive_selected.json")
    parser.add_argument("--val", type=int, default=64, help="pool pictures outside the draw that choose")
    args = parser.parse_args(argv)

    def selected(draw: Draw) -> tuple[list[int], dict]:
        from trainer.eval import token_fidelity

        val = draw.spare[: args.val]
        teacher_feats = features(draw.teacher, val)
        u = draw.uniform_width
        fisher, _ = fisher_widths(draw)
        candidates = {"uniform": [u] * len(draw.plan.widths), "adaptive": draw.plan.widths,
                      "band_2": banded(draw.plan, u // 2, 2 * u), "band_4/3": banded(draw.plan, 2 * u // 3, 4 * u // 3),
                      "band_7/6": banded(draw.plan, 5 * u // 6, 7 * u // 6), "fisher": fisher}
        scores = {}
        for name, chosen in candidates.items():
            if name != "uniform" and chosen in [candidates[k] for k in scores]:
                continue
            model = compensated(draw, chosen, planned=name != "uniform")
            fid = token_fidelity(features(model, val), teacher_feats)
            cls, patch = fid["cls_cosine"], fid["patch_cosine"]
            scores[name] = {"widths": chosen, "val_cls": cls, "val_patch": patch}
            log(f"draw {draw.index} candidate {name}: {chosen} validation CLS {cls:.4f} patch {patch:.4f}")
        best = max(scores, key=lambda k: (scores[k]["val_cls"] + scores[k]["val_patch"]) / 2)
        return scores[best]["widths"], {"selected_candidate": best, "candidates": scores}

    return compare_rules(prog, args, {"selected": selected})


if __name__ == "__main__":
    raise SystemExit(main())
