"""Choose which hidden units of an MLP to keep: the DGMR diversity order, its activation-space form and the
baselines.

Every method returns kept hidden-unit indices in selection order, so the first ``k`` of a
longer selection are the selection for ``k`` (ratios can be compared without recomputing).
"""

from __future__ import annotations

import ctypes
import functools
import math

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from pruning.native import build

METHODS = ("diversity", "l2", "random", "taylor", "activation")
"""``activation`` ranks on calibration activations: only ``prune_blocks`` with a ``Calibration`` runs it."""

# A round ends early once every remaining residual is below this fraction of its largest row norm (float64 /
# float32): those rows are spanned by the picked ones and the next round restarts (rank-deficient fc1 only).
RANK_TOL = 1e-6
RANK_TOL_FP32 = 1e-3

_CPU_BLOCK = 64
_POOL_LIMIT = 4  # pool rows per block pick before a block ends early


def select_mlp_channels(
    fc1_weight: torch.Tensor,
    num_keep: int,
    method: str = "diversity",
    *,
    generator: torch.Generator | None = None,
    scores: torch.Tensor | None = None,
) -> torch.LongTensor:
    """The ``num_keep`` hidden units to keep, in selection order, from ``fc1_weight`` [M hidden, N in] (gated: the
    site's ranking half); ``generator`` seeds ``random``, ``scores`` ([M], higher = more important) drive ``taylor``."""
    if not isinstance(fc1_weight, torch.Tensor) or fc1_weight.dim() != 2:
        shape = tuple(fc1_weight.shape) if isinstance(fc1_weight, torch.Tensor) else type(fc1_weight)
        raise ValueError(f"fc1_weight must be a 2-D tensor [hidden, in], got {shape}")
    hidden = fc1_weight.shape[0]
    if isinstance(num_keep, bool) or not isinstance(num_keep, int):
        raise ValueError(f"num_keep must be an int, got {num_keep!r}")
    if not 0 < num_keep <= hidden:
        raise ValueError(f"num_keep must be in [1, {hidden}] (the hidden width), got {num_keep}")
    # A plain sum decides the common case in a fraction of the elementwise test (run only if the sum overflows).
    if not (bool(torch.isfinite(fc1_weight.sum())) or bool(torch.isfinite(fc1_weight).all())):
        raise ValueError("fc1_weight contains NaN or Inf values")
    if method == "diversity":
        return diversity_order(fc1_weight, num_keep)
    if method == "l2":
        norms = fc1_weight.detach().to(torch.float64).norm(dim=1)
        return _top_by_score(norms, num_keep)
    if method == "random":
        perm = torch.randperm(hidden, generator=generator, device=generator.device if generator else "cpu")
        return perm[:num_keep].to(fc1_weight.device)
    if method == "taylor":
        if scores is None:
            raise ValueError("method='taylor' needs scores (see pruning.collect_taylor_scores)")
        if scores.shape != (hidden,):
            raise ValueError(f"scores must have shape ({hidden},), got {tuple(scores.shape)}")
        if not torch.isfinite(scores).all():
            raise ValueError("scores contain NaN or Inf values")
        return _top_by_score(scores.detach().to(torch.float64), num_keep).to(fc1_weight.device)
    if method == "activation":
        raise ValueError("method='activation' ranks on calibration activations: prune with pruning.prune_blocks "
                         "and a pruning.Calibration (the CLI's --calibration)")
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def _top_by_score(score: torch.Tensor, num_keep: int) -> torch.LongTensor:
    # A stable sort keeps the lower index first among equal scores, so results are reproducible.
    return torch.sort(score, descending=True, stable=True).indices[:num_keep]


