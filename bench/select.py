"""DGMR selection speed: our exact method against the plain float32 greedy loop, same run.

For each fc1 shape at the paper's ratio r=1 (keep N of M) the plain loop and ours run
interleaved three times; the best time of each is compared and the indices must be identical.
At the EVA-CLIP-E shape the plain loop would take minutes per run, so both are timed on the
same first ``--eva-slice`` picks (a measured ratio, not an extrapolation), and ours is also
timed on the full layer.

    python -m bench.select                   # writes bench/results/select.json
    DGMR_NATIVE=0 python -m bench.select     # the same without the compiled pick loop (dense fallback)
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# standard library's ``select`` module that torch's imports need.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from pruning import select_mlp_channels  # noqa: E402
from pruning.select import _native  # noqa: E402

SHAPES = {"ViT-B": (3072, 768), "ViT-L": (4096, 1024), "ViT-g": (6144, 1408), "EVA-CLIP-E": (15360, 1792)}


def plain_greedy_loop(weight: torch.Tensor, num_keep: int) -> torch.Tensor:
    """The straightforward float32 loop: refresh every norm, pick the largest, project it out."""
    residual = weight.float().clone()
    available = torch.ones(residual.shape[0], dtype=torch.bool)
    order = torch.empty(num_keep, dtype=torch.long)
    for k in range(num_keep):
        norms = torch.linalg.vector_norm(residual, dim=1).masked_fill_(~available, -1.0)
        i = int(torch.argmax(norms))
        order[k] = i
        available[i] = False
        q = residual[i] / norms[i]
        residual.addr_(residual @ q, q, alpha=-1.0)
    return order


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def bench_shape(name: str, hidden: int, width: int, picks: int, repeats: int) -> dict:
    weight = torch.randn(hidden, width, generator=torch.Generator().manual_seed(0))
    ref_times, our_times = [], []
    for _ in range(repeats):  # interleaved so both see the same machine state
        t_ref, ref = timed(plain_greedy_loop, weight, picks)
        t_our, ours = timed(select_mlp_channels, weight, picks)
        ref_times.append(t_ref)
        our_times.append(t_our)
    row = {
        "shape": name, "hidden": hidden, "width": width, "picks": picks,
        "plain_loop_s": min(ref_times), "ours_s": min(our_times),
        "speedup": min(ref_times) / min(our_times),
        "identical": bool(torch.equal(ref, ours)),
        "first_mismatch": None if torch.equal(ref, ours) else int((ref != ours).nonzero()[0]),
    }
    print(f"{name:11s} {hidden:6d}x{width:<5d} picks {picks:5d}: plain {row['plain_loop_s']:7.2f} s  "
          f"ours {row['ours_s']:6.3f} s  x{row['speedup']:5.1f}  identical={row['identical']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eva-slice", type=int, default=192, help="picks timed for both at the EVA shape")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "select.json")
    args = parser.parse_args()
    rows = []
    for name, (hidden, width) in SHAPES.items():
        picks = args.eva_slice if name == "EVA-CLIP-E" else width
        rows.append(bench_shape(name, hidden, width, picks, args.repeats))
    hidden, width = SHAPES["EVA-CLIP-E"]
    weight = torch.randn(hidden, width, generator=torch.Generator().manual_seed(0))
    full = min(timed(select_mlp_channels, weight, width)[0] for _ in range(args.repeats))
    print(f"EVA-CLIP-E full layer ({hidden}x{width}, keep {width}): ours {full:.2f} s (best of {args.repeats})")
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "pick_loop": "compiled" if _native() is not None else "dense fallback (DGMR_NATIVE=0 or no compiler)",
        "torch": torch.__version__,
        "rows": rows,
        "eva_full_layer_s": full,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
