"""``make gpu-check``: on one CUDA GPU, the gpu test tier and a short bf16 ViT-g-14 distillation on NCCL.

1. ``pytest -q tests/gpu`` (the planner's single-engine memory check, the CUDA selection kernels);
2. ``torchrun --nproc_per_node 1 -m trainer configs/experiments/vit_g_14_r1_fsdp.yaml`` (FSDP2 on NCCL, bf16,
   activation checkpointing, synthetic 224-px images, batch ``--batch``, ``--steps`` steps, host-path prune
   with ``l2``: no selection cost), its progress lines and TensorBoard scalars read back.

Prints one table: images/s (median over the steps after the first), TFLOP/s and MFU from the model FLOPs
(teacher forward + student forward, backward and the recomputed forward under activation checkpointing;
attention included), against an assumed dense bf16 peak of ``--peak-tflops`` (989: H100/H200 SXM bf16
dense), and the peak CUDA memory (``torch.cuda.max_memory_allocated``, perf/memory_bytes) against the
planner's total for the configured row (tools/plan.py). Budget: <= 8 minutes on an H100.

    .venv/bin/python bench/gpu_check.py [--steps 30] [--batch 64] [--out bench/results/gpu_check.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/select.py would shadow the standard library's select

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "experiments" / "vit_g_14_r1_fsdp.yaml"
RESULTS = REPO / "bench" / "results" / "gpu_check.json"
STEP = re.compile(r"^step (\d+)/(\d+) loss (\S+) lr \S+ ([\d.]+) img/s", re.M)
GIB = 1024 ** 3


def forward_flops(params: int, blocks: int, tokens: int, width: int) -> int:
    """Matmul FLOPs of one image's forward: 2 per weight and token, plus attention's QK^T and AV."""
    return 2 * params * tokens + 4 * blocks * tokens * tokens * width


def flops_per_image(teacher: object, student: object, checkpointing: bool) -> int:
    """Teacher forward + student forward, backward (2x) and, with AC, the recomputed forward."""
    t = forward_flops(teacher.params, teacher.blocks, teacher.tokens, teacher.width)
    s = forward_flops(student.params, student.blocks, student.tokens, student.width)
    return t + s * (4 if checkpointing else 3)


def run_gpu_tests(timeout: int) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/gpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    tail = (done.stdout + done.stderr).strip().splitlines()
    return {"exit_code": done.returncode, "seconds": round(time.perf_counter() - start, 1),
            "summary": tail[-1] if tail else ""}


def run_distillation(run_dir: Path, overrides: list[str], timeout: int) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "trainer", str(CONFIG), *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr, time.perf_counter() - start


def tb_scalar(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="images per step (one rank)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak assumed for MFU (H100 / H200 SXM: 989)")
    parser.add_argument("--skip-tests", action="store_true", help="only the distillation")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing was run.", file=sys.stderr)
        return 2

    from tools.plan import plan
    from trainer.cli import load_config
    from trainer.models.meta import tower_shapes

    started = time.perf_counter()
    tests = None if args.skip_tests else run_gpu_tests(timeout=300)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        run_dir = Path(tmp) / "run"
        overrides = [f"run.dir={run_dir}", f"run.steps={args.steps}", "run.log_every_steps=1",
                     "engine.name=fsdp", "engine.precision=bf16", "engine.activation_checkpointing=true",
                     f"optim.batch_size_per_rank={args.batch}", "optim.warmup_steps=2", "prune.method=l2",
                     "data.kind=synthetic", "data.shards=", "data.num_workers=0", "checkpoint.every_steps=100000",
                     "checkpoint.every_minutes=0"]
        log, wall = run_distillation(run_dir, overrides, timeout=420)
        memory = tb_scalar(run_dir, "perf/memory_bytes")
    steps = STEP.findall(log)
    rates = [float(s[3]) for s in steps][1:] or [float(s[3]) for s in steps]
    rates.sort()
    images_per_s = rates[len(rates) // 2]
    cfg = load_config(CONFIG, overrides)
    teacher, student = tower_shapes(cfg.model, cfg.prune.ratio)
    flops = flops_per_image(teacher, student, checkpointing=True)
    tflops = images_per_s * flops / 1e12
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    planned = plan(cfg, [1], gpu_gib, reserve_gib=0.0)
    row = next(r for r in planned["rows"] if r["engine"] == "fsdp")
    peak = max(memory.values())
    result = {
        "device": torch.cuda.get_device_name(0), "gpu_mem_gib": round(gpu_gib, 1), "steps": args.steps,
        "batch": args.batch, "tests": tests, "images_per_s": round(images_per_s, 1),
        "flops_per_image": flops, "tflops": round(tflops, 1), "peak_tflops_assumed": args.peak_tflops,
        "mfu": round(tflops / args.peak_tflops, 4), "peak_cuda_gib": round(peak / GIB, 2),
        "planned_gib": round(row["total_at_batch_checkpointed"] / GIB, 2),
        "measured_over_planned": round(peak / row["total_at_batch_checkpointed"], 3),
        "final_loss": float(steps[-1][2]) if steps else None, "distillation_wall_s": round(wall, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| device | gpu tests | img/s | TFLOP/s | MFU (peak {args.peak_tflops:g}) | peak CUDA GiB | planned GiB "
          "| measured/planned | total s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {result['device']} | {tests['summary'] if tests else 'skipped'} | {result['images_per_s']} | "
          f"{result['tflops']} | {100 * result['mfu']:.1f} % | {result['peak_cuda_gib']} | {result['planned_gib']} | "
          f"{result['measured_over_planned']} | {result['total_s']} |")
    print(f"wrote {args.out}")
    return 0 if tests is None or tests["exit_code"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
