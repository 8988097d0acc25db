"""In-engine pruning (``prune.in_engine=true``): the student is made from the sharded teacher, block by block.

Order, as the loop runs it (docs/inengine_pruning.md):

1. ``InEngineBuild`` describes both models without weights: the teacher's architecture, and the student's
   with every MLP already at its pruned width (widths follow from ``prune.ratio`` alone, so they are known
   before any selection). The engine builds them as skeletons (parameters on the meta device, real buffers),
   shards them (FSDP2 ``fully_shard`` + ``to_empty``; DeepSpeed ``zero.Init(module=...)`` module by module),
   fills the teacher's shards from ``model.pretrained`` (``TeacherWeights``: each rank reads only its rows)
   and copies every student tensor that pruning does not change shard to shard from the teacher.
2. ``prune_in_engine`` walks the MLP sites in module order. Block ``i`` belongs to rank ``i % world``: all
   ranks gather that block's MLP tensors (a collective), the owner selects the kept units with
   ``pruning.select_mlp_channels`` and broadcasts them, and every rank writes its shard of the pruned
   student block. Selection for different blocks runs on different ranks, so the slow diversity order
   costs about 1/world of the blocks per rank. With ``prune.compensate`` the fc_out inputs of the sites were
   measured on calibration batches through the sharded teacher (``calibration_stats``; in consecutive groups
   of sites whose moments fit ``prune.calib_stats_gib``, one pass over the batches per group), and each
   rank folds the fit of the removed units into its own fc_out rows (``pruning.compensate.fold_compensation``).
3. The engine builds the optimizer on the pruned student; distillation starts.

Engine-specific work (gathering, writing shards) lives in trainer/engines/; this module only calls it.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as torch_dist
from torch import nn

import pruning
from pruning import block_io
from pruning.compensate import (
    ActivationStats,
    fit_compensation_from_stats,
    fold_compensation,
    reconstruction_energies,
)
from pruning.sites import GATED_FUSED, MlpSite, find_mlp_sites, out_inputs, prefix_token_count
from pruning.skeleton import parameters_on_meta
from pruning.surgery import keep_counts
from trainer.config import ModelConfig, PruneConfig
from trainer.models.base import ModelAdapter, TokenLayout
from trainer.task import freeze_teacher

log = logging.getLogger(__name__)


class TeacherWeights:
    """The teacher's weights by parameter name, read as row ranges: each rank reads only its own shard.

    ``model.pretrained`` as ``.safetensors`` is read through ``safe_open(...).get_slice`` (only the rows
    asked for are touched); ``.pt``/``.bin`` through an mmap ``torch.load``. Keys may carry the tower
    prefix of a full CLIP checkpoint (``visual.``). Without a file, every rank builds the seeded init
    model once on its CPU (identical on every rank for a given run.seed, as the host path does): dry
    runs and tests only, the memory bound of in-engine pruning then does not hold.
    """

    def __init__(self, cfg: ModelConfig, adapter: ModelAdapter, seed: int) -> None:
        self.cfg, self.adapter, self.seed = cfg, adapter, seed
        self._tensors: dict[str, torch.Tensor] | None = None
        self._safe = None
        self._prefix: str | None = None
        if cfg.pretrained is None:
            return
        path = Path(cfg.pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained: no such file {path}")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            self._safe = safe_open(str(path), framework="pt")
            self._keys = set(self._safe.keys())
        else:
            from pruning.stream import open_checkpoint

            source = open_checkpoint(path)
            self._tensors = {k: source.get(k) for k in source.keys()}
            self._keys = set(self._tensors)

    def _key(self, name: str) -> str:
        # A whole CLIP checkpoint names the image tower's tensors 'visual.*' (its text tower has some of
        # the same bare names, positional_embedding): the prefix is decided per file, not per tensor.
        if self._prefix is None:
            clip = self.cfg.family == "open_clip" and any(k.startswith("visual.") for k in self._keys)
            self._prefix = "visual." if clip else ""
        prefix = self._prefix
        if prefix + name not in self._keys:
            raise ValueError(f"model.pretrained: {self.cfg.pretrained} has no tensor {prefix + name!r}: in-engine "
                             "loading needs a checkpoint of exactly this architecture")
        return prefix + name

    def _init_state(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            torch.manual_seed(self.seed)  # as build_models: the same init weights as the host path
            self._tensors = {k: v.detach() for k, v in self.adapter.build(self.cfg).state_dict().items()}
            self._keys = set(self._tensors)
        return self._tensors

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 of parameter ``name`` (the whole tensor for 0-dim ones)."""
        if self._safe is None:
            tensor = self._init_state()[self._key(name)]
            return tensor if tensor.dim() == 0 else tensor[start:stop]
        key = self._key(name)
        part = self._safe.get_slice(key)
        return self._safe.get_tensor(key) if len(part.get_shape()) == 0 else part[start:stop]

    def full(self, name: str) -> torch.Tensor:
        """The whole tensor (gathered-and-written paths such as DeepSpeed's ``GatheredParameters``)."""
        if self._safe is None:
            return self._init_state()[self._key(name)]
        return self._safe.get_tensor(self._key(name))


