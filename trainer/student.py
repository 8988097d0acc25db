"""The student: one architecture builder for every path, and the in-engine source of the one prune pipeline.

- ``student_architecture``: the teacher's architecture with every MLP at its pruned width, built real,
  on meta (export, planning) or as a skeleton (parameters on meta, real buffers: sharded builds).
- Host path (``prune.in_engine=false``, ``build_models``): every rank builds the teacher and prunes a copy
  with ``pruning.prune_blocks(ModelSource(...))``.
- In-engine path (``InEngineBuild`` + ``prune_in_engine``): the engine shards both skeletons, the teacher
  is filled shard by shard from ``model.pretrained`` (``TeacherWeights``), and ``pruning.prune_blocks``
  runs on ``EngineSource``: a block is gathered from the teacher's shards, block ``i`` is selected on rank
  ``i % world`` and broadcast, calibration statistics are all-reduced, and every rank writes its shards
  of the pruned student site. The engines only gather and write named tensors; they know nothing of pruning.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import resource
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn

import pruning
from trainer.config import ModelConfig, PruneConfig, TrainConfig
from trainer.engines.base import SkeletonModels
from trainer.models.base import ModelAdapter, TokenLayout, first_line
from trainer.models.meta import build_on_meta, build_skeleton
from trainer.task import freeze_teacher


def student_widths(prune: PruneConfig, sites: list[pruning.MlpSite]) -> dict[str, int]:
    """Kept hidden units per MLP site: those recorded by the prune output directory of ``prune.student_init``
    (per-block widths of ``--budget`` included), else ``prune.ratio`` of each block's width; every unit when
    pruning is off."""
    if not prune.enabled:
        return {s.path: s.hidden for s in sites}
    recorded = prune.widths if prune.widths else _recorded_widths(prune)
    if recorded is not None:
        try:
            return pruning.keep_counts(sites, num_keep=recorded)
        except ValueError as err:
            key = "prune.widths" if prune.widths else f"prune.student_init: {prune.student_init}"
            raise ValueError(f"{key}: {err}") from None
    try:
        return pruning.keep_counts(sites, prune.ratio)
    except ValueError as err:
        raise ValueError(f"prune.ratio: {err}") from None


def _recorded_widths(prune: PruneConfig) -> dict[str, int] | None:
    """The per-site widths a prune output directory records, None when ``student_init`` is not one."""
    path = Path(prune.student_init) if prune.student_init else None
    if path is None or not path.is_dir():
        return None
    from pruning.export import read_pruning_record

    try:
        return dict(read_pruning_record(path)[1]["dgmr_pruning"]["mlp_hidden"])
    except FileNotFoundError as err:
        raise ValueError(f"prune.student_init: {path} is not a prune output directory ({err})") from None


def student_architecture(model: ModelConfig, prune: PruneConfig, adapter: ModelAdapter, *, on: str) -> nn.Module:
    """The student's architecture, values unset (load them next): ``on`` = ``meta`` (shapes only), ``skeleton``
    (parameters on meta, real buffers) or ``real`` (CPU memory, the family's init values)."""
    if on == "meta":
        student = build_on_meta(model)
    elif on == "skeleton":
        student = build_skeleton(model)
    else:
        student = adapter.build(ModelConfig(family=model.family, name=model.name, kwargs=dict(model.kwargs)))
    pruning.resize_mlps(student, student_widths(prune, pruning.find_mlp_sites(student)))
    return student


def build_models(cfg: TrainConfig, adapter: ModelAdapter) -> tuple[nn.Module, nn.Module, pruning.PruneReport]:
    """Host path: (teacher, student, prune report), identical on every rank for a given run.seed."""
    torch.manual_seed(cfg.run.seed)
    teacher = adapter.build(cfg.model)
    student = copy.deepcopy(teacher)
    source = pruning.ModelSource(student)
    method = cfg.prune.method if cfg.prune.enabled else "none"
    if cfg.prune.enabled:
        # With activation (config-checked: student_init is set) the selection only sets shapes: every weight is
        # replaced by student_init's, and this path has no calibration data for activation's own choice.
        report = pruning.prune_blocks(source, student_widths(cfg.prune, source.sites),
                                      "diversity" if method == "activation" else method,
                                      generator=torch.Generator().manual_seed(cfg.run.seed))
        report.method = method
    else:
        report = pruning.PruneReport(method, [], source.params_before, source.params_before)
    if cfg.prune.student_init:
        load_student_init(student, student_init_file(cfg))
    return teacher, student, report


def student_init_file(cfg: TrainConfig) -> Path:
    """The weights file of ``prune.student_init``, checked against the run before any model is built.

    A prune output directory (``python -m pruning prune``) must record the teacher's family and name, and the
    widths ``prune.ratio`` gives; a file is checked by ``load_student_init`` when it is loaded.
    """
    path = Path(cfg.prune.student_init)
    if not path.exists():
        raise FileNotFoundError(f"prune.student_init: no such file or directory {path}")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"prune.student_init: {path} is not a .safetensors file or a prune output directory")
        return path
    from pruning.export import read_pruning_record

    try:
        _, config = read_pruning_record(path)
    except FileNotFoundError as err:
        raise ValueError(f"prune.student_init: {path} is not a prune output directory ({err})") from None
    record = config["dgmr_pruning"]
    if (record["family"], record["base_model"]) != (cfg.model.family, cfg.model.name):
        raise ValueError(f"prune.student_init: {path} was pruned from {record['family']} {record['base_model']!r}, "
                         f"the teacher (model.name) is {cfg.model.family} {cfg.model.name!r}")
    sites = pruning.find_mlp_sites(build_on_meta(cfg.model))
    want = pruning.keep_counts(sites, cfg.prune.ratio)
    budget = _budget_ratio(path)
    if budget is None and record["mlp_hidden"] != want:
        raise ValueError(f"prune.student_init: {path} has MLP widths {sorted(set(record['mlp_hidden'].values()))}, "
                         f"prune.ratio={cfg.prune.ratio} gives {sorted(set(want.values()))}")
    if budget is not None and budget != cfg.prune.ratio:
        raise ValueError(f"prune.student_init: {path} holds per-block widths at budget r={budget:g} (--budget), "
                         f"prune.ratio is {cfg.prune.ratio:g}: set prune.ratio={budget:g}")
    student_widths(cfg.prune, sites)  # the recorded widths fit this architecture
    files = [path / f for f in ("open_clip_visual.safetensors", "open_clip_model.safetensors", "model.safetensors")]
    found = next((f for f in files if f.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"prune.student_init: {path} holds no weights file ({', '.join(f.name for f in files)})")
    return found


def _budget_ratio(path: Path) -> float | None:
    """The ``--budget`` ratio a prune output directory was made with, None for uniform widths."""
    import json

    from pruning.stream import REPORT_JSON

    report = path / REPORT_JSON
    if not report.is_file():
        return None
    budget = (json.loads(report.read_text(encoding="utf-8")).get("calibration") or {}).get("budget")
    return None if budget is None else float(budget["ratio"])


def load_student_init(student: nn.Module, path: Path) -> None:
    """Load the student's starting weights (strict): a state dict of the pruned tower, or of a whole CLIP (the
    prune tool's ``open_clip_model.safetensors``), whose image tower is taken from its ``visual.`` keys."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"prune.student_init: no such file {path}")
    state = load_file(path)
    if any(k.startswith("visual.") for k in state) and not any(k.startswith("visual.") for k in student.state_dict()):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    try:
        student.load_state_dict(state, strict=True)
    except (RuntimeError, OSError) as err:
        raise ValueError(f"prune.student_init: {path} does not fit the pruned student: {first_line(err)}") from None


class TeacherWeights:
    """The teacher's weights by parameter name, read as row ranges: each rank reads only its own shard.

    ``model.pretrained`` is read through the streaming prune's reader (``pruning.stream.open_checkpoint``:
    ``.safetensors`` with plain reads of just the rows asked for, ``.pt``/``.bin`` through an mmap
    ``torch.load``). A whole CLIP checkpoint keeps the tower under ``visual.``. Without a file, every rank
    builds the seeded init model once (as the host path does): tests only.
    """

    def __init__(self, cfg: ModelConfig, adapter: ModelAdapter, seed: int) -> None:
        from pruning.stream import open_checkpoint

        self.cfg, self.adapter, self.seed = cfg, adapter, seed
        if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
            raise FileNotFoundError(f"model.pretrained: no such file {cfg.pretrained}")
        self._reader = None if cfg.pretrained is None else open_checkpoint(cfg.pretrained)
        self._keys: set[str] | None = None
        self._prefix = ""

    def _source(self) -> object:
        if self._reader is None:
            from pruning.stream import StateDictSource

            torch.manual_seed(self.seed)  # as build_models: the same init weights as the host path
            state = {k: v.detach() for k, v in self.adapter.build(self.cfg).state_dict().items()}
            self._reader = StateDictSource(state, f"<{self.cfg.name} init, seed {self.seed}>")
        return self._reader

    def _key(self, name: str) -> str:
        # The prefix is decided per file, not per tensor: a CLIP's text tower has some of the same bare names.
        if self._keys is None:
            self._keys = set(self._source().keys())
            clip = self.cfg.family == "open_clip" and any(k.startswith("visual.") for k in self._keys)
            self._prefix = "visual." if clip else ""
        if self._prefix + name not in self._keys:
            raise ValueError(f"model.pretrained: {self.cfg.pretrained} has no tensor {self._prefix + name!r}: "
                             "in-engine loading needs a checkpoint of exactly this architecture")
        return self._prefix + name

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 of parameter ``name`` (the whole tensor for 0-dim ones)."""
        return self._source().rows(self._key(name), start, stop)

    def full(self, name: str) -> torch.Tensor:
        """The whole tensor."""
        return self._source().get(self._key(name))


