"""Choose which hidden units of an MLP to keep: the DGMR diversity order and the baselines.

Every method returns kept hidden-unit indices in selection order, so the first ``k`` of a
longer selection are the selection for ``k`` (ratios can be compared without recomputing).
"""

from __future__ import annotations

import math

import torch

METHODS = ("diversity", "l2", "random", "taylor")

# A round of Gram-Schmidt ends early once every remaining residual is below this fraction of
# the round's largest row norm: those rows are (numerically) spanned by the rows already
# picked, and the next round restarts from their original weights. Full-rank fc1 weights
# never reach it; it only decides what happens for rank-deficient ones.
RANK_TOL = 1e-6

_CPU_BLOCK = 64


def select_mlp_channels(
    fc1_weight: torch.Tensor,
    num_keep: int,
    method: str = "diversity",
    *,
    generator: torch.Generator | None = None,
    scores: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Return the indices of the ``num_keep`` hidden units to keep, in selection order.

    ``fc1_weight`` is [M hidden, N in] (for gated MLPs: the half chosen by the site).
    ``generator`` seeds ``random``; ``scores`` ([M], higher = more important) drives ``taylor``.
    """
    if not isinstance(fc1_weight, torch.Tensor) or fc1_weight.dim() != 2:
        shape = tuple(fc1_weight.shape) if isinstance(fc1_weight, torch.Tensor) else type(fc1_weight)
        raise ValueError(f"fc1_weight must be a 2-D tensor [hidden, in], got {shape}")
    hidden = fc1_weight.shape[0]
    if isinstance(num_keep, bool) or not isinstance(num_keep, int):
        raise ValueError(f"num_keep must be an int, got {num_keep!r}")
    if not 0 < num_keep <= hidden:
        raise ValueError(f"num_keep must be in [1, {hidden}] (the hidden width), got {num_keep}")
    if not torch.isfinite(fc1_weight).all():
        raise ValueError("fc1_weight contains NaN or Inf values")
    if method == "diversity":
        return diversity_order(fc1_weight, num_keep)
    if method == "l2":
        norms = fc1_weight.detach().to(torch.float64).norm(dim=1)
        return _top_by_score(norms, num_keep)
    if method == "random":
        perm = torch.randperm(hidden, generator=generator, device=_generator_device(generator))
        return perm[:num_keep].to(fc1_weight.device)
    if method == "taylor":
        if scores is None:
            raise ValueError("method='taylor' needs scores (see pruning.collect_taylor_scores)")
        if scores.shape != (hidden,):
            raise ValueError(f"scores must have shape ({hidden},), got {tuple(scores.shape)}")
        if not torch.isfinite(scores).all():
            raise ValueError("scores contain NaN or Inf values")
        return _top_by_score(scores.detach().to(torch.float64), num_keep).to(fc1_weight.device)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _top_by_score(score: torch.Tensor, num_keep: int) -> torch.LongTensor:
    # A stable sort keeps the lower index first among equal scores, so results are reproducible.
    return torch.sort(score, descending=True, stable=True).indices[:num_keep]


def diversity_order(weight: torch.Tensor, num_keep: int, *, algorithm: str = "auto") -> torch.LongTensor:
    """DGMR order: greedy Gram-Schmidt on fc1 rows by largest residual norm, in rounds of N.

    Computed in float64. ``algorithm`` is ``blocked`` (exact blocked method, default on CPU) or
    ``dense`` (one rank-1 update per pick with no host sync, default on CUDA).
    """
    if algorithm == "auto":
        algorithm = "dense" if weight.is_cuda else "blocked"
    if algorithm not in ("blocked", "dense"):
        raise ValueError(f"unknown algorithm {algorithm!r}; expected 'blocked' or 'dense'")
    one_round = _round_blocked if algorithm == "blocked" else _round_dense
    w = weight.detach().to(torch.float64)
    remaining = torch.arange(w.shape[0], device=w.device)
    chosen: list[torch.Tensor] = []
    left = num_keep
    while left > 0:
        picks = one_round(w.index_select(0, remaining), min(left, w.shape[1]))
        if picks.numel() == 0:
            # Every remaining row is zero: no direction is left to rank them by.
            picks = torch.arange(min(left, remaining.numel()), device=w.device)
        chosen.append(remaining[picks])
        left -= picks.numel()
        keep = torch.ones(remaining.numel(), dtype=torch.bool, device=w.device)
        keep[picks] = False
        remaining = remaining[keep]
    return torch.cat(chosen)


def _round_dense(rows: torch.Tensor, max_picks: int) -> torch.LongTensor:
    """One round, one rank-1 update per pick; the loop never waits for the device."""
    residual = rows.clone()
    sq_norm = (residual * residual).sum(1)
    tol2 = RANK_TOL**2 * sq_norm.max()
    order = torch.empty(max_picks, dtype=torch.long, device=rows.device)
    valid = torch.empty(max_picks, dtype=torch.bool, device=rows.device)
    for k in range(max_picks):
        best, idx = sq_norm.max(0)
        ok = best > tol2
        order[k] = idx
        valid[k] = ok
        r = residual.index_select(0, idx.view(1)).squeeze(0)
        q = torch.where(ok, r / r.norm().clamp_min(torch.finfo(r.dtype).tiny), torch.zeros_like(r))
        coeff = residual @ q
        residual.addr_(coeff, q, alpha=-1.0)
        sq_norm = (sq_norm - coeff * coeff).index_fill_(0, idx.view(1), -math.inf)
    # Once a pick is invalid every later one is too (q is zero, nothing changes), so the valid
    # picks are a prefix; one host sync per round to learn its length.
    return order[: int(valid.sum())]


def _round_blocked(rows: torch.Tensor, max_picks: int, block: int = _CPU_BLOCK) -> torch.LongTensor:
    """One round, exact and mostly BLAS-3.

    The residual matrix is updated once per block of picks. Within a block, norms computed at
    the block start (or at an earlier pick) are upper bounds of the current ones, so only the
    rows whose bound beats the best exactly refreshed norm are refreshed. This is the same
    arithmetic as the plain loop (classical Gram-Schmidt projections), regrouped.
    """
    residual = rows.clone()
    m = residual.shape[0]
    sq_norm = _row_sq_norms(residual)
    tol2 = RANK_TOL**2 * float(sq_norm.max())
    picked = torch.zeros(m, dtype=torch.bool)
    order: list[int] = []
    while len(order) < max_picks:
        n = residual.shape[1]
        b = min(block, max_picks - len(order), n)
        basis = torch.zeros(n, b, dtype=residual.dtype)
        bound = sq_norm.masked_fill(picked, -math.inf)
        active = m - int(picked.sum())
        done = False
        for j in range(b):
            idx, coeff, best = _argmax_current(residual, sq_norm, bound, basis[:, :j], active)
            if best <= tol2:
                done = True
                break
            r = residual[idx] - basis[:, :j] @ coeff
            r -= basis[:, :j] @ (basis[:, :j].T @ r)  # second pass keeps the basis orthonormal
            basis[:, j] = r / r.norm()
            picked[idx] = True
            bound[idx] = -math.inf
            active -= 1
            order.append(idx)
        if done or len(order) == max_picks:
            break
        residual = _project_out(residual, basis)
        sq_norm = _row_sq_norms(residual)
    return torch.tensor(order, dtype=torch.long)


def _argmax_current(
    residual: torch.Tensor, sq_norm: torch.Tensor, bound: torch.Tensor, basis: torch.Tensor, active: int
) -> tuple[int, torch.Tensor, float]:
    """Index of the largest current residual norm, its coefficients on ``basis``, and the norm².

    ``bound`` holds upper bounds of the current squared norms and is tightened in place for
    every row refreshed here. Ties go to the lowest index, like ``torch.argmax``.
    """
    take = 8
    while True:
        take = min(take, active)
        top, cand = torch.topk(bound, take)
        coeff = residual[cand] @ basis
        current = sq_norm[cand] - (coeff * coeff).sum(1)
        bound[cand] = current
        best = current.max()
        # Rows outside ``cand`` are bounded by the smallest bound taken; strictly beating it
        # proves no outside row can win or tie.
        if take == active or best > top[-1]:
            ties = (current == best).nonzero().squeeze(1)
            pos = int(ties[torch.argmin(cand[ties])])
            return int(cand[pos]), coeff[pos], float(best)
        take *= 4


def _row_sq_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1).square_()


def _project_out(residual: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove the block's orthonormal directions from every residual row (two BLAS-3 products)."""
    return residual.addmm_(residual @ basis, basis.T, alpha=-1.0)
