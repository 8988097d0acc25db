"""Typed training configuration: one frozen dataclass per section, validated on construction.

Every error names the dotted key (``optim.base_lr``) so a bad YAML or override fails before any
process group starts. ``from_dict`` builds the tree from plain data (YAML + overrides, see cli.py).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from pruning import Calibration
from trainer.data.config import DataConfig
from trainer.engines.names import ENGINES
from trainer.models.names import FAMILIES
from trainer.schedule import warmup_steps_for

PRECISIONS = ("fp32", "bf16")
PRUNE_METHODS = ("diversity", "l2", "random", "taylor", "activation")
"""pruning.METHODS, named here so that validating a config reads no selection code."""
LOSS_OBJECTIVES = ("mse", "mse_postnorm", "cosine", "mse_standardized")
VALIDATION_METRICS = ("cos_cls", "cos_patch", "knn_top1")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {message}")


@dataclass(frozen=True)
class RunConfig:
    """Where the run writes, how long it lasts, how often it reports."""

    dir: str = "runs/default"
    """Run directory: resolved config, TensorBoard events, checkpoints/."""
    seed: int = 0
    """Seeds model init, pruning ties and data; identical on every rank."""
    steps: int = 100
    """Optimizer steps (each = grad_accum_steps micro-batches per rank); 0: build, prune (and compensate),
    save a step-0 checkpoint to export, train nothing."""
    log_every_steps: int = 10
    """Steps between TensorBoard scalar writes and progress lines."""

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "run.steps", f"must be >= 0, got {self.steps}")
        _check(self.log_every_steps >= 1, "run.log_every_steps", f"must be >= 1, got {self.log_every_steps}")
        _check(bool(self.dir), "run.dir", "must not be empty")


@dataclass(frozen=True)
class ModelConfig:
    """The teacher: which family and architecture, with which weights."""

    family: str = "timm"
    """Adapter in trainer/models: 'open_clip' (the visual tower of a CLIP) or 'timm'."""
    name: str = "vit_tiny_patch16_224"
    """Architecture name as the family's factory knows it (open_clip config name, timm model name)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the factory (timm: img_size, depth, ...)."""
    pretrained: str | None = None
    """Local checkpoint path (.pt/.bin/.safetensors) for the teacher; None keeps random init."""

    def __post_init__(self) -> None:
        _check(self.family in FAMILIES, "model.family", f"must be one of {FAMILIES}, got {self.family!r}")
        _check(bool(self.name), "model.name", "must not be empty")


