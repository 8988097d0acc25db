"""Closed-form fits for compensation after pruning: the statistics, the solves and the folds.

On calibration activations ``a`` at the input of a site's output Linear (hidden units after the
activation; for gated MLPs the gate * value product), the removed units are modelled as an
affine function of the kept ones, ``a_R ~ B a_K + c``, by ridge regression solved in fp64. The
prediction is folded into the smaller output Linear:

    W_out' = W_out[:, K] + W_out[:, R] @ B        b_out' = b_out + W_out[:, R] @ c

so the result has exactly the shapes of plain pruning and loads, exports and distils the same.

Choices:
- Centred regression (``c`` from the means) when the output Linear has a bias; without a bias
  the regression has no intercept (``c = 0``), so the module keeps its structure.
- Ridge ``lambda = ridge * mean(diag(Cov_KK))``: one scale-free number for every block, whatever
  the activation magnitudes. ``ridge=0`` is allowed; a singular ``Cov_KK`` then gets the
  minimum-norm least-squares solution (the limit of ``ridge -> 0``).
- A LayerNorm over the hidden units (timm ``scale_mlp``) renormalises the kept units once others
  are removed, so the regression on unpruned activations does not describe the pruned block:
  such sites raise ValueError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .sites import MlpSite, out_inputs
from .surgery import checked_units, prune_site


class ActivationStats:
    """Streaming fp64 mean and covariance of [tokens, units] activations, fed batch by batch."""

    def __init__(self, size: int, product_dtype: torch.dtype = torch.float64) -> None:
        """``product_dtype``: dtype of each batch's centred products (sums are always fp64); float32
        halves the time on CPU at ~1e-7 relative error per batch (benchmarks), float64 is exact."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.product_dtype = product_dtype
        self.count = 0
        # Moments are taken about the first batch's mean: E[xx^T] - mm^T then cancels far less
        # than about zero when activations have a large mean.
        self.shift: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def update(self, acts: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add activations of shape [..., size] (every leading index is a token).

        ``weights``: one non-negative weight per token (default 1): a token of weight w counts as w
        copies of it, so ``count`` is the total weight.
        """
        if acts.shape[-1] != self.size:
            raise ValueError(f"acts: expected last dimension {self.size}, got shape {tuple(acts.shape)}")
        x = acts.detach().reshape(-1, self.size).to(torch.float64)
        if x.shape[0] == 0:
            return
        w = None
        if weights is not None:
            w = weights.detach().reshape(-1).to(device=x.device, dtype=torch.float64)
            if w.shape[0] != x.shape[0] or not bool((w >= 0).all()):
                raise ValueError(f"weights: expected {x.shape[0]} non-negative values, got shape {tuple(weights.shape)}")
        if self.shift is None:
            self.shift = x.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(self.size, self.size, dtype=torch.float64, device=x.device)
        x = x - self.shift
        wx = x if w is None else x * w[:, None]
        self.sum += wx.sum(0)
        if self.product_dtype == torch.float64:
            self.outer.addmm_(x.T, wx)
        else:
            self.outer += (x.to(self.product_dtype).T @ wx.to(self.product_dtype)).to(torch.float64)
        self.count += x.shape[0] if w is None else float(w.sum())

    def rebase(self, shift: torch.Tensor) -> None:
        """Hold the same moments about ``shift`` instead: stats of several processes, each rebased onto one
        common shift, add up (count, sum and outer product) to the stats of all their tokens."""
        shift = shift.detach().to(torch.float64)
        if shift.shape != (self.size,):
            raise ValueError(f"shift: expected shape ({self.size},), got {tuple(shift.shape)}")
        if self.shift is None:
            self.shift, self.sum = shift.clone(), torch.zeros_like(shift)
            self.outer = torch.zeros(self.size, self.size, dtype=torch.float64, device=shift.device)
            return
        d = (self.shift - shift.to(self.shift.device))
        # sum (x - s')(x - s')^T with x - s' = (x - s) + d
        self.outer += torch.outer(d, self.sum) + torch.outer(self.sum, d) + self.count * torch.outer(d, d)
        self.sum += self.count * d
        self.shift = shift.to(self.shift.device).clone()

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("ActivationStats has no tokens: feed activations with update() first")

    def mean(self) -> torch.Tensor:
        """Per-unit mean, [size] fp64."""
        self._require_data()
        return self.shift + self.sum / self.count

    def covariance(self) -> torch.Tensor:
        """Population covariance (divided by the token count), [size, size] fp64."""
        self._require_data()
        m = self.sum / self.count
        cov = self.outer / self.count - torch.outer(m, m)
        return (cov + cov.T) / 2


def removed_units(kept: torch.Tensor, size: int) -> torch.Tensor:
    """Hidden units not in ``kept``, ascending: the row order of ``B`` and ``c``."""
    mask = torch.ones(size, dtype=torch.bool)
    mask[kept.cpu()] = False
    return mask.nonzero().flatten()


def fit_compensation_from_stats(stats: ActivationStats, kept: torch.Tensor, ridge: float = 1e-3,
                                intercept: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge fit of the removed units on the kept ones: ``B`` [R, K] (columns in ``kept`` order), ``c`` [R].

    Rows follow ``removed_units(kept, stats.size)``. ``intercept=False`` fits ``a_R ~ B a_K``
    on raw second moments and returns ``c = 0``.
    """
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    kept = checked_units(kept, stats.size)
    mean = stats.mean()
    moment = stats.covariance()
    if not intercept:
        moment = moment + torch.outer(mean, mean)
    kept = kept.to(mean.device)
    removed = removed_units(kept, stats.size).to(mean.device)
    gram = moment[kept][:, kept]
    cross = moment[kept][:, removed]
    if removed.numel() == 0:
        b = gram.new_zeros(0, kept.numel())
    else:
        b = _ridge_solve(gram, cross, ridge).T
    c = mean[removed] - b @ mean[kept] if intercept else mean.new_zeros(removed.numel())
    return b, c


def _ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float,
                 anchor: torch.Tensor | None = None) -> torch.Tensor:
    """(gram + lambda I)^-1 (cross + lambda anchor), lambda = ridge * mean(diag(gram)); fp64, Cholesky."""
    lam = ridge * gram.diagonal().mean()
    gram = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    if anchor is not None:
        cross = cross + lam * anchor
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(cross, chol)
    # singular only with ridge=0 or units constant on every token: the minimum-norm solution
    return torch.linalg.pinv(gram, hermitian=True) @ cross


