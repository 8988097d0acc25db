"""Prune a checkpoint on disk into a loadable export, holding one MLP block in memory at a time.

The checkpoint is a ``BlockSource`` of ``prune_blocks``, read tensor by tensor against the architecture built
on meta; the output header is written first and each pruned block appended (docs/pruning_stream.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .blockwise import BlockSource, BlockState, Calibration, materialize_outside, prune_blocks, stem_states
from .budget import Budget, plan_widths
from .calib_images import input_spec, load_calibration_images
from .export import (
    OPEN_CLIP,
    OPEN_CLIP_VISUAL_WEIGHTS,
    PRUNING_KEY,
    Architecture,
    build_initialized,
    check_stock_build,
    export_configs,
    resolve_architecture,
    weights_file,
)
from .safetensors_stream import SafetensorsReader, SafetensorsWriter
from .select import METHODS
from .sites import MlpSite
from .surgery import PruneReport, keep_counts, prune_site_tensors

REPORT_JSON = "pruning_report.json"
REPORT_MD = "pruning_report.md"
Spec = tuple[str, tuple[int, ...], torch.dtype]


class StateDictSource:
    """A state dict (in memory or mmap-backed) behind the same interface as ``SafetensorsReader``."""

    def __init__(self, state_dict: dict[str, torch.Tensor], label: str):
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{label}: entry {key!r} is a {type(value).__name__}, not a tensor")
        self.path, self._sd = label, state_dict

    def keys(self) -> list[str]:
        return list(self._sd)

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return tuple(self._sd[name].shape), self._sd[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._sd[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        tensor = self._sd[name]
        return tensor if tensor.dim() == 0 else tensor[start:stop]

    def close(self) -> None:
        self._sd = {}


Reader = SafetensorsReader | StateDictSource


def open_checkpoint(path: str | os.PathLike) -> Reader:
    """Open a ``.safetensors`` file, or a torch state dict (optionally under ``state_dict``, ``module.``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
        raise ValueError(f"{path}: not a readable torch checkpoint (truncated or another format): {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a non-empty state dict, got {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return StateDictSource(obj, str(path))


def _layout(arch: Architecture, keys: list[str]) -> tuple[str, bool, dict[str, tuple[int, ...]]]:
    """(key prefix of the tower, visual_only, expected key -> shape) for the checkpoint's keys."""
    full = {k: tuple(v.shape) for k, v in arch.model.state_dict().items()}
    if arch.family != OPEN_CLIP:
        return "", False, full
    prefix = arch.tower_path + "."
    if any(k.startswith(prefix) for k in keys):
        if any(not k.startswith(prefix) for k in keys):
            return prefix, False, full
        return prefix, True, {k: s for k, s in full.items() if k.startswith(prefix)}
    return "", True, {k[len(prefix):]: s for k, s in full.items() if k.startswith(prefix)}


def _check_keys(source: Reader, expected: dict[str, tuple[int, ...]], model: str) -> None:
    keys = source.keys()
    have = set(keys)
    missing = [k for k in expected if k not in have]
    unexpected = [k for k in keys if k not in expected]
    if missing or unexpected:
        problem = (f"tensor {missing[0]!r} is missing ({len(missing)} missing in all)" if missing
                   else f"unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
        raise ValueError(f"{source.path}: {problem}: the checkpoint does not match {model}")
    for key in keys:
        if (shape := tuple(source.meta(key)[0])) != expected[key]:
            raise ValueError(f"{source.path}: tensor {key!r} has shape {shape}, {model} expects "
                             f"{expected[key]}")


def _calibration_images(arch: Architecture, images: str | os.PathLike | torch.Tensor,
                        calibration: Calibration) -> tuple[torch.Tensor, str]:
    """(normalised images [N, 3, S, S], their label for the report) from a source or a tensor used whole."""
    spec = input_spec(arch.model, arch.family)
    if not isinstance(images, torch.Tensor):
        return load_calibration_images(images, calibration.num_images, spec), str(images)
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, spec.size, spec.size):
        raise ValueError(f"calibration: expected normalised images [N, 3, {spec.size}, {spec.size}] for "
                         f"{arch.name}, got shape {tuple(images.shape)}")
    return images.float(), f"<tensor {tuple(images.shape)}>"


@contextlib.contextmanager
def _staged(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside ``out_dir``, renamed into place when the block ends, removed on error."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        old = None
        if out_dir.exists():
            if not overwrite:
                raise FileExistsError(f"output directory exists: {out_dir}")
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(old / out_dir.name)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prune_checkpoint(model: str, out_dir: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                     ratio: float | None = None, num_keep: int | dict[str, int] | list[int] | None = None,
                     method: str = "diversity", overwrite: bool = False, seed: int = 0,
                     progress: Callable[[str], None] | None = None, calibration: Calibration | None = None,
                     images: str | os.PathLike | torch.Tensor | None = None, budget: Budget | None = None,
                     model_kwargs: dict | None = None) -> PruneReport:
    """Prune the MLPs of ``model``'s checkpoint (or its init weights, seeded) into export ``out_dir``.

    ``model``: an open_clip or timm name (``open_clip:`` / ``timm:`` choose); ``num_keep``: one count, a
    dict site path -> count or one count per block; ``seed``: init weights and ``random``. ``calibration``
    with ``images`` (a ``pruning.calib_images`` source, or normalised images [N, 3, S, S] used whole)
    compensates; ``budget`` (instead of ``ratio`` / ``num_keep``) picks per-block widths; ``model_kwargs``:
    a timm model's constructor arguments.
    """
    if method not in METHODS or method == "taylor":
        raise ValueError(f"method must be one of {[m for m in METHODS if m != 'taylor']} for checkpoint "
                         f"pruning (taylor needs activations), got {method!r}")
    if (calibration is None) != (images is None):
        raise ValueError("compensation needs both a Calibration and calibration images")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory exists: {out_dir} (pass overwrite=True / --overwrite)")
    arch = resolve_architecture(model, model_kwargs)
    if budget is not None and (ratio is not None or num_keep is not None or calibration is None):
        raise ValueError("a width budget replaces ratio / num_keep and needs calibration images")
    counts = keep_counts(arch.sites(), ratio, num_keep) if budget is None else {}
    loaded, label = _calibration_images(arch, images, calibration) if calibration is not None else (None, "")
    if checkpoint is not None:
        reader = open_checkpoint(checkpoint)
    else:
        reader = StateDictSource(build_initialized(arch, seed).state_dict(), f"<{arch.name} init, seed {seed}>")
    with contextlib.closing(reader):
        prefix, visual_only, expected = _layout(arch, reader.keys())
        _check_keys(reader, expected, f"{arch.family} model {arch.name!r}")
        with _staged(out_dir, overwrite) as tmp:
            source = CheckpointSource(arch, reader, prefix, visual_only)
            batches = [] if loaded is None else list(loaded.split(calibration.batch_size))
            common = dict(calibration=calibration, calib_inputs=batches, progress=progress,
                          generator=torch.Generator().manual_seed(seed))
            plan = None if budget is None else plan_widths(source, budget, method, **common)
            if plan is not None:
                counts = keep_counts(source.sites, num_keep=plan.widths)
            weights = weights_file(arch.family, visual_only)
            specs, orders = source.output_specs(counts), None if plan is None else plan.orders
            with SafetensorsWriter(tmp / weights, specs, metadata={"format": "pt"}) as writer:
                source.writer = writer
                report = prune_blocks(source, counts, method, orders=orders, **common)
                source.finish()
            if report.calibration is not None:
                report.calibration.update(source=label, num_images=int(loaded.shape[0]),
                                          image_shape=list(loaded.shape[1:]))
                if plan is not None:
                    report.calibration["budget"] = plan.summary
            _write_metadata(arch, reader, source, report, visual_only, weights, checkpoint, tmp)
    return report


class CheckpointSource(BlockSource):
    """A checkpoint read tensor by tensor, pruned into a ``SafetensorsWriter`` in checkpoint order.

    Each site's tensors go together at the slot where the site first appears in the file; sites fill those
    slots in module order (the file may sort blocks.10 before blocks.2), so ``write`` first appends the
    tensors before the site's slot.
    """

    def __init__(self, arch: Architecture, reader: Reader, prefix: str, visual_only: bool) -> None:
        self.reader, self.prefix = reader, prefix
        self.tower, self.sites = arch.tower, arch.sites()
        self.params_before = sum(p.numel() for p in arch.tower.parameters())
        self.strip = len(prefix) if visual_only else 0
        self.writer: SafetensorsWriter | None = None
        have = set(reader.keys())
        self.names: dict[str, dict[str, str]] = {}  # site path -> {file key: name relative to the site}
        for site in self.sites:
            keys = {f"{prefix}{site.path}.{n}": n for n in site.tensor_names()}
            self.names[site.path] = {k: n for k, n in keys.items() if k in have}
        owner = {key: path for path, names in self.names.items() for key in names}
        self.order: list[str | MlpSite] = []  # file keys outside the sites, and a slot per site
        in_module_order, seen = iter(self.sites), set()
        for key in reader.keys():
            if key not in owner:
                self.order.append(key)
            elif owner[key] not in seen:
                seen.add(owner[key])
                self.order.append(next(in_module_order))
        self.specs: list[Spec] = []
        self._unwritten = iter(self.order)

    def output_specs(self, counts: dict[str, int]) -> list[Spec]:
        """(name, shape, dtype) of every output tensor, in writing order, with the sites ``counts`` wide."""
        self.specs = []
        for item in self.order:
            if isinstance(item, str):
                self.specs.append((item[self.strip:], *self.reader.meta(item)))
                continue
            names = self.names[item.path]
            metas = {n: self.reader.meta(k) for k, n in names.items()}
            empty = {n: torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype) in metas.items()}
            pruned = prune_site_tensors(item, empty, torch.arange(counts[item.path]))
            self.specs += [(k[self.strip:], tuple(pruned[n].shape), metas[n][1]) for k, n in names.items()]
        return self.specs

    @contextlib.contextmanager
    def read(self, path: str) -> Iterator[dict[str, torch.Tensor]]:
        names = self.tower.get_submodule(path).state_dict()
        yield {n: self.reader.get(f"{self.prefix}{path}.{n}") for n in names}

    def write(self, site: MlpSite, tensors: dict[str, torch.Tensor]) -> None:
        assert self.writer is not None
        self._flush(stop_at=site)
        for key, name in self.names[site.path].items():
            self.writer.write(key[self.strip:], tensors[name].to(self.reader.meta(key)[1]))

    def finish(self) -> None:
        """Append the tensors after the last site's slot."""
        self._flush(stop_at=None)

    def _flush(self, stop_at: MlpSite | None) -> None:
        """Append the unwritten tensors up to ``stop_at``'s slot (taking the slot), or to the end."""
        assert self.writer is not None
        for item in self._unwritten:
            if not isinstance(item, str):
                assert item.path == getattr(stop_at, "path", None), (item.path, stop_at)
                return
            self.writer.write(item[self.strip:], self.reader.get(item))

    def stem_states(self, first_block: str, images: list[torch.Tensor]) -> list[BlockState]:
        container = first_block.rpartition(".")[0]
        stem = materialize_outside(self.tower, container, lambda n: self.reader.get(self.prefix + n))
        return stem_states(stem, first_block, images)


def _write_metadata(arch: Architecture, reader: Reader, source: CheckpointSource, report: PruneReport,
                    visual_only: bool, weights: str, checkpoint: str | os.PathLike | None, tmp: Path) -> None:
    """The export's config (written before ``check_stock_build`` reads it) and the pruning report."""
    def write_json(path: Path, obj: dict) -> None:
        path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

    widths = {s.path: s.hidden_after for s in report.sites}
    config_name, config, claimed = export_configs(arch, widths, visual_only=visual_only)
    write_json(tmp / config_name, config)
    stock = config[PRUNING_KEY]["stock_loadable"] = claimed and check_stock_build(tmp)
    write_json(tmp / config_name, config)
    summary = {"model": arch.name, "family": arch.family, "checkpoint": checkpoint and str(checkpoint),
               "tower": arch.tower_path, "visual_only": visual_only, "weights_file": weights,
               "stock_loadable": stock, "how_to_load": _how_to_load(arch, config, visual_only, stock),
               "checkpoint_elements_before": sum(math.prod(reader.meta(k)[0]) for k in reader.keys()),
               "checkpoint_elements_after": sum(math.prod(shape) for _, shape, _ in source.specs)}
    write_json(tmp / REPORT_JSON, {**summary, **report.to_dict()})
    (tmp / REPORT_MD).write_text(_markdown(summary, report), encoding="utf-8")


def _how_to_load(arch: Architecture, config: dict, visual_only: bool, stock: bool) -> str:
    if not stock:
        return ("per-layer widths: stock open_clip/timm cannot build them from the config; "
                "use pruning.export.load_pruned(dir)")
    if arch.family != OPEN_CLIP:
        return "timm.create_model('local-dir:<dir>', pretrained=True)"
    timm_models = config[PRUNING_KEY].get("timm_models")
    register = ("" if timm_models is None else "pruning.export.register_pruned_timm_models(dir) first "
                f"(registers {list(timm_models)}), then ")
    if visual_only:
        return (register + "m = open_clip.create_model('local-dir:<dir>', load_weights=False); "
                f"m.visual.load_state_dict(safetensors.torch.load_file('<dir>/{OPEN_CLIP_VISUAL_WEIGHTS}'))")
    return register + "open_clip.create_model_and_transforms('local-dir:<dir>')"


def _row(cells: list) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _markdown(summary: dict, report: PruneReport) -> str:
    before, after, calib = report.model_params_before, report.model_params_after, report.calibration
    lines = [
        f"# Pruning report: {summary['model']} ({summary['family']}, tower `{summary['tower'] or '<root>'}`)",
        "",
        f"- method: {report.method}; checkpoint: {summary['checkpoint'] or 'init weights'}",
        f"- tower parameters: {before:,} -> {after:,} (-{100 * (1 - after / before):.1f}%)",
        f"- checkpoint elements: {summary['checkpoint_elements_before']:,} -> "
        f"{summary['checkpoint_elements_after']:,}",
        f"- stock-loadable: {'yes' if summary['stock_loadable'] else 'no (per-layer widths)'}; "
        f"load with: {summary['how_to_load']}",
    ]
    if calib:
        lines.append(f"- compensation: each block refitted to the original block's output, ridge "
                     f"{calib['ridge']}, {calib['num_images']} calibration images from {calib['source']} "
                     f"(batches of {calib['batch_size']}; {calib['holdout_fraction']:.0%} of tokens held out "
                     f"for the errors); carried hidden states {calib['hidden_state_bytes'] / 2**20:.1f} MiB; "
                     f"{calib['seconds']:.1f} s" + (f"; then each MLP refined {calib['refine_steps']} steps at lr "
                                                    f"{calib['refine_lr']:g}" if calib["refine_steps"] else ""))
    header = ["#", "site", "hidden before", "hidden after", "params before", "params after"]
    header += ["held-out error plain", "held-out error compensated"] if calib else []
    lines += ["", _row([*header, "first kept indices"]), "|" + "---|" * (len(header) + 1)]
    for i, s in enumerate(report.sites):
        errors = [] if not calib else ["-", "-"] if s.recon_error_before is None else [
            f"{s.recon_error_before:.4f}", f"{s.recon_error_after:.4f}"]
        head = ", ".join(map(str, s.kept[:8])) + (", ..." if len(s.kept) > 8 else "")
        lines.append(_row([i, f"`{s.path}`", s.hidden_before, s.hidden_after, f"{s.params_before:,}",
                           f"{s.params_after:,}", *errors, head]))
    if calib:
        lines += ["", "held-out error: ||y' - y|| / ||y|| of fc2's output against the one that reproduces "
                      "the original block's output, on held-out calibration tokens, pruned without and with "
                      "compensation."]
    if calib and calib.get("budget"):
        lines += _budget_markdown(calib["budget"], report)
    return "\n".join([*lines, "", f"Full kept index lists (selection order) are in `{REPORT_JSON}`.", ""])


def _budget_markdown(plan: dict, report: PruneReport) -> list[str]:
    """Widths per block as a bar chart, with the predicted and the measured errors."""
    lines = ["", f"## Adaptive widths: budget r={plan['ratio']:g} ({plan['units']:,} of "
                 f"{plan['uniform_units']:,} units; grid {plan['grid']}; curves measured in "
                 f"{plan['seconds']:.1f} s)",
             "", "| # | width | | predicted error | at the uniform width | measured held-out error |",
             "|---|---|---|---|---|---|"]
    rows = zip(plan["widths"], plan["predicted_error"], plan["uniform_error"], report.sites, strict=True)
    for i, (width, predicted, uniform, site) in enumerate(rows):
        bar = "█" * max(1, round(20 * width / max(plan["widths"])))
        at_uniform = "-" if uniform is None else f"{uniform:.3g}"
        lines.append(_row([i, width, bar, f"{predicted:.3g}", at_uniform, f"{site.recon_error_after:.4f}"]))
    return [*lines, "", "predicted error: E||s (y_w - y)||^2 / E||h_out||^2 of the block on held-out tokens "
                        "of the original model's hidden states (docs/adaptive.md); measured: the compensated "
                        "block's held-out error above."]
