"""THE one loop over blocks: ``prune_blocks`` prunes (and optionally compensates) every MLP of a tower.

A *source* hands the driver one block at a time and takes the pruned tensors back: a tower in memory
(``ModelSource``), a checkpoint on disk (``pruning.stream``) or a teacher sharded by an engine (the trainer's).
What differs across processes is two hooks of the source, ``select`` and ``reduce``. Calibration runs the
tower block by block on carried hidden states, recorded at block 0 by a pre-hook (docs/pipeline.md).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .fit import ActivationStats, fit_output_from_stats, holdout_mask, output_fit_error
from .refine import TokenPairs, refine_mlp, weighted_error
from .select import METHODS, activation_order, select_mlp_channels
from .sites import MlpSite, find_mlp_sites, prefix_token_count
from .surgery import PruneReport, SiteReport, install_site, keep_counts, prune_site, prune_site_tensors

Forward = Callable[[nn.Module, torch.Tensor], Any]
UnitChoice = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(covariance of a block's MLP units' activations [M, M], their covariance with the refit's target [M, D]) ->
the units to keep: the ``activation`` method, made inside the compensation step where those statistics exist."""
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """Closed-form compensation settings, one value for the prune CLI, the trainer and the demo: each pruned
    block's output Linear is refitted so the block reproduces the original block's output (docs/compensation.md)."""

    ridge: float = 1e-3
    """Ridge penalty relative to the mean variance of the fit's inputs (0: plain least squares)."""
    holdout_fraction: float = 0.2
    """Fraction of every block's calibration tokens, spread evenly, kept out of the fit for the errors."""
    balance_prefix: bool = False
    """Class / register tokens weigh as much as the patch tokens of their image."""
    num_images: int = 256
    """Calibration images (the CLI and the demo read this many; the trainer takes batches of its stream)."""
    batch_size: int = 16
    """Images per calibration forward."""
    refine_steps: int = 0
    """After each refit, Adam steps training the whole pruned MLP on the block's fit tokens (0: closed form only;
    one process only, ``pruning.refine``)."""
    refine_lr: float = 1e-3
    """Peak learning rate of the refinement (cosine decay to 0)."""
    refine_batch_tokens: int = 4096
    """Tokens per refinement step."""
    selection_stride: int = 1
    """Method ``activation``: rank the units on every k-th calibration batch (the ranking's statistics cost
    (units + outputs)^2 per token, the fit's (kept + outputs)^2)."""

    def __post_init__(self) -> None:
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.num_images < 1 or self.batch_size < 1:
            raise ValueError(f"num_images and batch_size must be >= 1, got {self.num_images}, {self.batch_size}")
        if self.selection_stride < 1:
            raise ValueError(f"selection_stride must be >= 1, got {self.selection_stride}")
        if self.refine_steps < 0 or self.refine_batch_tokens < 1 or not self.refine_lr > 0:
            raise ValueError(f"refinement needs steps >= 0, batch tokens >= 1 and lr > 0, got {self.refine_steps}, "
                             f"{self.refine_batch_tokens}, {self.refine_lr}")


class BlockSource:
    """Where ``prune_blocks`` reads blocks and writes pruned sites; the ``select`` / ``reduce`` defaults serve one
    process. Subclasses set ``tower`` (real, or parameters on meta with real buffers), ``sites``, ``params_before``
    and ``device``."""

    tower: nn.Module
    sites: list[MlpSite]
    params_before: int
    device: torch.device = torch.device("cpu")

    def read(self, path: str) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]]:
        """Full tensors (parameters and persistent buffers, names relative to ``path``) of submodule ``path``."""
        raise NotImplementedError

    def write(self, site: MlpSite, tensors: dict[str, torch.Tensor]) -> None:
        """Take the pruned site's tensors (``site.tensor_names()`` that exist, relative to ``site.path``)."""
        raise NotImplementedError

    def stem_states(self, first_block: str, images: list[torch.Tensor]) -> list[BlockState]:
        """The inputs of ``first_block`` for each batch of calibration images."""
        raise NotImplementedError

    def select(self, index: int, choose: Callable[[], torch.Tensor], count: int) -> torch.Tensor:
        """The kept units of site ``index``: ``choose()`` here; a sharded source runs it on one rank and broadcasts."""
        return choose()

    def reduce(self, stats: ActivationStats) -> None:
        """Make fit statistics cover every process's calibration tokens (a sharded source all-reduces)."""