def reconstruction_error(stats: ActivationStats, weight: torch.Tensor, bias: torch.Tensor | None,
                         kept: torch.Tensor, new_weight: torch.Tensor, new_bias: torch.Tensor | None) -> float:
    """||y' - y|| / ||y|| over the tokens of ``stats``, y = weight a + bias, y' = new_weight a[kept] + new_bias.

    Exact from the moments: sum_t ||P a_t + q||^2 = T (tr(P Cov P^T) + ||P mean + q||^2).
    """
    kept = checked_units(kept, stats.size)
    if tuple(weight.shape[1:]) != (stats.size,) or tuple(new_weight.shape) != (weight.shape[0], kept.numel()):
        raise ValueError(f"weight {tuple(weight.shape)} and new_weight {tuple(new_weight.shape)} do not map "
                         f"{stats.size} units and {kept.numel()} kept units to the same outputs")
    device = stats.mean().device
    w = weight.detach().to(device=device, dtype=torch.float64)
    b = _bias64(bias, w)
    diff_w = -w
    diff_w[:, kept.to(device)] += new_weight.detach().to(device=device, dtype=torch.float64)
    error, reference = _energy(stats, diff_w, _bias64(new_bias, w) - b), _energy(stats, w, b)
    if reference == 0:
        raise ValueError("reconstruction_error: the reference output is zero on every token")
    return (error / reference) ** 0.5


def compensate_site(model: nn.Module, site: MlpSite, kept: torch.Tensor, stats: ActivationStats,
                    ridge: float = 1e-3) -> MlpSite:
    """Prune ``site`` to ``kept`` and fold the regression of the removed units into its output Linear."""
    _refuse_hidden_norm(site)
    if stats.size != site.hidden:
        raise ValueError(f"{site.path}: activation stats have {stats.size} units, the site has {site.hidden}")
    # prune_site orders the kept units ascending; fit in that order so B's columns match W_out'.
    kept = checked_units(kept, site.hidden).sort().values
    out = getattr(site.module(model), site.out_name)
    b, c = fit_compensation_from_stats(stats, kept, ridge, intercept=out.bias is not None)
    folded, shifted = fold_compensation(out.weight, out.bias, kept, b, c)
    new_site = prune_site(model, site, kept)
    if b.shape[0] == 0:
        return new_site
    new_out = getattr(new_site.module(model), site.out_name)
    with torch.no_grad():
        new_out.weight.copy_(folded.to(new_out.weight.dtype))
        if new_out.bias is not None:
            new_out.bias.copy_(shifted.to(new_out.bias.dtype))
    return new_site


