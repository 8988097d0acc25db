"""Memory planner: per-rank bytes of teacher and student for each engine, and the largest batch that fits.

``python -m trainer plan <config.yaml> [key=value ...] [--gpu-mem-gib 80] [--world-size 8 64 | --nodes 4
--gpus-per-node 8] [--json]``: per row a verdict (fits / fits with AC / the batch that does), and the host RAM
per node of the configured build path.

Shapes come from a meta-device build of ``model`` (no memory, no weights) and ``prune.ratio``
arithmetic (``trainer.models.meta``). The byte model is written out in docs/planner.md; in short:

- student, bf16: DeepSpeed keeps bf16 weights (all of them at ZeRO-2, a 1/N shard at ZeRO-3), bf16
  gradient shards, and an fp32 master copy + two fp32 AdamW moments + an fp32 copy of the gradient
  shard at the step (the 2 + 18/N of its own estimator); FSDP2 keeps fp32 shards of weights,
  gradients and both moments (16/N, the weights are their own master) and gathers bf16 blocks.
- teacher: no gradients, no optimizer; ZeRO-3 or FSDP shards, or whole at fp32 for ``single``.
- activations per block and sample with fused (flash / memory-efficient) SDPA, no dropout:
  ``T * (9 D + 2 H)`` elements (two LayerNorm inputs, the qkv input, q, k, v, the attention output,
  the out-projection input, the fc1 input, the activation input and the fc2 input); all bf16 this
  is Megatron's 34 T D bytes at H = 4 D. Under CUDA autocast the LayerNorm inputs are saved in fp32.
  Checked against the tensors autograd really saves on CPU (tests/unit/test_plan.py): 3-10 % above.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

from trainer.cli import load_config
from trainer.config import TrainConfig
from trainer.models.meta import TowerShape, tower_shapes

GIB = 1024**3
ADAMW_MOMENT_BYTES = 8  # exp_avg + exp_avg_sq, fp32
FP32 = 4
DS_REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default (ZeRO-2)
DS_ZERO3_BUCKET_BLOCKS = 2
"""ZeRO-3 student: reduce_bucket_size = 2 blocks (trainer.engines.deepspeed.ds_config), allocated whole."""
GATHERED_BLOCKS = 2  # the block being computed and the one prefetched (FSDP2 / ZeRO-3)
DEFAULT_RESERVE_GIB = 2.0
SETUPS = (("deepspeed", 2), ("deepspeed", 3), ("fsdp", 0))


@dataclass(frozen=True)
class ModelStates:
    """Bytes one rank holds for a model, independent of the batch."""

    params: int
    """Weights as the engine stores them (shards, or whole)."""
    grads: int
    """Gradients (shards), including an fp32 copy made at the optimizer step."""
    optimizer: int
    """fp32 master weights (where the stored weights are bf16) and the two AdamW moments."""
    transient: int
    """Gathered blocks (ZeRO-3 / FSDP), one unsharded block gradient, DeepSpeed's reduce bucket, autocast copies."""

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.transient


def elem_bytes(precision: str) -> int:
    """Bytes of one activation or compute-weight element."""
    return 2 if precision == "bf16" else 4


def student_states(shape: TowerShape, engine: str, stage: int, precision: str, world: int) -> ModelStates:
    """Model states of the trained student on one of ``world`` ranks."""
    p, e = shape.params, elem_bytes(precision)
    block = shape.block_params
    if engine == "single":
        # Weights stay fp32 under autocast, which caches a bf16 copy of each weight until the step.
        autocast = 2 * p if precision == "bf16" else 0
        return ModelStates(FP32 * p, FP32 * p, ADAMW_MOMENT_BYTES * p, autocast)
    if engine == "fsdp":
        # fp32 shards are the master weights; reduce_dtype fp32 adds an fp32 copy of the block gradient.
        gathered = GATHERED_BLOCKS * e * block + e * block + (FP32 * block if precision == "bf16" else 0)
        return ModelStates(_shard(FP32 * p, world), _shard(FP32 * p, world),
                           _shard(ADAMW_MOMENT_BYTES * p, world), gathered)
    if engine == "deepspeed":
        # DeepSpeed always keeps a separate fp32 partition for the optimizer and flattens an fp32 gradient
        # partition at the step, also in fp32 mode.
        grads = _shard(e * p, world) + _shard(FP32 * p, world)
        optimizer = _shard((FP32 + ADAMW_MOMENT_BYTES) * p, world)
        if stage == 2:
            return ModelStates(e * p, grads, optimizer, e * min(DS_REDUCE_BUCKET_ELEMENTS, p))
        if stage == 3:
            bucket = e * min(DS_ZERO3_BUCKET_BLOCKS * block, p)
            return ModelStates(_shard(e * p, world), grads, optimizer, GATHERED_BLOCKS * e * block + e * block + bucket)
        raise ValueError(f"engine.zero_stage: must be 2 or 3, got {stage}")
    raise ValueError(f"engine.name: unknown engine {engine!r}")