class ModelSource(BlockSource):
    """The tower in memory: read its modules, write by replacing the site's layers (``install_site``)."""

    def __init__(self, tower: nn.Module, forward: Forward | None = None) -> None:
        """``forward(tower, images)`` runs calibration batches (default ``tower(images)``)."""
        self.tower, self.forward = tower, forward
        self.sites = find_mlp_sites(tower)
        self.params_before = sum(p.numel() for p in tower.parameters())
        self.device = next(tower.parameters()).device

    @contextlib.contextmanager
    def read(self, path: str) -> Iterator[dict[str, torch.Tensor]]:
        yield {k: v.detach() for k, v in self.tower.get_submodule(path).state_dict().items()}

    def write(self, site: MlpSite, tensors: dict[str, torch.Tensor]) -> None:
        install_site(self.tower, site, tensors)

    def stem_states(self, first_block: str, images: list[torch.Tensor]) -> list[BlockState]:
        return stem_states(self.tower, first_block, images, self.forward)


def prune_blocks(source: BlockSource, widths: Mapping[str, int] | Sequence[int], method: str = "diversity", *,
                 calibration: Calibration | None = None, calib_inputs: Sequence[torch.Tensor | BlockState] = (),
                 generator: torch.Generator | None = None, scores: Mapping[str, torch.Tensor] | None = None,
                 orders: Mapping[str, torch.Tensor] | None = None,
                 progress: Callable[[str], None] | None = None) -> PruneReport:
    """Prune every MLP of ``source`` to ``widths`` (per site path, or one per site in module order).

    ``method``: ``pruning.METHODS`` (``random`` draws from ``generator``, ``taylor`` ranks by ``scores``). With
    ``calibration``, each block is compensated on ``calib_inputs``: image batches (run by ``source.stem_states``)
    or recorded ``BlockState``s. ``orders``: selection orders already made (``plan_widths``), cut to ``widths``.
    """
    sites = source.sites
    counts = keep_counts(sites, num_keep=widths)
    if method == "activation" and calibration is None and orders is None:
        raise ValueError("method='activation' ranks the units on calibration activations: give a calibration")
    choose = Selection(source, method, generator, scores)
    start = time.perf_counter()
    blocks: list[str] = [s.path for s in sites]
    local = sites
    calib = None
    if calibration is not None:
        if calibration.refine_steps and type(source).reduce is not BlockSource.reduce:
            raise ValueError("calibration.refine_steps: refinement runs in one process; prune offline (python -m "
                             "pruning prune --refine-steps) and start the engine from the export")
        layout, states = calibration_states(source, calibration, calib_inputs)
        blocks, local = layout.blocks, layout.sites
        prefix_tokens = prefix_token_count(source.tower) if calibration.balance_prefix else 0
        calib = BlockCalibration(states, calibration, prefix_tokens=prefix_tokens, reduce=source.reduce)
    records = []
    for i, (site, block_path, inner) in enumerate(zip(sites, blocks, local, strict=True)):
        tick = time.perf_counter()
        with source.read(block_path) as tensors:
            own = site_tensors(site, tensors, inner.path if calib is not None else "")
            count = counts[site.path]
            if orders is not None:
                keep = orders[site.path][:count]
            elif method == "activation":  # picked from the block's activations by ``calib.step``
                keep = choose.from_activations(i, count, calibration.ridge)
            else:
                keep = choose(i, site, own, count)
            if calib is None:
                pruned = prune_site_tensors(site, own, keep)
                before = sum(t.numel() for t in own.values())
                record = SiteReport(site.path, site.hidden, keep.numel(), before,
                                    sum(t.numel() for t in pruned.values()), keep.tolist())
            else:
                block = materialize(source.tower.get_submodule(block_path), tensors, label=f"{block_path}.",
                                    device=source.device)
        if calib is not None:
            record = calib.step(block, inner, keep, site.path)
            names = set(site.tensor_names())
            pruned = {n: t.detach() for n, t in inner.module(block).state_dict().items() if n in names}
            del block
        source.write(site, pruned)
        del pruned
        records.append(record)
        if progress is not None:
            errors = ("" if record.recon_error_before is None else
                      f", held-out error {record.recon_error_before:.4f} -> {record.recon_error_after:.4f}")
            progress(f"[{i + 1}/{len(sites)}] {site.path}: {site.hidden} -> {record.hidden_after}{errors} "
                     f"({time.perf_counter() - tick:.1f} s)")
    removed = sum(r.params_before - r.params_after for r in records)
    summary = None
    if calib is not None:
        summary = {**asdict(calibration), "num_batches": len(calib.states),
                   "prefix_tokens_balanced": calib.prefix_tokens, "hidden_state_bytes": calib.peak_bytes,
                   "seconds": round(time.perf_counter() - start, 3)}
    return PruneReport(method, records, source.params_before, source.params_before - removed, summary)


