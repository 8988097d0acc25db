"""Channel selection: the DGMR order equals a plain greedy Gram-Schmidt loop, and the baselines."""

import shutil

import pytest
import torch

from pruning import select, select_mlp_channels
from pruning.native import build
from pruning.select import RANK_TOL, diversity_order

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True, params=["compiled", "fallback"])
def pick_loop(request, monkeypatch):
    """Every test runs with the blocked method's compiled pick loop and without it (the dense fallback)."""
    if request.param == "fallback":
        monkeypatch.setattr(select, "_native", lambda: None)
    elif shutil.which("g++") or shutil.which("c++"):
        assert select._native() is not None, "a C++ compiler is on PATH but the pick loop did not build"
    else:
        pytest.skip("no C++ compiler: only the dense fallback exists here")
    return request.param


def reference_diversity(weight: torch.Tensor, num_keep: int) -> torch.Tensor:
    """The straightforward greedy loop, written independently: the definition we must match."""
    w = weight.double()
    hidden, width = w.shape
    remaining = list(range(hidden))
    order: list[int] = []
    while len(order) < num_keep:
        residual = w[remaining].clone()
        tol2 = RANK_TOL**2 * float((residual * residual).sum(1).max())
        alive = torch.ones(len(remaining), dtype=torch.bool)
        got: list[int] = []
        for _ in range(min(width, num_keep - len(order))):
            norms = (residual * residual).sum(1)
            norms[~alive] = -float("inf")
            i = int(torch.argmax(norms))
            if norms[i] <= tol2:
                break
            q = residual[i] / residual[i].norm()
            residual -= torch.outer(residual @ q, q)
            alive[i] = False
            got.append(i)
        if not got:
            got = list(range(min(num_keep - len(order), len(remaining))))
        order += [remaining[g] for g in got]
        taken = set(got)
        remaining = [r for j, r in enumerate(remaining) if j not in taken]
    return torch.tensor(order)


