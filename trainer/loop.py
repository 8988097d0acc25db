"""The training loop: the one place where the order of a step is written."""

from __future__ import annotations

import ctypes
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from trainer.checkpoint import Checkpointer
from trainer.cli import preflight
from trainer.config import TrainConfig
from trainer.data import BatchStream, build_stream
from trainer.dist import (
    STOP_EXIT_CODE,
    StepFlags,
    StopSignals,
    destroy_process_group,
    read_env,
    stopped_message,
)
from trainer.engines.base import Engine, Models, build_engine
from trainer.metrics import Metrics, flat_hparams, log_prune_report, memory_bytes
from trainer.models.registry import get_adapter
from trainer.schedule import lr_at, peak_lr, weight_decay_at
from trainer.student import build_models, in_engine_build, prune_in_engine
from trainer.task import DistillTask, freeze_teacher
from trainer.validate import FidelityRecord, Validator

LOSS_TERMS = ("loss", "loss_cls", "loss_patch", "loss_blocks")


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Loading and pruning allocate and free many tensors of up to tens of MB; glibc's dynamic mmap threshold
    then serves such sizes from the heap and keeps what is freed, so a rank's resident memory stays at its
    transient peak for the rest of the run.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def phase(name: str, *, enabled: bool) -> Iterator[None]:
    """Rank 0 prints ``phase <name>: <s> s [<start> <end>]`` (epoch seconds) when the block ends, so that a
    benchmark can attribute what it measured outside (RSS per rank) to build, load, prune, save, train.
    Every rank then releases the heap's free pages (``release_free_memory``)."""
    start = time.time()
    yield
    release_free_memory()
    if enabled:
        end = time.time()
        print(f"phase {name}: {end - start:.2f} s [{start:.3f} {end:.3f}]", file=sys.stderr, flush=True)


@dataclass
class TrainResult:
    """What a finished run hands back (tests and benchmarks read it; the CLI ignores it)."""

    engine: Engine
    losses: dict[int, float] = field(default_factory=dict)
    """Rank-averaged total loss by step (0-based), for every logged step."""
    validation: dict[int, dict[str, float]] = field(default_factory=dict)
    """Held-out metrics by optimizer steps done (0 = before training), identical on every rank."""
    stopped_at: Path | None = None
    """The checkpoint written when a stop signal ended the run before ``run.steps``; None when it ran to the end."""