class Selection:
    """Kept units of a site in selection order, through the source's ``select`` hook (checked arguments)."""

    def __init__(self, source: BlockSource, method: str, generator: torch.Generator | None,
                 scores: Mapping[str, torch.Tensor] | None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        missing = [s.path for s in source.sites if method == "taylor" and (scores is None or s.path not in scores)]
        if missing:
            raise ValueError(f"method='taylor' needs scores for site {missing[0]}")
        self.source, self.method, self.scores = source, method, scores
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def __call__(self, index: int, site: MlpSite, own: dict[str, torch.Tensor], count: int) -> torch.Tensor:
        rows = site.selection_rows(own[site.selection_tensor_name])

        def choose() -> torch.Tensor:
            return select_mlp_channels(rows, count, self.method, generator=self.generator,
                                       scores=None if self.scores is None else self.scores.get(site.path))

        # Random draws from one generator site after site: every process draws every site itself.
        return choose() if self.method == "random" else self.source.select(index, choose, count)

    def from_activations(self, index: int, count: int, ridge: float) -> UnitChoice:
        """The ``activation`` method's choice for site ``index``: ``count`` units from the block's statistics
        (identical on every process once reduced; still made on one and shared, as every selection is)."""
        return lambda gram, cross: self.source.select(index, lambda: activation_order(gram, cross, count, ridge), count)


def calibration_states(source: BlockSource, calibration: Calibration,
                       calib_inputs: Sequence[torch.Tensor | BlockState]) -> tuple[BlockLayout, list[BlockState]]:
    """The tower's blocks and the inputs of block 0 (image batches run by the source's stem, recorded states kept)."""
    hidden_norm = [s for s in source.sites if s.norm_name is not None]
    if hidden_norm:
        raise ValueError(f"{hidden_norm[0].path}: compensation is not defined with a LayerNorm over the hidden "
                         f"units ({hidden_norm[0].norm_name}): removing units changes how the kept ones are "
                         "normalised; prune without calibration")
    layout = block_layout(source.tower, source.sites)
    images = [x for x in calib_inputs if isinstance(x, torch.Tensor)]
    states = source.stem_states(layout.blocks[0], images) if images else []
    return layout, states + [x for x in calib_inputs if isinstance(x, BlockState)]


def site_tensors(site: MlpSite, tensors: dict[str, torch.Tensor], inside: str) -> dict[str, torch.Tensor]:
    """The site's own tensors out of those read (names relative to the site; ``inside``: its path among them)."""
    prefix = inside + "." if inside else ""
    names = set(site.tensor_names())
    return {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix) and n[len(prefix):] in names}