@dataclass(frozen=True)
class PruneConfig:
    """How the student is made from the teacher (pruning package)."""

    enabled: bool = True
    """False: the student is an unpruned copy of the teacher (ratio and method are ignored)."""
    ratio: float = 1.0
    """Kept MLP hidden units per block = int(ratio * block width), the paper's r."""
    method: str = "diversity"
    """Channel selection: diversity (DGMR), l2, random, taylor (needs in_engine) or activation (DGMR on calibration
    activations: needs compensate, or a student_init made with it by ``python -m pruning prune``)."""
    in_engine: bool = False
    """True (engine fsdp or deepspeed): teacher and student are built sharded from the start, the teacher
    loaded shard by shard from model.pretrained, and each block's MLP is gathered, selected and shrunk
    inside the engine (docs/inengine_pruning.md). False: every rank builds and prunes full copies on the
    host before the engine shards them."""
    taylor_batches: int = 4
    """method=taylor: batches of the training stream whose |activation x gradient| rank the hidden units."""
    student_init: str = ""
    """The student's starting weights (strict), e.g. a compensated student made with the same ratio: the
    output directory of ``python -m pruning prune`` (or any of its .safetensors, whole CLIP or tower), or a
    .safetensors state dict of the student tower; empty: the student keeps the teacher's surviving weights.
    Checked against the teacher and ``prune.ratio`` before any model is built."""
    compensate: bool = False
    """in_engine only: compensate every pruned block in closed form (``pruning.Calibration``,
    docs/compensation.md) on the first ``calib_batches`` batches of the training stream, block by block on
    whole blocks gathered from the shards, each rank carrying its own batches, fit statistics all-reduced.
    The host path takes a compensated student through student_init instead."""
    calib_batches: int = 8
    """compensate: batches of the training stream (per rank) used for calibration."""
    ridge: float = Calibration.ridge
    """compensate: ridge lambda relative to the mean variance of the fit's inputs (0: plain least squares)."""
    calib_holdout: float = Calibration.holdout_fraction
    """compensate: fraction of each block's calibration tokens, spread evenly, held out of the fit for the
    reported errors."""
    balance_prefix: bool = Calibration.balance_prefix
    """compensate: class / register tokens weigh as much as an image's patch tokens."""
    budget: float | None = None
    """in_engine with compensate: per-block widths with the parameters of ratio ``budget`` (replaces prune.ratio),
    planned from each block's measured error on the calibration batches (``pruning.plan_widths``, the prune
    CLI's ``--budget``); the plan is stored in prune.widths of the run's saved config."""
    budget_grid: int = 64
    """budget: every width a multiple of this."""
    widths: list[int] | None = None
    """Kept hidden units per block, in block order (instead of prune.ratio and of the widths a prune.student_init
    directory records); set by prune.budget's plan, or by hand for a student_init file of per-block widths."""

    def calibration(self) -> Calibration | None:
        """The compensation settings, None without ``compensate``."""
        if not self.compensate:
            return None
        return Calibration(ridge=self.ridge, holdout_fraction=self.calib_holdout, balance_prefix=self.balance_prefix)

    def __post_init__(self) -> None:
        _check(self.ratio > 0, "prune.ratio", f"must be > 0, got {self.ratio}")
        _check(self.taylor_batches >= 1, "prune.taylor_batches", f"must be >= 1, got {self.taylor_batches}")
        _check(self.method != "taylor" or self.in_engine, "prune.method",
               "taylor needs training batches: set prune.in_engine=true (engine fsdp or deepspeed)")
        _check(not self.student_init.endswith((".pt", ".pth", ".bin")), "prune.student_init",
               f"must be a .safetensors file or a prune output directory, got {self.student_init!r}")
        _check(not (self.in_engine and self.student_init), "prune.student_init",
               "cannot be combined with prune.in_engine=true")
        _check(self.method in PRUNE_METHODS, "prune.method",
               f"must be one of {PRUNE_METHODS}, got {self.method!r}")
        _check(self.method != "activation" or self.compensate or self.student_init, "prune.method",
               "activation ranks units on calibration activations: set prune.compensate=true (in_engine), or "
               "start from a student made with it (prune.student_init)")
        _check(self.method != "activation" or self.budget is None, "prune.method",
               "activation cannot plan prune.budget's widths (the plan ranks units by a weight order)")
        _check(self.calib_batches >= 1, "prune.calib_batches", f"must be >= 1, got {self.calib_batches}")
        try:
            Calibration(ridge=self.ridge, holdout_fraction=self.calib_holdout, balance_prefix=self.balance_prefix)
        except ValueError as err:
            raise ValueError(f"prune.ridge / calib_holdout / balance_prefix: {err}") from None
        _check(not self.compensate or self.in_engine, "prune.compensate",
               "needs prune.in_engine=true (on the host path load a compensated student with prune.student_init)")
        _check(self.budget is None or (self.in_engine and self.compensate), "prune.budget",
               "needs prune.in_engine=true and prune.compensate=true (on the host path: python -m pruning prune "
               "--budget R, then prune.student_init)")
        _check(self.budget is None or self.budget > 0, "prune.budget", f"must be > 0, got {self.budget}")
        _check(self.budget is None or self.method != "taylor", "prune.budget",
               "plans with diversity, l2 or random selection, not taylor")
        _check(self.budget_grid >= 1, "prune.budget_grid", f"must be >= 1, got {self.budget_grid}")
        _check(self.widths is None or (self.widths and all(w >= 1 for w in self.widths)), "prune.widths",
               f"must be a list of positive widths, one per block, got {self.widths}")