def teacher_states(shape: TowerShape, engine: str, precision: str, world: int) -> ModelStates:
    """Model states of the frozen teacher: weights only, sharded except for ``single``."""
    p, e = shape.params, elem_bytes(precision)
    if engine == "single":
        return ModelStates(FP32 * p, 0, 0, 0)
    if engine == "fsdp":
        return ModelStates(_shard(FP32 * p, world), 0, 0, GATHERED_BLOCKS * e * shape.block_params)
    if engine == "deepspeed":
        # The teacher engine is always ZeRO-3, in the student's precision.
        return ModelStates(_shard(e * p, world), 0, 0, GATHERED_BLOCKS * e * shape.block_params)
    raise ValueError(f"engine.name: unknown engine {engine!r}")


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes per saved element, by role, for one engine and precision."""

    compute: int
    """Linear inputs, q/k/v, attention output, MLP hidden tensors."""
    norm_input: int
    """LayerNorm inputs: CUDA autocast runs LayerNorm in fp32 and saves the fp32 copy of its input."""
    stream: int
    """The residual stream (block inputs kept under activation checkpointing): fp32 when the weights are."""


def activation_bytes(engine: str, precision: str) -> ActivationBytes:
    """Saved-element sizes: DeepSpeed bf16 is bf16 throughout; single and fsdp run bf16 by autocast."""
    if precision != "bf16":
        return ActivationBytes(FP32, FP32, FP32)
    if engine == "deepspeed":
        return ActivationBytes(2, 2, 2)
    if engine == "fsdp":  # bf16 weights from the MixedPrecisionPolicy keep the stream bf16
        return ActivationBytes(2, FP32, 2)
    if engine == "single":
        return ActivationBytes(2, FP32, FP32)
    raise ValueError(f"engine.name: unknown engine {engine!r}")


def block_activation_bytes(shape: TowerShape, sizes: ActivationBytes) -> int:
    """Tensors one block saves for backward, per sample: T * (7 D + 2 H) compute elements + 2 T D norm inputs."""
    return shape.tokens * (sizes.compute * (7 * shape.width + 2 * shape.mlp_hidden) + sizes.norm_input * 2 * shape.width)


def student_activation_bytes(shape: TowerShape, sizes: ActivationBytes, checkpointing: bool) -> int:
    """Peak activation bytes of the student per sample, forward + backward."""
    block = block_activation_bytes(shape, sizes)
    # The loss reads the output tokens in fp32; backward holds one block's activation gradients.
    common = FP32 * shape.tokens * shape.width + block
    if checkpointing:
        # Only block inputs are kept; one block is recomputed at a time in backward.
        return shape.blocks * shape.tokens * shape.width * sizes.stream + block + common
    return shape.blocks * block + common


def teacher_activation_bytes(shape: TowerShape, sizes: ActivationBytes) -> int:
    """Peak activation bytes of the teacher per sample: no_grad keeps one block's working set and the output."""
    return block_activation_bytes(shape, sizes) + FP32 * shape.tokens * shape.width


def image_bytes(image_size: int) -> int:
    """One fp32 input image."""
    return 3 * image_size * image_size * FP32