def activation_order(gram: torch.Tensor, cross: torch.Tensor, num_keep: int, ridge: float = 1e-3
                     ) -> torch.LongTensor:
    """DGMR's greedy Gram-Schmidt on the units' activations instead of their fc1 rows: each pick is the unit whose
    activation, less what the kept units already explain, most lowers the least-squares error of fitting the
    compensation's target from the kept units (forward selection by pivoted Cholesky).

    ``gram`` [M, M]: covariance of the M units' activations; ``cross`` [M, D]: their covariance with the target;
    ``ridge``: relative to the mean variance, as in ``pruning.fit.fit_output_from_stats``.
    """
    m = gram.shape[0]
    if gram.shape != (m, m) or cross.dim() != 2 or cross.shape[0] != m:
        raise ValueError(f"activation_order: gram [M, M] and cross [M, D] expected, got {tuple(gram.shape)} and "
                         f"{tuple(cross.shape)}")
    if not 0 < num_keep <= m:
        raise ValueError(f"num_keep must be in [1, {m}], got {num_keep}")
    gram, residual_cross = gram.to(torch.float64), cross.to(torch.float64).clone()
    variance = gram.diagonal().clone()  # of each unit's activation, less its projection on the kept ones
    lam = ridge * float(variance.mean())
    floor = variance * RANK_TOL  # below it a unit is spanned by the kept ones: no new direction
    factor = torch.zeros(m, num_keep, dtype=torch.float64, device=gram.device)
    free = torch.ones(m, dtype=torch.bool, device=gram.device)
    order = []
    for j in range(num_keep):
        gain = residual_cross.square().sum(1) / (variance + lam)
        gain = torch.where(free & (variance > floor), gain, -1.0)
        if not bool((gain >= 0).any()):  # the rest are spanned or constant: keep the most varied of them
            gain = torch.where(free, gram.diagonal(), -math.inf)
        p = int(gain.argmax())
        order.append(p)
        free[p] = False
        pivot = max(float(variance[p]), 0.0) ** 0.5
        if pivot > 0:
            column = (gram[:, p] - factor[:, :j] @ factor[p, :j]) / pivot
            factor[:, j] = column
            residual_cross -= torch.outer(column, residual_cross[p] / pivot)
            variance -= column.square()
    return torch.tensor(order, dtype=torch.long)


def diversity_order(weight: torch.Tensor, num_keep: int, *, algorithm: str = "auto",
                    dtype: torch.dtype = torch.float32) -> torch.LongTensor:
    """DGMR order: greedy Gram-Schmidt on fc1 rows by largest residual norm, in rounds of N.

    ``algorithm``: ``blocked`` (compiled pick loop, CPU default) or ``dense`` (a rank-1 update per pick, no host
    sync in a round, CUDA default); both make the plain loop's picks. ``dtype``: the working precision (squared
    norms in float64); implementations can only disagree on norms tied within rounding (~1e-6 relative in fp32).
    """
    if algorithm == "auto":
        algorithm = "dense" if weight.is_cuda else "blocked"
    if algorithm not in ("blocked", "dense"):
        raise ValueError(f"unknown algorithm {algorithm!r}; expected 'blocked' or 'dense'")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    w = weight.detach().to(dtype)
    # The blocked method's pick loop is compiled; where it cannot be built the dense loop makes the same picks.
    if algorithm == "dense" or _native() is None:
        return _rounds(w, num_keep, _round_dense)
    # Row norms and bases are NumPy work; its BLAS threads would spin against torch's for
    # the two cores' worth of matrix products, so they are held to one thread.
    with threadpool_limits(limits=1, user_api="blas"):
        return _rounds(w, num_keep, _round_blocked)


def _rounds(w: torch.Tensor, num_keep: int, one_round) -> torch.LongTensor:
    """Rounds of at most N picks, each on the rows not picked yet, until ``num_keep`` are chosen."""
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
    sq_norm = _row_sq_norms(residual)
    tol2 = _rank_tol(rows.dtype) ** 2 * sq_norm.max()
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
        sq_norm = (sq_norm - coeff.double().square()).index_fill_(0, idx.view(1), -math.inf)
    # Once a pick is invalid every later one is too (q is zero, nothing changes), so the valid
    # picks are a prefix; one host sync per round to learn its length.
    return order[: int(valid.sum())]


