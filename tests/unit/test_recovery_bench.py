"""bench/recovery.py: row parsing, the grid, and moving weights trained at a smaller size back to 224 px."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from bench.recovery import RowSpec, parse_args, parse_row, restore_full_size
from tools.demo import knn_eval_model as resized

pytestmark = pytest.mark.unit


def test_a_row_string_names_method_ratio_compensation_and_repeated_trainer_overrides() -> None:
    row = parse_row("name=cos-comp method=diversity ratio=1 compensate=output "
                    "set=loss.patch_objective=cosine set=optim.betas=[0.9,0.99]", common=("optim.base_lr=1e-3",))
    assert row == RowSpec("cos-comp", "diversity", 1.0, "output",
                          ("optim.base_lr=1e-3", "loss.patch_objective=cosine", "optim.betas=[0.9,0.99]"))
    assert parse_row("method=taylor ratio=2") == RowSpec("taylor-r2", "taylor", 2.0, "none", ())
    assert parse_row("method=l2 ratio=0.5 compensate=output").name == "l2-r0.5-comp"


@pytest.mark.parametrize(("text", "message"), [
    ("method=l2", "ratio= is required"),
    ("method=magnitude ratio=1", "method: must be one of"),
    ("method=l2 ratio=x", "ratio: expected a number"),
    ("method=l2 ratio=1 compensate=yes", "compensate: must be one of"),
    ("method=l2 ratio=1 lr=3", "unknown key 'lr'"),
    ("method=l2 ratio=1 set=optim.base_lr", "is not of the form KEY=VALUE"),
    ("method=l2 method=random ratio=1", "method given twice"),
    ("method=activation ratio=1", "needs compensate=output"),
])
def test_bad_rows_are_refused_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_row(text)


def test_the_default_grid_is_four_methods_at_r1_then_r2(capsys: pytest.CaptureFixture) -> None:
    rows = parse_args([]).rows
    assert [r.name for r in rows] == ["diversity-r1", "l2-r1", "random-r1", "taylor-r1",
                                      "diversity-r2", "l2-r2", "random-r2", "taylor-r2"]
    grid = parse_args(["--methods", "l2", "--ratios", "1", "--compensate", "none", "output",
                       "--set", "optim.base_lr=1e-3"]).rows
    assert grid == [RowSpec("l2-r1", "l2", 1.0, "none", ("optim.base_lr=1e-3",)),
                    RowSpec("l2-r1-comp", "l2", 1.0, "output", ("optim.base_lr=1e-3",))]
    # activation chooses its units inside the compensation: in the grid only where it is compensated.
    grid = parse_args(["--methods", "diversity", "activation", "--ratios", "1", "--compensate", "none", "output"]).rows
    assert [r.name for r in grid] == ["diversity-r1", "diversity-r1-comp", "activation-r1-comp"]
    with pytest.raises(SystemExit):
        parse_args(["--row", "method=l2 ratio=1", "--row", "method=l2 ratio=1"])
    assert "row names must be unique" in capsys.readouterr().err


def test_weights_trained_at_a_smaller_size_come_back_with_the_change_of_the_position_embedding() -> None:
    torch.manual_seed(0)
    full = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                             num_classes=0).eval()
    small = resized(full, 16)
    assert small.pos_embed.shape == (1, 1 + 4, 64) and full.pos_embed.shape == (1, 1 + 16, 64)
    # Untouched by training: exactly the full-size model.
    same = restore_full_size(full, small, copy.deepcopy(small))
    for (name, a), b in zip(full.state_dict().items(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # Trained: the other weights are the trained ones; a constant shift of the embedding carries over as is.
    trained = copy.deepcopy(small)
    with torch.no_grad():
        trained.blocks[0].mlp.fc1.weight.add_(1.0)
        trained.pos_embed.add_(0.5)
    back = restore_full_size(full, small, trained)
    assert torch.equal(back.blocks[0].mlp.fc1.weight, trained.blocks[0].mlp.fc1.weight)
    torch.testing.assert_close(back.pos_embed, full.pos_embed + 0.5)
    assert back.patch_embed.img_size == (32, 32)


def _result(rows: list[str], knn: float = 0.5) -> dict:
    return {"teacher": {"knn_top1": knn}, "budget": {"steps": 40}, "eval": {}, "tiny": False, "seconds": 10.0,
            "command": f"python -m bench.recovery {' '.join(rows)}",
            "rows": [_row(name) for name in rows]}


def _metrics(knn: float) -> dict:
    return {"knn_top1": knn, "linear_top1": knn, "cls_cosine": knn, "patch_cosine": knn}


def _row(name: str, seed: int = 0, knn: float = 0.5) -> dict:
    scores = {"seed": seed, "pruned": _metrics(knn), "recovered": _metrics(knn)}
    if name == "custom":
        return {"name": name, "method": "l2", "ratio": 1.0, "compensate": "none", "overrides": ["optim.base_lr=1"],
                **scores}
    method, _, rest = name.partition("-r")
    ratio, _, comp = rest.partition("-")
    return {"name": name, "method": method, "ratio": float(ratio), "compensate": "output" if comp else "none",
            "overrides": [], **scores}


def test_seeds_of_a_row_are_summarised_as_mean_and_sample_sd() -> None:
    from bench.recovery import markdown_summary, summarise

    rows = [_row("l2-r1", 0, 0.5), _row("diversity-r1", 0, 0.7), _row("l2-r1", 1, 0.6), _row("l2-r1", 2, 0.7),
            _row("diversity-r1", 1, 0.7)]
    summary = summarise(rows)
    assert [s["name"] for s in summary] == ["l2-r1", "diversity-r1"]
    assert summary[0]["seeds"] == [0, 1, 2] and summary[1]["seeds"] == [0, 1]
    mean, sd = summary[0]["recovered"]["knn_top1"]
    assert mean == pytest.approx(0.6) and sd == pytest.approx(0.1)  # sample sd of 0.5, 0.6, 0.7
    assert summary[1]["pruned"]["cls_cosine"] == pytest.approx([0.7, 0.0])
    table = markdown_summary(summary)
    assert "| l2-r1 | 0,1,2 | 60.0 +- 10.0 | 60.0 +- 10.0 | 60.0 +- 10.0 |" in table


def test_one_row_name_may_repeat_across_seeds_when_merging(tmp_path) -> None:
    import json

    from bench.recovery import merge_results

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({**_result([]), "rows": [_row("l2-r1", 0, 0.5)]}))
    b.write_text(json.dumps({**_result([]), "rows": [_row("l2-r1", 1, 0.7)]}))
    merged = merge_results([a, b])
    assert [r["seed"] for r in merged["rows"]] == [0, 1]
    assert merged["summary"][0]["recovered"]["knn_top1"][0] == pytest.approx(0.6)


def test_merging_side_by_side_runs_puts_rows_in_grid_order(tmp_path) -> None:
    import json

    from bench.recovery import merge_results

    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(_result(["diversity-r2", "custom", "random-r1-comp", "l2-r1"])))
    b.write_text(json.dumps(_result(["taylor-r1", "diversity-r1-comp", "diversity-r1"])))
    merged = merge_results([a, b])
    assert [r["name"] for r in merged["rows"]] == ["diversity-r1", "l2-r1", "taylor-r1", "diversity-r2",
                                                   "diversity-r1-comp", "random-r1-comp", "custom"]
    assert merged["command"] == [_result([])["command"] + "diversity-r2 custom random-r1-comp l2-r1",
                                 _result([])["command"] + "taylor-r1 diversity-r1-comp diversity-r1"]
    c.write_text(json.dumps(_result(["random-r1"], knn=0.6)))
    with pytest.raises(ValueError, match="another 'teacher'"):
        merge_results([a, c])
    with pytest.raises(ValueError, match="repeated row names"):
        merge_results([a, a])
