"""Prune a checkpoint on disk into a loadable export, holding one MLP block in memory at a time.

The architecture is built on the meta device to learn tensor names, shapes and MLP sites; the
input is read tensor by tensor (safetensors with plain reads, ``.pt``/``.bin`` through mmap
``torch.load``); every output shape is known before any selection runs, so the output header is
written first and tensors are appended as each block is pruned. The export is assembled in a
temporary directory beside ``out_dir`` and renamed into place only when complete.

With ``calibration`` images the MLPs are also compensated in closed form (``pruning.compensate``)
without ever holding the model: everything before block 0 is materialised from the checkpoint and
run once (``pruning.block_io``), then block by block the block alone is materialised (fp32), its
fc2-input statistics are collected on the carried hidden states, it is pruned, compensated and
written (in the checkpoint's dtype), and the hidden states move on through the original block
(``teacher``) or the compensated one (``sequential``; ``corrected`` carries both). Memory is one
block plus the calibration hidden states, whose size the report gives.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import block_io
from .calib_images import input_spec, load_calibration_images
from .compensate import MODES
from .export import (
    OPEN_CLIP,
    OPEN_CLIP_VISUAL_WEIGHTS,
    OPEN_CLIP_WEIGHTS,
    PRUNING_KEY,
    TIMM_WEIGHTS,
    Architecture,
    build_initialized,
    check_stock_build,
    export_configs,
    resolve_architecture,
)
from .safetensors_stream import SafetensorsReader, SafetensorsWriter
from .select import METHODS, select_mlp_channels
from .sites import MlpSite, prefix_token_count
from .surgery import PruneReport, SiteReport, keep_counts, prune_site_tensors

REPORT_JSON = "pruning_report.json"
REPORT_MD = "pruning_report.md"


class StateDictSource:
    """A state dict (in memory or mmap-backed) behind the same interface as ``SafetensorsReader``."""

    def __init__(self, state_dict: dict[str, torch.Tensor], label: str):
        self.path = label
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{label}: entry {key!r} is a {type(value).__name__}, not a tensor")
        self._sd = state_dict

    def keys(self) -> list[str]:
        return list(self._sd)

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return tuple(self._sd[name].shape), self._sd[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._sd[name]

    def close(self) -> None:
        self._sd = {}


Source = SafetensorsReader | StateDictSource


def open_checkpoint(path: str | os.PathLike) -> Source:
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


def _check_keys(source: Source, expected: dict[str, tuple[int, ...]], model: str) -> None:
    keys = source.keys()
    have = set(keys)
    missing = [k for k in expected if k not in have]
    if missing:
        raise ValueError(f"{source.path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all): "
                         f"the checkpoint does not match {model}")
    unexpected = [k for k in keys if k not in expected]
    if unexpected:
        raise ValueError(f"{source.path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all): "
                         f"the checkpoint does not match {model}")
    for key in keys:
        shape, _ = source.meta(key)
        if tuple(shape) != expected[key]:
            raise ValueError(f"{source.path}: tensor {key!r} has shape {tuple(shape)}, {model} expects "
                             f"{expected[key]}")


def _site_tensor_names(site: MlpSite) -> list[str]:
    # Every tensor of the site's layers (fc_out bias included) so counts match site_param_count.
    modules = [*site.in_names, site.out_name] + ([site.norm_name] if site.norm_name else [])
    return [f"{m}.{p}" for m in modules for p in ("weight", "bias")]


def prune_checkpoint(
    model: str,
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    ratio: float | None = None,
    num_keep: int | dict[str, int] | None = None,
    method: str = "diversity",
    overwrite: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    calibration: str | os.PathLike | torch.Tensor | None = None,
    num_calib: int = 256,
    calib_mode: str = "sequential",
    ridge: float = 1e-3,
    calib_batch_size: int = 16,
    holdout_fraction: float = 0.2,
    balance_prefix: bool = False,
) -> PruneReport:
    """Prune the MLPs of ``model``'s checkpoint (or seeded init weights) into export ``out_dir``.

    ``model`` is an open_clip or timm name (``open_clip:``/``timm:`` prefixes disambiguate);
    ``num_keep`` is one count or a dict from tower-relative site path to count. ``seed`` seeds
    the init weights when there is no checkpoint and the ``random`` method.

    ``calibration``: an image folder, tar shards or tensor file (``pruning.calib_images``), or
    normalised images [N, 3, S, S], turns on closed-form compensation: ``num_calib`` images (a
    tensor is used whole) in batches of ``calib_batch_size``, ``calib_mode`` in
    ``pruning.compensate.MODES``, ``ridge`` and ``holdout_fraction`` as in
    ``prune_and_compensate``; per-block reconstruction errors go into the report.
    ``balance_prefix`` (``calib_mode='output'``): class / register tokens weigh as much as the patch
    tokens of their image in the fit (``pruning.block_io.BlockCalibration``).
    """
    if method not in METHODS or method == "taylor":
        raise ValueError(f"method must be one of {[m for m in METHODS if m != 'taylor']} for checkpoint "
                         f"pruning (taylor needs activations), got {method!r}")
    if calibration is not None:
        if calib_mode not in MODES:
            raise ValueError(f"calib_mode must be one of {MODES}, got {calib_mode!r}")
        if not ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if calib_batch_size < 1:
            raise ValueError(f"calib_batch_size must be >= 1, got {calib_batch_size}")
        if not 0 <= holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
        if balance_prefix and calib_mode != "output":
            raise ValueError(f"balance_prefix needs calib_mode 'output', got {calib_mode!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory exists: {out_dir} (pass overwrite=True / --overwrite)")
    arch = resolve_architecture(model)
    sites = arch.sites()
    counts = keep_counts(sites, ratio, num_keep)
    calib = None
    if calibration is not None:
        for site in sites:
            if site.norm_name is not None:
                raise ValueError(f"{site.path}: compensation is not defined with a LayerNorm over the hidden units "
                                 f"({site.norm_name}); prune without --calibration")
        layout = block_io.block_layout(arch.tower, sites)
        spec = input_spec(arch.model, arch.family)
        if isinstance(calibration, torch.Tensor):
            if calibration.dim() != 4 or tuple(calibration.shape[1:]) != (3, spec.size, spec.size):
                raise ValueError(f"calibration: expected normalised images [N, 3, {spec.size}, {spec.size}] for "
                                 f"{arch.name}, got shape {tuple(calibration.shape)}")
            images, label = calibration.float(), f"<tensor {tuple(calibration.shape)}>"
        else:
            images, label = load_calibration_images(calibration, num_calib, spec), str(calibration)
        prefix_tokens = prefix_token_count(arch.tower) if balance_prefix else 0
        calib = _Calibration(layout, images, label, calib_mode, ridge, calib_batch_size, holdout_fraction,
                             prefix_tokens)
    if checkpoint is not None:
        source = open_checkpoint(checkpoint)
    else:
        source = StateDictSource(build_initialized(arch, seed).state_dict(), f"<{arch.name} init, seed {seed}>")
    try:
        prefix, visual_only, expected = _layout(arch, source.keys())
        _check_keys(source, expected, f"{arch.family} model {arch.name!r}")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            report = _write_export(arch, source, sites, counts, prefix, visual_only, method, seed, tmp,
                                   progress, checkpoint, calib)
            _move_into_place(tmp, out_dir, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        source.close()
    return report


class _Calibration:
    """Settings of a calibrated run and, once started, the block-to-block state."""

    def __init__(self, layout: block_io.BlockLayout, images: torch.Tensor, label: str, mode: str, ridge: float,
                 batch_size: int, holdout_fraction: float, prefix_tokens: int = 0) -> None:
        self.layout, self.images, self.label = layout, images, label
        self.prefix_tokens = prefix_tokens
        self.mode, self.ridge, self.batch_size, self.holdout_fraction = mode, ridge, batch_size, holdout_fraction
        self.index = {s.path: i for i, s in enumerate(layout.tower_sites)}
        self.state: block_io.BlockCalibration | None = None
        self.peak_bytes = 0
        self.seconds = 0.0

    def start(self, arch: Architecture, source: Source, prefix: str) -> None:
        start = time.perf_counter()
        stem = block_io.materialize_outside(arch.tower, self.layout.container, lambda n: source.get(prefix + n))
        states = block_io.stem_states(stem, self.layout.blocks[0], self.images.split(self.batch_size))
        del stem
        self.state = block_io.BlockCalibration(states, mode=self.mode, ridge=self.ridge,
                                               holdout_fraction=self.holdout_fraction,
                                               prefix_tokens=self.prefix_tokens)
        self.peak_bytes = self.state.hidden_state_bytes()
        self.seconds += time.perf_counter() - start

    def step(self, arch: Architecture, source: Source, prefix: str, site: MlpSite, keep: torch.Tensor,
             names: dict[str, str]) -> tuple[dict[str, torch.Tensor], SiteReport]:
        """Pruned-and-compensated tensors of ``site`` (keyed like ``names``' values) and its record."""
        if self.state is None:
            self.start(arch, source, prefix)
        assert self.state is not None
        start = time.perf_counter()
        i = self.index[site.path]
        path, local = self.layout.blocks[i], self.layout.sites[i]
        meta = arch.tower.get_submodule(path)
        block = block_io.materialize(meta, {n: source.get(f"{prefix}{path}.{n}") for n in meta.state_dict()},
                                     label=f"{path}.")
        record = self.state.step(block, local, keep, site.path)
        state = block.get_submodule(local.path).state_dict()
        tensors = {n: state[n].to(source.meta(k)[1]) for k, n in names.items()}
        self.peak_bytes = max(self.peak_bytes, self.state.hidden_state_bytes())
        self.seconds += time.perf_counter() - start
        return tensors, record

    def summary(self) -> dict:
        return {"source": self.label, "num_images": int(self.images.shape[0]),
                "image_shape": list(self.images.shape[1:]), "mode": self.mode, "ridge": self.ridge,
                "prefix_tokens_balanced": self.prefix_tokens,
                "batch_size": self.batch_size, "holdout_fraction": self.holdout_fraction,
                "hidden_state_bytes": self.peak_bytes, "seconds": round(self.seconds, 3)}


def _write_export(arch: Architecture, source: Source, sites: list[MlpSite], counts: dict[str, int],
                  prefix: str, visual_only: bool, method: str, seed: int, tmp: Path,
                  progress: Callable[[str], None] | None, checkpoint: str | os.PathLike | None,
                  calib: _Calibration | None = None) -> PruneReport:
    # Output order: checkpoint order, each site's tensors together at a slot where a site first
    # appears; sites fill those slots in module order (file order may sort blocks.10 before
    # blocks.2), so the random method draws per site in the same order as prune_model.
    groups: dict[str, tuple[MlpSite, dict[str, str]]] = {}
    owner: dict[str, str] = {}
    have = set(source.keys())
    for site in sites:
        names = {prefix + site.path + "." + n: n for n in _site_tensor_names(site) if prefix + site.path + "." + n in have}
        groups[site.path] = (site, names)
        owner.update(dict.fromkeys(names, site.path))
    order: list[str | MlpSite] = []
    seen: set[str] = set()
    in_module_order = iter(sites)
    for key in source.keys():
        path = owner.get(key)
        if path is None:
            order.append(key)
        elif path not in seen:
            seen.add(path)
            order.append(next(in_module_order))

    strip = len(prefix) if visual_only else 0
    specs = []
    for item in order:
        if isinstance(item, str):
            shape, dtype = source.meta(item)
            specs.append((item[strip:], shape, dtype))
            continue
        site, names = groups[item.path]
        metas = {n: source.meta(k) for k, n in names.items()}
        shapes = prune_site_tensors(site, {n: torch.empty(s, dtype=d, device="meta") for n, (s, d) in metas.items()},
                                    torch.arange(counts[site.path]))
        specs += [(k[strip:], tuple(shapes[n].shape), metas[n][1]) for k, n in names.items()]

    weights = TIMM_WEIGHTS if arch.family != OPEN_CLIP else OPEN_CLIP_VISUAL_WEIGHTS if visual_only else OPEN_CLIP_WEIGHTS
    generator = torch.Generator().manual_seed(seed)
    records = []
    with SafetensorsWriter(tmp / weights, specs, metadata={"format": "pt"}) as writer:
        for item in order:
            if isinstance(item, str):
                writer.write(item[strip:], source.get(item))
                continue
            start = time.perf_counter()
            site, names = groups[item.path]
            tensors = {n: source.get(k) for k, n in names.items()}
            if site.selection_tensor_name not in tensors:
                raise ValueError(f"{source.path}: tensor {prefix + site.path + '.' + site.selection_tensor_name!r} "
                                 "is missing")
            keep = select_mlp_channels(site.selection_rows(tensors[site.selection_tensor_name]),
                                       counts[site.path], method, generator=generator)
            if calib is None:
                pruned = prune_site_tensors(site, tensors, keep)
                record = SiteReport(site.path, site.hidden, counts[site.path], sum(t.numel() for t in tensors.values()),
                                    sum(t.numel() for t in pruned.values()), keep.tolist())
            else:
                pruned, record = calib.step(arch, source, prefix, site, keep, names)
            for key, name in names.items():
                writer.write(key[strip:], pruned[name])
            records.append(record)
            del tensors, pruned
            if progress is not None:
                errors = ("" if record.recon_error_before is None else
                          f", fc2 error {record.recon_error_before:.4f} -> {record.recon_error_after:.4f}")
                progress(f"[{len(records)}/{len(sites)}] {site.path}: {site.hidden} -> {counts[site.path]}{errors} "
                         f"({time.perf_counter() - start:.1f} s)")

    before = sum(p.numel() for p in arch.tower.parameters())
    after = before - sum(r.params_before - r.params_after for r in records)
    report = PruneReport(method, records, before, after)
    config_name, config, claimed = export_configs(arch, counts, visual_only=visual_only)
    _write_json(tmp / config_name, config)
    stock = claimed and check_stock_build(tmp)
    config[PRUNING_KEY]["stock_loadable"] = stock
    _write_json(tmp / config_name, config)
    summary = {"model": arch.name, "family": arch.family, "checkpoint": None if checkpoint is None else str(checkpoint),
               "tower": arch.tower_path, "visual_only": visual_only, "weights_file": weights,
               "stock_loadable": stock, "how_to_load": _how_to_load(arch, config, visual_only, stock),
               "checkpoint_elements_before": sum(_numel(source.meta(k)[0]) for k in source.keys()),
               "checkpoint_elements_after": sum(_numel(s) for _, s, _ in specs),
               "calibration": None if calib is None else calib.summary()}
    _write_json(tmp / REPORT_JSON, {**summary, **report.to_dict()})
    (tmp / REPORT_MD).write_text(_markdown(summary, report), encoding="utf-8")
    return report


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    old = None
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"output directory exists: {out_dir}")
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(old / out_dir.name)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _how_to_load(arch: Architecture, config: dict, visual_only: bool, stock: bool) -> str:
    if not stock:
        return ("per-layer widths: stock open_clip/timm cannot build them from the config; "
                "use pruning.export.load_pruned(dir)")
    if arch.family != OPEN_CLIP:
        return "timm.create_model('local-dir:<dir>', pretrained=True)"
    register = ("pruning.export.register_pruned_timm_models(dir) first (registers "
                f"{list(config[PRUNING_KEY]['timm_models'])}), then "
                if "timm_models" in config[PRUNING_KEY] else "")
    if visual_only:
        return (register + "m = open_clip.create_model('local-dir:<dir>', load_weights=False); "
                f"m.visual.load_state_dict(safetensors.torch.load_file('<dir>/{OPEN_CLIP_VISUAL_WEIGHTS}'))")
    return register + "open_clip.create_model_and_transforms('local-dir:<dir>')"