def _round_blocked(rows: torch.Tensor, max_picks: int, block: int | None = None) -> torch.LongTensor:
    """One round, exact and mostly BLAS-3 (``rows`` is overwritten): residuals are updated once per block of picks;
    inside a block the block-start norms bound the current ones, so only a pool of candidates is followed pick by
    pick (the compiled loop); then the block's directions are dropped from every residual (``_drop_directions``).
    """
    block = block or _CPU_BLOCK
    residual = rows
    sq_norm = _row_sq_norms(residual)
    tol2 = _rank_tol(rows.dtype) ** 2 * float(sq_norm.max())
    available = torch.ones(residual.shape[0], dtype=torch.bool)
    order: list[int] = []
    while len(order) < max_picks:
        b = min(block, max_picks - len(order), residual.shape[1])
        picks, basis, exhausted = _pick_block(residual, sq_norm, available, b, tol2)
        order += picks
        if exhausted or len(order) == max_picks:
            break
        residual, sq_norm = _drop_directions(residual, sq_norm, torch.from_numpy(basis))
    return torch.tensor(order, dtype=torch.long)


def _pick_block(residual: torch.Tensor, sq_norm: torch.Tensor, available: torch.Tensor, block: int,
                tol2: float) -> tuple[list[int], np.ndarray, bool]:
    """Up to ``block`` greedy picks on residuals fixed at the block start, in the compiled loop
    (pruning/native/pick_block.cpp): the picked rows, the orthonormal directions they add ([n, picks])
    and whether the round is exhausted (every remaining residual below the rank tolerance)."""
    m, n = residual.shape
    assert residual.stride(1) == 1, residual.stride()
    np_type = np.float32 if residual.dtype == torch.float32 else np.float64
    basis = np.empty((block, n), dtype=np_type)
    picks = np.empty(block, dtype=np.int64)
    exhausted = ctypes.c_int64(0)
    flags = available.numpy().view(np.uint8)  # the same memory: picked rows are cleared in place
    lib = _native()
    run = lib.dgmr_pick_block_f32 if np_type == np.float32 else lib.dgmr_pick_block_f64
    count = run(residual.data_ptr(), residual.stride(0), m, n, sq_norm.contiguous().data_ptr(),
                flags.ctypes.data, block, tol2, _POOL_LIMIT, picks.ctypes.data, basis.ctypes.data,
                ctypes.byref(exhausted))
    return picks[:count].tolist(), basis[:count].T, bool(exhausted.value)


@functools.cache
def _native() -> ctypes.CDLL | None:
    """The compiled pick loop (pruning/native/pick_block.cpp), or None where it cannot be built."""
    lib = build.load("pick_block")
    if lib is not None:
        args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int64, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)]
        for fn in (lib.dgmr_pick_block_f32, lib.dgmr_pick_block_f64):
            fn.argtypes, fn.restype = args, ctypes.c_int64
    return lib


def _row_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared row norms, accumulated and returned in float64 whatever the working precision."""
    if x.device.type == "cpu":
        # NumPy's einsum accumulates in float64 without materialising a float64 copy: 4x faster.
        a = x.numpy()
        return torch.from_numpy(np.einsum("ij,ij->i", a, a, dtype=np.float64))
    return x.square().sum(1, dtype=torch.float64)


def _rank_tol(dtype: torch.dtype) -> float:
    return RANK_TOL if dtype == torch.float64 else RANK_TOL_FP32


def _drop_directions(residual: torch.Tensor, sq_norm: torch.Tensor, basis: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals and norms² in an orthonormal basis of the complement of span(basis): with the Householder QR
    ``H = I - V T V^T`` of ``basis``, ``(residual @ H)[:, b:]``; its first b columns are the parts removed."""
    n, b = basis.shape
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small factorisation: a second thread only adds overhead
    try:
        reflectors, tau = torch.geqrf(basis)
    finally:
        torch.set_num_threads(threads)
    v = reflectors.tril(-1) + torch.eye(n, b, dtype=basis.dtype)
    t_inv = torch.diag(1.0 / tau) + torch.triu(v.T @ v, diagonal=1)
    t = torch.linalg.solve_triangular(t_inv, torch.eye(b, dtype=basis.dtype), upper=True)
    coeff = residual @ (v @ t)
    # In place over the whole buffer: its first b columns become the removed parts, the rest the
    # kept residual (a fresh allocation per block costs more, in page faults, than the product).
    residual.addmm_(coeff, v.T, alpha=-1.0)
    removed, kept = residual[:, :b], residual[:, b:]
    # at most one block's worth of terms per row: summed in the working precision, then
    # subtracted from the float64 norms²
    return kept, sq_norm - removed.square().sum(1).to(torch.float64)