@dataclass(frozen=True)
class Row:
    """One engine setup at one world size."""

    engine: str
    zero_stage: int | None
    world_size: int
    student: ModelStates
    teacher: ModelStates
    reserve: int
    student_act_per_sample: int
    """Student activations per image without AC (forward + backward peak)."""
    student_act_per_sample_checkpointed: int
    """The same with activation checkpointing."""
    teacher_act_per_sample: int
    """Teacher working set per image under no_grad (one block and its output tokens)."""
    act_per_sample: int
    """Peak per image of the whole step without AC: the larger of the teacher phase and the student phase
    (student activations + teacher output tokens kept for the loss), plus the input image."""
    act_per_sample_checkpointed: int
    """The same with activation checkpointing on the student."""
    batch: int
    total_at_batch: int
    total_at_batch_checkpointed: int
    max_batch: int
    max_batch_checkpointed: int

    @property
    def label(self) -> str:
        return f"deepspeed zero{self.zero_stage}" if self.engine == "deepspeed" else self.engine

    @property
    def verdict(self) -> str:
        """Whether the configured batch fits one GPU, with activation checkpointing if it must, or what does."""
        if self.batch <= self.max_batch:
            return "fits"
        if self.batch <= self.max_batch_checkpointed:
            return "fits with AC"
        if self.max_batch_checkpointed >= 1:
            return f"no: batch <= {self.max_batch_checkpointed} with AC"
        return "does not fit"