def _markdown(summary: dict, report: PruneReport) -> str:
    def pct(after: int, before: int) -> str:
        return f"{100 * (1 - after / before):.1f}%"

    lines = [
        f"# Pruning report: {summary['model']} ({summary['family']}, tower `{summary['tower'] or '<root>'}`)",
        "",
        f"- method: {report.method}; checkpoint: {summary['checkpoint'] or 'init weights'}",
        f"- tower parameters: {report.model_params_before:,} -> {report.model_params_after:,} "
        f"(-{pct(report.model_params_after, report.model_params_before)})",
        f"- checkpoint elements: {summary['checkpoint_elements_before']:,} -> "
        f"{summary['checkpoint_elements_after']:,}",
        f"- stock-loadable: {'yes' if summary['stock_loadable'] else 'no (per-layer widths)'}; "
        f"load with: {summary['how_to_load']}",
    ]
    calib = summary.get("calibration")
    if calib:
        lines.append(f"- compensation: {calib['mode']} mode, ridge {calib['ridge']}, {calib['num_images']} "
                     f"calibration images from {calib['source']} (batches of {calib['batch_size']}; "
                     f"{calib['holdout_fraction']:.0%} of tokens held out for the errors); carried hidden states "
                     f"{calib['hidden_state_bytes'] / 2**20:.1f} MiB; {calib['seconds']:.1f} s")
    errors = " fc2 error plain | fc2 error compensated |" if calib else ""
    lines += [
        "",
        "| # | site | hidden before | hidden after | params before | params after |" + errors + " first kept indices |",
        "|---|---|---|---|---|---|---|" + ("---|---|" if calib else ""),
    ]
    for i, s in enumerate(report.sites):
        head = ", ".join(map(str, s.kept[:8])) + (", ..." if len(s.kept) > 8 else "")
        cells = (f" {s.recon_error_before:.4f} | {s.recon_error_after:.4f} |"
                 if calib and s.recon_error_before is not None else " - | - |" if calib else "")
        lines.append(f"| {i} | `{s.path}` | {s.hidden_before} | {s.hidden_after} | {s.params_before:,} | "
                     f"{s.params_after:,} |{cells} {head} |")
    if calib:
        lines += ["", "fc2 error: ||y' - y|| / ||y|| of the MLP's output Linear on held-out calibration tokens, "
                      "pruned without and with compensation."]
    lines += ["", f"Full kept index lists (selection order) are in `{REPORT_JSON}`.", ""]
    return "\n".join(lines)