@dataclass(frozen=True)
class LossConfig:
    """Feature distillation loss per term (class/pooled token, patch tokens); see trainer/losses.py."""

    cls_weight: float = 1.0
    """Weight of the class (or pooled) token term."""
    patch_weight: float = 1.0
    """Weight of the patch token term."""
    cls_objective: str = "mse"
    """Objective of the class term: one of LOSS_OBJECTIVES ('mse' = MSE before the final norm, the paper's)."""
    patch_objective: str = "mse"
    """Objective of the patch term: one of LOSS_OBJECTIVES."""
    block_weight: float = 0.0
    """Weight of the hidden-state term (intermediate-block distillation): the tokens leaving each of ``blocks``
    matched to the teacher's same block by relative MSE, mean (s - t)^2 / mean t^2, averaged over the blocks;
    0: off (trainer/losses.py ``hidden_term``)."""
    blocks: tuple[int, ...] = ()
    """Block indices (0-based; negative count from the end) whose outputs the hidden-state term matches."""

    def __post_init__(self) -> None:
        _check(self.cls_weight >= 0, "loss.cls_weight", f"must be >= 0, got {self.cls_weight}")
        _check(self.block_weight >= 0, "loss.block_weight", f"must be >= 0, got {self.block_weight}")
        _check(bool(self.blocks) == (self.block_weight > 0), "loss.blocks",
               f"the hidden-state term needs both loss.blocks and loss.block_weight > 0, got blocks {list(self.blocks)} "
               f"and block_weight {self.block_weight}")
        _check(self.patch_weight >= 0, "loss.patch_weight", f"must be >= 0, got {self.patch_weight}")
        _check(self.cls_weight + self.patch_weight > 0, "loss.cls_weight",
               "cls_weight and patch_weight are both 0: nothing to train")
        for name in ("cls_objective", "patch_objective"):
            value = getattr(self, name)
            _check(value in LOSS_OBJECTIVES, f"loss.{name}", f"must be one of {LOSS_OBJECTIVES}, got {value!r}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, batch sizes and the lr / weight-decay schedules."""

    base_lr: float = 6e-5
    """Learning rate per 256 images; peak lr = base_lr * global_batch / 256."""
    batch_size_per_rank: int = 8
    """Images per rank per micro-batch."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; global batch = batch_size_per_rank * world * this."""
    warmup_steps: int | None = None
    """Linear lr warmup from 0 to the peak over this many steps, then cosine to min_lr_ratio * peak. None (not
    given, and no warmup_fraction): no warm-up, or 20 % of the run for a compensated start (prune.student_init or
    prune.compensate; ``TrainConfig.warmup_steps``). 0: none, whatever the start."""
    warmup_fraction: float | None = None
    """The warm-up as a share of run.steps (rounded, at least one step), instead of warmup_steps."""
    min_lr_ratio: float = 0.0
    """Final lr of the cosine as a fraction of the peak."""
    weight_decay_start: float = 0.04
    """Weight decay at step 0; follows a cosine to weight_decay_end (bias and norm params get none)."""
    weight_decay_end: float = 0.2
    """Weight decay at the last step."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max global grad L2 norm; 0 disables clipping (the norm is still logged)."""

    def __post_init__(self) -> None:
        _check(self.base_lr > 0, "optim.base_lr", f"must be > 0, got {self.base_lr}")
        _check(self.batch_size_per_rank >= 1, "optim.batch_size_per_rank", f"must be >= 1, got {self.batch_size_per_rank}")
        _check(self.grad_accum_steps >= 1, "optim.grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "optim.warmup_steps",
               f"must be >= 0, got {self.warmup_steps}")
        _check(self.warmup_fraction is None or 0 <= self.warmup_fraction < 1, "optim.warmup_fraction",
               f"must be in [0, 1), got {self.warmup_fraction}")
        _check(self.warmup_fraction is None or self.warmup_steps is None, "optim.warmup_fraction",
               f"set either optim.warmup_steps ({self.warmup_steps}) or optim.warmup_fraction, not both")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.weight_decay_start >= 0, "optim.weight_decay_start", f"must be >= 0, got {self.weight_decay_start}")
        _check(self.weight_decay_end >= 0, "optim.weight_decay_end", f"must be >= 0, got {self.weight_decay_end}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               f"must be two numbers in [0, 1), got {self.betas}")
        _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True)
class EngineConfig:
    """Which distributed engine runs the step, and its precision and memory settings."""

    name: str = "single"
    """'single' (one process, plain torch: debugging and reference), 'fsdp' (FSDP2) or 'deepspeed'."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage for the student (2 or 3); the teacher is always stage-3 sharded."""
    precision: str = "fp32"
    """'fp32' or 'bf16' (autocast for single, MixedPrecisionPolicy for fsdp, bf16 mode for deepspeed)."""
    activation_checkpointing: bool = False
    """Recompute each student transformer block in backward instead of storing its activations."""
    dist_timeout_s: int = 1800
    """Process-group timeout for collectives."""

    def __post_init__(self) -> None:
        _check(self.name in ENGINES, "engine.name", f"must be one of {ENGINES}, got {self.name!r}")
        _check(self.zero_stage in (2, 3), "engine.zero_stage", f"must be 2 or 3, got {self.zero_stage}")
        _check(self.precision in PRECISIONS, "engine.precision",
               f"must be one of {PRECISIONS}, got {self.precision!r}")
        _check(self.dist_timeout_s > 0, "engine.dist_timeout_s", f"must be > 0, got {self.dist_timeout_s}")