def shrink_site(model: nn.Module, site: MlpSite, keep: int) -> None:
    """Give ``site`` new layers at hidden width ``keep``, with shapes only (values come later).

    Built in the caller's context (meta tensors under ``parameters_on_meta``); the layer kinds and the
    unit order are those of ``pruning.prune_site``, so the filled layers equal its output.
    """
    mlp = site.module(model)
    rows = 2 * keep if site.layout == GATED_FUSED else keep
    for name in site.in_names:
        old = getattr(mlp, name)
        setattr(mlp, name, nn.Linear(old.in_features, rows, bias=old.bias is not None))
    old = getattr(mlp, site.out_name)
    setattr(mlp, site.out_name, nn.Linear(keep, old.out_features, bias=old.bias is not None))
    if site.norm_name is not None:
        old = getattr(mlp, site.norm_name)
        setattr(mlp, site.norm_name, nn.LayerNorm(keep, eps=old.eps, elementwise_affine=old.elementwise_affine,
                                                  bias=old.bias is not None))


def _numel(param: torch.Tensor) -> int:
    # A ZeRO-3 partitioned parameter keeps its full size in ds_numel (its .numel() is 0 outside a gather).
    return int(getattr(param, "ds_numel", param.numel()))


def count_params(model: nn.Module) -> int:
    """Global parameter count of a model on meta, sharded by FSDP2 or partitioned by ZeRO-3."""
    return sum(_numel(p) for p in model.parameters())


