"""Make MLPs smaller: keep chosen hidden units, as real smaller Linear layers (never masks).

fc_in keeps rows (and bias entries) at the kept indices, fc_out keeps the same columns and its
bias unchanged; no weight compensation. Gated layouts keep the same indices in both halves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .select import select_mlp_channels
from .sites import GATED_FUSED, MlpSite, find_mlp_sites


@dataclass
class SiteReport:
    """What pruning did to one MLP."""

    path: str
    hidden_before: int
    hidden_after: int
    params_before: int
    params_after: int
    kept: list[int] = field(repr=False)
    recon_error_before: float | None = None
    """Relative error of fc_out's output on held-out calibration tokens, pruned without compensation."""
    recon_error_after: float | None = None
    """The same error after closed-form compensation (``pruning.compensate``); None without it."""


@dataclass
class PruneReport:
    """Per-site records and whole-model parameter counts."""

    method: str
    sites: list[SiteReport]
    model_params_before: int
    model_params_after: int

    @property
    def widths(self) -> list[int]:
        return [s.hidden_after for s in self.sites]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "sites": [vars(s) for s in self.sites],
        }


def num_keep_for_ratio(width: int, ratio: float, hidden: int) -> int:
    """The paper's kept width: int(ratio * width) hidden units, ratio relative to the block width."""
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    keep = int(ratio * width)
    if keep < 1:
        raise ValueError(f"ratio {ratio} keeps no hidden unit of a block of width {width}")
    if keep > hidden:
        raise ValueError(f"ratio {ratio} keeps {keep} hidden units but the MLP has only {hidden}")
    return keep