@dataclass(frozen=True)
class CheckpointConfig:
    """Sharded checkpoints under ``<run.dir>/checkpoints`` and where a run starts from (see docs/checkpoints.md)."""

    every_steps: int = 1000
    """Optimizer steps between checkpoints; one is always written after the last step."""
    every_minutes: float = 30.0
    """Also checkpoint when this much wall time has passed since the last checkpoint (rank 0's clock
    decides for all ranks); 0 disables. A stop signal (SIGINT / SIGTERM) always checkpoints."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted after each successful save."""
    resume: str = "auto"
    """'auto': newest complete checkpoint in the run directory (falling back past broken ones with a
    warning), or a fresh start if there is none; 'none': always start fresh; else a checkpoint directory
    (``<run.dir>/checkpoints/step-NNNNNNNN``), which must be complete and match model and prune."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "checkpoint.every_steps", f"must be >= 1, got {self.every_steps}")
        _check(self.every_minutes >= 0, "checkpoint.every_minutes", f"must be >= 0, got {self.every_minutes}")
        _check(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")
        _check(bool(self.resume), "checkpoint.resume", "must be 'auto', 'none' or a checkpoint path")


@dataclass(frozen=True)
class ValidationConfig:
    """Held-out fidelity of the student during training (trainer/validate.py); off while ``shards`` is empty."""

    shards: str = ""
    """Held-out webdataset shards, same syntax as ``data.shards`` (brace pattern, ``::``, ``.txt`` list); empty: off."""
    every_steps: int = 500
    """Optimizer steps between validations; one also runs at step 0 (before training) and after the last step."""
    num_images: int = 1024
    """The first this many samples of ``shards`` (in listed order), split over ranks; decoded once, kept in memory."""
    batch_size: int = 32
    """Images per rank per validation forward."""
    best_metric: str = "cos_patch"
    """Held-out value whose maximum selects ``checkpoints/best``: cos_cls, cos_patch or knn_top1."""
    knn_train_shards: str = ""
    """Labelled shards (json 'label' or a .cls file) whose student features are the kNN memory; empty: no kNN."""
    knn_eval_shards: str = ""
    """Labelled shards classified by kNN against ``knn_train_shards``; required with it."""
    knn_max_images: int = 10000
    """At most this many samples read from each kNN shard list."""
    knn_k: int = 20
    """Neighbours voting in the kNN classifier (cosine, weighted as DINO)."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "validation.every_steps", f"must be >= 1, got {self.every_steps}")
        _check(self.num_images >= 1, "validation.num_images", f"must be >= 1, got {self.num_images}")
        _check(self.batch_size >= 1, "validation.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.best_metric in VALIDATION_METRICS, "validation.best_metric",
               f"must be one of {VALIDATION_METRICS}, got {self.best_metric!r}")
        _check(bool(self.knn_train_shards) == bool(self.knn_eval_shards), "validation.knn_eval_shards",
               "knn_train_shards and knn_eval_shards are given together or not at all")
        _check(self.best_metric != "knn_top1" or bool(self.knn_train_shards), "validation.best_metric",
               "knn_top1 needs validation.knn_train_shards and validation.knn_eval_shards")
        _check(not self.knn_train_shards or bool(self.shards), "validation.shards",
               "kNN runs with the held-out validation: set validation.shards too")
        _check(self.knn_max_images >= 1, "validation.knn_max_images", f"must be >= 1, got {self.knn_max_images}")
        _check(self.knn_k >= 1, "validation.knn_k", f"must be >= 1, got {self.knn_k}")

    @property
    def enabled(self) -> bool:
        return bool(self.shards)


@dataclass(frozen=True)
class TrainConfig:
    """The whole experiment; the resolved form is saved in the run directory."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    @property
    def compensated_start(self) -> bool:
        """Whether the student starts from closed-form compensated (or otherwise given) weights."""
        return self.prune.enabled and bool(self.prune.student_init or self.prune.compensate)

    def warmup_steps(self) -> int:
        """The run's linear warm-up in optimizer steps (``trainer.schedule.warmup_steps_for``): the recipe for
        compensated starts when neither optim.warmup_steps nor optim.warmup_fraction is set."""
        return warmup_steps_for(warmup_steps=self.optim.warmup_steps, warmup_fraction=self.optim.warmup_fraction,
                                total_steps=self.run.steps, compensated_start=self.compensated_start)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists) for YAML, TensorBoard text and hparams."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


REMOVED_KEYS = {"prune.calib_mode": "output-mode compensation is the only one (the others lost every measured "
                                    "row, docs/compensation.md); delete the key"}
"""Keys that older configs (and older runs' saved config.yaml) may hold, with what to do instead."""


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a validated TrainConfig; unknown keys and wrong types are ValueErrors naming the key."""
    return _build(TrainConfig, data, "")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    for key in unknown:
        if f"{prefix}{key}" in REMOVED_KEYS:
            raise ValueError(f"config key {prefix}{key} was removed: {REMOVED_KEYS[prefix + key]}")
    if unknown:
        keys = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ValueError(f"unknown config key(s): {keys} (known in {prefix or 'top level'}: {sorted(names)})")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field without default missing
        raise ValueError(f"{prefix or 'config'}: {err}") from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        last_error = None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ValueError as err:
                last_error = err
        raise last_error or ValueError(f"{key}: None is not allowed")
    if hint is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise ValueError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        item_hints = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        return tuple(_coerce(h, v, f"{key}[{i}]") for i, (h, v) in enumerate(zip(item_hints, value, strict=True)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise ValueError(f"{key}: unsupported config type {hint!r}")
