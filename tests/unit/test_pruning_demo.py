"""`make demo` (until the real-model demo lands): prunes open_clip ViT-B-32 and prints widths."""

import pytest

from pruning.demo import main

pytestmark = pytest.mark.unit


def test_demo_prints_every_block_and_the_totals(capsys):
    main(["--model", "ViT-B-32", "--ratio", "0.5", "--method", "l2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("transformer.resblocks.")]
    assert len(rows) == 12
    assert all("3072 -> 384" in row for row in rows)
    # Each MLP keeps fc1 768x384 + 384 bias and fc2 384x768 + its full 768 bias.
    assert "87,849,216 -> " in out and f"{87_849_216 - 12 * (4_722_432 - 590_976):,}" in out