def slice_linear(layer: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear with only ``index`` along ``dim`` of the weight (0: outputs, 1: inputs)."""
    index = index.to(layer.weight.device)
    weight = layer.weight.detach().index_select(dim, index)
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=layer.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if layer.bias is not None:
            bias = layer.bias.detach()
            new.bias.copy_(bias.index_select(0, index) if dim == 0 else bias)
    new.weight.requires_grad_(layer.weight.requires_grad)
    if layer.bias is not None:
        new.bias.requires_grad_(layer.bias.requires_grad)
    return new


def sorted_keep(site: MlpSite, keep: torch.Tensor) -> torch.Tensor:
    """Validated kept indices in ascending order, the unit order every pruned layer uses.

    The function does not depend on the order of hidden units, and ascending order makes
    keeping all units reproduce the original bit for bit.
    """
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    if keep.numel() == 0 or keep.unique().numel() != keep.numel():
        raise ValueError(f"{site.path}: kept indices must be non-empty and distinct")
    if int(keep.min()) < 0 or int(keep.max()) >= site.hidden:
        raise ValueError(f"{site.path}: kept indices must be in [0, {site.hidden})")
    return keep.sort().values


def prune_site(model: nn.Module, site: MlpSite, keep: torch.Tensor) -> MlpSite:
    """Replace the site's layers by smaller ones keeping hidden units ``keep``; return the new site."""
    keep = sorted_keep(site, keep)
    mlp = site.module(model)
    # Rows of a fused gated layer are [gate half; value half]: the same units in both.
    in_index = torch.cat([keep, keep + site.hidden]) if site.layout == GATED_FUSED else keep
    for name in site.in_names:
        setattr(mlp, name, slice_linear(getattr(mlp, name), in_index, dim=0))
    setattr(mlp, site.out_name, slice_linear(getattr(mlp, site.out_name), keep, dim=1))
    if site.norm_name is not None:
        old = getattr(mlp, site.norm_name)
        norm = nn.LayerNorm(keep.numel(), eps=old.eps, elementwise_affine=old.elementwise_affine,
                            bias=old.bias is not None, device=old.weight.device if old.weight is not None else None)
        with torch.no_grad():
            if old.weight is not None:
                norm.weight.copy_(old.weight.index_select(0, keep.to(old.weight.device)))
            if old.bias is not None:
                norm.bias.copy_(old.bias.index_select(0, keep.to(old.bias.device)))
        setattr(mlp, site.norm_name, norm.to(old.weight.dtype if old.weight is not None else torch.float32))
    return MlpSite(**{**vars(site), "hidden": keep.numel()})


def site_param_count(model: nn.Module, site: MlpSite) -> int:
    mlp = site.module(model)
    names = [*site.in_names, site.out_name] + ([site.norm_name] if site.norm_name else [])
    return sum(p.numel() for n in names for p in getattr(mlp, n).parameters())


def keep_counts(sites: list[MlpSite], ratio: float | None, num_keep: int | dict[str, int] | None
                ) -> dict[str, int]:
    """Kept hidden units per site path: ``ratio`` (the paper's r) or ``num_keep`` (one count, or per site path).

    Validated against each site's hidden width; every pruning path counts with this.
    """
    if (ratio is None) == (num_keep is None):
        raise ValueError("give exactly one of ratio or num_keep")
    if ratio is not None:
        return {s.path: num_keep_for_ratio(s.width, ratio, s.hidden) for s in sites}
    if isinstance(num_keep, dict):
        unknown = sorted(set(num_keep) - {s.path for s in sites})
        if unknown:
            raise ValueError(f"num_keep names unknown MLP sites: {unknown}; sites are {sites[0].path} ...")
        counts = {s.path: num_keep.get(s.path, s.hidden) for s in sites}
    else:
        counts = {s.path: num_keep for s in sites}
    for site in sites:
        count = counts[site.path]
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= site.hidden:
            raise ValueError(f"num_keep for {site.path} must be an int in [1, {site.hidden}], got {count!r}")
    return counts


def prune_model(
    model: nn.Module,
    *,
    ratio: float | None = None,
    num_keep: int | dict[str, int] | None = None,
    method: str = "diversity",
    generator: torch.Generator | None = None,
    scores: dict[str, torch.Tensor] | None = None,
) -> PruneReport:
    """Prune every MLP of ``model`` in place and report what was kept.

    Give ``ratio`` (kept hidden = int(ratio * width), the paper's r) or ``num_keep`` (one count
    for every site, or a dict from site path to count for per-layer widths). ``scores`` maps
    site paths to per-unit importances for ``method='taylor'``.
    """
    sites = find_mlp_sites(model)
    counts = keep_counts(sites, ratio, num_keep)
    total_before = sum(p.numel() for p in model.parameters())
    records = []
    for site in sites:
        site_scores = None
        if method == "taylor":
            if scores is None or site.path not in scores:
                raise ValueError(f"method='taylor' needs scores for site {site.path}")
            site_scores = scores[site.path]
        before = site_param_count(model, site)
        keep = select_mlp_channels(site.selection_weight(model), counts[site.path], method,
                                   generator=generator, scores=site_scores)
        new_site = prune_site(model, site, keep)
        records.append(SiteReport(site.path, site.hidden, new_site.hidden, before,
                                  site_param_count(model, new_site), keep.tolist()))
    total_after = sum(p.numel() for p in model.parameters())
    return PruneReport(method, records, total_before, total_after)


def prune_site_tensors(site: MlpSite, tensors: dict[str, torch.Tensor], keep: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
    """Slice a site's tensors (names relative to ``site.path``) to hidden units ``keep``.

    The state-dict form of ``prune_site`` (same validation, same unit order), for checkpoints
    that are never built as modules. Tensors whose shape does not depend on the hidden width
    are returned unchanged.
    """
    keep = sorted_keep(site, keep)
    fused = site.layout == GATED_FUSED
    in_index = torch.cat([keep, keep + site.hidden]) if fused else keep
    rules = {f"{n}.{p}": (0, in_index, 2 * site.hidden if fused else site.hidden)
             for n in site.in_names for p in ("weight", "bias")}
    rules[f"{site.out_name}.weight"] = (1, keep, site.hidden)
    if site.norm_name is not None:
        rules.update({f"{site.norm_name}.{p}": (0, keep, site.hidden) for p in ("weight", "bias")})
    out = {}
    for name, tensor in tensors.items():
        if name not in rules:
            out[name] = tensor
            continue
        dim, index, size = rules[name]
        if tensor.dim() <= dim or tensor.shape[dim] != size:
            raise ValueError(f"{site.path}.{name}: expected size {size} along dim {dim} (the hidden "
                             f"width), got shape {tuple(tensor.shape)}")
        out[name] = tensor.index_select(dim, index.to(tensor.device))
    return out
