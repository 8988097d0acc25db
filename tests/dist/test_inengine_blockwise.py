"""Calibration inside in-engine pruning (prune.compensate) on 2 gloo ranks.

Each rank carries the hidden states of its own calibration batches through whole teacher blocks gathered
from the shards, and the fit statistics are all-reduced: the student must equal
``pruning.prune_blocks`` on the full teacher in this process, fed every rank's batches, with the same
held-out errors (FSDP2, ZeRO-3 and ZeRO-2, the units chosen by diversity or, on ZeRO-3, by activation; an open_clip ViT and an EVA-CLIP-E-style timm tower: post-norm blocks, rotary tables and a zero
``k_bias`` that are in no checkpoint). One torchrun launch of tests/dist/inengine_worker.py runs every job.
"""

from __future__ import annotations

import json
from pathlib import Path

import inengine_worker  # tests/dist is on sys.path
import open_clip
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import trainer.models.open_clip_family  # noqa: F401  registers ViT-Tiny-8 (configs/open_clip)
from pruning import Calibration
from pruning.blockwise import block_layout, stem_states
from pruning_helpers import calibrate_blocks

pytestmark = pytest.mark.dist

RATIO = 0.5
CALIB = 2  # batches per rank
RIDGE = 1e-3
CLIP = {"family": "open_clip", "model": "ViT-Tiny-8"}
EVA = {"family": "timm", "model": inengine_worker.TINY_EVA}
JOBS = {"fsdp": {**CLIP, "engine": "fsdp", "calib_holdout": 0.0},
        "zero3": {**CLIP, "engine": "deepspeed", "zero_stage": 3, "calib_holdout": 0.25},
        "fsdp_eva": {**EVA, "engine": "fsdp", "calib_holdout": 0.0},
        "zero2": {**CLIP, "engine": "deepspeed", "zero_stage": 2, "calib_holdout": 0.25},
        "fsdp_train": {**CLIP, "engine": "fsdp", "calib_holdout": 0.25, "train": True},
        "zero3_activation": {**CLIP, "engine": "deepspeed", "zero_stage": 3, "calib_holdout": 0.25,
                             "method": "activation"}}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inengine_blockwise")
    torch.manual_seed(1234)
    clip = open_clip.create_model(CLIP["model"], pretrained=None)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, out / "clip.safetensors")
    torch.manual_seed(1234)
    eva = timm.create_model(EVA["model"], pretrained=False)
    with torch.no_grad():
        for name, p in eva.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # stock inits zero them: make the intercepts and the norm shifts count
    save_file({k: v.contiguous() for k, v in eva.state_dict().items()}, out / "eva.safetensors")
    jobs = [{**spec, "name": name, "pretrained": str(out / ("eva" if spec is JOBS["fsdp_eva"] else "clip")
                                                       ) + ".safetensors",
             "ratio": RATIO, "method": spec.get("method", "diversity"), "in_engine": True, "compensate": True, "calib_batches": CALIB,
             "ridge": RIDGE, "stream": "synthetic", "train": spec.get("train", False)} for name, spec in JOBS.items()]
    inengine_worker.launch(out, jobs)
    return out


def host(out: Path, name: str) -> tuple[dict, list]:
    """calibrate_blocks on the full teacher with both ranks' calibration batches: (state, report sites)."""
    from trainer.models.registry import get_adapter

    spec = JOBS[name]
    job = {**spec, "name": f"host-{name}", "pretrained": str(out / ("eva" if "eva" in name else "clip")) + ".safetensors",
           "stream": "synthetic", "ratio": RATIO, "method": "diversity", "in_engine": False}  # builds the teacher
    cfg = inengine_worker.config(out / "host", {**job, "engine": "fsdp"}, 1, 0.05)
    adapter = get_adapter(cfg.model.family)
    teacher = adapter.build(cfg.model).eval().requires_grad_(False)
    adapter.strip_head(teacher)
    images = [inengine_worker.stream(job, rank).batch_at(i).model_input() for rank in range(2) for i in range(CALIB)]
    states = stem_states(teacher, block_layout(teacher).blocks[0], images)
    report = calibrate_blocks(teacher, states, ratio=RATIO, method=spec.get("method", "diversity"), ridge=RIDGE,
                              holdout_fraction=spec["calib_holdout"])
    return teacher.state_dict(), report.sites