def fold_compensation(weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, b: torch.Tensor,
                      c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold a fit into the output Linear: ``(W[:, K] + W[:, R] @ B, bias + W[:, R] @ c)``, fp64.

    ``weight`` [rows, M] and ``bias`` [rows] may be any subset of the output rows (a rank's shard):
    each row folds on its own. ``kept`` ascending, ``b``/``c`` from ``fit_compensation_from_stats``
    with the same ``kept``.
    """
    w = weight.detach().to(torch.float64)
    removed = removed_units(kept, w.shape[1]).to(w.device)
    w_removed = w[:, removed]
    folded = w[:, kept.to(w.device)] + w_removed @ b.to(w.device)
    shifted = None if bias is None else bias.detach().to(torch.float64) + w_removed @ c.to(w.device)
    return folded, shifted


def site_record(model: nn.Module, new_site: MlpSite, weight: torch.Tensor, bias: torch.Tensor | None,
                keep: torch.Tensor, held: ActivationStats | None) -> tuple[float | None, float | None]:
    """(recon_error_before, recon_error_after) of a compensated site on held-out stats; Nones without them.

    ``weight``/``bias``: the output Linear before pruning; ``new_site``: the pruned site in ``model``.
    """
    if held is None:
        return None, None
    new_out = getattr(new_site.module(model), new_site.out_name)
    ordered = torch.as_tensor(keep, dtype=torch.long).sort().values
    uncompensated = weight[:, ordered.to(weight.device)]
    return (reconstruction_error(held, weight, bias, ordered, uncompensated, bias),
            reconstruction_error(held, weight, bias, ordered, new_out.weight, new_out.bias))


def corrected_compensation(model: nn.Module, site: MlpSite, keep: torch.Tensor, fit: ActivationStats,
                           held: ActivationStats | None, ridge: float = 1e-3) -> tuple[float | None, float | None]:
    """Prune ``site`` to ``keep``, fitting the pruned model's kept units onto the original model's units.

    ``fit``/``held`` hold token-aligned rows ``[t, s]``: ``t`` all M units of the original model
    on its own inputs, ``s`` the K kept units (ascending) of the same block on the inputs the
    already-pruned blocks before it produce. Fits ``t ~ G s + g`` with the ridge anchored at
    "kept units pass through": ``G = (C_ts + lambda E)(C_ss + lambda I)^-1``, ``E`` the [M, K]
    selection of the kept units, ``lambda = ridge * mean(diag(C_ss))``; then
    ``W_out' = W_out G``, ``b_out' = b_out + W_out g``. With identical inputs (block 0) this is the
    teacher-mode fit; downstream it also undoes the drift that reaches the MLP from earlier blocks.
    Returns (recon_error_before, recon_error_after) of the output Linear against the original
    block on original inputs, over ``held`` (Nones without it).
    """
    _refuse_hidden_norm(site)
    order = checked_units(keep, site.hidden).sort().values
    m, k = site.hidden, order.numel()
    if fit.size != m + k:
        raise ValueError(f"{site.path}: joint stats have {fit.size} columns, expected {m} + {k}")
    out = getattr(site.module(model), site.out_name)
    intercept = out.bias is not None
    mean = fit.mean()
    moment = fit.covariance() if intercept else fit.covariance() + torch.outer(mean, mean)
    anchor = torch.zeros(m, k, dtype=torch.float64, device=mean.device)
    anchor[order.to(mean.device), torch.arange(k, device=mean.device)] = 1
    gain = _ridge_solve(moment[m:, m:], moment[m:, :m], ridge, anchor.T).T  # [M, K]
    shift = mean[:m] - gain @ mean[m:] if intercept else mean.new_zeros(m)
    w = out.weight.detach().to(torch.float64)
    w_dev = w.to(mean.device)
    b = _bias64(out.bias, w_dev)
    new_w, new_b = w_dev @ gain, b + w_dev @ shift
    errors: tuple[float | None, float | None] = (None, None)
    if held is not None:
        reference = _energy(held, torch.cat([w_dev, w_dev.new_zeros(w.shape[0], k)], 1), b)
        if reference == 0:
            raise ValueError(f"{site.path}: the reference output is zero on every held-out token")
        before = _energy(held, torch.cat([-w_dev, w_dev[:, order.to(mean.device)]], 1), b.new_zeros(b.shape))
        after = _energy(held, torch.cat([-w_dev, new_w], 1), new_b - b)
        errors = ((before / reference) ** 0.5, (after / reference) ** 0.5)
    new_site = prune_site(model, site, order)
    new_out = getattr(new_site.module(model), site.out_name)
    with torch.no_grad():
        new_out.weight.copy_(new_w.to(new_out.weight.device, new_out.weight.dtype))
        if new_out.bias is not None:
            new_out.bias.copy_(new_b.to(new_out.bias.device, new_out.bias.dtype))
    return errors


def fit_output_from_stats(stats: ActivationStats, weight: torch.Tensor, bias: torch.Tensor | None,
                          ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refit a pruned output Linear onto target outputs: ``(W', b')``, fp64, ``W'`` shaped like ``weight``.

    ``stats`` holds token-aligned rows ``[a, y*]``: ``a`` the K inputs of the pruned Linear
    (``weight`` [D, K], ``bias`` [D] or None), ``y*`` the D outputs it should give. Each output row
    is an independent least-squares fit on ``a``, the ridge anchored at ``weight`` (``lambda = ridge *
    mean(diag(Cov_aa))``): ``W' = (C_ya + lambda W)(C_aa + lambda I)^-1``, ``b' = mean(y*) - W' mean(a)``;
    without a bias, the same on raw second moments and ``b' = None``.
    """
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    rows, k = _output_shape(stats, weight)
    mean = stats.mean()
    moment = stats.covariance() if bias is not None else stats.covariance() + torch.outer(mean, mean)
    anchor = weight.detach().to(device=mean.device, dtype=torch.float64)
    new_weight = _ridge_solve(moment[:k, :k], moment[:k, k:], ridge, anchor.T).T
    if bias is None:
        return new_weight, None
    return new_weight, mean[k:] - new_weight @ mean[:k]


def output_fit_error(stats: ActivationStats, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """``||W a + b - y*|| / ||y*||`` over the tokens of ``stats`` (rows ``[a, y*]`` as in ``fit_output_from_stats``)."""
    rows, _ = _output_shape(stats, weight)
    device = stats.mean().device
    w = weight.detach().to(device=device, dtype=torch.float64)
    eye = torch.eye(rows, dtype=torch.float64, device=device)
    reference = _energy(stats, torch.cat([torch.zeros_like(w), eye], 1), w.new_zeros(rows))
    if reference == 0:
        raise ValueError("output fit: the target output is zero on every token")
    return (_energy(stats, torch.cat([w, -eye], 1), _bias64(bias, w)) / reference) ** 0.5


def _output_shape(stats: ActivationStats, weight: torch.Tensor) -> tuple[int, int]:
    """(rows, inputs) of an output Linear whose fit statistics ``stats`` hold ``[inputs, targets]`` columns."""
    rows, k = weight.shape
    if stats.size != k + rows:
        raise ValueError(f"output fit: stats have {stats.size} columns, expected {k} inputs + {rows} targets")
    return rows, k


def collect_out_inputs(model: nn.Module, sites: list[MlpSite], batches: Sequence, forward: Callable,
                       holdout_fraction: float) -> dict[str, tuple[ActivationStats, ActivationStats | None]]:
    """One pass over ``batches``: fit and held-out stats of every site's output-Linear input."""
    stats = {s.path: (ActivationStats(s.hidden), ActivationStats(s.hidden) if holdout_fraction > 0 else None)
             for s in sites}
    seen = dict.fromkeys(stats, 0)

    def receive(path: str, x: torch.Tensor) -> None:
        fit, held = stats[path]
        acts = x.detach().reshape(-1, fit.size)
        start, seen[path] = seen[path], seen[path] + acts.shape[0]
        if held is None:
            fit.update(acts)
            return
        mask = holdout_mask(start, acts.shape[0], holdout_fraction).to(acts.device)
        fit.update(acts[~mask])
        held.update(acts[mask])

    with out_inputs(model, sites, receive), torch.no_grad():
        for batch in batches:
            forward(model, batch)
    for path, (_, held) in stats.items():
        if held is not None and held.count == 0:
            raise ValueError(f"{path}: holdout_fraction {holdout_fraction} left no held-out token "
                             f"out of {seen[path]}")
    return stats


def holdout_mask(start: int, count: int, fraction: float) -> torch.Tensor:
    """Tokens start..start+count-1 of a site's stream that are held out, spread evenly."""
    index = torch.arange(start, start + count, dtype=torch.float64)
    return torch.floor((index + 1) * fraction) > torch.floor(index * fraction)


def _refuse_hidden_norm(site: MlpSite) -> None:
    if site.norm_name is not None:
        raise ValueError(f"{site.path}: compensation is not defined with a LayerNorm over the hidden "
                         f"units ({site.norm_name}): removing units changes how the kept ones are normalised")


def _bias64(bias: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return weight.new_zeros(weight.shape[0])
    return bias.detach().to(device=weight.device, dtype=torch.float64)


def _energy(stats: ActivationStats, p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over tokens of ||P a + q||^2."""
    spread = ((p @ stats.covariance()) * p).sum()
    offset = p @ stats.mean() + q
    return max(float(spread + offset @ offset), 0.0)
