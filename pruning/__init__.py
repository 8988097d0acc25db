"""DGMR pruning core: pure torch, no torch.distributed, no trainer imports."""

from .compensate import (
    ActivationStats,
    compensate_site,
    fit_compensation,
    fit_compensation_from_stats,
    prune_and_compensate,
    reconstruction_error,
)
from .select import METHODS, diversity_order, select_mlp_channels
from .sites import GATED_FUSED, GATED_SPLIT, PLAIN, MlpSite, find_mlp_sites, mlp_site_of
from .surgery import (
    PruneReport,
    SiteReport,
    num_keep_for_ratio,
    prune_model,
    prune_site,
    prune_site_tensors,
    slice_linear,
)
from .taylor import collect_taylor_scores

__all__ = [
    "METHODS", "GATED_FUSED", "GATED_SPLIT", "PLAIN", "MlpSite", "PruneReport", "SiteReport",
    "collect_taylor_scores", "diversity_order", "find_mlp_sites", "mlp_site_of", "num_keep_for_ratio",
    "prune_model", "prune_site", "prune_site_tensors", "select_mlp_channels", "slice_linear",
    "ActivationStats", "compensate_site", "fit_compensation", "fit_compensation_from_stats",
    "prune_and_compensate", "reconstruction_error",
]
