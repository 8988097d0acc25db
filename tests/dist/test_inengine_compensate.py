"""Closed-form compensation inside in-engine pruning (prune.compensate=true) on 2 gloo ranks.

The compensated student made inside each engine (FSDP2, ZeRO-3, ZeRO-2) from a tiny open_clip ViT checkpoint
must equal ``pruning.prune_and_compensate(mode='teacher')`` on the full teacher in this process, fitted on
the same calibration images (every rank's batches but its last) and reporting the same held-out error
(every rank's last batch). One torchrun launch of tests/dist/inengine_worker.py runs every job; the FSDP
job then also trains 3 steps through trainer.loop.train with compensation switched on.
"""

from __future__ import annotations

import json
from pathlib import Path

import inengine_worker  # tests/dist is on sys.path
import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

import trainer.models.open_clip_family  # noqa: F401  registers ViT-Tiny-8 (configs/open_clip)
from pruning import find_mlp_sites, prune_and_compensate
from pruning.compensate import ActivationStats, reconstruction_error

pytestmark = pytest.mark.dist

RATIO = 0.5  # width 64 -> 32 kept of 256 hidden units
CALIB = 3  # per rank: 2 fitted batches, the last held out
RIDGE = 1e-3
MODEL = {"family": "open_clip", "model": "ViT-Tiny-8"}
# fsdp_grouped: moments for one block at a time (1 MiB each with held-out stats), one calibration pass per block
ENGINES = {"fsdp": {"engine": "fsdp"}, "zero3": {"engine": "deepspeed", "zero_stage": 3},
           "zero2": {"engine": "deepspeed", "zero_stage": 2},
           "fsdp_grouped": {"engine": "fsdp", "calib_stats_gib": 1.5 / 1024}}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inengine_compensate")
    torch.manual_seed(1234)
    net = open_clip.create_model(MODEL["model"], pretrained=None)  # the whole CLIP, as published
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out / "vit.safetensors")
    common = {**MODEL, "pretrained": str(out / "vit.safetensors"), "ratio": RATIO, "method": "diversity",
              "in_engine": True, "compensate": True, "calib_batches": CALIB, "ridge": RIDGE, "stream": "synthetic"}
    jobs = [{**common, **spec, "name": engine, "train": engine == "fsdp"} for engine, spec in ENGINES.items()]
    inengine_worker.launch(out, jobs)
    return out


@pytest.fixture(scope="module")
def host(out: Path) -> dict:
    """prune_and_compensate on the full teacher with both ranks' calibration images, and its held-out errors."""
    from trainer.models.registry import get_adapter

    job = {**MODEL, "pretrained": str(out / "vit.safetensors"), "stream": "synthetic"}
    cfg = inengine_worker.config(out / "host", {**job, "engine": "fsdp", "name": "host", "ratio": RATIO,
                                                "method": "diversity", "in_engine": False}, 1, 0.05)
    adapter = get_adapter(cfg.model.family)
    teacher = adapter.build(cfg.model).eval().requires_grad_(False)
    adapter.strip_head(teacher)
    streams = [inengine_worker.stream(job, rank) for rank in range(2)]
    images = [[s.batch_at(i).model_input() for i in range(CALIB)] for s in streams]
    sites = find_mlp_sites(teacher)
    outs = {s.path: getattr(s.module(teacher), s.out_name) for s in sites}
    original = {p: (o.weight.detach().clone(), o.bias.detach().clone()) for p, o in outs.items()}
    held = {s.path: ActivationStats(s.hidden) for s in sites}
    handles = [o.register_forward_pre_hook(lambda _m, args, p=p: held[p].update(args[0])) for p, o in outs.items()]
    with torch.no_grad():
        for part in images:
            teacher(part[-1])
    for handle in handles:
        handle.remove()
    fit = [x for part in images for x in part[:-1]]
    report = prune_and_compensate(teacher, fit, lambda m, x: m(x), ratio=RATIO, method="diversity",
                                  mode="teacher", ridge=RIDGE, holdout_fraction=0)
    errors = []
    for site, record in zip(sites, report.sites, strict=True):
        weight, bias = original[site.path]
        kept = torch.tensor(record.kept).sort().values
        new = getattr(site.module(teacher), site.out_name)
        errors.append((reconstruction_error(held[site.path], weight, bias, kept, weight[:, kept], bias),
                       reconstruction_error(held[site.path], weight, bias, kept, new.weight, new.bias)))
    return {"state": teacher.state_dict(), "report": report, "errors": errors, "original": original,
            "out_names": {s.path: s.out_name for s in sites}}