class InEngineBuild:
    """Teacher and pruned-width student architectures for an engine to build, shard and fill.

    ``build(context)`` constructs both inside ``context()`` (each call a fresh context), freezes the
    teacher and strips both heads; ``sites`` are the MLP sites of the stripped tower (same paths in
    teacher and student), ``counts`` the kept width per site.
    """

    def __init__(self, model: ModelConfig, prune: PruneConfig, adapter: ModelAdapter, seed: int) -> None:
        self.model_cfg, self.prune, self.adapter, self.seed = model, prune, adapter, seed
        self.weights = TeacherWeights(model, adapter, seed)
        self.blocks = adapter.blocks
        self.enable_activation_checkpointing = adapter.enable_activation_checkpointing
        self.sites: list[MlpSite] = []
        self.counts: dict[str, int] = {}
        self.teacher: nn.Module | None = None
        self.student: nn.Module | None = None
        """The built student (the engine shards this very module): train/eval mode for validation."""
        """The built teacher (the engine shards this very module): attributes such as its input size."""
        self.teacher_layout: TokenLayout | None = None
        self.student_layout: TokenLayout | None = None
        self.params_before = self.params_after = self.sharded_numel = 0
        self.site_params: dict[str, tuple[int, int]] = {}
        """Per site path: (parameters before, after), counted on the architectures (tower with head)."""

    def build(self, context: Callable[[], AbstractContextManager],
              student_context: Callable[[], AbstractContextManager] | None = None) -> tuple[nn.Module, nn.Module]:
        """(teacher, student), heads stripped, the student's MLPs at their pruned widths, no weights loaded
        (except the stripped final norm / head parts, which stay on the host: ``_load_removed``).

        ``student_context`` (default: ``context``) builds the student otherwise than the teacher.
        """
        student_context = student_context or context
        arch = self._architecture()
        with context():
            teacher = self.adapter.build(arch)
        with student_context():
            student = self.adapter.build(arch)
        sites = find_mlp_sites(teacher)
        if self.prune.enabled:
            try:
                counts = keep_counts(sites, self.prune.ratio, None)
            except ValueError as err:
                raise ValueError(f"prune.ratio: {err}") from None
            with student_context():
                for site in sites:
                    shrink_site(student, site, counts[site.path])
        else:
            counts = {s.path: s.hidden for s in sites}
        # Counted with the heads, like pruning.prune_model and the streaming prune report them.
        self.params_before, self.params_after = count_params(teacher), count_params(student)
        for site in sites:
            pruned = pruning.MlpSite(**{**vars(site), "hidden": counts[site.path]})
            self.site_params[site.path] = (_site_numel(teacher, site), _site_numel(student, pruned))
        freeze_teacher(teacher)
        self.teacher_layout = self.adapter.strip_head(teacher)
        self.student_layout = self.adapter.strip_head(student)
        for layout in (self.teacher_layout, self.student_layout):
            self._load_removed(layout)
        self.sites, self.counts, self.teacher, self.student = sites, counts, teacher, student
        self.sharded_numel = count_params(teacher) + count_params(student)
        """Teacher and student elements the engine holds in all, heads stripped (the shards add up to this)."""
        return teacher, student

    def _architecture(self) -> ModelConfig:
        return ModelConfig(family=self.model_cfg.family, name=self.model_cfg.name,
                           kwargs=dict(self.model_cfg.kwargs), pretrained=None)

    def teacher_skeleton(self) -> nn.Module:
        """A fresh teacher tower, head stripped, parameters on meta and buffers real: block-wise calibration
        makes a local copy of each block from it and the values gathered from the shards."""
        with parameters_on_meta():
            teacher = self.adapter.build(self._architecture())
        self.adapter.strip_head(teacher)
        return teacher.eval()

    def _load_removed(self, layout: TokenLayout) -> None:
        """Give the parts strip_head took out (final norm, head) the teacher's real weights, on the host.

        They leave the sharded models, so no engine fills them; the task's post-norm objectives, validation
        and export use them. Pruning never changes them, so teacher and student get the same values.
        """
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

    def pruned_names(self) -> set[str]:
        """Student parameter names (dotted, from the tower) whose values pruning decides."""
        return {f"{s.path}.{n}" for s in self.sites for n in s.parameter_names()} if self.prune.enabled else set()


def _site_numel(model: nn.Module, site: MlpSite) -> int:
    mlp = site.module(model)
    names = [*site.in_names, site.out_name] + ([site.norm_name] if site.norm_name else [])
    return sum(_numel(p) for n in names for p in getattr(mlp, n).parameters())


