"""Closed-form fits for compensation: streaming fp64 statistics of ``[a_K, y*]`` token rows (mergeable across
processes) and the ridge refit of a pruned output Linear onto them, so the result has plain pruning's shapes.
Ridge ``lambda = ridge * mean(diag(Cov_aa))``, anchored at the pruned weights; centred when the Linear has a
bias, raw second moments without one (docs/compensation.md).
"""

from __future__ import annotations

import torch


class ActivationStats:
    """Streaming fp64 mean and covariance of [tokens, units] activations, fed batch by batch."""

    def __init__(self, size: int, product_dtype: torch.dtype = torch.float64) -> None:
        """``product_dtype``: of each batch's centred products (sums always fp64); float32 halves the CPU time at
        ~1e-7 relative error per batch."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.product_dtype = product_dtype
        self.count = 0
        self.rows = 0  # tokens fed, unweighted: they bound the covariance's rank
        # Moments about the first batch's mean cancel far less than about zero when activations have a large mean.
        self.shift: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def update(self, acts: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add activations [..., size] (every leading index a token); ``weights``: one per token (a token of weight
        w counts as w copies; ``count`` is the total weight)."""
        if acts.shape[-1] != self.size:
            raise ValueError(f"acts: expected last dimension {self.size}, got shape {tuple(acts.shape)}")
        x = acts.detach().reshape(-1, self.size).to(torch.float64)
        if x.shape[0] == 0:
            return
        self.rows += x.shape[0]
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
        """Hold the same moments about ``shift``: stats of several processes rebased onto one shift add up."""
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


def fit_output_from_stats(stats: ActivationStats, weight: torch.Tensor, bias: torch.Tensor | None,
                          ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refit a pruned output Linear (``weight`` [D, K], ``bias``) onto ``stats`` rows ``[a, y*]``: fp64
    ``W' = (C_ya + lambda W)(C_aa + lambda I)^-1``, ``b' = mean(y*) - W' mean(a)`` (raw moments, no bias, without)."""
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    _, k = _output_shape(stats, weight)
    mean = stats.mean()
    moment = stats.covariance() if bias is not None else stats.covariance() + torch.outer(mean, mean)
    gram, cross = moment[:k, :k], moment[:k, k:]
    lam = ridge * gram.diagonal().mean()
    gram = gram + lam * torch.eye(k, dtype=gram.dtype, device=gram.device)
    cross = cross + lam * weight.detach().to(device=mean.device, dtype=torch.float64).T
    chol, info = torch.linalg.cholesky_ex(gram)
    # singular only with ridge=0 or units constant on every token: then the minimum-norm solution
    solved = torch.cholesky_solve(cross, chol) if int(info) == 0 else torch.linalg.pinv(gram, hermitian=True) @ cross
    new_weight = solved.T
    return new_weight, None if bias is None else mean[k:] - new_weight @ mean[:k]


def output_fit_error(stats: ActivationStats, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """``||W a + b - y*|| / ||y*||`` over the tokens of ``stats`` (rows ``[a, y*]`` as in ``fit_output_from_stats``)."""
    rows, _ = _output_shape(stats, weight)
    device = stats.mean().device
    w = weight.detach().to(device=device, dtype=torch.float64)
    eye = torch.eye(rows, dtype=torch.float64, device=device)
    reference = _energy(stats, torch.cat([torch.zeros_like(w), eye], 1), w.new_zeros(rows))
    if reference == 0:
        raise ValueError("output fit: the target output is zero on every token")
    b = w.new_zeros(rows) if bias is None else bias.detach().to(device=device, dtype=torch.float64)
    return (_energy(stats, torch.cat([w, -eye], 1), b) / reference) ** 0.5


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


def _energy(stats: ActivationStats, p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over tokens of ||P a + q||^2."""
    spread = ((p @ stats.covariance()) * p).sum()
    offset = p @ stats.mean() + q
    return max(float(spread + offset @ offset), 0.0)
