"""Held-out validation: how closely the student follows the teacher on images training never sees.

The held-out set is the first ``validation.num_images`` samples of ``validation.shards`` in listed order
(no shuffle, no augmentation: a center crop). Sample ``i`` belongs to rank ``i % world_size``, so the set
does not depend on the world size; each rank sums per-image values, the sums and counts are all-reduced
in float64 and divided once: 1 rank and N ranks give the same numbers up to the order of float additions
(and batch-size effects in the forward). Every rank runs the same number of forwards (padded with a dummy
batch) because sharded engines gather parameters inside each forward. The decoded images stay in memory
(uint8, about ``num_images / world_size * 3 * size^2`` bytes per rank), so later validations only forward.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from trainer.config import ValidationConfig
from trainer.data import InputSpec
from trainer.data.base import normalise
from trainer.data.decode import SampleDecoder, to_chw
from trainer.data.shards import check_exist, expand_shards
from trainer.data.tar_reader import Counters, tar_samples
from trainer.dist import DistEnv
from trainer.eval.knn import knn_accuracy
from trainer.losses import sum_over_ranks
from trainer.task import DistillTask

SUMMED = ("cos_cls", "cos_patch", "loss_cls", "loss_patch")
"""Per-image values of DistillTask.evaluate that are averaged over the held-out images."""


@dataclass
class HeldOut:
    """This rank's share of a held-out shard list: uint8 images and their sample positions and labels."""

    images: torch.Tensor
    """[n, 3, S, S] uint8."""
    positions: list[int]
    """Position of each image in the shard list (the order every world size agrees on)."""
    labels: list[str | None]


def label_of(sample: dict) -> str | None:
    """A sample's class: its ``.cls`` file, else the json 'label' (make_shards writes the class folder)."""
    if "cls" in sample:
        return sample["cls"].decode("utf-8").strip()
    if "json" in sample:
        meta = json.loads(sample["json"])
        if isinstance(meta, dict) and "label" in meta:
            return str(meta["label"])
    return None


