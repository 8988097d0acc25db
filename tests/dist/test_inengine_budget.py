"""prune.budget inside the engines on 2 gloo ranks: the same per-block widths, kept units and compensated weights as
``pruning.prune_to_budget`` on the full teacher fed every rank's calibration batches (FSDP2 and ZeRO-3).

The plan reads the teacher block by block from its checkpoint on every rank (selection on one rank and broadcast,
statistics all-reduced); the student is then built at the planned widths and pruned from the sharded teacher with
the plan's orders. One torchrun launch of tests/dist/inengine_worker.py runs both jobs.
"""

from __future__ import annotations

import json
from pathlib import Path

import inengine_worker  # tests/dist is on sys.path
import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

import pruning
import trainer.models.open_clip_family  # noqa: F401  registers ViT-Tiny-8 (configs/open_clip)

pytestmark = pytest.mark.dist

CALIB, HOLDOUT, RIDGE, GRID, BUDGET = 2, 0.25, 1e-3, 8, 0.5
JOBS = {"fsdp_budget": {"engine": "fsdp"}, "zero3_budget": {"engine": "deepspeed", "zero_stage": 3}}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inengine_budget")
    torch.manual_seed(1234)
    clip = open_clip.create_model("ViT-Tiny-8", pretrained=None)
    with torch.no_grad():  # one block's MLP nearly silent: the plan must move its units to the other blocks
        clip.visual.transformer.resblocks[1].mlp.c_proj.weight.mul_(1e-3)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, out / "clip.safetensors")
    jobs = [{**spec, "name": name, "family": "open_clip", "model": "ViT-Tiny-8",
             "pretrained": str(out / "clip.safetensors"), "ratio": 1.0, "budget": BUDGET, "budget_grid": GRID,
             "method": "diversity", "in_engine": True, "compensate": True, "calib_batches": CALIB, "ridge": RIDGE,
             "calib_holdout": HOLDOUT, "stream": "synthetic", "train": False}
            for name, spec in JOBS.items()]
    inengine_worker.launch(out, jobs)
    return out


def host(out: Path) -> tuple[dict, pruning.PruneReport]:
    """prune_to_budget on the full teacher in this process, with both ranks' calibration batches in rank order."""
    from trainer.models.registry import get_adapter

    job = {"name": "host", "family": "open_clip", "model": "ViT-Tiny-8", "pretrained": str(out / "clip.safetensors"),
           "stream": "synthetic", "ratio": 1.0, "method": "diversity", "in_engine": False, "engine": "fsdp"}
    cfg = inengine_worker.config(out / "host", job, 1, 0.05)
    adapter = get_adapter(cfg.model.family)
    teacher = adapter.build(cfg.model).eval().requires_grad_(False)
    adapter.strip_head(teacher)
    images = [inengine_worker.stream(job, rank).batch_at(i).model_input() for rank in range(2) for i in range(CALIB)]
    report = pruning.prune_to_budget(pruning.ModelSource(teacher), pruning.Budget(BUDGET, grid=GRID),
                                     calibration=pruning.Calibration(ridge=RIDGE, holdout_fraction=HOLDOUT),
                                     calib_inputs=images)
    return teacher.state_dict(), report


@pytest.mark.parametrize("name", JOBS)
def test_in_engine_budget_equals_the_host_plan_and_prune(out: Path, name: str) -> None:
    want, report = host(out)
    widths = report.calibration["budget"]["widths"]
    assert len(set(widths)) > 1 and widths[1] == GRID
    student = load_file(out / f"{name}.pruned.safetensors")
    for key, value in student.items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-5, msg=key)
    for path in sorted(out.glob(f"{name}.prune.rank*.json")):
        got = json.loads(path.read_text())["report"]
        assert got["calibration"]["budget"]["widths"] == widths
        assert [s["kept"] for s in got["sites"]] == [s.kept for s in report.sites]
        assert got["calibration"]["budget"]["predicted_error"] == pytest.approx(
            report.calibration["budget"]["predicted_error"], rel=1e-4)


def test_budget_config_is_checked() -> None:
    from trainer.config import from_dict

    with pytest.raises(ValueError, match="prune.budget: needs prune.in_engine=true and prune.compensate=true"):
        from_dict({"prune": {"budget": 1.0}})
    with pytest.raises(ValueError, match="prune.budget: plans with diversity, l2 or random"):
        from_dict({"prune": {"budget": 1.0, "in_engine": True, "compensate": True, "method": "taylor"}})
    with pytest.raises(ValueError, match="prune.widths: must be a list of positive widths"):
        from_dict({"prune": {"widths": [64, 0]}})