def ranks(out: Path, pattern: str) -> list[dict]:
    found = [json.loads(p.read_text()) for p in sorted(out.glob(pattern))]
    assert len(found) == 2, pattern
    return found


@pytest.mark.parametrize("engine", ENGINES)
def test_compensated_student_equals_prune_and_compensate_on_the_full_teacher(out: Path, host: dict,
                                                                              engine: str) -> None:
    student = load_file(out / f"{engine}.pruned.safetensors")
    assert student and set(student) <= set(host["state"])
    worst = 0.0
    for key, value in student.items():
        want = host["state"][key]
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=key)
        worst = max(worst, float((value - want).abs().max()))
    print(f"{engine}: max |in-engine - host| over the student = {worst:.3g}")
    # Compensation did something: every fc_out differs from the plain kept columns, and its bias moved.
    for site in host["report"].sites:
        weight, bias = host["original"][site.path]
        kept = torch.tensor(site.kept).sort().values
        out_name = f"{site.path}.{host['out_names'][site.path]}"
        assert not torch.allclose(student[f"{out_name}.weight"], weight[:, kept])
        assert not torch.allclose(student[f"{out_name}.bias"], bias)


@pytest.mark.parametrize("engine", ENGINES)
def test_report_has_the_host_held_out_errors(out: Path, host: dict, engine: str) -> None:
    for record in ranks(out, f"{engine}.prune.rank*.json"):
        sites = record["report"]["sites"]
        assert [s["kept"] for s in sites] == [s.kept for s in host["report"].sites]
        got = [(s["recon_error_before"], s["recon_error_after"]) for s in sites]
        for (before, after), (want_before, want_after) in zip(got, host["errors"], strict=True):
            assert before == pytest.approx(want_before, rel=1e-6)
            assert after == pytest.approx(want_after, rel=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_calibration_groups_follow_the_moment_budget(out: Path, host: dict, engine: str) -> None:
    sites = len(host["report"].sites)
    for record in ranks(out, f"{engine}.prune.rank*.json"):
        groups = {r["calib_groups"] for r in record["in_engine_memory"]["ranks"]}
        assert groups == ({sites} if engine == "fsdp_grouped" else {1})


def test_calibration_groups_are_consecutive_and_within_budget() -> None:
    from pruning.sites import MlpSite
    from trainer.sharded_prune import calibration_groups

    sites = [MlpSite(path=f"b{i}", layout="plain", in_names=("fc1",), out_name="fc2", hidden=h, width=8)
             for i, h in enumerate([256, 256, 512, 256, 1024])]
    mib = 2**20 / 2**30
    groups = calibration_groups(sites, held_out=False, budget_gib=2.5 * mib)  # 0.5, 0.5, 2, 0.5, 8 MiB
    assert [[s.path for s in g] for g in groups] == [["b0", "b1"], ["b2", "b3"], ["b4"]]
    groups = calibration_groups(sites, held_out=True, budget_gib=2.5 * mib)  # twice as much each
    assert [[s.path for s in g] for g in groups] == [["b0", "b1"], ["b2"], ["b3"], ["b4"]]
    assert len(calibration_groups(sites, held_out=True, budget_gib=4.0)) == 1


def test_training_run_writes_the_compensated_report(out: Path) -> None:
    records = ranks(out, "fsdp.rank*.json")
    assert all(len(r["losses"]) == 3 and all(loss == loss for loss in r["losses"]) for r in records)
    report = json.loads((Path(records[0]["run_dir"]) / "prune_report.json").read_text())
    assert all(s["recon_error_after"] is not None for s in report["sites"])
    pruned = ranks(out, "fsdp.prune.rank*.json")[0]["report"]
    assert [s["recon_error_after"] for s in report["sites"]] == [s["recon_error_after"] for s in pruned["sites"]]


def test_config_keys_are_validated() -> None:
    from trainer.config import from_dict

    with pytest.raises(ValueError, match="prune.compensate: needs prune.in_engine=true"):
        from_dict({"prune": {"compensate": True}})
    with pytest.raises(ValueError, match="prune.calib_batches: must be >= 1"):
        from_dict({"prune": {"in_engine": True, "compensate": True, "calib_batches": 0}})
    with pytest.raises(ValueError, match="prune.ridge: must be >= 0"):
        from_dict({"prune": {"in_engine": True, "compensate": True, "ridge": -1.0}})
    with pytest.raises(ValueError, match="prune.calib_stats_gib: must be > 0"):
        from_dict({"prune": {"in_engine": True, "compensate": True, "calib_stats_gib": 0}})
    cfg = from_dict({"prune": {"in_engine": True, "compensate": True}})
    assert (cfg.prune.calib_batches, cfg.prune.ridge) == (8, 1e-3)