class InEngineBuild:
    """Teacher and pruned-width student skeletons for an engine to shard and fill (``skeletons``)."""

    def __init__(self, model: ModelConfig, prune: PruneConfig, adapter: ModelAdapter, seed: int,
                 plan: pruning.WidthPlan | None = None) -> None:
        """``plan``: prune.budget's widths and selection orders (``plan_student_widths``); ``prune.widths`` must
        hold its widths."""
        self.model_cfg, self.prune, self.adapter, self.seed, self.plan = model, prune, adapter, seed, plan
        self.weights = TeacherWeights(model, adapter, seed)
        self.teacher = build_skeleton(model)
        self.student = student_architecture(model, prune, adapter, on="skeleton")
        self.sites = pruning.find_mlp_sites(self.teacher)
        self.widths = student_widths(prune, self.sites)
        # Counted with the heads, as the host path and the streaming prune report them.
        self.params_before, self.params_after = count_params(self.teacher), count_params(self.student)
        freeze_teacher(self.teacher)
        self.teacher_layout: TokenLayout = adapter.strip_head(self.teacher)
        self.student_layout: TokenLayout = adapter.strip_head(self.student)
        for layout in (self.teacher_layout, self.student_layout):
            self._load_removed(layout)
        self.sharded_numel = count_params(self.teacher) + count_params(self.student)

    def skeletons(self) -> SkeletonModels:
        """What the engine shards: both models, the teacher's rows, and the student tensors equal to the teacher's."""
        pruned = {f"{s.path}.{n}" for s in self.sites for n in s.parameter_names()} if self.prune.enabled else set()
        shared = {n for n, _ in self.student.named_parameters() if n not in pruned}
        return SkeletonModels(self.teacher, self.student, self.adapter.blocks,
                              self.adapter.enable_activation_checkpointing, self.weights.rows, shared)

    def teacher_skeleton(self) -> nn.Module:
        """A fresh teacher, head stripped, parameters on meta and buffers real: each calibrated block is
        materialised from it and the values gathered from the shards."""
        teacher = build_skeleton(self.model_cfg)
        self.adapter.strip_head(teacher)
        return teacher.eval()

    def _load_removed(self, layout: TokenLayout) -> None:
        """Give the parts strip_head took out (final norm, head) the teacher's real weights, on the host: they
        leave the sharded models, and the task, validation and export use them (pruning never changes them)."""
        for path, part in list(layout.removed.items()):
            if isinstance(part, nn.Parameter) and part.is_meta:
                layout.removed[path] = nn.Parameter(self.weights.full(path).float().clone(),
                                                    requires_grad=part.requires_grad)
            elif isinstance(part, nn.Module) and any(p.is_meta for p in part.parameters()):
                buffers = dict(part.named_buffers())
                part.to_empty(device="cpu")
                with torch.no_grad():
                    for name, b in part.named_buffers():
                        b.copy_(buffers[name])
                    for name, param in part.named_parameters():
                        param.copy_(self.weights.full(f"{path}.{name}"))


