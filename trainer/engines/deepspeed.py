"""DeepSpeed ZeRO-2/3 for the student and a ZeRO-3, optimizer-less engine for the teacher.

The DeepSpeed JSON is generated from our config (``ds_config``), never written by hand. The
optimizer is torch AdamW passed as a client optimizer (DeepSpeedCPUAdam JIT-builds for ~70 s
on CPU). Gradient accumulation is DeepSpeed's own: ``backward`` runs engine.backward and
engine.step per micro-batch and DeepSpeed steps the optimizer at the boundary.

Checkpoints are DeepSpeed's ``save_checkpoint`` (tag ``ds``). ``load_checkpoint`` refuses another
data-parallel world size, so a resume at a new world size first converts the checkpoint once to
DeepSpeed's universal format (``deepspeed.checkpoint.ds_to_universal``, tag ``ds_universal``
beside it) and loads that with ``load_universal_checkpoint`` switched on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from torch import nn

from trainer.config import EngineConfig, OptimConfig
from trainer.dist import DistEnv, init_process_group
from trainer.engines.base import (
    FROZEN_STUDENT_FILE,
    Models,
    SkeletonModels,
    apply_hparams,
    make_adamw,
    param_groups,
)
from trainer.engines.collectives import mean_over_ranks

TAG = "ds"
UNIVERSAL_TAG = "ds_universal"
FROZEN_CHUNK_BYTES = 128 * 1024**2


def ds_config(cfg: EngineConfig, optim: OptimConfig, world_size: int, *, stage: int, train: bool,
              block_numel: int = 0) -> dict[str, Any]:
    """The DeepSpeed config dict for the student (``train``) or the frozen teacher.

    ``block_numel`` (ZeRO-3: the largest transformer block's parameter count) bounds what a rank holds
    gathered to two blocks, the one computed and the one prefetched. DeepSpeed's defaults keep up to 1e9
    gathered elements live (``stage3_max_live_parameters``) and reuse them over 1e9 elements of distance:
    in practice the whole gathered model on every rank at the end of its forward (ViT-g teacher: 2.0 GB
    in bf16), which no per-rank memory plan of a sharded model can leave room for.
    """
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3 and block_numel > 0:
        zero.update({"stage3_prefetch_bucket_size": block_numel, "stage3_max_live_parameters": 2 * block_numel,
                     # A block used again within one block's worth of gathers (the last block, forward then
                     # backward) stays gathered; everything else is released after its module.
                     "stage3_max_reuse_distance": block_numel if train else 0})
        if train:
            # The optimizer steps the fp32 partition in sub-groups of this many local elements (default 1e9:
            # all of it at once). torch AdamW's step on one flat partition holds two fp32 temporaries of its
            # size (``exp_avg_sq.sqrt() / bias_correction``) beside the fp32 copy of its gradient: 12 bytes
            # per parameter and rank (ViT-g r=1 on 2 ranks: 2.7 GiB). One block per sub-group bounds them.
            # AdamW is elementwise and the clipping norm global: the same update.
            zero["sub_group_size"] = block_numel
            # The gradient bucket is allocated whole (default 5e8 elements: a ViT-g student's every gradient,
            # 0.9 GiB per rank in bf16); two blocks of gradients per reduce-scatter.
            zero["reduce_bucket_size"] = 2 * block_numel
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": optim.batch_size_per_rank,
        "gradient_accumulation_steps": optim.grad_accum_steps if train else 1,
        "train_batch_size": optim.batch_size_per_rank * world_size * (optim.grad_accum_steps if train else 1),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if train:
        config["gradient_clipping"] = optim.grad_clip
        config["zero_allow_untested_optimizer"] = True
    return config


class DeepSpeedEngine:
    """Student: ZeRO ``engine.zero_stage`` with AdamW; teacher: ZeRO-3 partitioned parameters only."""

    def __init__(self, cfg: EngineConfig, optim: OptimConfig, env: DistEnv) -> None:
        self.cfg, self.optim_cfg, self.env = cfg, optim, env
        self.checkpoint_format = "deepspeed"
        init_process_group(env, cfg.dist_timeout_s)
        # DeepSpeed wraps the torch process group created above instead of making its own.
        deepspeed.init_distributed(dist_backend="nccl" if env.device.type == "cuda" else "gloo")
        deepspeed.utils.logger.setLevel(logging.WARNING)
        # DeepSpeed's comm layer calls deprecated torch collectives on every step.
        warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed",
                                category=FutureWarning)

    def setup(self, models: Models) -> None:
        if self.cfg.activation_checkpointing:
            models.enable_activation_checkpointing(models.student)
        self._init_teacher(models.teacher, _largest_block(models.blocks(models.teacher)))
        self._student_module = models.student
        self._student_block_numel = _largest_block(models.blocks(models.student))
        self.build_optimizer()

    def _init_teacher(self, teacher: nn.Module, block_numel: int) -> None:
        # A second engine without optimizer only partitions the teacher and gathers it per module.
        self.teacher_engine, _, _, _ = deepspeed.initialize(
            model=teacher, config=ds_config(self.cfg, self.optim_cfg, self.env.world_size, stage=3, train=False,
                                            block_numel=block_numel))
        self.teacher_engine.eval()
        self.dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32

    def freeze_student(self) -> None:
        """The run trains nothing (``run.steps=0``): ``build_optimizer`` builds no student engine and ``save``
        writes the student's weights alone (format ``safetensors``), which ``trainer export`` reads.

        deepspeed.initialize with an optimizer builds ZeRO's fp32 partition and both AdamW moments at once
        (it steps once on zeroed gradients): 18 bytes per student parameter and rank, 10.4 GiB per rank for
        an EVA-CLIP-E r=1 student on 2 ranks, never read by a run that does not train.
        """
        self.frozen = True
        self.checkpoint_format = "safetensors"

    def build_optimizer(self) -> None:
        """AdamW and the student's DeepSpeed engine, on the (possibly just pruned) student."""
        if getattr(self, "frozen", False):
            self.student_engine, self.optimizer, self.group_flags = None, None, []
            return
        student = self._student_module
        optimizer = make_adamw(param_groups(student, 0.0), self.optim_cfg)
        self.student_engine, self.optimizer, _, _ = deepspeed.initialize(
            model=student, optimizer=optimizer,
            config=ds_config(self.cfg, self.optim_cfg, self.env.world_size, stage=self.cfg.zero_stage, train=True,
                             block_numel=self._student_block_numel))
        # Our per-group flags ("decays"), restored after a load: see restore_group_flags.
        self.group_flags = [{"decays": g["decays"]} for g in self.optimizer.param_groups]

    # Sharded from skeletons (prune.in_engine). Both models are built as skeletons (parameters on meta)
    # and partitioned module by module: each module's own parameters are allocated and handed at once to
    # ``zero.Init(module=...)``, so no rank ever holds more than one module's parameters whole. (Building
    # inside the zero.Init context instead fails on 0-dim parameters such as a CLIP's logit_scale, and
    # constructs the text tower for nothing.) Each rank then writes its own flat partitions
    # (``ds_tensor``) from the checkpoint's rows. A ZeRO-2 student is never partitioned: it is allocated
    # whole at its pruned widths and filled (it is the small model).

    def _partition(self, model: nn.Module) -> None:
        config = ds_config(self.cfg, self.optim_cfg, self.env.world_size, stage=3, train=False)
        if self.cfg.precision == "bf16":
            # deepspeed.initialize casts only unpartitioned modules (module.bfloat16()): cast the skeleton
            # (meta parameters, real buffers) first, as that cast would have.
            model.to(torch.bfloat16)
        # Reversed pre-order visits every module after all of its descendants, which zero.Init(module=...)
        # needs: it converts the whole subtree, so nothing below may still be on meta.
        for module in reversed(list(model.modules())):
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.is_meta]
            for name, param in own:
                if param.dim() == 0:
                    raise ValueError(f"model.name: 0-dim parameter {name!r} cannot be partitioned by ZeRO-3")
                setattr(module, name, nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=self.env.device),
                                                   requires_grad=param.requires_grad))
            if own:
                deepspeed.zero.Init(module=module, config_dict_or_path=config)

    def setup_sharded(self, models: SkeletonModels) -> None:
        partitioned = self.cfg.zero_stage == 3
        teacher, student = models.teacher, models.student
        self._partition(teacher)
        if partitioned:
            self._partition(student)
        else:
            buffers = dict(student.named_buffers())
            student.to_empty(device=self.env.device)
            with torch.no_grad():
                for name, b in student.named_buffers():
                    b.copy_(buffers[name])
        if self.cfg.activation_checkpointing:
            models.enable_activation_checkpointing(student)
        with torch.no_grad():
            for name, param in teacher.named_parameters():
                self._write_partition(param, lambda start, stop, n=name: models.teacher_rows(n, start, stop))
            teacher_params = dict(teacher.named_parameters())
            for name, param in student.named_parameters():
                if name not in models.shared:
                    continue
                if partitioned:
                    param.ds_tensor.copy_(teacher_params[name].ds_tensor)
                else:
                    param.copy_(models.teacher_rows(name, 0, 2**62))
        self._init_teacher(teacher, _largest_block(models.blocks(teacher)))
        self._student_module = student
        self._student_block_numel = _largest_block(models.blocks(student))

    def _write_partition(self, param: torch.Tensor, rows: Callable[[int, int], torch.Tensor]) -> None:
        """Fill this rank's flat ZeRO-3 partition of ``param`` from ``rows(start, stop)`` of the full tensor."""
        local = param.ds_tensor
        size, numel = local.numel(), param.ds_numel
        begin, end = min(self.env.rank * size, numel), min((self.env.rank + 1) * size, numel)
        if end <= begin:
            return
        shape = tuple(param.ds_shape)
        row = math.prod(shape[1:]) if shape else 1
        first, last = begin // row, -(-end // row)
        flat = rows(first, last).reshape(-1)[begin - first * row:end - first * row]
        local[:end - begin].copy_(flat)

    @contextlib.contextmanager
    def gather_teacher_module(self, path: str) -> Iterator[dict[str, torch.Tensor]]:
        module = self.teacher_engine.module.get_submodule(path)
        params = dict(module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            yield {**{n: p.data for n, p in params.items()}, **dict(module.named_buffers())}

    def write_student_tensors(self, path: str, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self._student_module.get_submodule(path).named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                param = params[name]
                if self.cfg.zero_stage == 3:
                    self._write_partition(param, lambda start, stop, t=value: t[start:stop])
                else:
                    param.copy_(value)

    def shard_numel(self) -> tuple[int, int]:
        teacher = sum(p.ds_tensor.numel() for p in self.teacher_engine.module.parameters())
        student = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                      for p in self._student_module.parameters())
        return teacher, student

    def teacher_module(self) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        module = self.teacher_engine.module
        # The module itself, not the engine: an optimizer-less engine refuses tensor.backward() on its outputs,
        # while ZeRO-3's gather hooks live on the modules and serve forward and backward alike.
        return module, lambda images: module(images.to(self.env.device, self.dtype))

    def student(self, images: torch.Tensor) -> object:
        return self.student_engine(images.to(self.env.device, self.dtype, non_blocking=True))

    def teacher(self, images: torch.Tensor) -> object:
        return self.teacher_engine(images.to(self.env.device, self.dtype, non_blocking=True))

    def autocast(self) -> AbstractContextManager:
        # DeepSpeed's bf16 mode holds bf16 parameters itself.
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        self.student_engine.backward(loss)
        self.student_engine.step()

    def step(self) -> float:
        norm = self.student_engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def set_hparams(self, *, lr: float, weight_decay: float) -> None:
        apply_hparams(self.optimizer, lr=lr, weight_decay=weight_decay)

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return mean_over_ranks(values, self.env)

    def teacher_local_numel(self) -> int:
        return sum(p.ds_tensor.numel() for p in self.teacher_engine.module.parameters())

    def gather_teacher_state(self) -> dict[str, torch.Tensor]:
        """Full teacher parameters on every rank (a collective; tests and export)."""
        params = dict(self.teacher_engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {name: p.detach().cpu().clone() for name, p in params.items()}

    def gather_student_state(self) -> dict[str, torch.Tensor]:
        module = self.student_engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {k: v.detach().cpu().float().clone() for k, v in module.state_dict().items()}

    def save(self, path: Path) -> None:
        if getattr(self, "frozen", False):
            self._save_frozen_student(path)
            return
        # Step, data and RNG live in the trainer's part of the checkpoint; the only client state is the
        # version record that ds_to_universal requires to convert this checkpoint later.
        info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.student_engine.save_checkpoint(str(path), tag=TAG, client_state=info, save_latest=False)

    def load(self, path: Path, *, saved_world_size: int) -> None:
        tag = TAG
        if not (path / TAG).is_dir():
            raise ValueError(f"{path}: no DeepSpeed checkpoint (missing {path / TAG})")
        if saved_world_size != self.env.world_size:
            if self.env.is_main:
                convert_to_universal(path / TAG, path / UNIVERSAL_TAG)
            torch.distributed.barrier()
            # The switch is read from the engine's config at load time and has no per-call argument.
            self.student_engine._config.load_universal_checkpoint = True
            tag = UNIVERSAL_TAG
        try:
            loaded, _ = self.student_engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                                            load_lr_scheduler_states=False)
        finally:
            self.student_engine._config.load_universal_checkpoint = False
        if loaded is None:
            raise ValueError(f"{path / tag}: DeepSpeed could not load this checkpoint")
        restore_group_flags(self.optimizer, self.group_flags)

    def _save_frozen_student(self, path: Path) -> None:
        """Rank 0 writes the student in fp32, each parameter gathered from its ZeRO-3 partitions (a collective
        per parameter), in safetensors files of at most ``FROZEN_CHUNK_BYTES``: no rank holds more than one
        chunk beyond its shards."""
        from safetensors.torch import save_file

        module = self._student_module
        params = dict(module.named_parameters())
        buffers = {n: b for n, b in module.state_dict(keep_vars=True).items() if n not in params}
        if self.env.is_main:
            path.mkdir(parents=True, exist_ok=True)
        chunk: dict[str, torch.Tensor] = {}
        files = 0

        def flush() -> None:
            nonlocal files
            if chunk:
                save_file(chunk, path / FROZEN_STUDENT_FILE.format(files), metadata={"format": "pt"})
                files += 1
                chunk.clear()

        for name, param in params.items():
            gathered = deepspeed.zero.GatheredParameters([param]) if hasattr(param, "ds_tensor") \
                else contextlib.nullcontext()
            with gathered:
                if self.env.is_main:
                    chunk[name] = param.data.detach().float().cpu().clone()
            if self.env.is_main and sum(t.numel() * t.element_size() for t in chunk.values()) >= FROZEN_CHUNK_BYTES:
                flush()
        if self.env.is_main:
            chunk.update({n: b.detach().cpu().clone() for n, b in buffers.items()})
            flush()

    def close(self) -> None:
        if self.student_engine is not None:
            self.student_engine.destroy()
        self.teacher_engine.destroy()


def _largest_block(blocks: list[nn.Module]) -> int:
    """Parameter count of the largest block, whole (a partitioned parameter's ``ds_numel``)."""
    return max((sum(getattr(p, "ds_numel", p.numel()) for p in b.parameters()) for b in blocks), default=0)


def restore_group_flags(optimizer: torch.optim.Optimizer, flags: list[dict[str, Any]]) -> None:
    """Repair what DeepSpeed's universal-checkpoint load (ZeRO-3) leaves wrong in the optimizer.

    It gives every param group the first group's settings (biases and norms would start to decay), and one
    shared ``step`` tensor to every group's state, which AdamW then increments once per group per step
    (wrong bias correction). Measured before the repair: 7e-4 relative loss drift one step after 2 -> 1 ranks.
    """
    if len(optimizer.param_groups) != len(flags):
        raise ValueError(f"optimizer has {len(optimizer.param_groups)} param groups after load, expected {len(flags)}")
    for group, own in zip(optimizer.param_groups, flags, strict=True):
        group.update(own)
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch AdamW inside DeepSpeed's ZeRO wrapper
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def read_fp32_student(path: Path, *, lazy: bool = False) -> dict[str, Any]:
    """Consolidated fp32 student weights of a ``save`` output (DeepSpeed's zero_to_fp32), no process group.

    ``lazy``: zero_to_fp32's lazy mode, values that gather one tensor on ``.contiguous()`` (export reads
    one block at a time with it).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (path / TAG).is_dir():
        raise ValueError(f"{path}: no DeepSpeed checkpoint (missing {path / TAG})")
    return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG, lazy_mode=lazy)


def convert_to_universal(source: Path, target: Path) -> None:
    """Run DeepSpeed's ds_to_universal once; written under a temporary name so a kill leaves no half copy."""
    if target.is_dir():
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise ValueError(f"{source}: conversion to a universal checkpoint failed:\n{done.stderr[-3000:]}")
    tmp.rename(target)