@dataclass
class BlockState:
    """One calibration batch at the input of a block: hidden states and the block's extra arguments."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    weight: float = 1.0
    """How much each of the batch's tokens counts in the fits (e.g. to balance two input sizes)."""

    def run(self, block: nn.Module) -> BlockState:
        out = block(self.hidden, *self.args, **self.kwargs)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{type(block).__name__} returned {type(out).__name__}, not the next hidden states: "
                             "streaming calibration needs blocks that map a tensor to a tensor")
        return BlockState(out, self.args, self.kwargs, self.weight)

    def float(self, device: torch.device | str | None = None) -> BlockState:
        """The same state in fp32 (the fits run in fp32 and fp64), on ``device`` when given."""
        def cast(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            value = value.detach() if device is None else value.detach().to(device)
            return value.float() if value.is_floating_point() else value

        return BlockState(cast(self.hidden), tuple(cast(a) for a in self.args),
                          {k: cast(v) for k, v in self.kwargs.items()}, self.weight)

    def nbytes(self) -> int:
        tensors = [self.hidden, *self.args, *self.kwargs.values()]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class BlockLayout:
    """The tower's blocks (module paths in call order) and each one's MLP site, its path relative to the block."""

    blocks: list[str]
    sites: list[MlpSite]


def block_layout(tower: nn.Module, sites: list[MlpSite] | None = None) -> BlockLayout:
    """Blocks = the numbered children of one container, each holding exactly one MLP site."""
    sites = find_mlp_sites(tower) if sites is None else sites
    blocks, local = [], []
    for site in sites:
        parts = site.path.split(".")
        # The block is the innermost numbered module holding the MLP (the MLP itself in a plain stack).
        cut = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
        if cut is None:
            raise ValueError(f"{site.path}: the MLP is not inside a numbered block; streaming calibration needs "
                             "a tower made of a sequence of blocks")
        blocks.append(".".join(parts[: cut + 1]))
        local.append(MlpSite(**{**vars(site), "path": ".".join(parts[cut + 1:])}))
    container = blocks[0].rpartition(".")[0]
    expected = [f"{container}.{i}" if container else str(i) for i in range(len(blocks))]
    if blocks != expected or len(tower.get_submodule(container) if container else tower) != len(blocks):
        raise ValueError(f"MLP blocks {blocks[:3]}...: streaming calibration needs every numbered child of one "
                         "container to hold exactly one MLP, in order")
    return BlockLayout(blocks, local)


class _ReachedBlock(Exception):  # noqa: N818 - control flow, not an error
    pass


def stem_states(tower: nn.Module, first_block: str, batches: Iterable[torch.Tensor],
                forward: Forward | None = None) -> list[BlockState]:
    """The inputs of block ``first_block`` for every batch (``forward(tower, images)``, default ``tower(images)``),
    recorded by a pre-hook that ends the forward there, so the blocks may stay on meta."""
    forward = forward or (lambda m, x: m(x))
    seen: list[BlockState] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(BlockState(args[0].detach(), tuple(args[1:]), dict(kwargs)))
        raise _ReachedBlock

    handle = tower.get_submodule(first_block).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for images in batches:
                count = len(seen)
                with contextlib.suppress(_ReachedBlock):
                    forward(tower, images)
                if len(seen) == count:
                    raise ValueError(f"the forward never reached {first_block}: cannot record its inputs")
    finally:
        handle.remove()
    return seen


def materialize(meta_module: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                label: str = "", device: torch.device | str = "cpu") -> nn.Module:
    """A real copy of a meta-device module holding ``tensors`` (its full state dict), floats cast to ``dtype``;
    non-persistent buffers (a sharded source hands them too) come from ``meta_module`` itself."""
    transient = _transient_buffers(meta_module, label)
    module = copy.deepcopy(meta_module).to_empty(device=device)
    module.load_state_dict({k: _cast(v, dtype) for k, v in tensors.items() if k not in transient}, strict=True)
    for name, value in transient.items():
        owner_path, _, attr = name.rpartition(".")
        module.get_submodule(owner_path)._buffers[attr] = _cast(value.to(device, copy=True), dtype)
    return module.eval()


def materialize_outside(meta_tower: nn.Module, container: str, get: Callable[[str], torch.Tensor],
                        dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of the tower whose parameters and buffers outside ``container`` are real (read with ``get``): enough
    to run everything before block 0; the blocks stay on meta."""
    tower = copy.deepcopy(meta_tower)
    prefix = container + "."
    transient = _transient_buffers(tower, "", skip=prefix)
    for kind in ("parameters", "buffers"):
        for name, _ in list(getattr(tower, f"named_{kind}")()):
            if name.startswith(prefix):
                continue
            owner_path, _, attr = name.rpartition(".")
            value = _cast(transient[name] if name in transient else get(name), dtype)
            if kind == "parameters":
                tower.get_submodule(owner_path)._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                tower.get_submodule(owner_path)._buffers[attr] = value
    return tower.eval()


def _cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.to(dtype) if value.is_floating_point() else value


def _transient_buffers(module: nn.Module, label: str, skip: str | None = None) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (in no checkpoint) not under ``skip``; one built on meta has no values anywhere."""
    persistent = set(module.state_dict())
    transient = {n: b for n, b in module.named_buffers()
                 if n not in persistent and not (skip and n.startswith(skip))}
    missing = [n for n, b in transient.items() if b.is_meta]
    if missing:
        raise ValueError(f"{label}{missing[0]}: a non-persistent buffer (computed when the model is built, not "
                         "in checkpoints) that was built on the meta device; build the model under "
                         "pruning.skeleton.parameters_on_meta so it is real")
    return transient


@dataclass
class TokenRows:
    """One calibration batch's tokens for a block's refit, flattened: ``joint`` = ``[a, e*]`` (the output Linear's
    inputs, the target pulled back through a post-norm), the target before that pull-back, the MLP's inputs, the
    token weights, the held-out mask and the branch's scale ``s``."""

    joint: torch.Tensor
    raw_target: torch.Tensor
    inputs: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    scale: torch.Tensor


class BlockCalibration:
    """Two streams of hidden states carried block to block, the original blocks' outputs (targets) and the pruned
    ones' (what the pruned tower sees); ``step`` prunes one block and refits it so the second matches the first."""

    def __init__(self, states: list[BlockState], calibration: Calibration, *, prefix_tokens: int = 0,
                 reduce: Callable[[ActivationStats], None] | None = None) -> None:
        """``prefix_tokens`` > 0: that many leading tokens of every sequence weigh together as much as its patch
        tokens. ``reduce``: applied to every statistic before use (an all-reduce across ranks in-engine)."""
        if prefix_tokens < 0:
            raise ValueError(f"prefix token count must be >= 0, got {prefix_tokens}")
        states = [s for s in states if s.hidden.shape[0] > 0]  # an empty batch adds nothing to any fit
        if not states:
            raise ValueError("calibration: no batch with any image")
        if any(not s.weight > 0 for s in states):
            raise ValueError("calibration: batch weights must be > 0")
        self.calibration, self.ridge, self.holdout_fraction = (calibration, calibration.ridge,
                                                               calibration.holdout_fraction)
        self.generator = torch.Generator().manual_seed(0)  # refinement draws, in block order
        self.prefix_tokens, self.reduce = prefix_tokens, reduce or (lambda _stats: None)
        self.states, self.teacher_states = states, list(states)
        self.peak_bytes = self.hidden_state_bytes()
        self.warned = False

    def hidden_state_bytes(self) -> int:
        """Bytes of the carried calibration states (both streams)."""
        return sum(s.nbytes() for s in self.states + self.teacher_states)

    def step(self, block: nn.Module, site: MlpSite, keep: torch.Tensor | UnitChoice, report_path: str
             ) -> SiteReport:
        """Prune ``site`` (relative to ``block``) to ``keep`` with compensation and advance the states; ``keep``
        may be a ``UnitChoice``, made from the statistics of the unpruned MLP on the carried states."""
        params_before = _site_numel(block, site)
        new_site, keep, errors = self._output_refit(block, site, keep, report_path)
        with torch.no_grad():
            self.states = [s.run(block) for s in self.states]
        self.peak_bytes = max(self.peak_bytes, self.hidden_state_bytes())
        return SiteReport(report_path, site.hidden, new_site.hidden, params_before,
                          _site_numel(block, new_site), keep.tolist(), *errors)

    def _output_refit(self, block: nn.Module, site: MlpSite, keep: torch.Tensor | UnitChoice, report_path: str
                      ) -> tuple[MlpSite, torch.Tensor, tuple[float | None, float | None]]:
        """Prune ``site`` and refit its output Linear so the block's output matches the original block's: the
        target ``e* = e + (o_t - o) / s`` of the branch's last module (``branch_scale``), pulled back through a
        post-norm (``norm_pullback``); docs/compensation.md. Returns the new site, the kept units and the held-out
        errors of the plain pruned and the refitted Linear. A ``UnitChoice`` is made first, on the whole MLP's
        statistics over every ``selection_stride``-th batch (``_choose``)."""
        post_norm = _post_norm(block, site, self.teacher_states[0], report_path)
        teacher_y: list[torch.Tensor] = []
        norm_input = post_norm.register_forward_pre_hook(lambda _m, args: teacher_y.append(args[0].detach())) \
            if post_norm is not None else None
        try:
            with torch.no_grad():
                teacher_out = [t.run(block) for t in self.teacher_states]
        finally:
            if norm_input is not None:
                norm_input.remove()
        if callable(keep):
            keep = self._choose(block, site, keep, teacher_out, teacher_y, post_norm, report_path)
        new_site = prune_site(block, site, keep)
        mlp = new_site.module(block)
        out = getattr(mlp, site.out_name)
        width, rows = out.weight.shape[1], out.weight.shape[0]
        fit, held = ActivationStats(width + rows), ActivationStats(width + rows)
        refining = self.calibration.refine_steps > 0
        pairs: dict[bool, list[TokenPairs]] = {False: [], True: []}  # fit / held-out tokens for the refinement
        scale = None
        for r in self._token_rows(block, mlp, out, post_norm, teacher_out, teacher_y, report_path):
            scale = r.scale
            fit.update(r.joint[~r.mask], r.weights[~r.mask])
            held.update(r.joint[r.mask], r.weights[r.mask])
            if refining:  # fit tokens: the norm's output target (post-norm); held out: fc2's, as above
                pairs[False].append(TokenPairs(r.inputs[~r.mask], r.raw_target[~r.mask], r.weights[~r.mask]))
                pairs[True].append(TokenPairs(r.inputs[r.mask], r.joint[r.mask, width:], r.weights[r.mask]))
        holding = self.holdout_fraction > 0
        self._reduce(fit, held if holding else None, report_path)
        if fit.rows < width + 1 and not self.warned:
            self.warned = True
            log.warning("%s: the compensation fit has %d calibration tokens for %d kept units + a bias: it is "
                        "underdetermined and only the ridge (%g) makes it unique; give more calibration images",
                        report_path, fit.rows, width, self.ridge)
        new_weight, new_bias = fit_output_from_stats(fit, out.weight, out.bias, self.ridge)
        errors = ((output_fit_error(held, out.weight, out.bias), output_fit_error(held, new_weight, new_bias))
                  if holding else (None, None))
        with torch.no_grad():
            out.weight.copy_(new_weight.to(out.weight.device, out.weight.dtype))
            if out.bias is not None:
                out.bias.copy_(new_bias.to(out.bias.device, out.bias.dtype))
        if refining:  # block output = base + s * (MLP or post-norm output): errors weigh by s
            # The token lists are popped: while the MLP trains, only the concatenated copy is held.
            weight = torch.where(scale.isfinite(), scale, 0).abs().reshape(-1)
            refine_mlp(mlp, TokenPairs.cat(pairs.pop(False)), weight, generator=self.generator, after=post_norm,
                       steps=self.calibration.refine_steps, lr=self.calibration.refine_lr,
                       batch_tokens=self.calibration.refine_batch_tokens)
            if holding:
                errors = (errors[0], weighted_error(mlp, TokenPairs.cat(pairs.pop(True)), torch.ones(rows)))
        self.teacher_states = teacher_out
        return new_site, keep, errors

    def _choose(self, block: nn.Module, site: MlpSite, choice: UnitChoice, teacher_out: list[BlockState],
                teacher_y: list[torch.Tensor], post_norm: nn.LayerNorm | None, report_path: str) -> torch.Tensor:
        """The units ``choice`` keeps, from the unpruned MLP's ``[a, e*]`` statistics on the fit tokens of every
        ``selection_stride``-th batch: ``e*`` does not depend on the branch's output (``(o_t - base) / s``)."""
        mlp = site.module(block)
        out = getattr(mlp, site.out_name)
        width, rows = out.weight.shape[1], out.weight.shape[0]
        fit = ActivationStats(width + rows)
        for r in self._token_rows(block, mlp, out, post_norm, teacher_out, teacher_y, report_path,
                                  stride=self.calibration.selection_stride):
            fit.update(r.joint[~r.mask], r.weights[~r.mask])
        self._reduce(fit, None, report_path)
        moment = fit.covariance()  # raw second moments for a Linear without a bias, as the fit uses
        if out.bias is None:
            moment = moment + torch.outer(fit.mean(), fit.mean())
        return choice(moment[:width, :width], moment[:width, width:])

    def _token_rows(self, block: nn.Module, mlp: nn.Module, out: nn.Linear, post_norm: nn.LayerNorm | None,
                    teacher_out: list[BlockState], teacher_y: list[torch.Tensor], report_path: str, stride: int = 1
                    ) -> Iterator[TokenRows]:
        """Run ``block`` on every ``stride``-th carried batch: its tokens' ``[a, e*]`` rows and what goes with them
        (the held-out split is the one every stride gives: token positions count over all batches)."""
        end = out if post_norm is None else post_norm
        captured: dict[str, torch.Tensor] = {}
        handles = [out.register_forward_pre_hook(lambda _m, args: captured.__setitem__("a", args[0].detach())),
                   end.register_forward_hook(lambda _m, _args, e: captured.__setitem__("e", e.detach())),
                   mlp.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0].detach()))]
        width, rows = out.weight.shape[1], out.weight.shape[0]
        seen, scale = 0, None
        try:
            with torch.no_grad():
                for i, (student, teacher) in enumerate(zip(self.states, teacher_out, strict=True)):
                    tokens = student.hidden.numel() // student.hidden.shape[-1]
                    if i % stride:
                        seen += tokens
                        continue
                    o = student.run(block).hidden
                    a, e = captured["a"], captured["e"]
                    if scale is None:  # one probe per block: the factor is the same on every token
                        scale = branch_scale(block, end, student, report_path, output=o)
                    target = raw_target = e + (teacher.hidden - o) / scale
                    if post_norm is not None:
                        target = norm_pullback(post_norm, teacher_y[i], target)
                    joint = torch.cat([a.reshape(-1, width), target.reshape(-1, rows)], dim=1)
                    mask = holdout_mask(seen, joint.shape[0], self.holdout_fraction).to(joint.device)
                    seen += joint.shape[0]
                    x = captured["x"]
                    yield TokenRows(joint, raw_target.reshape(-1, rows), x.reshape(-1, x.shape[-1]),
                                    self._token_weights(a, report_path, student.weight), mask, scale)
        finally:
            for h in handles:
                h.remove()

    def _reduce(self, fit: ActivationStats, held: ActivationStats | None, report_path: str) -> None:
        """All-reduce the fit's statistics (and the held-out ones, if any) and check that each has tokens."""
        for stats in (fit,) if held is None else (fit, held):
            self.reduce(stats)
        if fit.count == 0 or (held is not None and held.count == 0):
            raise ValueError(f"{report_path}: not enough calibration tokens for the fit and the held-out split")

    def _token_weights(self, acts: torch.Tensor, label: str, batch_weight: float) -> torch.Tensor:
        """Per-token weights of [batch, tokens, units] activations, flattened: ``batch_weight`` times the prefix
        weighting."""
        weights = torch.full(acts.shape[:-1], float(batch_weight), dtype=torch.float64, device=acts.device)
        if self.prefix_tokens:
            if acts.dim() != 3 or acts.shape[1] <= self.prefix_tokens:
                raise ValueError(f"{label}: prefix token weighting needs [batch, tokens, units] with more than "
                                 f"{self.prefix_tokens} tokens, got {tuple(acts.shape)}")
            weights[:, :self.prefix_tokens] *= (acts.shape[1] - self.prefix_tokens) / self.prefix_tokens
        return weights.reshape(-1)