def count_params(model: nn.Module) -> int:
    """Global parameter count of a model on meta, sharded by FSDP2 or partitioned by ZeRO-3 (``ds_numel``)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


@dataclass
class MemoryRecord:
    """One rank's memory during the pruning pass: elements held, and the process's RSS."""

    rank: int
    teacher_shard_numel: int
    student_shard_numel: int
    rss_start_bytes: int
    """VmRSS when the pruning pass starts (after the sharded build and the teacher load)."""
    peak_extra_numel: int = 0
    """Largest number of elements held beyond the shards at once: a gathered block plus the pruned site."""
    rss_peak_bytes: int = 0
    """VmHWM at the end of the pruning pass: the process's peak resident set so far."""
    sites_selected: list[str] = field(default_factory=list)
    """Site paths whose selection ran on this rank (round robin)."""

    @property
    def peak_local_numel(self) -> int:
        return self.teacher_shard_numel + self.student_shard_numel + self.peak_extra_numel


class RankHooks(pruning.BlockSource):
    """What differs across ranks: block ``i`` is selected on rank ``i % world`` and broadcast; fit statistics are
    all-reduced. Block 0's calibration inputs come from the stem read from ``model.pretrained`` in fp32 on the
    host, as in the offline prune (a bf16 sharded forward would round them: docs/results.md, session 4)."""

    rank: int
    world: int
    selected: list[str]
    weights: TeacherWeights

    def select(self, index: int, choose: Callable[[], torch.Tensor], count: int) -> torch.Tensor:
        owner = index % self.world
        keep = choose().cpu() if self.rank == owner else None
        if self.rank == owner:
            self.selected.append(self.sites[index].path)
        if self.world == 1:
            return keep
        buffer = keep.to(self.device) if keep is not None else torch.empty(count, dtype=torch.long, device=self.device)
        torch_dist.broadcast(buffer, src=owner)
        return buffer.cpu()

    def reduce(self, stats: pruning.ActivationStats) -> None:
        all_reduce_stats(stats, self.device)

    def stem_states(self, first_block: str, images: list[torch.Tensor]) -> list[pruning.BlockState]:
        # The stem runs on the host (its blocks stay on meta); the blocks run on ``device``.
        stem = pruning.materialize_outside(self.tower, first_block.rpartition(".")[0], self.weights.full)
        return [s.float(self.device) for s in pruning.stem_states(stem, first_block, [x.cpu() for x in images])]