class PruningEngine(Protocol):
    """What in-engine pruning needs from an engine (fsdp, deepspeed), in the order the loop calls it."""

    env: object

    def setup_sharded(self, build: InEngineBuild) -> None:
        """Build both models from ``build`` sharded, load the teacher's shards, copy the unpruned student tensors."""
        ...

    def gather_teacher_site(self, site: MlpSite) -> AbstractContextManager[dict[str, torch.Tensor]]:
        """Full teacher tensors of ``site`` (names relative to the site) that selection and slicing need,
        held on every rank inside the context (a collective)."""
        ...

    def write_student_site(self, site: MlpSite, keep: torch.Tensor, gathered: dict[str, torch.Tensor],
                           compensation: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
        """Fill this rank's shards of the student site from the kept units; return the elements of the
        transient full tensors it made (the pruned site, or the student site gathered to be written).

        ``compensation``: ``(B, c)`` of ``pruning.compensate.fit_compensation_from_stats`` on the ascending
        ``keep`` (identical on every rank), folded into fc_out's weight and bias with ``fold_compensation``.
        """
        ...

    def gather_teacher_module(self, path: str) -> AbstractContextManager[dict[str, torch.Tensor]]:
        """Full tensors (parameters and buffers, names relative to ``path``) of the teacher submodule ``path``,
        held on every rank inside the context (a collective): block-wise calibration runs whole blocks."""
        ...

    def write_student_tensors(self, site: MlpSite, tensors: dict[str, torch.Tensor]) -> None:
        """Fill this rank's shards of the student site's parameters from full tensors (names relative to
        the site, identical on every rank), cast to the student's dtype."""
        ...

    def teacher_out_rows(self, site: MlpSite, gathered: dict[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's share of the teacher's fc_out rows (weight [rows, M], bias [rows] or None), inside
        ``gather_teacher_site``; the shares of all ranks cover every output row exactly once."""
        ...

    def pruning_local_numel(self) -> tuple[int, int]:
        """(teacher, student) parameter elements stored on this rank."""
        ...

    def taylor_module(self) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        """(the sharded teacher module holding the sites, its forward on this rank's images)."""
        ...

    def build_optimizer(self) -> None:
        """The optimizer on the pruned student, once every block is written."""
        ...


@dataclass
class MemoryRecord:
    """One rank's memory during the pruning pass: elements held, and the process's RSS."""

    rank: int
    teacher_shard_numel: int
    student_shard_numel: int
    peak_extra_numel: int
    """Largest number of elements held beyond the shards at once: one gathered block plus its pruned copy."""
    block_mlp_numel: int
    """Elements of the largest teacher MLP block (every tensor of fc1/fc2/gate/norm)."""
    student_block_mlp_numel: int
    """Elements of the largest pruned student MLP block."""
    rss_start_bytes: int
    """VmRSS when the pruning pass starts (after the sharded build and the teacher load)."""
    rss_peak_bytes: int
    """VmHWM at the end of the pruning pass: the process's peak resident set so far."""
    sites_selected: list[str] = field(default_factory=list)
    """Site paths whose selection ran on this rank (round robin)."""
    calib_groups: int = 0
    """compensate: groups of sites calibrated one after another (prune.calib_stats_gib; block-wise modes:
    one per block)."""

    @property
    def peak_local_numel(self) -> int:
        return self.teacher_shard_numel + self.student_shard_numel + self.peak_extra_numel


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


def taylor_scores(engine: PruningEngine, sites: list[MlpSite], batches: Iterable[torch.Tensor],
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Taylor importance on the sharded teacher, summed over ranks: every rank its own images.

    The teacher alone has no task loss; the loss is the mean squared pre-norm output token, so the score
    of a unit is the first-order change of the output energy when it is removed. Parameters stay frozen:
    the images require grad so that the hidden activations do.
    """
    module, forward = engine.taylor_module()

    def loss_fn(_model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return forward(images.detach().requires_grad_(True)).float().square().mean()

    scores = pruning.collect_taylor_scores(module, batches, loss_fn, sites)
    for path in scores:
        total = scores[path].to(device)
        if _world()[1] > 1:
            torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM)
        scores[path] = total.cpu()
    return scores


CalibrationStats = dict[str, tuple[ActivationStats, ActivationStats | None]]


def _all_reduce(tensor: torch.Tensor) -> None:
    if _world()[1] > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)


def calibration_stats(engine: PruningEngine, sites: list[MlpSite], batches: list[torch.Tensor],
                      device: torch.device) -> CalibrationStats:
    """Per site, fp64 moments of fc_out's input over every rank's calibration images: (fit, held-out).

    The held-out stats are the last batch of each rank when there are two or more (None otherwise), as
    ``pruning.prune_and_compensate`` keeps held-out tokens out of the fit. Identical on every rank: one
    shift for all (the mean of the first batch over all ranks, measured by an extra forward of that
    batch), then count, sum and outer product all-reduced. A collective; the teacher runs under no_grad.
    """
    if not batches:
        raise ValueError("prune.calib_batches: no calibration batch")
    module, forward = engine.taylor_module()
    first: dict[str, torch.Tensor] = {}
    sink: dict[str, Callable[[torch.Tensor], None]] = {}

    def first_sum(path: str, size: int) -> Callable[[torch.Tensor], None]:
        def add(acts: torch.Tensor) -> None:
            x = acts.reshape(-1, size).to(torch.float64)
            part = torch.cat([x.sum(0), x.new_tensor([x.shape[0]])])
            first[path] = first[path] + part if path in first else part
        return add

    with out_inputs(module, sites, lambda path, x: sink[path](x.detach())), torch.no_grad():
        sink.update({s.path: first_sum(s.path, s.hidden) for s in sites})
        forward(batches[0])
        # One all-reduce for every site's (sum, count) of the first batch.
        packed = torch.cat([first.get(s.path, torch.zeros(s.hidden + 1, dtype=torch.float64)).to(device)
                            for s in sites])
        _all_reduce(packed)
        stats: CalibrationStats = {}
        offset = 0
        for site in sites:
            part = packed[offset:offset + site.hidden + 1]
            offset += site.hidden + 1
            if float(part[-1]) == 0:
                raise ValueError(f"{site.path}: no calibration token reached this MLP")
            shift = part[:-1] / part[-1]
            stats[site.path] = (_preset(site.hidden, shift),
                                _preset(site.hidden, shift) if len(batches) > 1 else None)
        for i, images in enumerate(batches):
            held = i == len(batches) - 1 and len(batches) > 1
            sink.update({path: (pair[1] if held else pair[0]).update for path, pair in stats.items()})
            forward(images)
    for pair in stats.values():
        for part in pair:
            if part is not None:
                _sum_over_ranks(part, device)
    return stats


def _sum_over_ranks(stats: ActivationStats, device: torch.device) -> None:
    """Add up count, sum and outer product of every rank's ``stats``, which must share one shift already."""
    count = torch.tensor([float(stats.count)], dtype=torch.float64, device=device)
    for tensor in (count, stats.sum, stats.outer):
        _all_reduce(tensor)
    stats.count = int(count.item()) if isinstance(stats.count, int) else float(count.item())


def calibration_groups(sites: list[MlpSite], *, held_out: bool, budget_gib: float) -> list[list[MlpSite]]:
    """Consecutive sites whose float64 moments (hidden^2 x 8 bytes, twice with held-out stats) fit the budget.

    A site larger than the budget on its own gets a group of its own (and a warning).
    """
    budget = budget_gib * 2**30
    groups: list[list[MlpSite]] = []
    used = 0.0
    for site in sites:
        need = site.hidden**2 * 8 * (2 if held_out else 1)
        if need > budget:
            log.warning("prune.calib_stats_gib=%s: %s alone needs %.2f GiB of moments", budget_gib, site.path,
                        need / 2**30)
        if not groups or used + need > budget:
            groups.append([])
            used = 0.0
        groups[-1].append(site)
        used += need
    return groups


def _preset(size: int, shift: torch.Tensor) -> ActivationStats:
    """Empty stats about a given shift: ActivationStats takes its first batch's mean only when none is set."""
    stats = ActivationStats(size)
    stats.shift = shift.clone()
    stats.sum = torch.zeros_like(shift)
    stats.outer = torch.zeros(size, size, dtype=torch.float64, device=shift.device)
    return stats


def _compensate(engine: PruningEngine, site: MlpSite, keep: torch.Tensor, gathered: dict[str, torch.Tensor],
                stats: tuple[ActivationStats, ActivationStats | None], ridge: float, device: torch.device
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[float | None, float | None]]:
    """The fit (B, c) of ``site`` on every rank, and the held-out fc_out error before/after (None without)."""
    fit, held = stats
    kept = keep.sort().values  # the unit order of the pruned layers, so B's columns match fc_out's
    weight, bias = engine.teacher_out_rows(site, gathered)
    b, c = fit_compensation_from_stats(fit, kept, ridge, intercept=bias is not None)
    if held is None:
        return (b, c), (None, None)
    new_weight, new_bias = fold_compensation(weight, bias, kept, b, c)
    index = kept.to(weight.device)
    plain = reconstruction_energies(held, weight, bias, kept, weight[:, index], bias)
    folded = reconstruction_energies(held, weight, bias, kept, new_weight, new_bias)
    # Energies are sums over output rows: every rank holds a share of the rows.
    energies = torch.tensor([plain[0], folded[0], plain[1]], dtype=torch.float64, device=device)
    _all_reduce(energies)
    before, after, reference = energies.tolist()
    if reference == 0:
        raise ValueError(f"{site.path}: the teacher's fc_out output is zero on every held-out token")
    return (b, c), ((before / reference) ** 0.5, (after / reference) ** 0.5)


def _select(site: MlpSite, rows: torch.Tensor, index: int, method: str, count: int,
            generator: torch.Generator, scores: dict[str, torch.Tensor] | None, memory: MemoryRecord,
            device: torch.device) -> torch.Tensor:
    """Kept units of site number ``index``: selected on rank ``index % world`` from ``rows`` (the ranking rows
    of its first input Linear) and broadcast."""
    rank, world = _world()
    owner = index % world
    keep = torch.empty(count, dtype=torch.long)
    # Random needs no weights but one generator drawn site after site: every rank draws them all.
    if rank == owner or method == "random":
        keep = pruning.select_mlp_channels(rows, count, method, generator=generator,
                                           scores=None if scores is None else scores[site.path]).cpu()
        if rank == owner:
            memory.sites_selected.append(site.path)
    if world > 1:
        buffer = keep.to(device)
        torch_dist.broadcast(buffer, src=owner)
        keep = buffer.cpu()
    return keep


def all_reduce_stats(stats: ActivationStats) -> None:
    """Make ``stats`` the statistics of every rank's tokens (a collective): one common shift (the
    token-weighted mean of the ranks' shifts), then count, sum and outer product summed."""
    if _world()[1] == 1:
        return
    device = stats.outer.device if stats.outer is not None else torch.device("cpu")
    shift = stats.shift if stats.shift is not None else torch.zeros(stats.size, dtype=torch.float64, device=device)
    packed = torch.cat([shift.to(device) * float(stats.count), shift.new_tensor([float(stats.count)]).to(device)])
    _all_reduce(packed)
    if float(packed[-1]) == 0:
        return
    stats.rebase(packed[:-1] / packed[-1])
    _sum_over_ranks(stats, device)


def _stem_states(engine: PruningEngine, first_block: str, batches: list[torch.Tensor]) -> list[block_io.BlockState]:
    """The inputs of ``first_block`` of the sharded teacher for each of this rank's batches (fp32): the whole
    teacher runs (a collective), a pre-hook records what the tower gives its first block."""
    module, forward = engine.taylor_module()
    seen: list[block_io.BlockState] = []

    def fp32(value: object) -> object:
        return value.detach().float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(block_io.BlockState(fp32(args[0]), tuple(fp32(a) for a in args[1:]),
                                        {k: fp32(v) for k, v in kwargs.items()}))

    handle = module.get_submodule(first_block).register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for images in batches:
                forward(images)
    finally:
        handle.remove()
    if len(seen) != len(batches):
        raise ValueError(f"prune.calib_mode: the teacher ran {first_block} {len(seen)} times for {len(batches)} "
                         "batches; block-wise calibration needs a tower that runs each block once per forward")
    return seen


def _prune_blockwise(engine: PruningEngine, build: InEngineBuild, calib: list[torch.Tensor],
                     generator: torch.Generator, scores: dict[str, torch.Tensor] | None, memory: MemoryRecord,
                     device: torch.device) -> list[pruning.SiteReport]:
    """``prune.calib_mode`` sequential / corrected / output: ``pruning.block_io.BlockCalibration`` block after
    block, as the streaming prune runs it, on whole teacher blocks gathered from their shards.

    Every rank carries the hidden states of its own calibration batches; the fit statistics are
    all-reduced (``all_reduce_stats``), so every rank computes the same refitted block and writes its
    shards of the student site. Memory beyond the shards: one gathered block, its local copy and the
    carried states (both streams in corrected / output modes).
    """
    prune = build.prune
    if not calib:
        raise ValueError("prune.calib_batches: no calibration batch")
    skeleton = build.teacher_skeleton()
    layout = block_io.block_layout(skeleton, build.sites)
    states = _stem_states(engine, layout.blocks[0], calib)
    calibration = block_io.BlockCalibration(
        states, mode=prune.calib_mode, ridge=prune.ridge, holdout_fraction=prune.calib_holdout,
        prefix_tokens=prefix_token_count(skeleton) if prune.balance_prefix else 0, reduce=all_reduce_stats)
    records = []
    for i, (path, local, site) in enumerate(zip(layout.blocks, layout.sites, layout.tower_sites, strict=True)):
        meta = skeleton.get_submodule(path)
        with engine.gather_teacher_module(path) as tensors:
            state = {n: tensors[n] for n in meta.state_dict()}  # non-persistent buffers come from the skeleton
            block = block_io.materialize(meta, state, label=f"{path}.", device=device)
            gathered = sum(t.numel() for t in state.values())
        keep = _select(site, local.selection_weight(block), i, prune.method, build.counts[site.path], generator,
                       scores, memory, device)
        records.append(calibration.step(block, local, keep, site.path))
        # Every tensor the hidden width shapes, and fc_out's bias, which the refit moves.
        params = dict(local.module(block).named_parameters())
        names = dict.fromkeys([*site.parameter_names(), f"{site.out_name}.bias"])
        engine.write_student_tensors(site, {n: params[n].detach() for n in names if n in params})
        memory.peak_extra_numel = max(memory.peak_extra_numel,
                                      gathered + sum(p.numel() for p in block.parameters()))
        del block
    memory.calib_groups = len(layout.blocks)
    return records


def prune_in_engine(engine: PruningEngine, build: InEngineBuild, *, taylor_batches: Iterable[torch.Tensor] = (),
                    calib_batches: Iterable[torch.Tensor] = (), device: torch.device | None = None
                    ) -> tuple[pruning.PruneReport, list[MemoryRecord]]:
    """Select and write every pruned student block; returns the report and every rank's memory record.

    A collective: every rank calls it with the same ``build``. Kept indices equal those of
    ``pruning.stream.prune_checkpoint`` on the same checkpoint with the same method and seed
    (``random`` draws every site on every rank from one generator, in module order, as the stream does).
    ``prune.compensate``: every site is fitted on ``calib_batches`` (this rank's; all ranks' in effect) of
    the unpruned teacher, as ``pruning.prune_and_compensate(mode='teacher')`` on the full model; with
    ``prune.calib_mode`` sequential / corrected / output, block after block as
    ``pruning.block_io.calibrate_blocks`` (``_prune_blockwise``).
    """
    device = device or torch.device("cpu")
    rank, world = _world()
    prune = build.prune
    method = prune.method if prune.enabled else "none"
    scores = taylor_scores(engine, build.sites, taylor_batches, device) if method == "taylor" else None
    calibration: CalibrationStats | None = None
    groups: dict[str, list[MlpSite]] = {}  # the group each site is calibrated with, keyed by its first site
    calib = list(calib_batches)
    blockwise = prune.enabled and prune.compensate and prune.calib_mode != "teacher"
    if prune.enabled and prune.compensate:
        for site in build.sites:
            if site.norm_name is not None:
                raise ValueError(f"prune.compensate: {site.path} has a LayerNorm over the hidden units "
                                 f"({site.norm_name}); compensation is not defined there (docs/compensation.md)")
        if not blockwise:
            groups = {group[0].path: group for group in
                      calibration_groups(build.sites, held_out=len(calib) > 1, budget_gib=prune.calib_stats_gib)}
    generator = torch.Generator().manual_seed(build.seed)
    teacher_local, student_local = engine.pruning_local_numel()
    memory = MemoryRecord(rank, teacher_local, student_local, 0,
                          max(before for before, _ in build.site_params.values()),
                          max(after for _, after in build.site_params.values()),
                          _proc_status_bytes("VmRSS"), 0)
    records = []
    if blockwise:
        records = _prune_blockwise(engine, build, calib, generator, scores, memory, device)
    for i, site in enumerate(build.sites if prune.enabled and not blockwise else []):
        with engine.gather_teacher_site(site) as gathered:
            count = build.counts[site.path]
            keep = _select(site, site.selection_rows(gathered[site.selection_tensor_name]), i, method, count,
                           generator, scores, memory, device)
            fold, errors = None, (None, None)
            if site.path in groups:  # the next group's moments, from the unpruned teacher (a collective)
                calibration = None
                calibration = calibration_stats(engine, groups[site.path], calib, device)
                memory.calib_groups += 1
            if calibration is not None:
                fold, errors = _compensate(engine, site, keep, gathered, calibration.pop(site.path),
                                           prune.ridge, device)
            transient = engine.write_student_site(site, keep, gathered, compensation=fold)
            memory.peak_extra_numel = max(memory.peak_extra_numel,
                                          sum(t.numel() for t in gathered.values()) + transient)
        before, after = build.site_params[site.path]
        records.append(pruning.SiteReport(site.path, site.hidden, count, before, after, keep.tolist(), *errors))
    memory.rss_peak_bytes = _proc_status_bytes("VmHWM")
    report = pruning.PruneReport(method, records, build.params_before, build.params_after)
    everyone: list[MemoryRecord] = [memory]
    if world > 1:
        gathered_records: list[object] = [None] * world
        torch_dist.all_gather_object(gathered_records, memory)
        everyone = [r for r in gathered_records if isinstance(r, MemoryRecord)]
    return report, everyone


def memory_summary(records: list[MemoryRecord], build: InEngineBuild) -> dict:
    """Plain data for prune_report.json: per rank, with the full models' sizes to compare against."""
    return {
        "full_teacher_numel": build.params_before, "full_student_numel": build.params_after,
        "sharded_numel": build.sharded_numel,
        "ranks": [{**vars(r), "peak_local_numel": r.peak_local_numel} for r in records],
    }


def setup_sharded(engine: object, build: InEngineBuild) -> None:
    """Have the engine build, shard and load both models for in-engine pruning (fsdp and deepspeed only)."""
    setup = getattr(engine, "setup_sharded", None)
    if setup is None:
        raise ValueError(f"prune.in_engine: engine {type(engine).__name__} has no sharded build; use engine.name "
                         "fsdp or deepspeed, or prune.in_engine=false")
    setup(build)


def prune_and_build_optimizer(engine: PruningEngine, build: InEngineBuild, stream: Iterable,
                              device: torch.device) -> tuple[pruning.PruneReport, dict]:
    """In-engine pruning, then the engine's optimizer on the pruned student: (report, memory summary).

    method=taylor reads the first ``prune.taylor_batches`` batches of ``stream``, compensate the first
    ``prune.calib_batches`` (the same first batches when both run; a separate iterator, closed afterwards;
    a fresh run's training then goes on with the following batches).
    """
    prune = build.prune
    taylor = prune.taylor_batches if prune.enabled and prune.method == "taylor" else 0
    calib = prune.calib_batches if prune.enabled and prune.compensate else 0
    batches: list[torch.Tensor] = []
    if taylor or calib:
        iterator = iter(stream)
        batches = [next(iterator).model_input(device) for _ in range(max(taylor, calib))]
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    report, memory = prune_in_engine(engine, build, taylor_batches=batches[:taylor], calib_batches=batches[:calib],
                                     device=device)
    engine.build_optimizer()
    return report, {"in_engine_memory": memory_summary(memory, build)}


def width_chart(widths: list[int], before: list[int], *, height: int = 160) -> torch.Tensor:
    """A [3, H, W] uint8 bar chart of kept width per block (grey: width before, blue: kept)."""
    bar, gap = 12, 4
    image = torch.full((3, height, max(1, len(widths)) * (bar + gap) + gap), 255, dtype=torch.uint8)
    top = max(before + widths + [1])
    for i, (w, b) in enumerate(zip(widths, before, strict=True)):
        left = gap + i * (bar + gap)
        for value, colour in ((b, (200, 200, 200)), (w, (31, 119, 180))):
            rows = max(1, round(value / top * (height - 2)))
            image[:, height - rows:, left:left + bar] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
    return image


def log_prune_report(metrics: object, report: pruning.PruneReport) -> None:
    """TensorBoard (rank 0): the report as a markdown table and a bar chart of kept width per block."""
    writer = getattr(metrics, "writer", None)
    if writer is None:
        return
    lines = [f"method **{report.method}**, parameters {report.model_params_before:,} -> {report.model_params_after:,}",
             "", "| # | site | hidden before | hidden after | first kept |", "|---|---|---|---|---|"]
    for i, site in enumerate(report.sites):
        head = ", ".join(map(str, site.kept[:8])) + (", ..." if len(site.kept) > 8 else "")
        lines.append(f"| {i} | `{site.path}` | {site.hidden_before} | {site.hidden_after} | {head} |")
    writer.add_text("prune/report", "\n".join(lines), 0)
    if report.sites:
        chart = width_chart(report.widths, [s.hidden_before for s in report.sites])
        writer.add_image("prune/kept_width_per_block", chart, 0, dataformats="CHW")