def _post_norm(block: nn.Module, site: MlpSite, state: BlockState, label: str) -> nn.LayerNorm | None:
    """The LayerNorm of ``block`` that reads the MLP's output (post-norm blocks), or None (pre-norm), found by
    running the block once; refused unless the MLP's output is its output Linear's."""
    mlp = site.module(block)
    seen: dict[str, torch.Tensor] = {}
    norms = {name: m for name, m in block.named_modules() if isinstance(m, nn.LayerNorm)
             and not any(m is inner for inner in mlp.modules())}

    def keep(key: str) -> Callable:
        return lambda _m, args, result=None: seen.__setitem__(key, args[0] if result is None else result)

    handles = [mlp.register_forward_hook(keep("mlp")),
               getattr(mlp, site.out_name).register_forward_hook(keep("linear"))]
    handles += [m.register_forward_pre_hook(keep(name)) for name, m in norms.items()]
    try:
        with torch.no_grad():
            state.run(block)
    finally:
        for h in handles:
            h.remove()
    reads = [name for name in norms if name in seen and (seen[name] is seen["mlp"] or (
        seen[name].shape == seen["mlp"].shape and torch.equal(seen[name], seen["mlp"])))]
    if not reads:
        return None
    if not torch.equal(seen["linear"], seen["mlp"]):
        raise ValueError(f"{label}: {reads[0]} normalises the MLP's output, which is not the output Linear's "
                         "output: compensation cannot place its target (prune this tower without it)")
    norm = norms[reads[0]]
    if len(norm.normalized_shape) != 1:
        raise ValueError(f"{label}: {reads[0]} normalises over {tuple(norm.normalized_shape)}, not the channels")
    return norm