def ranks(out: Path, name: str) -> list[dict]:
    found = [json.loads(p.read_text()) for p in sorted(out.glob(f"{name}.prune.rank*.json"))]
    assert len(found) == 2, name
    return found


@pytest.mark.parametrize("name", JOBS)
def test_blockwise_student_equals_calibrate_blocks_on_the_full_teacher(out: Path, name: str) -> None:
    want, sites = host(out, name)
    student = load_file(out / f"{name}.pruned.safetensors")
    assert student and set(student) <= set(want)
    worst = 0.0
    for key, value in student.items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-5, msg=key)
        worst = max(worst, float((value - want[key]).abs().max()))
    print(f"{name}: max |in-engine - host| over the student = {worst:.3g}")
    for record in ranks(out, name):
        assert [s["kept"] for s in record["report"]["sites"]] == [s.kept for s in sites]
        for got, want_site in zip(record["report"]["sites"], sites, strict=True):
            for key in ("recon_error_before", "recon_error_after"):
                want_error = getattr(want_site, key)
                assert (got[key] is None) == (want_error is None)
                if want_error is not None:
                    assert got[key] == pytest.approx(want_error, rel=1e-5), (key, got["path"])
    # The refit did something: every fc2 differs from the teacher's kept columns (plain pruning).
    teacher = load_file(out / ("eva.safetensors" if "eva" in name else "clip.safetensors"))
    prefix = "visual." if "eva" not in name else ""
    for site in sites:
        out_weight = next(k for k in student if k.startswith(site.path + ".") and k.endswith("weight")
                          and student[k].shape[1] == len(site.kept))
        plain = teacher[prefix + out_weight][:, torch.tensor(site.kept).sort().values]
        assert (student[out_weight] - plain).abs().max() > 1e-3, out_weight


def test_blockwise_reports_held_out_errors_alike_on_every_rank(out: Path) -> None:
    records = ranks(out, "zero2")
    errors = [[(s["recon_error_before"], s["recon_error_after"]) for s in r["report"]["sites"]] for r in records]
    assert errors[0] == errors[1]
    assert all(before is not None and after is not None and after < before for before, after in errors[0])


def test_training_run_writes_the_compensated_report(out: Path) -> None:
    records = [json.loads(p.read_text()) for p in sorted(out.glob("fsdp_train.rank*.json"))]
    assert len(records) == 2
    assert all(len(r["losses"]) == 3 and all(loss == loss for loss in r["losses"]) for r in records)
    report = json.loads((Path(records[0]["run_dir"]) / "prune_report.json").read_text())
    pruned = ranks(out, "fsdp_train")[0]["report"]
    assert [s["recon_error_after"] for s in report["sites"]] == [s["recon_error_after"] for s in pruned["sites"]]
    assert (report["calibration"]["ridge"], report["calibration"]["holdout_fraction"]) == (RIDGE, 0.25)


def test_calibration_config_keys_are_validated() -> None:
    from trainer.config import from_dict

    cfg = from_dict({"prune": {"in_engine": True, "compensate": True}})
    assert cfg.prune.calibration() == Calibration()  # one default, the CLI's and the demo's
    assert (cfg.prune.calib_batches, cfg.prune.ridge) == (8, 1e-3)
    assert from_dict({"prune": {"in_engine": True}}).prune.calibration() is None
    with pytest.raises(ValueError, match="prune.compensate: needs prune.in_engine=true"):
        from_dict({"prune": {"compensate": True}})
    with pytest.raises(ValueError, match="prune.calib_batches: must be >= 1"):
        from_dict({"prune": {"in_engine": True, "compensate": True, "calib_batches": 0}})
    bad = [({"calib_mode": "output"}, "config key prune.calib_mode was removed: output-mode compensation is the only"),
           ({"calib_holdout": 1.0}, r"holdout_fraction must be in \[0, 1\)"),
           ({"ridge": -1.0}, "ridge must be >= 0")]
    for keys, message in bad:
        with pytest.raises(ValueError, match=message):
            from_dict({"prune": {"in_engine": True, "compensate": True, **keys}})
