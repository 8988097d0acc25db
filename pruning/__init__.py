"""DGMR pruning: pure torch, no torch.distributed, no trainer imports.

The public API (callers import these names from ``pruning``, not from its modules):

- ``prune_blocks(source, widths, method, calibration=..., calib_inputs=...)``: THE loop over blocks;
  prunes every MLP of a source and, with a ``Calibration``, compensates it in closed form.
- ``BlockSource``: what a source implements (read a block, write a pruned site, stem states, and the
  ``select`` / ``reduce`` hooks a sharded source overrides); ``ModelSource``: a tower in memory.
- ``prune_checkpoint``: the streaming CLI's entry (a checkpoint on disk -> a loadable export).
- ``Calibration``: compensation settings (mode, ridge, hold-out, prefix balance, images), one default.
- ``Budget`` / ``plan_widths`` / ``WidthPlan`` / ``prune_to_budget``: per-block widths at the parameters of a
  uniform ratio, chosen from error curves measured block by block, then pruned with the plan's orders.
- ``keep_counts``: widths per site from the paper's ratio or explicit counts; ``resize_mlps``: an
  architecture at those widths (values unset).
- ``PruneReport`` / ``SiteReport``: what pruning did.
- ``MlpSite`` / ``find_mlp_sites``: where a block's MLP layers live, for every supported family.
- ``select_mlp_channels`` / ``METHODS``: diversity (DGMR), l2, random, taylor selection.
- ``collect_taylor_scores``: |activation x gradient| importances for ``taylor``.
- ``ActivationStats``: streaming fp64 moments (a sharded source's ``reduce`` all-reduces them).
- ``BlockState`` / ``stem_states``: calibration inputs of block 0 (recorded once, carried block to block);
  ``materialize_outside``: a tower whose stem is real and blocks on meta (records them from a checkpoint).
- ``parameters_on_meta``: build an architecture with parameters on meta and real buffers.
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
    "prune_blocks", "BlockSource", "ModelSource", "prune_checkpoint", "Calibration", "Budget", "plan_widths", "prune_to_budget", "WidthPlan", "keep_counts", "resize_mlps",
    "PruneReport", "SiteReport", "MlpSite", "find_mlp_sites", "select_mlp_channels", "METHODS",
    "collect_taylor_scores", "ActivationStats", "BlockState", "stem_states", "materialize_outside", "parameters_on_meta", "load_pruned",
]