def train(cfg: TrainConfig, *, stream: BatchStream | None = None, stop: StopSignals | None = None) -> TrainResult:
    """Build everything from ``cfg`` and run ``cfg.run.steps`` optimizer steps.

    ``stop``: signals that end the run early, after the step in progress and its checkpoint
    (``TrainResult.stopped_at``); None: only the step count ends it.
    """
    env = read_env()
    with phase("init", enabled=env.is_main):
        engine = build_engine(cfg.engine, cfg.optim, env)  # starts the process group where needed
    adapter = get_adapter(cfg.model.family)
    if cfg.prune.in_engine:
        # Sharded before any weight exists: teacher loaded shard by shard, student MLPs at pruned widths,
        # filled by prune_in_engine below (it may read the stream), then the optimizer.
        if not hasattr(engine, "setup_sharded"):
            raise ValueError(f"prune.in_engine: engine {cfg.engine.name!r} has no sharded build; use engine.name "
                             "fsdp or deepspeed, or prune.in_engine=false")
        with phase("build", enabled=env.is_main):
            cfg, build = in_engine_build(cfg, adapter, stream, env.device)
            skeletons = build.skeletons()
        with phase("load", enabled=env.is_main):  # shard both skeletons, each rank reads its teacher rows
            engine.setup_sharded(skeletons)
        if cfg.run.steps == 0 and hasattr(engine, "freeze_student"):
            engine.freeze_student()  # nothing to train: no optimizer states (DeepSpeed would build them eagerly)
        teacher, student = build.teacher, build.student
        student_layout, teacher_layout = build.student_layout, build.teacher_layout
    else:
        with phase("build", enabled=env.is_main):
            teacher, student, prune_report = build_models(cfg, adapter)
            freeze_teacher(teacher)
            # Before the engine wraps them: the heads go, so both models end at the pre-norm tokens.
            student_layout, teacher_layout = adapter.strip_head(student), adapter.strip_head(teacher)
        with phase("load", enabled=env.is_main):
            engine.setup(Models(student, teacher, adapter.blocks, adapter.enable_activation_checkpointing))
    task = DistillTask(engine.student, engine.teacher, student_layout=student_layout,
                       teacher_layout=teacher_layout, loss=cfg.loss, student_norm=adapter.final_norm(student_layout),
                       teacher_norm=adapter.final_norm(teacher_layout), device=env.device,
                       student_blocks=adapter.blocks(student), teacher_blocks=adapter.blocks(teacher))

    optim, steps, accum = cfg.optim, cfg.run.steps, cfg.optim.grad_accum_steps
    global_batch = optim.batch_size_per_rank * env.world_size * accum
    peak = peak_lr(optim.base_lr, global_batch)
    warmup = cfg.warmup_steps()
    if stream is None:
        stream = build_stream(cfg.data, adapter.input_spec(teacher), batch_size=optim.batch_size_per_rank,
                              rank=env.rank, world_size=env.world_size, seed=cfg.run.seed)
    prune_extra: dict = {}
    if cfg.prune.in_engine:
        # Per block: gather its MLP -> owner rank selects -> every rank writes its student shard; then AdamW.
        with phase("prune", enabled=env.is_main):  # with compensation: the calibration forward and fits too
            prune_report, prune_extra = prune_in_engine(engine, build, stream, env.device)
    run_dir = Path(cfg.run.dir)
    validator = Validator(cfg.validation, adapter.input_spec(teacher), env) if cfg.validation.enabled else None
    record = FidelityRecord(cfg.validation.best_metric)
    checkpointer = Checkpointer(cfg.checkpoint, run_dir, env, cfg.to_dict(), {"task": task, "validation": record})
    with phase("resume", enabled=env.is_main):
        state = checkpointer.resume(engine, stream)  # engine, stream, RNGs, task and record as saved, or fresh
    # After a resume, TensorBoard hides what the interrupted run logged past the checkpoint (purge_step).
    metrics = Metrics(run_dir, enabled=env.is_main, total_steps=steps, resumed_at=state.step)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (run_dir / "prune_report.json").write_text(json.dumps({**prune_report.to_dict(), **prune_extra}))
        log_prune_report(metrics, prune_report)
        metrics.log_config(cfg.to_dict(), flat_hparams(cfg.to_dict()))
        if optim.warmup_fraction is not None or (optim.warmup_steps is None and warmup > 0):
            why = ("optim.warmup_fraction" if optim.warmup_fraction is not None
                   else "the default for a compensated start, prune.student_init / prune.compensate")
            print(f"warm-up: {warmup} of {steps} steps ({why})", file=sys.stderr, flush=True)

    result = TrainResult(engine)

    last_logged, last_log_time = state.step, time.perf_counter()

    def validate() -> bool:
        """Held-out metrics at ``state.step`` (a collective); True when they beat every earlier validation."""
        nonlocal last_log_time
        assert validator is not None
        start = time.perf_counter()
        values = validator.run(task, student, engine.autocast)  # the student in eval mode meanwhile (drop_path)
        result.validation[state.step] = values
        is_best = record.update(state.step, values[record.metric])
        metrics.log_validation(state.step, values, record)
        last_log_time += time.perf_counter() - start  # perf/step_time_s measures training only
        return is_best

    if validator is not None and state.step == 0 and validate():
        checkpointer.save_best(state, engine, stream, {"metric": record.metric, "value": record.best})
    flags = StepFlags(engine.mean_over_ranks, is_main=env.is_main, stop=stop,
                      every_minutes=cfg.checkpoint.every_minutes)
    batches = iter(stream)
    for step in range(state.step, steps):
        lr = lr_at(step, peak=peak, warmup_steps=warmup, total_steps=steps,
                   min_lr_ratio=optim.min_lr_ratio)
        wd = weight_decay_at(step, start=optim.weight_decay_start, end=optim.weight_decay_end, total_steps=steps)
        engine.set_hparams(lr=lr, weight_decay=wd)
        terms: torch.Tensor | float = 0.0  # stays on the device: no sync per step
        for micro in range(accum):
            images = next(batches).model_input(env.device)
            with engine.autocast():
                out = task(images)
            engine.backward(out["loss"], last_micro_batch=micro == accum - 1)
            terms = terms + torch.stack([out[k].detach().float() for k in LOSS_TERMS]) / accum
        grad_norm = engine.step()
        state.step, state.samples_seen = step + 1, state.samples_seen + global_batch
        # Every rank, every step: a signal seen by any rank stops all of them after this same step.
        stopping, timed = flags.agree()
        stopping = stopping and state.step < steps  # a signal during the last step: the run is complete anyway
        # Validation first: the checkpoint of this step then holds the updated record, and best/ links it.
        is_best = validator is not None and validator.due(state.step, steps) and validate()
        saved = None
        if checkpointer.due(state.step, steps) or timed or stopping:
            with phase("save", enabled=env.is_main):
                saved = checkpointer.save(state, engine, stream)
            flags.saved()
        if is_best:
            checkpointer.save_best(state, engine, stream, {"metric": record.metric, "value": record.best}, saved)

        if (step + 1) % cfg.run.log_every_steps == 0 or step + 1 == steps:
            # Every rank joins the reduction; only rank 0's Metrics writes.
            skipped = float(stream.counters().get("samples_skipped", 0))
            reduced = engine.mean_over_ranks(torch.cat([terms.cpu(), torch.tensor([skipped])]))
            step_time = (time.perf_counter() - last_log_time) / (step + 1 - last_logged)
            result.losses[step] = float(reduced[0])
            metrics.log(step + 1, {
                "loss/total": float(reduced[0]), "loss/cls": float(reduced[1]), "loss/patch": float(reduced[2]),
                **({"loss/blocks": float(reduced[3])} if cfg.loss.block_weight > 0 else {}),
                "opt/lr": lr, "opt/weight_decay": wd, "opt/grad_norm": float(grad_norm),
                "perf/images_per_s": global_batch / step_time, "perf/step_time_s": step_time,
                "perf/samples_seen": state.samples_seen, "perf/memory_bytes": memory_bytes(),
                "data/samples_skipped": float(reduced[4]) * env.world_size,
            })
            last_logged, last_log_time = step + 1, time.perf_counter()
        if stopping:
            result.stopped_at = saved
            metrics.close(None)  # TensorBoard flushed; no summary line: the run is not finished
            return result
    if steps == 0 and state.step == 0:
        # Nothing to train: the checkpoint holds the pruned (and compensated) student, ready to export.
        with phase("save", enabled=env.is_main):
            checkpointer.save(state, engine, stream)
    summary = {"steps": steps, "final_loss": result.losses.get(steps - 1),
               "student_params": prune_report.model_params_after,
               "teacher_params": prune_report.model_params_before}
    if validator is not None:
        summary["validation"] = record.state_dict()  # metric, start (step 0), best, best_step
    metrics.close(summary)
    return result


def main(cfg: TrainConfig) -> int:
    """CLI entry: check the files, train, then release the engine and the process group; the exit status.

    SIGINT / SIGTERM stop the run after the step in progress, with a checkpoint (trainer/dist.py):
    rank 0 prints one line saying where, and the status is ``STOP_EXIT_CODE``.
    """
    env = read_env()
    try:
        preflight(cfg, env.world_size)  # before any model is built; the same verdict on every rank
    except (ValueError, FileNotFoundError):
        if not env.is_main:
            return 2  # rank 0 reports it: one line, not one per rank
        raise
    with StopSignals() as stop:
        result = train(cfg, stop=stop)
        result.engine.close()
        destroy_process_group()
    if result.stopped_at is None:
        return 0
    if env.is_main:
        step = int(result.stopped_at.name.removeprefix("step-"))
        print(stopped_message(step, str(result.stopped_at), cfg.checkpoint.resume), file=sys.stderr, flush=True)
    return STOP_EXIT_CODE
