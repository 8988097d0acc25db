"""DGMR pruning: pure torch, no torch.distributed, no trainer imports. The public API (import from ``pruning``):

- ``prune_blocks(source, widths, method, calibration=, calib_inputs=)``: THE loop over blocks, compensating with a
  ``Calibration``; ``BlockSource`` (what a source implements), ``ModelSource`` (a tower in memory),
  ``prune_checkpoint`` (a checkpoint on disk -> a loadable export).
- ``Budget`` / ``plan_widths`` / ``WidthPlan`` / ``prune_to_budget``: per-block widths at a uniform ratio's size.
- ``keep_counts`` (widths per site), ``resize_mlps`` (an architecture at those widths), ``PruneReport`` /
  ``SiteReport`` (what pruning did), ``MlpSite`` / ``find_mlp_sites`` (where each block's MLP lives).
- ``select_mlp_channels`` / ``METHODS`` (diversity, l2, random, taylor; activation, on calibration activations,
  inside ``prune_blocks``), ``collect_taylor_scores``.
- ``ActivationStats`` (fp64 moments a sharded source all-reduces), ``BlockState`` / ``stem_states`` (block 0's
  calibration inputs), ``materialize_outside`` (a tower real outside its blocks), ``parameters_on_meta``.
- ``load_pruned``: load any export (stock formats where widths are uniform).
"""

from .blockwise import (
    BlockSource,
    BlockState,
    Calibration,
    ModelSource,
    materialize_outside,
    prune_blocks,
    stem_states,
)
from .budget import Budget, WidthPlan, plan_widths, prune_to_budget
from .export import load_pruned
from .fit import ActivationStats
from .select import METHODS, select_mlp_channels
from .sites import MlpSite, find_mlp_sites
from .skeleton import parameters_on_meta
from .stream import prune_checkpoint
from .surgery import PruneReport, SiteReport, keep_counts, resize_mlps
from .taylor import collect_taylor_scores

__all__ = [
    "prune_blocks", "BlockSource", "ModelSource", "prune_checkpoint", "Calibration", "Budget", "plan_widths",
    "prune_to_budget", "WidthPlan", "keep_counts", "resize_mlps", "PruneReport", "SiteReport", "MlpSite",
    "find_mlp_sites", "select_mlp_channels", "METHODS", "collect_taylor_scores", "ActivationStats", "BlockState",
    "stem_states", "materialize_outside", "parameters_on_meta", "load_pruned",
]
