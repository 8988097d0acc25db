"""Prune a checkpoint on disk into a loadable export, holding one MLP block in memory at a time.

The architecture is built on the meta device to learn tensor names, shapes and MLP sites; the
input is read tensor by tensor (safetensors with plain reads, ``.pt``/``.bin`` through mmap
``torch.load``); every output shape is known before any selection runs, so the output header is
written first and tensors are appended as each block is pruned. The export is assembled in a
temporary directory beside ``out_dir`` and renamed into place only when complete.
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
from .sites import MlpSite
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
) -> PruneReport:
    """Prune the MLPs of ``model``'s checkpoint (or seeded init weights) into export ``out_dir``.

    ``model`` is an open_clip or timm name (``open_clip:``/``timm:`` prefixes disambiguate);
    ``num_keep`` is one count or a dict from tower-relative site path to count. ``seed`` seeds
    the init weights when there is no checkpoint and the ``random`` method.
    """
    if method not in METHODS or method == "taylor":
        raise ValueError(f"method must be one of {[m for m in METHODS if m != 'taylor']} for checkpoint "
                         f"pruning (taylor needs activations), got {method!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory exists: {out_dir} (pass overwrite=True / --overwrite)")
    arch = resolve_architecture(model)
    sites = arch.sites()
    counts = keep_counts(sites, ratio, num_keep)
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
                                   progress, checkpoint)
            _move_into_place(tmp, out_dir, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        source.close()
    return report


def _write_export(arch: Architecture, source: Source, sites: list[MlpSite], counts: dict[str, int],
                  prefix: str, visual_only: bool, method: str, seed: int, tmp: Path,
                  progress: Callable[[str], None] | None, checkpoint: str | os.PathLike | None) -> PruneReport:
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
            pruned = prune_site_tensors(site, tensors, keep)
            for key, name in names.items():
                writer.write(key[strip:], pruned[name])
            records.append(SiteReport(site.path, site.hidden, counts[site.path],
                                      sum(t.numel() for t in tensors.values()),
                                      sum(t.numel() for t in pruned.values()), keep.tolist()))
            del tensors, pruned
            if progress is not None:
                progress(f"[{len(records)}/{len(sites)}] {site.path}: {site.hidden} -> {counts[site.path]} "
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
               "checkpoint_elements_after": sum(_numel(s) for _, s, _ in specs)}
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
        "",
        "| # | site | hidden before | hidden after | params before | params after | first kept indices |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(report.sites):
        head = ", ".join(map(str, s.kept[:8])) + (", ..." if len(s.kept) > 8 else "")
        lines.append(f"| {i} | `{s.path}` | {s.hidden_before} | {s.hidden_after} | {s.params_before:,} | "
                     f"{s.params_after:,} | {head} |")
    lines += ["", f"Full kept index lists (selection order) are in `{REPORT_JSON}`.", ""]
    return "\n".join(lines)