SHAPES = [(48, 12, 12), (48, 12, 30), (48, 12, 48), (200, 40, 40), (200, 40, 130), (300, 100, 300), (30, 30, 30)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("algorithm", ["blocked", "dense"])
@pytest.mark.parametrize(("hidden", "width", "keep"), SHAPES)
def test_diversity_matches_reference_loop(algorithm, dtype, hidden, width, keep):
    w = torch.randn(hidden, width, generator=torch.Generator().manual_seed(hidden * 31 + keep))
    expected = reference_diversity(w, keep)
    assert torch.equal(diversity_order(w, keep, algorithm=algorithm, dtype=dtype), expected)


def test_blocked_crosses_many_blocks_exactly():
    # width 300 > 4 blocks of 64 picks; trained-like spread of row norms.
    g = torch.Generator().manual_seed(7)
    w = torch.randn(700, 300, generator=g) * torch.rand(700, 1, generator=g).pow(3)
    expected = reference_diversity(w, 500)
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(diversity_order(w, 500, algorithm="blocked", dtype=dtype), expected)


def test_concentrated_norms_force_the_candidate_pool_to_grow():
    # Gaussian rows all have nearly the same norm, the hard case for stale bounds.
    w = torch.randn(2000, 96, generator=torch.Generator().manual_seed(11))
    assert torch.equal(diversity_order(w, 96, algorithm="blocked"), reference_diversity(w, 96))


def test_rank_deficient_rounds_restart():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(60, 4, generator=g) @ torch.randn(4, 16, generator=g)  # rank 4 < width 16
    expected = reference_diversity(w, 20)
    for algorithm in ("blocked", "dense"):
        got = diversity_order(w, 20, algorithm=algorithm, dtype=torch.float64)
        assert torch.equal(got, expected)
    # A round can only find 4 independent rows, so rounds restart every 4 picks.
    first_round = expected[:4]
    assert torch.linalg.matrix_rank(w[first_round].double()) == 4


def test_zero_rows_are_taken_last():
    w = torch.randn(20, 8, generator=torch.Generator().manual_seed(3))
    w[[2, 5, 11]] = 0
    order = select_mlp_channels(w, 20)
    assert sorted(order.tolist()) == list(range(20))
    assert set(order[-3:].tolist()) == {2, 5, 11}


def test_prefix_property_across_ratios():
    w = torch.randn(256, 32, generator=torch.Generator().manual_seed(5))
    long = select_mlp_channels(w, 96)
    assert torch.equal(select_mlp_channels(w, 40), long[:40])
    assert long.unique().numel() == 96


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_select_on_upcast_values(dtype):
    w = torch.randn(96, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
    assert torch.equal(select_mlp_channels(w, 24), reference_diversity(w.double(), 24))


def test_first_pick_is_largest_row_and_second_is_most_orthogonal():
    w = torch.zeros(4, 3, dtype=torch.float64)
    w[0] = torch.tensor([3.0, 0.0, 0.0])
    w[1] = torch.tensor([2.9, 0.1, 0.0])  # large but nearly parallel to row 0
    w[2] = torch.tensor([0.0, 1.0, 0.0])
    w[3] = torch.tensor([0.0, 0.0, 0.5])
    assert select_mlp_channels(w, 3).tolist() == [0, 2, 3]
    assert select_mlp_channels(w, 3, "l2").tolist() == [0, 1, 2]


def test_l2_orders_by_row_norm():
    w = torch.diag(torch.tensor([1.0, 5.0, 3.0, 4.0]))
    assert select_mlp_channels(w, 3, "l2").tolist() == [1, 3, 2]


def test_random_is_seeded_and_without_replacement():
    w = torch.randn(50, 8)
    a = select_mlp_channels(w, 30, "random", generator=torch.Generator().manual_seed(0))
    b = select_mlp_channels(w, 30, "random", generator=torch.Generator().manual_seed(0))
    c = select_mlp_channels(w, 30, "random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.unique().numel() == 30


def test_taylor_orders_by_scores():
    w = torch.randn(6, 4)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.0, 0.3])
    assert select_mlp_channels(w, 4, "taylor", scores=scores).tolist() == [1, 3, 2, 5]


@pytest.mark.parametrize(
    ("weight", "keep", "kwargs", "message"),
    [
        (torch.randn(8, 4), 0, {}, "num_keep"),
        (torch.randn(8, 4), 9, {}, "num_keep"),
        (torch.randn(8), 2, {}, "2-D"),
        (torch.randn(2, 8, 4), 2, {}, "2-D"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1, {}, "NaN"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1, {}, "NaN or Inf"),
        (torch.randn(8, 4), 2, {"method": "magic"}, "unknown method"),
        (torch.randn(8, 4), 2, {"method": "taylor"}, "scores"),
        (torch.randn(8, 4), 2, {"method": "taylor", "scores": torch.ones(7)}, "shape"),
        (torch.randn(8, 4), 2.0, {}, "int"),
    ],
)
def test_bad_input_is_a_value_error_naming_it(weight, keep, kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_mlp_channels(weight, keep, **kwargs)


def test_bad_precision_or_algorithm():
    with pytest.raises(ValueError, match="dtype"):
        diversity_order(torch.randn(8, 4), 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="algorithm"):
        diversity_order(torch.randn(8, 4), 2, algorithm="qr")


def test_native_library_is_cached_per_source_and_a_broken_compiler_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DGMR_CACHE", str(tmp_path))
    if shutil.which("g++") or shutil.which("c++"):
        lib = build.load.__wrapped__("pick_block")
        built = list(tmp_path.glob("pick_block-*.so"))
        assert lib is not None and len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        assert build.load.__wrapped__("pick_block") is not None
        assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    monkeypatch.setenv("DGMR_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    assert build.load.__wrapped__("pick_block") is None
    assert "building pick_block failed" in caplog.text
    assert not list((tmp_path / "other").glob("*.so")) and not list((tmp_path / "other").glob("*.tmp*"))
    monkeypatch.setenv("DGMR_NATIVE", "0")
    assert build.load.__wrapped__("pick_block") is None
