"""Make MLPs smaller: keep chosen hidden units, as real smaller layers (never masks).

fc_in keeps rows (and bias entries) at the kept indices, fc_out keeps the same columns and its
bias unchanged; gated layouts keep the same indices in both halves. Surgery works on tensors
(``prune_site_tensors``), so checkpoints, engine shards and modules share one rule;
``install_site`` puts tensors of any width into a module as new layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .sites import GATED_FUSED, MlpSite


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
    """Relative error of the MLP branch's output on held-out calibration tokens, pruned, not compensated."""
    recon_error_after: float | None = None
    """The same after compensation; both None without calibration."""


@dataclass
class PruneReport:
    """Per-site records and whole-model parameter counts."""

    method: str
    sites: list[SiteReport]
    model_params_before: int
    model_params_after: int
    calibration: dict | None = None
    """Settings and cost of the calibration (``pruning.blockwise.Calibration``), None without it."""

    @property
    def widths(self) -> list[int]:
        return [s.hidden_after for s in self.sites]

    def to_dict(self) -> dict:
        return asdict(self)


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


def keep_counts(sites: list[MlpSite], ratio: float | None = None,
                num_keep: int | Mapping[str, int] | Sequence[int] | None = None) -> dict[str, int]:
    """Kept hidden units per site path: ``ratio`` (the paper's r) or ``num_keep`` (one count for every site,
    a mapping from site path to count, or a sequence with one count per site in module order).

    Validated against each site's hidden width; every pruning path counts with this.
    """
    if (ratio is None) == (num_keep is None):
        raise ValueError("give exactly one of ratio or num_keep")
    if ratio is not None:
        return {s.path: num_keep_for_ratio(s.width, ratio, s.hidden) for s in sites}
    if isinstance(num_keep, Mapping):
        unknown = sorted(set(num_keep) - {s.path for s in sites})
        if unknown:
            raise ValueError(f"num_keep names unknown MLP sites: {unknown}; sites are {sites[0].path} ...")
        counts = {s.path: num_keep.get(s.path, s.hidden) for s in sites}
    elif isinstance(num_keep, Sequence):
        if len(num_keep) != len(sites):
            raise ValueError(f"num_keep: {len(num_keep)} widths for {len(sites)} MLP blocks")
        counts = {s.path: w for s, w in zip(sites, num_keep, strict=True)}
    else:
        counts = {s.path: num_keep for s in sites}
    for site in sites:
        count = counts[site.path]
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= site.hidden:
            raise ValueError(f"num_keep for {site.path} must be an int in [1, {site.hidden}], got {count!r}")
    return counts


def sorted_keep(site: MlpSite, keep: torch.Tensor) -> torch.Tensor:
    """Kept indices checked (non-empty, distinct, in range) and ascending, the unit order of every pruned layer:
    keeping all units then reproduces the original bit for bit."""
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    if keep.numel() == 0 or keep.unique().numel() != keep.numel():
        raise ValueError(f"{site.path}: kept indices must be non-empty and distinct")
    if int(keep.min()) < 0 or int(keep.max()) >= site.hidden:
        raise ValueError(f"{site.path}: kept indices must be in [0, {site.hidden})")
    return keep.sort().values


def prune_site_tensors(site: MlpSite, tensors: dict[str, torch.Tensor], keep: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
    """Slice a site's tensors (names relative to ``site.path``) to hidden units ``keep``; the rest (fc_out's bias)
    unchanged."""
    keep = sorted_keep(site, keep)
    fused = site.layout == GATED_FUSED
    # Rows of a fused gated layer are [gate half; value half]: the same units in both.
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


def install_site(model: nn.Module, site: MlpSite, tensors: dict[str, torch.Tensor]) -> MlpSite:
    """Replace the site's layers by new ones holding ``tensors`` (its ``tensor_names()`` the layers have), of any
    width, keeping the old layers' dtype, device and requires_grad (meta tensors give shapes only); the new site."""
    mlp = site.module(model)
    out = getattr(mlp, site.out_name)
    hidden = tensors[f"{site.out_name}.weight"].shape[1]
    for name in site.layer_names():
        old = getattr(mlp, name)
        has_bias = getattr(old, "bias", None) is not None
        ref = old.weight if getattr(old, "weight", None) is not None else out.weight
        like = {"device": ref.device, "dtype": ref.dtype}
        if isinstance(old, nn.LayerNorm):
            new = nn.LayerNorm(hidden, eps=old.eps, elementwise_affine=old.elementwise_affine, bias=has_bias, **like)
        else:
            weight = tensors[f"{name}.weight"]
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, **like)
        with torch.no_grad():
            for part, param in new.named_parameters():
                value = tensors[f"{name}.{part}"]
                if not param.is_meta and not value.is_meta:
                    param.copy_(value)
                param.requires_grad_(getattr(old, part).requires_grad)
        setattr(mlp, name, new)
    return MlpSite(**{**vars(site), "hidden": hidden})


def prune_site(model: nn.Module, site: MlpSite, keep: torch.Tensor) -> MlpSite:
    """Replace the site's layers by smaller ones keeping hidden units ``keep``; return the new site."""
    state = {k: v.detach() for k, v in site.module(model).state_dict().items() if k in site.tensor_names()}
    return install_site(model, site, prune_site_tensors(site, state, keep))


def resize_mlps(model: nn.Module, widths: Mapping[str, int]) -> None:
    """Give every MLP site of ``model`` (paths as ``find_mlp_sites``) the hidden width ``widths[path]``, values
    unset: the architecture of a pruned model, to load or fill afterwards (meta models stay on meta)."""
    from .sites import find_mlp_sites

    for site in find_mlp_sites(model):
        if widths[site.path] == site.hidden:
            continue
        state = {k: torch.empty_like(v, device="meta") for k, v in site.module(model).state_dict().items()
                 if k in site.tensor_names()}
        install_site(model, site, prune_site_tensors(site, state, torch.arange(widths[site.path])))
