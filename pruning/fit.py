"""Closed-form fits for compensation after pruning: streaming statistics and the ridge refit of an output Linear.

``BlockCalibration`` collects, for every calibration token, the inputs ``a_K`` of a pruned site's output
Linear (the kept hidden units) next to the output ``y*`` that would make the pruned block reproduce the
original block, in ``ActivationStats`` (fp64 moments, mergeable across processes). ``fit_output_from_stats``
solves each output row by ridge regression on ``a_K``, so the result has exactly the shapes of plain
pruning and loads, exports and distils the same.

Choices:
- Centred regression (the bias from the means) when the output Linear has a bias; without one the fit
  runs on raw second moments, so the module keeps its structure.
- Ridge ``lambda = ridge * mean(diag(Cov_aa))``, anchored at the pruned weights: one scale-free number for
  every block, whatever the activation magnitudes. ``ridge=0`` is allowed; a singular ``Cov_aa`` then gets
  the minimum-norm least-squares solution (the limit of ``ridge -> 0``).
- A LayerNorm over the hidden units (timm ``scale_mlp``) renormalises the kept units once others are
  removed, and the width curves (``pruning.budget``) assume it does not: such towers are refused
  (``blockwise.calibration_states``).
"""

from __future__ import annotations

import torch


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


def holdout_mask(start: int, count: int, fraction: float) -> torch.Tensor:
    """Tokens start..start+count-1 of a site's stream that are held out, spread evenly."""
    index = torch.arange(start, start + count, dtype=torch.float64)
    return torch.floor((index + 1) * fraction) > torch.floor(index * fraction)


def _bias64(bias: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return weight.new_zeros(weight.shape[0])
    return bias.detach().to(device=weight.device, dtype=torch.float64)


def _energy(stats: ActivationStats, p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over tokens of ||P a + q||^2."""
    spread = ((p @ stats.covariance()) * p).sum()
    offset = p @ stats.mean() + q
    return max(float(spread + offset @ offset), 0.0)
