"""Adaptive widths through the streaming prune and its CLI: the same plan and weights as in memory, a loadable export."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import pruning
from pruning.__main__ import main
from pruning.export import TIMM_WEIGHTS, load_pruned

NAME = "vit_small_patch14_dinov2"
KWARGS = {"img_size": 28, "depth": 3, "embed_dim": 64, "num_heads": 2, "num_classes": 0}


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, **KWARGS).eval()
    with torch.no_grad():  # LayerScale off its 1e-5 init, so every block's MLP matters
        for block in model.blocks:
            block.ls1.gamma.uniform_(0.2, 1.0)
            block.ls2.gamma.uniform_(0.2, 1.0)
        model.blocks[1].ls2.gamma.mul_(1e-3)  # a block whose MLP hardly matters: its units go elsewhere
    return model


def test_streamed_budget_equals_in_memory_and_loads(tmp_path):
    teacher = _teacher()
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(teacher.state_dict(), ckpt)
    images = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    calibration = pruning.Calibration(batch_size=4, holdout_fraction=0.25)
    budget = pruning.Budget(ratio=1.0, grid=16)
    out = tmp_path / "out"
    report = pruning.prune_checkpoint(f"timm:{NAME}", out, checkpoint=ckpt, budget=budget, calibration=calibration,
                                      images=images, model_kwargs=KWARGS)

    expected = copy.deepcopy(teacher)
    want = pruning.prune_to_budget(pruning.ModelSource(expected, lambda m, x: m.forward_features(x)), budget,
                                   calibration=calibration, calib_inputs=list(images.split(4)))
    assert report.calibration["budget"]["widths"] == want.calibration["budget"]["widths"] == report.widths
    assert sum(report.widths) == 3 * 64 and report.widths[1] == 16
    got = load_file(out / TIMM_WEIGHTS)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    summary = json.loads((out / "pruning_report.json").read_text())
    assert summary["calibration"]["budget"]["units"] == 192
    md = (out / "pruning_report.md").read_text()
    assert "## Adaptive widths: budget r=1" in md
    # The export records the constructor arguments and, with unequal widths, loads through load_pruned only.
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"] == KWARGS
    loaded = load_pruned(out).eval()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), expected.forward_features(x), rtol=1e-5, atol=1e-5)
    assert summary["stock_loadable"] is False


def test_cli_budget_and_model_kwargs(tmp_path, capsys):
    teacher = _teacher()
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(teacher.state_dict(), ckpt)
    images = tmp_path / "calib.pt"
    torch.save(torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(1)), images)
    common = ["prune", "--model", f"timm:{NAME}", "--model-kwargs", json.dumps(KWARGS), "--checkpoint", str(ckpt),
              "--quiet"]
    assert main([*common, "--budget", "1", "--grid", "16", "--calibration", str(images), "--num-calib", "8",
                 "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "budget r=1: 192 of 192 units, widths [" in printed
    assert (tmp_path / "out" / TIMM_WEIGHTS).is_file()
    # Refusals name the problem and write nothing.
    assert main([*common, "--budget", "1", "--out", str(tmp_path / "no_calib")]) == 2
    assert "--budget measures each block's error on calibration images" in capsys.readouterr().err
    assert main(["prune", "--model", f"timm:{NAME}", "--model-kwargs", '{"no_such_arg": 1}', "--ratio", "1",
                 "--out", str(tmp_path / "bad_kwargs")]) == 2
    assert "does not take the keyword arguments" in capsys.readouterr().err
    assert not (tmp_path / "no_calib").exists() and not (tmp_path / "bad_kwargs").exists()


@pytest.mark.parametrize("model_kwargs", [{"img_size": 28}])
def test_open_clip_refuses_model_kwargs(tmp_path, model_kwargs):
    with pytest.raises(ValueError, match="apply to timm models"):
        pruning.prune_checkpoint("open_clip:ViT-B-32", tmp_path / "o", ratio=1.0, model_kwargs=model_kwargs)