def norm_pullback(norm: nn.LayerNorm, y_ref: torch.Tensor, e_wanted: torch.Tensor) -> torch.Tensor:
    """An input near ``y_ref`` whose LayerNorm output is ``e_wanted``, to first order: the minimum-norm
    Gauss-Newton step (docs/compensation.md); channels of ~0 gain stay, hooks on ``norm`` do not see it."""
    y = y_ref.to(torch.float64)
    mean = y.mean(-1, keepdim=True)
    sigma = (y.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    unit = (y - mean) / sigma
    gain = None if norm.weight is None else norm.weight.detach().to(torch.float64)
    shift = None if norm.bias is None else norm.bias.detach().to(torch.float64)
    delta = e_wanted.to(torch.float64) - nn.functional.layer_norm(y, norm.normalized_shape, gain, shift, norm.eps)
    if gain is not None:
        movable = gain.abs() > 1e-6 * float(gain.abs().max())
        delta = torch.where(movable, delta / torch.where(movable, gain, torch.ones_like(gain)), torch.zeros_like(delta))
    delta = delta - delta.mean(-1, keepdim=True)
    delta = delta - (delta * unit).sum(-1, keepdim=True) / (unit * unit).sum(-1, keepdim=True).clamp_min(1e-12) * unit
    return (y + sigma * delta).to(y_ref.dtype)


def branch_scale(block: nn.Module, end: nn.Module, state: BlockState, label: str,
                 output: torch.Tensor | None = None) -> torch.Tensor:
    """The per-channel ``s`` in ``block output = base + s * (output of end)``, ``end`` the MLP branch's last module,
    from a run of ``state`` (or its ``output``) and one with unequal known offsets added at ``end``. Refused
    unless the same on every token; channels of zero factor give inf (they cannot change the output)."""
    with torch.no_grad():
        output = state.run(block).hidden if output is None else output
        rows = output.shape[-1]
        probe = 1 + torch.arange(rows, dtype=output.dtype, device=output.device) / rows
        handle = end.register_forward_hook(lambda _m, _args, e: e + probe)
        try:
            scale = (state.run(block).hidden - output) / probe
        finally:
            handle.remove()
    flat = scale.reshape(-1, scale.shape[-1])
    factor = flat.mean(0)
    rounding = max(1e-5, 4 * torch.finfo(output.dtype).eps)  # two roundings of the output (bf16: ~3e-2)
    slack = 1e-3 * float(factor.abs().max()) + rounding * (1 + float(output.abs().max()))
    if float((flat - factor).abs().max()) > slack:
        raise ValueError(f"{label}: compensation needs the block's output to be its input plus a per-channel "
                         "multiple of the MLP's output (or its LayerNorm, post-norm); here it is not: prune this "
                         "tower without compensation")
    tiny = 1e-6 * float(factor.abs().max())
    return torch.where(factor.abs() > tiny, factor, torch.full_like(factor, torch.inf))


def _site_numel(block: nn.Module, site: MlpSite) -> int:
    return sum(p.numel() for name in site.layer_names() for p in getattr(site.module(block), name).parameters())