class TeacherFileSource(RankHooks):
    """The teacher read block by block from ``model.pretrained`` on every rank, for planning widths before the
    student exists (prune.budget): one block in host memory at a time; nothing is written."""

    def __init__(self, model: ModelConfig, adapter: ModelAdapter, weights: TeacherWeights, device: torch.device) -> None:
        self.tower = build_skeleton(model)
        adapter.strip_head(self.tower)
        self.tower.eval()
        self.sites, self.params_before = pruning.find_mlp_sites(self.tower), count_params(self.tower)
        self.weights, self.device, self.selected = weights, device, []
        self.rank, self.world = _world()

    @contextlib.contextmanager
    def read(self, path: str) -> Iterator[dict[str, torch.Tensor]]:
        yield {n: self.weights.full(f"{path}.{n}") for n in self.tower.get_submodule(path).state_dict()}


def plan_student_widths(cfg: TrainConfig, adapter: ModelAdapter, stream: Iterable, device: torch.device
                        ) -> pruning.WidthPlan:
    """prune.budget: per-block widths and selection orders, planned on the teacher checkpoint with this rank's first
    ``prune.calib_batches`` batches (the calibration batches of ``prune_in_engine``); a collective, identical on
    every rank and equal to ``python -m pruning prune --budget`` on the same images."""
    prune = cfg.prune
    source = TeacherFileSource(cfg.model, adapter, TeacherWeights(cfg.model, adapter, cfg.run.seed), device)
    return pruning.plan_widths(source, pruning.Budget(prune.budget, grid=prune.budget_grid), prune.method,
                               calibration=prune.calibration(), calib_inputs=first_batches(stream, prune.calib_batches,
                                                                                           device),
                               generator=torch.Generator().manual_seed(cfg.run.seed))


