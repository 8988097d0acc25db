"""bench.demo_sweep's row syntax: the rows it runs are the ones asked for."""

from __future__ import annotations

import pytest

from bench.demo_sweep import ROWS, parse_row

pytestmark = pytest.mark.unit


def test_a_row_is_name_steps_and_overrides_in_order() -> None:
    assert parse_row("name=x steps=30 set=optim.base_lr=8e-5 set=loss.blocks=[2,5]") == (
        "x", 30, ["optim.base_lr=8e-5", "loss.blocks=[2,5]"])
    assert ROWS["base224"][1] == ["data.image_size=0"]  # the demo's config trains at 112 px now


@pytest.mark.parametrize(("text", "message"), [
    ("name=x", "name and steps"),
    ("steps=3", "name and steps"),
    ("name=x steps=3 lr=1", "unknown key 'lr'"),
    ("name=x steps=3 set=optim.base_lr", "not set=KEY=VALUE"),
    ("name=x steps", "is not key=value"),
])
def test_bad_rows_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_row(text)