def plan_row(teacher: TowerShape, student: TowerShape, engine: str, stage: int, precision: str, world: int,
             batch: int, gpu_mem: int, reserve: int) -> Row:
    """Memory per rank of one setup at ``batch`` and the largest batch fitting ``gpu_mem`` bytes."""
    s = student_states(student, engine, stage, precision, world)
    t = teacher_states(teacher, engine, precision, world)
    fixed = s.total + t.total + reserve
    # The teacher's forward is over before the student's starts; its output tokens stay for the loss.
    teacher_out = FP32 * teacher.tokens * teacher.width
    sizes = activation_bytes(engine, precision)
    teacher_act = teacher_activation_bytes(teacher, sizes)
    student_act = {ckpt: student_activation_bytes(student, sizes, ckpt) for ckpt in (False, True)}
    per = {ckpt: max(act + teacher_out, teacher_act) + image_bytes(teacher.image_size)
           for ckpt, act in student_act.items()}
    return Row(
        engine=engine, zero_stage=stage if engine == "deepspeed" else None, world_size=world, student=s, teacher=t,
        reserve=reserve, student_act_per_sample=student_act[False],
        student_act_per_sample_checkpointed=student_act[True], teacher_act_per_sample=teacher_act,
        act_per_sample=per[False], act_per_sample_checkpointed=per[True], batch=batch,
        total_at_batch=fixed + batch * per[False], total_at_batch_checkpointed=fixed + batch * per[True],
        max_batch=max(0, (gpu_mem - fixed) // per[False]),
        max_batch_checkpointed=max(0, (gpu_mem - fixed) // per[True]),
    )


def host_ram_per_node(teacher: TowerShape, student: TowerShape, in_engine: bool, world: int,
                      gpus_per_node: int) -> int:
    """Host bytes a node's ranks hold while the models are built (before they move to the GPUs).

    Host path (``prune.in_engine=false``): every rank builds the whole teacher with its head in fp32 and a
    pruned copy, the student. In-engine: each rank holds only its shards of both (fp32 at load) and one
    gathered block; the checkpoint's pages are file-backed and not counted.
    """
    if in_engine:
        per_rank = _shard(FP32 * (teacher.params + student.params), world) + FP32 * teacher.block_params
    else:
        per_rank = FP32 * (teacher.params_with_head + student.params_with_head)
    return per_rank * min(gpus_per_node, world)


def plan(cfg: TrainConfig, world_sizes: list[int], gpu_mem_gib: float,
         reserve_gib: float = DEFAULT_RESERVE_GIB, gpus_per_node: int = 8) -> dict:
    """The whole plan for ``cfg``: shapes, and one row per engine setup and world size."""
    if gpu_mem_gib <= 0:
        raise ValueError(f"--gpu-mem-gib: must be > 0, got {gpu_mem_gib}")
    if reserve_gib < 0:
        raise ValueError(f"--reserve-gib: must be >= 0, got {reserve_gib}")
    if not world_sizes or min(world_sizes) < 1:
        raise ValueError(f"--world-size: must be >= 1, got {world_sizes}")
    try:
        teacher, student = tower_shapes(cfg.model, cfg.prune.ratio)
    except ValueError as err:
        raise ValueError(f"prune.ratio: {err}") from None
    gpu_mem, reserve = int(gpu_mem_gib * GIB), int(reserve_gib * GIB)
    setups = list(SETUPS) + ([("single", 0)] if 1 in world_sizes else [])
    rows = [plan_row(teacher, student, engine, stage, cfg.engine.precision, world, cfg.optim.batch_size_per_rank,
                     gpu_mem, reserve)
            for world in world_sizes for engine, stage in setups if engine != "single" or world == 1]
    return {
        "model": cfg.model.name, "prune_ratio": cfg.prune.ratio, "precision": cfg.engine.precision,
        "batch_size_per_rank": cfg.optim.batch_size_per_rank, "gpu_mem_gib": gpu_mem_gib,
        "reserve_gib": reserve_gib,
        "configured": {"engine": cfg.engine.name, "zero_stage": cfg.engine.zero_stage,
                       "activation_checkpointing": cfg.engine.activation_checkpointing,
                       "in_engine": cfg.prune.in_engine},
        "teacher": asdict(teacher), "student": asdict(student), "gpus_per_node": gpus_per_node,
        "host_ram_per_node": {str(w): {"in_engine": cfg.prune.in_engine,
                                       "bytes": host_ram_per_node(teacher, student, cfg.prune.in_engine, w,
                                                                  gpus_per_node)}
                              for w in world_sizes},
        "rows": [_row_dict(r, cfg) for r in rows],
    }


# ---------------------------------------------------------------------------------------------- CPU mode
# A CPU rank (gloo, ``DS_ACCELERATOR=cpu``) holds everything in host memory: its peak is anonymous RSS
# (``RssAnon``: heap and anonymous mappings; the checkpoint's mmap pages are file-backed and left out),
# not CUDA memory. Offsets beyond the model's bytes, measured on this machine kind (2 gloo ranks,
# OMP_NUM_THREADS=1, torch 2.14.1, deepspeed 0.19.8, open_clip 3.3.0; bench/full_size.py --tiny):
CPU_PROCESS_BASELINE = {"fsdp": 0.43 * GIB, "deepspeed": 0.50 * GIB}
"""RssAnon of a rank with nothing built: torch + open_clip + timm (+ deepspeed and its accelerator probe)
imports, the gloo process group and its buffers, the data loader's first batches."""
FROZEN_CHUNK_BYTES = 128 * 1024**2
"""trainer.engines.deepspeed.FROZEN_CHUNK_BYTES: what rank 0 holds while writing an untrained student."""
CPU_ALLOCATOR_SLACK = 0.05
"""glibc keeps freed blocks of the build and load phases; measured in the tens of percent of nothing
stable, so a flat 5 % of the model bytes."""


def cpu_rank_bytes(cfg: TrainConfig, world: int) -> dict:
    """Predicted peak anonymous RSS (bytes) of one CPU rank of the configured run, by component.

    In-engine build (``prune.in_engine=true``): the teacher shard in the run's precision (a frozen teacher
    has no fp32 copy under bf16, both engines), the student shard (FSDP2: fp32, its own master; ZeRO-3: bf16
    partition), during pruning one gathered teacher block in fp32 and its pruned copy (plus, with
    compensation, the fit moments and the calibration states); when training (``run.steps > 0``) the
    student's gradients and AdamW states as on the GPU (``student_states``) and the activations of one
    batch. ``run.steps=0``: no optimizer state is ever built (torch AdamW allocates lazily, a never-stepped
    one is saved without state; DeepSpeed builds no student engine and rank 0 writes the student in chunks).
    """
    teacher, student = tower_shapes(cfg.model, cfg.prune.ratio)
    engine, precision = cfg.engine.name, cfg.engine.precision
    if engine not in CPU_PROCESS_BASELINE:
        raise ValueError(f"engine.name: the CPU mode plans fsdp and deepspeed, got {engine!r}")
    stage = cfg.engine.zero_stage if engine == "deepspeed" else 0
    e = elem_bytes(precision)
    teacher_store = _shard(e * teacher.params, world)
    states = student_states(student, engine, stage, precision, world)
    # Pruning one site: the gathered teacher block (stored dtype + an fp32 copy for selection / fitting)
    # and the pruned student block at its new width.
    prune_extra = (e + FP32) * teacher.block_params + FP32 * student.block_params
    if cfg.prune.compensate:
        kept = student.mlp_hidden
        # Output-mode fit moments [kept + width]^2 in fp64, twice with held-out tokens; the carried states
        # (teacher and student streams, fp32) of this rank's calibration images.
        moments = 2 * 8 * (kept + teacher.width) ** 2
        carried = 2 * FP32 * cfg.prune.calib_batches * cfg.optim.batch_size_per_rank * teacher.tokens * teacher.width
        prune_extra += moments + carried + FP32 * teacher.block_params
    student_weights = states.params
    train_states = states.params + states.grads + states.optimizer
    phases = {"prune": teacher_store + student_weights + prune_extra}
    rank0_only = 0
    if engine == "deepspeed" and cfg.run.steps == 0:
        # No student engine (DeepSpeedEngine.freeze_student): rank 0 writes the fp32 student in chunks.
        # The chunk being filled and one gathered parameter.
        rank0_only = min(FROZEN_CHUNK_BYTES, FP32 * student.params) + FP32 * student.block_params
        phases["save"] = teacher_store + student_weights + rank0_only
    elif engine == "deepspeed":
        # deepspeed.initialize (ZeRO-3) builds the fp32 partition and both moments at once, stepping AdamW
        # once on a zeroed fp32 gradient buffer: 2 + 4 + 8 + 4 bytes per parameter and rank, even for
        # run.steps=0 (measured 18.0 P/N on ViT-B-32; tests/unit/test_plan.py).
        phases["optimizer"] = teacher_store + _shard((e + FP32 + ADAMW_MOMENT_BYTES + FP32) * student.params, world)
    sizes = activation_bytes(engine, precision)
    per_image = max(student_activation_bytes(student, sizes, cfg.engine.activation_checkpointing)
                    + FP32 * teacher.tokens * teacher.width, teacher_activation_bytes(teacher, sizes)) \
        + image_bytes(teacher.image_size)
    if cfg.run.steps > 0:
        phases["train"] = teacher_store + train_states + states.transient + cfg.optim.batch_size_per_rank * per_image
    model_peak = max(phases.values())
    other_peak = max(v - (rank0_only if k == "save" else 0) for k, v in phases.items())
    baseline = int(CPU_PROCESS_BASELINE[engine])
    slack = int(CPU_ALLOCATOR_SLACK * model_peak)
    return {"engine": engine, "zero_stage": stage or None, "world_size": world, "baseline": baseline,
            "teacher_store": teacher_store, "student_weights": student_weights, "train_states": train_states,
            "prune_extra": prune_extra, "per_image": per_image, "phases": phases, "allocator_slack": slack,
            "peak": baseline + model_peak + slack,
            "peak_other_ranks": baseline + other_peak + int(CPU_ALLOCATOR_SLACK * other_peak)}


def format_cpu_table(cfg: TrainConfig, rows: list[dict]) -> str:
    """``cpu_rank_bytes`` rows as text, GiB per rank."""
    engine = cfg.engine.name + (f" zero{cfg.engine.zero_stage}" if cfg.engine.name == "deepspeed" else "")
    lines = [f"{cfg.model.name} r={cfg.prune.ratio} {engine} {cfg.engine.precision}, CPU ranks, run.steps="
             f"{cfg.run.steps}, compensate={cfg.prune.compensate}: peak anonymous RSS per rank, GiB",
             "ranks  baseline  teacher  student  prune extra  train states  act/img  slack   peak  (phase)"]
    for r in rows:
        worst = max(r["phases"], key=r["phases"].get)
        lines.append(f"{r['world_size']:5d}  {_gib(r['baseline']):>8}  {_gib(r['teacher_store']):>7}  "
                     f"{_gib(r['student_weights']):>7}  {_gib(r['prune_extra']):>11}  {_gib(r['train_states']):>12}  "
                     f"{_gib(r['per_image'], 3):>7}  {_gib(r['allocator_slack']):>5}  {_gib(r['peak']):>5}  ({worst})")
    lines.append("baseline: torch/open_clip/timm(/deepspeed) imports + gloo process group, measured; "
                 "checkpoint pages are file-backed (not anonymous) and not counted")
    return "\n".join(lines)


def cpu_peak_per_rank(config: str, overrides: list[str], world_size: int) -> dict:
    """``cpu_rank_bytes`` of a config file with overrides, in GiB (bench/full_size.py's planned column)."""
    result = cpu_rank_bytes(load_config(config, overrides), world_size)
    return {"peak_gib": round(result["peak"] / GIB, 3), "phases": {k: round(v / GIB, 3) for k, v in result["phases"].items()},
            **{k: round(v / GIB, 3) if isinstance(v, int) and k not in ("world_size", "zero_stage") else v
               for k, v in result.items() if k != "phases"}}


def _row_dict(row: Row, cfg: TrainConfig) -> dict:
    out = asdict(row)
    out["label"] = row.label
    out["verdict"] = row.verdict
    out["configured"] = row.engine == cfg.engine.name and row.zero_stage in (None, cfg.engine.zero_stage)
    out["student"]["total"], out["teacher"]["total"] = row.student.total, row.teacher.total
    return out


def _shard(nbytes: int, world: int) -> int:
    return math.ceil(nbytes / world)


def format_table(result: dict) -> str:
    """Human-readable table of ``plan``'s result, sizes in GiB."""
    t, s = result["teacher"], result["student"]
    lines = [
        f"{result['model']}  teacher {t['params']:,} params  ->  student (r={result['prune_ratio']}) "
        f"{s['params']:,} params  [trained tower, head stripped]",
        f"precision {result['precision']}, batch/rank {result['batch_size_per_rank']}, GPU {result['gpu_mem_gib']} GiB "
        f"(reserve {result['reserve_gib']} GiB for CUDA context, NCCL, fragmentation); GiB per rank",
        "",
    ]
    head = ("setup", "GPUs", "S params", "S grads", "S optim", "S trans", "T states", "act/img", "act/img AC",
            f"tot@{result['batch_size_per_rank']}", f"tot@{result['batch_size_per_rank']} AC", "max b", "max b AC",
            f"batch {result['batch_size_per_rank']}?")
    body = []
    for r in result["rows"]:
        st, te = r["student"], r["teacher"]
        body.append((r["label"] + (" *" if r["configured"] else ""), str(r["world_size"]), *(_gib(st[k]) for k in ("params", "grads", "optimizer", "transient")),
                     _gib(te["total"]), _gib(r["act_per_sample"], 3), _gib(r["act_per_sample_checkpointed"], 3),
                     _gib(r["total_at_batch"]), _gib(r["total_at_batch_checkpointed"]),
                     str(r["max_batch"]), str(r["max_batch_checkpointed"]), r["verdict"]))
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    ac = "on" if result["configured"]["activation_checkpointing"] else "off"
    lines.append(f"* = the configured engine (activation checkpointing {ac}); AC = with activation checkpointing")
    for row in [head, *body]:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    path = "in-engine (prune.in_engine=true)" if result["configured"]["in_engine"] else \
        "host (prune.in_engine=false: every rank builds teacher + student in fp32)"
    for world, ram in result["host_ram_per_node"].items():
        lines.append(f"host RAM per node while building, {path}, {world} GPUs ({result['gpus_per_node']} per node): "
                     f"{_gib(ram['bytes'])} GiB")
    return "\n".join(lines)


def _gib(nbytes: int, digits: int = 2) -> str:
    return f"{nbytes / GIB:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    """Command line entry: print the table, or the JSON with ``--json``."""
    parser = argparse.ArgumentParser(prog="python -m trainer plan", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for training")
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--world-size", type=int, nargs="+", default=None,
                        help="GPUs in all (one rank each); default: --nodes x --gpus-per-node")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (with --gpus-per-node, instead of --world-size)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (host RAM is per node)")
    parser.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_GIB,
                        help="per-GPU memory outside the model (CUDA context, NCCL, allocator fragmentation)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--cpu", action="store_true",
                        help="CPU ranks (gloo): peak anonymous host RSS per rank of the configured engine, "
                             "in-engine build, with the process baseline and allocator slack stated")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ValueError(f"--nodes and --gpus-per-node: must be >= 1, got {args.nodes} and {args.gpus_per_node}")
    cfg = load_config(args.config, args.overrides)
    worlds = args.world_size or [args.nodes * args.gpus_per_node]
    if args.cpu:
        rows = [cpu_rank_bytes(cfg, world) for world in worlds]
        print(json.dumps(rows, indent=2) if args.json else format_cpu_table(cfg, rows))
        return 0
    result = plan(cfg, worlds, args.gpu_mem_gib, args.reserve_gib, args.gpus_per_node)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