def in_engine_build(cfg: TrainConfig, adapter: ModelAdapter, stream: Iterable | None, device: torch.device
                    ) -> tuple[TrainConfig, InEngineBuild]:
    """The run's config and skeletons for an in-engine build; with prune.budget the widths are planned first
    (``plan_student_widths``, a collective) and the returned config holds them in prune.widths, so the saved
    config (checkpoints, export, resume checks) names the student's architecture. ``stream``: the run's batches,
    or None to read the calibration batches from the configured data."""
    if cfg.prune.budget is None:
        return cfg, InEngineBuild(cfg.model, cfg.prune, adapter, cfg.run.seed)
    if stream is None:
        from trainer.data import build_stream

        rank, world = _world()
        stream = build_stream(cfg.data, adapter.input_spec(build_on_meta(cfg.model)),
                              batch_size=cfg.optim.batch_size_per_rank, rank=rank, world_size=world, seed=cfg.run.seed)
    plan = plan_student_widths(cfg, adapter, stream, device)
    cfg = dataclasses.replace(cfg, prune=dataclasses.replace(cfg.prune, widths=plan.widths))
    return cfg, InEngineBuild(cfg.model, cfg.prune, adapter, cfg.run.seed, plan)


def first_batches(stream: Iterable, count: int, device: torch.device) -> list[torch.Tensor]:
    """The first ``count`` batches of ``stream`` as model inputs, from an iterator of their own (closed after)."""
    if not count:
        return []
    iterator = iter(stream)
    batches = [next(iterator).model_input(device) for _ in range(count)]
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
    return batches


class EngineSource(RankHooks):
    """The sharded teacher as a source of ``pruning.prune_blocks``; pruned sites go to the student's shards."""

    def __init__(self, engine: object, build: InEngineBuild, device: torch.device, memory: MemoryRecord) -> None:
        self.engine, self.memory, self.device, self.weights = engine, memory, device, build.weights
        self.tower, self.sites, self.params_before = build.teacher_skeleton(), build.sites, build.params_before
        self.rank, self.world = _world()
        self.selected = memory.sites_selected
        self._held = 0

    @contextlib.contextmanager
    def read(self, path: str) -> Iterator[dict[str, torch.Tensor]]:
        with self.engine.gather_teacher_module(path) as tensors:
            self._held = sum(t.numel() for t in tensors.values())
            yield tensors

    def write(self, site: pruning.MlpSite, tensors: dict[str, torch.Tensor]) -> None:
        self.memory.peak_extra_numel = max(self.memory.peak_extra_numel,
                                           self._held + sum(t.numel() for t in tensors.values()))
        self.engine.write_student_tensors(site.path, tensors)