def read_held_out(shards: str, spec: InputSpec, *, max_images: int, rank: int, world_size: int) -> HeldOut:
    """Decode this rank's samples among the first ``max_images`` of ``shards``; bad samples are skipped."""
    urls = expand_shards(shards)
    check_exist(urls)
    counters = Counters()
    decoder = SampleDecoder(spec, "none")
    images, positions, labels = [], [], []
    for pos, sample in enumerate(tar_samples(({"url": u} for u in urls), counters)):
        if pos >= max_images:
            break
        if pos % world_size != rank:
            continue  # another rank's sample: read (tar order) but never decoded here
        try:
            image, _, _ = decoder(sample)
        except Exception as exn:  # a bad image counts and is left out, as in training
            counters.skip_sample(exn)
            continue
        images.append(image)
        positions.append(pos)
        labels.append(label_of(sample))
    size = spec.image_size
    stacked = to_chw(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return HeldOut(stacked, positions, labels)


def _max_over_ranks(value: int) -> int:
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return value
    device = "cuda" if torch_dist.get_backend() == "nccl" else "cpu"
    buffer = torch.tensor([value], dtype=torch.int64, device=device)
    torch_dist.all_reduce(buffer, op=torch_dist.ReduceOp.MAX)
    return int(buffer.item())


def _gather(obj: object) -> list[object]:
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [obj]
    out: list[object] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


class Validator:
    """Runs the held-out set (and the optional kNN sets) through teacher and student; a collective."""

    def __init__(self, cfg: ValidationConfig, spec: InputSpec, env: DistEnv) -> None:
        self.cfg, self.spec, self.env = cfg, spec, env
        for key in ("shards", "knn_train_shards", "knn_eval_shards"):
            if getattr(cfg, key):
                try:  # fail before training, not at the first validation
                    check_exist(expand_shards(getattr(cfg, key)))
                except (ValueError, FileNotFoundError) as err:
                    raise type(err)(f"validation.{key}: {err}") from None
        self._sets: dict[str, HeldOut] = {}

    def due(self, step: int, total_steps: int) -> bool:
        """Validate at step 0, every ``every_steps`` and after the last step."""
        return step % self.cfg.every_steps == 0 or step == total_steps

    def _held_out(self, key: str, max_images: int) -> HeldOut:
        if key not in self._sets:
            self._sets[key] = read_held_out(getattr(self.cfg, key), self.spec, max_images=max_images,
                                            rank=self.env.rank, world_size=self.env.world_size)
        return self._sets[key]

    def _evaluate(self, task: DistillTask, held: HeldOut,
                  autocast: Callable[[], AbstractContextManager]) -> Iterator[dict[str, torch.Tensor]]:
        """task.evaluate per batch of this rank's images; extra dummy forwards keep the ranks in step."""
        size, batch = self.spec.image_size, self.cfg.batch_size
        steps = _max_over_ranks(math.ceil(len(held.images) / batch))
        for i in range(steps):
            chunk = held.images[i * batch:(i + 1) * batch]
            real = len(chunk) > 0
            if not real:
                chunk = torch.zeros(1, 3, size, size, dtype=torch.uint8)
            with autocast():
                out = task.evaluate(normalise(chunk.to(self.env.device), self.spec))
            if real:
                yield out

    def run(self, task: DistillTask, student: nn.Module | None = None,
            autocast: Callable[[], AbstractContextManager] | None = None) -> dict[str, float]:
        """Metrics on the held-out set, identical on every rank: cos_cls, cos_patch (after the final norm),
        loss, loss_cls, loss_patch (the configured objectives), images; knn_top1(_teacher) with kNN sets.

        ``student`` (the raw module) is put in eval mode meanwhile; ``autocast`` wraps the forwards.
        """
        autocast = autocast or contextlib.nullcontext
        was_training = student.training if student is not None else False
        if student is not None:
            student.eval()
        try:
            out = self._fidelity(task, autocast)
            if self.cfg.knn_train_shards:
                out.update(self._knn(task, autocast))
        finally:
            if student is not None:
                student.train(was_training)
        return out

    def _fidelity(self, task: DistillTask, autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
        sums = torch.zeros(len(SUMMED) + 1, dtype=torch.float64)
        for out in self._evaluate(task, self._held_out("shards", self.cfg.num_images), autocast):
            sums += torch.stack([out[k].sum().cpu() for k in SUMMED] + [torch.tensor(float(len(out["cos_cls"])))])
        total = sum_over_ranks(sums.to(self.env.device)).cpu()
        images = float(total[-1])
        if images == 0:
            raise ValueError(f"validation.shards: no decodable image in {self.cfg.shards}")
        values = {k: float(total[i]) / images for i, k in enumerate(SUMMED)}
        values["loss"] = task.cfg.cls_weight * values["loss_cls"] + task.cfg.patch_weight * values["loss_patch"]
        values["images"] = images
        return values

    def _features(self, task: DistillTask, key: str,
                  autocast: Callable[[], AbstractContextManager]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(student, teacher) normed pooled features of a kNN set on every rank, in position order, with labels."""
        held = self._held_out(key, self.cfg.knn_max_images)
        student, teacher = [], []
        for out in self._evaluate(task, held, autocast):
            student += list(out["features"].float().cpu())
            teacher += list(out["teacher_features"].float().cpu())
        rows = []
        for part in _gather(list(zip(held.positions, held.labels, student, teacher, strict=True))):
            rows += part  # type: ignore[operator]
        # Checked on the gathered rows, so every rank raises alike instead of one leaving the others waiting.
        if not rows:
            raise ValueError(f"validation.{key}: no decodable image")
        unlabelled = [r[0] for r in rows if r[1] is None]
        if unlabelled:
            raise ValueError(f"validation.{key}: sample {min(unlabelled)} has no label (.cls file or json 'label')")
        rows.sort(key=lambda r: r[0])
        return torch.stack([r[2] for r in rows]), torch.stack([r[3] for r in rows]), [r[1] for r in rows]

    def _knn(self, task: DistillTask, autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
        train_s, train_t, train_labels = self._features(task, "knn_train_shards", autocast)
        eval_s, eval_t, eval_labels = self._features(task, "knn_eval_shards", autocast)
        if self.cfg.knn_k > len(train_labels):
            raise ValueError(f"validation.knn_k: {self.cfg.knn_k} neighbours but knn_train_shards has "
                             f"{len(train_labels)} images")
        classes = {name: i for i, name in enumerate(sorted(set(train_labels) | set(eval_labels)))}
        train_ids = torch.tensor([classes[x] for x in train_labels])
        eval_ids = torch.tensor([classes[x] for x in eval_labels])
        return {"knn_top1": knn_accuracy(train_s, train_ids, eval_s, eval_ids, k=self.cfg.knn_k),
                "knn_top1_teacher": knn_accuracy(train_t, train_ids, eval_t, eval_ids, k=self.cfg.knn_k)}


@dataclass
class FidelityRecord:
    """Step-0 and best held-out values of ``metric`` (higher is better); saved in checkpoints for resume."""

    metric: str
    start: float | None = None
    best: float | None = None
    best_step: int | None = None

    def update(self, step: int, value: float) -> bool:
        """Record a validation; True when it beats every earlier one (the first always does)."""
        if step == 0:
            self.start = value
        if self.best is None or value > self.best:
            self.best, self.best_step = value, step
            return True
        return False

    def state_dict(self) -> dict[str, object]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore, unless the saved record is of another metric (then this run starts a new record)."""
        if state.get("metric") == self.metric:
            for key, value in state.items():
                setattr(self, key, value)
