"""The real ``python -m pruning prune`` in a subprocess on a tiny open_clip model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
from pruning_helpers import prune_model
from safetensors.torch import save_file

from pruning.__main__ import main

pytestmark = pytest.mark.smoke

NAME = "dgmr-smoke-tiny-vit"
CONFIG = {"embed_dim": 32,
          "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "patch_size": 8},
          "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pruning", "prune", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_prunes_a_checkpoint_into_a_stock_loadable_export(tmp_path, capsys):
    config = tmp_path / f"{NAME}.json"
    config.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(NAME, pretrained=None).eval()
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(model.state_dict(), ckpt)
    out = tmp_path / "out"

    done = run_cli("--model", NAME, "--model-config", str(config), "--checkpoint", str(ckpt), "--ratio", "1.5",
                   "--method", "diversity", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "pruned 3 MLP blocks" in done.stdout and "[3/3]" in done.stderr
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    prune_model(model.visual, ratio=1.5)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval().encode_image(x), model.encode_image(x), rtol=0, atol=0)
    report = json.loads((out / "pruning_report.json").read_text())
    assert [s["hidden_after"] for s in report["sites"]] == [96, 96, 96]
    assert "| 2 | `transformer.resblocks.2.mlp` | 256 | 96 |" in (out / "pruning_report.md").read_text()

    # User errors: one line on stderr, exit status 2 (in-process: the same main(), no import cost).
    assert main(["prune", "--model", NAME, "--ratio", "1", "--out", str(out)]) == 2
    assert "output directory exists" in capsys.readouterr().err
    assert main(["prune", "--model", NAME, "--ratio", "5", "--out", str(tmp_path / "x")]) == 2
    assert "keeps 320 hidden units" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    widths = tmp_path / "widths.json"
    widths.write_text(json.dumps([10, 20, 30]))
    per_layer = run_cli("--model", NAME, "--model-config", str(config), "--num-keep-json", str(widths),
                        "--out", str(out), "--overwrite", "--quiet")
    assert per_layer.returncode == 0, per_layer.stderr
    record = json.loads((out / "open_clip_config.json").read_text())["dgmr_pruning"]
    assert list(record["mlp_hidden"].values()) == [10, 20, 30] and record["stock_loadable"] is False


def test_cli_compensates_from_an_image_folder_like_in_memory(tmp_path):
    import copy

    import numpy as np
    from PIL import Image
    from pruning_helpers import prune_and_compensate
    from safetensors.torch import load_file

    from pruning.calib_images import input_spec, load_calibration_images

    config = tmp_path / f"{NAME}.json"
    config.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(NAME, pretrained=None).eval()
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    ckpt = tmp_path / "visual.pt"
    torch.save(model.visual.state_dict(), ckpt)
    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"

    done = run_cli("--model", NAME, "--model-config", str(config), "--checkpoint", str(ckpt), "--ratio", "0.5",
                   "--out", str(out), "--calibration", str(tmp_path / "images"), "--num-calib", "8",
                   "--calib-batch-size", "3", "--ridge", "0.01")
    assert done.returncode == 0, done.stderr
    # 2 streams x 8 images x 17 tokens x width 64 x 4 bytes
    assert "compensated (ridge 0.01) on 8 images; carried hidden states 69,632 bytes" in done.stdout
    assert "held-out error" in done.stderr  # per-block progress lines carry the errors

    images = load_calibration_images(tmp_path / "images", 8, input_spec(model, "open_clip"))
    expected = copy.deepcopy(model.visual)
    want = prune_and_compensate(expected, list(images.split(3)), lambda m, x: m(x), ratio=0.5, ridge=0.01)
    got = load_file(out / "open_clip_visual.safetensors")
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["calibration"]["num_images"] == 8 and report["calibration"]["source"] == str(tmp_path / "images")
    for site, exp in zip(report["sites"], want.sites, strict=True):
        assert site["recon_error_after"] == pytest.approx(exp.recon_error_after, rel=1e-5)
    assert main(["prune", "--model", NAME, "--ratio", "0.5", "--out", str(tmp_path / "y"),
                 "--calibration", str(tmp_path / "nothing.tar")]) == 2
    assert not (tmp_path / "y").exists()