def all_reduce_stats(stats: pruning.ActivationStats, device: torch.device) -> None:
    """Make ``stats`` the statistics of every rank's tokens (a collective): one common shift (the
    token-weighted mean of the ranks' shifts), then count, sum and outer product summed."""
    if _world()[1] == 1:
        return
    shift = stats.shift if stats.shift is not None else torch.zeros(stats.size, dtype=torch.float64)
    packed = torch.cat([shift.to(device) * float(stats.count), torch.tensor([float(stats.count)], dtype=torch.float64,
                                                                             device=device)])
    torch_dist.all_reduce(packed)
    if float(packed[-1]) == 0:
        return
    stats.rebase(packed[:-1] / packed[-1])
    count = torch.tensor([float(stats.count), float(stats.rows)], dtype=torch.float64, device=device)
    for tensor in (count, stats.sum, stats.outer):
        torch_dist.all_reduce(tensor)
    stats.count = int(count[0].item()) if isinstance(stats.count, int) else float(count[0].item())
    stats.rows = int(count[1].item())


def taylor_scores(engine: object, sites: list[pruning.MlpSite], batches: Iterable[torch.Tensor],
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Taylor importance on the sharded teacher, summed over ranks: the loss is the mean squared pre-norm
    output token (the teacher alone has no task loss); the images require grad so that activations do."""
    module, forward = engine.teacher_module()

    def loss_fn(_model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return forward(images.detach().requires_grad_(True)).float().square().mean()

    scores = pruning.collect_taylor_scores(module, batches, loss_fn, sites)
    for path, total in scores.items():
        total = total.to(device)
        if _world()[1] > 1:
            torch_dist.all_reduce(total)
        scores[path] = total.cpu()
    return scores


def prune_in_engine(engine: object, build: InEngineBuild, stream: Iterable, device: torch.device
                    ) -> tuple[pruning.PruneReport, dict]:
    """Prune every student block from the sharded teacher, then build the optimizer: (report, memory summary).

    A collective. method=taylor reads the first ``prune.taylor_batches`` batches of ``stream`` and compensation
    the first ``prune.calib_batches`` (each rank its own; a separate iterator, closed afterwards).
    """
    prune = build.prune
    calibration = prune.calibration() if prune.enabled else None
    taylor = prune.taylor_batches if prune.enabled and prune.method == "taylor" else 0
    batches = first_batches(stream, max(taylor, prune.calib_batches if calibration is not None else 0), device)
    teacher_numel, student_numel = engine.shard_numel()
    rank, world = _world()
    memory = MemoryRecord(rank, teacher_numel, student_numel, _proc_status_bytes("VmRSS"))
    if prune.enabled:
        scores = taylor_scores(engine, build.sites, batches[:taylor], device) if taylor else None
        source = EngineSource(engine, build, device, memory)
        plan = build.plan
        report = pruning.prune_blocks(source, build.widths, prune.method, calibration=calibration,
                                      calib_inputs=batches[:prune.calib_batches] if calibration else (),
                                      generator=torch.Generator().manual_seed(build.seed), scores=scores,
                                      orders=None if plan is None else plan.orders)
        if plan is not None:
            report.calibration["budget"] = plan.summary
    else:
        report = pruning.PruneReport("none", [], build.params_before, build.params_after)
    memory.rss_peak_bytes = _proc_status_bytes("VmHWM")
    engine.build_optimizer()
    records: list[object] = [memory]
    if world > 1:
        records = [None] * world
        torch_dist.all_gather_object(records, memory)
    summary = {"full_teacher_numel": build.params_before, "full_student_numel": build.params_after,
               "sharded_numel": build.sharded_numel,
               "ranks": [{**vars(r), "peak_local_numel": r.peak_local_numel} for r in records]}
    return report, {"in_engine_memory": summary}


def _proc_status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _world() -> tuple[int, int]:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1
