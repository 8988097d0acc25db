"""In-engine pruning (prune.in_engine=true) on 2 gloo ranks against the offline streaming prune.

For a tiny open_clip ViT (full CLIP checkpoint) and a tiny timm EVA (post-norm blocks, rotary buffers),
the same safetensors checkpoint is pruned offline (pruning.stream.prune_checkpoint) in this process and
inside each engine by tests/dist/inengine_worker.py. One torchrun launch runs every job (DeepSpeed's
start-up is the slow part): per engine and model, the in-engine pruning pass alone, then a 3-step training
run with in-engine pruning and a reference run started from the offline-pruned weights
(prune.student_init) with the host path.
"""

from __future__ import annotations

import json
from pathlib import Path

import inengine_worker  # tests/dist is on sys.path; registers the tiny EVA in this process too
import open_clip
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import trainer.models.open_clip_family  # noqa: F401  registers ViT-Tiny-8 (configs/open_clip)
from pruning.export import OPEN_CLIP_WEIGHTS, TIMM_WEIGHTS
from pruning.stream import REPORT_JSON
from pruning_helpers import prune_checkpoint

pytestmark = pytest.mark.dist

RATIO = 0.5  # width 64 -> 32 kept of 256 hidden units
MODELS = {
    "vit": {"family": "open_clip", "model": "ViT-Tiny-8"},
    "eva": {"family": "timm", "model": inengine_worker.TINY_EVA},
}
ENGINES = {"fsdp": {"engine": "fsdp"}, "zero3": {"engine": "deepspeed", "zero_stage": 3},
           "zero2": {"engine": "deepspeed", "zero_stage": 2}}
CASES = [(e, m) for e in ENGINES for m in MODELS]
LOSS_TOL = 1e-6
TAYLOR_ENGINES = [e for e in ("fsdp", "zero3") if e in ENGINES]


def make_checkpoint(model: str, path: Path) -> None:
    torch.manual_seed(1234)
    if model == "vit":
        net = open_clip.create_model(MODELS[model]["model"], pretrained=None)  # the whole CLIP, as published
    else:
        net = timm.create_model(MODELS[model]["model"], pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)


def offline_student(model: str, export: Path) -> dict[str, torch.Tensor]:
    """The offline export's tower weights under the trained student's names (the CLIP's 'visual.' dropped)."""
    if model == "vit":
        state = load_file(export / OPEN_CLIP_WEIGHTS)
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return load_file(export / TIMM_WEIGHTS)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inengine")
    jobs = []
    for model, spec in MODELS.items():
        ckpt = out / f"{model}.safetensors"
        make_checkpoint(model, ckpt)
        prefix = "open_clip:" if spec["family"] == "open_clip" else "timm:"
        prune_checkpoint(prefix + spec["model"], out / f"{model}-offline", checkpoint=ckpt, ratio=RATIO,
                         method="diversity", seed=0)
        student_init = out / f"{model}-offline-student.safetensors"
        save_file(offline_student(model, out / f"{model}-offline"), student_init)
        for engine, engine_spec in ENGINES.items():
            common = {**spec, **engine_spec, "pretrained": str(ckpt), "ratio": RATIO, "method": "diversity"}
            jobs.append({**common, "name": f"{engine}-{model}", "in_engine": True})
            jobs.append({**common, "name": f"{engine}-{model}-ref", "in_engine": False,
                         "student_init": str(student_init)})
    for engine in TAYLOR_ENGINES:
        jobs.append({**MODELS["vit"], **ENGINES[engine], "pretrained": str(out / "vit.safetensors"), "ratio": RATIO,
                     "method": "taylor", "name": f"{engine}-vit-taylor", "in_engine": True})
    jobs.append({**MODELS["vit"], **ENGINES["zero3"], "pretrained": str(out / "vit.safetensors"), "ratio": RATIO,
                 "method": "diversity", "name": "zero3-vit-unpruned", "in_engine": True, "enabled": False})
    inengine_worker.launch(out, jobs)
    return out


def ranks(out: Path, pattern: str) -> list[dict]:
    found = [json.loads(p.read_text()) for p in sorted(out.glob(pattern))]
    assert len(found) == 2, pattern
    return found


@pytest.mark.parametrize(("engine", "model"), CASES)
def test_kept_indices_equal_the_offline_streaming_prune(out: Path, engine: str, model: str) -> None:
    offline = json.loads((out / f"{model}-offline" / REPORT_JSON).read_text())
    for record in ranks(out, f"{engine}-{model}.prune.rank*.json"):
        report = record["report"]
        assert [s["kept"] for s in report["sites"]] == [s["kept"] for s in offline["sites"]]
        assert [s["path"] for s in report["sites"]] == [s["path"] for s in offline["sites"]]
        assert [s["hidden_after"] for s in report["sites"]] == [32, 32]
        assert report["model_params_before"] == offline["model_params_before"]
        assert report["model_params_after"] == offline["model_params_after"]
        assert record["norms_loaded"] and record["norm_tensors"] == 4  # both final norms: weight and bias


@pytest.mark.parametrize(("engine", "model"), CASES)
def test_pruned_student_equals_the_offline_export_bit_for_bit(out: Path, engine: str, model: str) -> None:
    pruned = load_file(out / f"{engine}-{model}.pruned.safetensors")
    offline = offline_student(model, out / f"{model}-offline")
    # The student has no head (strip_head); everything it has is in the export, bit for bit.
    assert pruned and set(pruned) <= set(offline)
    for key, value in pruned.items():
        assert torch.equal(value, offline[key]), key


@pytest.mark.parametrize(("engine", "model"), CASES)
def test_distillation_matches_a_run_from_the_offline_pruned_checkpoint(out: Path, engine: str, model: str) -> None:
    got, want = ranks(out, f"{engine}-{model}.rank*.json"), ranks(out, f"{engine}-{model}-ref.rank*.json")
    for a, b in zip(got, want, strict=True):
        assert len(a["losses"]) == 3
        assert a["losses"] == pytest.approx(b["losses"], rel=LOSS_TOL, abs=LOSS_TOL)
    trained = load_file(out / f"{engine}-{model}.trained.safetensors")
    reference = load_file(out / f"{engine}-{model}-ref.trained.safetensors")
    assert trained.keys() == reference.keys()
    for key, value in trained.items():
        torch.testing.assert_close(value, reference[key], rtol=LOSS_TOL, atol=LOSS_TOL)


@pytest.mark.parametrize(("engine", "model"), CASES)
def test_a_rank_holds_its_shards_plus_one_block_during_pruning(out: Path, engine: str, model: str) -> None:
    records = ranks(out, f"{engine}-{model}.prune.rank*.json")
    for record in records:
        memory = record["in_engine_memory"]
        full_teacher, full_student = memory["full_teacher_numel"], memory["full_student_numel"]
        assert [r["rank"] for r in memory["ranks"]] == [0, 1]
        sites = record["report"]["sites"]
        block_mlp, student_block_mlp = max(s["params_before"] for s in sites), max(s["params_after"] for s in sites)
        for rank in memory["ranks"]:
            # One gathered teacher MLP block plus its pruned copy (the student block), nothing more.
            assert 0 < rank["peak_extra_numel"] <= block_mlp + student_block_mlp
            assert rank["peak_local_numel"] == (rank["teacher_shard_numel"] + rank["student_shard_numel"]
                                                + rank["peak_extra_numel"])
            if engine != "zero2":  # ZeRO-2 keeps the (pruned, small) student whole on every rank
                # About half of both (stripped) towers: rows split unevenly where a tensor's rows do not divide
                # by 2, and single-row tensors (class token, position embedding) sit on rank 0 whole.
                shards = rank["teacher_shard_numel"] + rank["student_shard_numel"]
                assert shards <= 0.52 * memory["sharded_numel"], (shards, memory["sharded_numel"])
                assert rank["peak_local_numel"] < 0.75 * (full_teacher + full_student)
            else:
                assert rank["teacher_shard_numel"] <= 0.52 * full_teacher and rank["student_shard_numel"] <= full_student
        # Every element is held somewhere (ZeRO-3 pads each flat partition, FSDP2 pads nothing).
        total = sum(r["teacher_shard_numel"] + r["student_shard_numel"] for r in memory["ranks"])
        assert total >= memory["sharded_numel"]
        # Round robin: each rank selected one of the two blocks.
        assert sorted(len(r["sites_selected"]) for r in memory["ranks"]) == [1, 1]


def test_report_in_run_directory_and_tensorboard(out: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(ranks(out, "fsdp-eva.rank*.json")[0]["run_dir"])
    report = json.loads((run_dir / "prune_report.json").read_text())
    assert [s["hidden_after"] for s in report["sites"]] == [32, 32]
    assert len(report["in_engine_memory"]["ranks"]) == 2
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert "prune/kept_width_per_block" in events.Tags()["images"]
    assert any(tag.startswith("prune/report") for tag in events.Tags()["tensors"])


@pytest.mark.parametrize("engine", TAYLOR_ENGINES)
def test_taylor_on_the_sharded_teacher_equals_taylor_on_the_full_teacher(out: Path, engine: str) -> None:
    """Scores summed over ranks from sharded forward/backward rank units as the host computation does."""
    from inengine_worker import image_size, stream

    from pruning import collect_taylor_scores, find_mlp_sites, select_mlp_channels
    from trainer.models.registry import get_adapter

    job = {**MODELS["vit"], "pretrained": str(out / "vit.safetensors")}
    adapter = get_adapter(job["family"])
    cfg = inengine_worker.config(out / "host", {**job, **ENGINES["fsdp"], "name": "host", "ratio": RATIO,
                                                "method": "diversity", "in_engine": False}, 1, 0.05)
    teacher = adapter.build(cfg.model).eval().requires_grad_(False)
    adapter.strip_head(teacher)
    sites = find_mlp_sites(teacher)
    scores = {s.path: torch.zeros(s.hidden, dtype=torch.float64) for s in sites}
    for rank in range(2):  # each rank's two Taylor batches (rank r's fixed batch, twice)
        images = next(iter(stream(job, rank))).model_input()
        assert images.shape[-1] == image_size(job)
        part = collect_taylor_scores(teacher, [images, images],
                                     lambda m, x: m(x.detach().requires_grad_(True)).float().square().mean(), sites)
        scores = {k: scores[k] + part[k] for k in scores}
    want = [select_mlp_channels(getattr(teacher.get_submodule(s.path), s.in_names[0]).weight, 32, "taylor",
                                scores=scores[s.path]).tolist() for s in sites]
    for record in ranks(out, f"{engine}-vit-taylor.prune.rank*.json"):
        assert record["report"]["method"] == "taylor"
        assert [s["kept"] for s in record["report"]["sites"]] == want
    for record in ranks(out, f"{engine}-vit-taylor.rank*.json"):
        assert all(loss == loss for loss in record["losses"])  # the pruned student trains


def test_prune_disabled_gives_the_teacher_as_student(out: Path) -> None:
    student = load_file(out / "zero3-vit-unpruned.pruned.safetensors")
    checkpoint = load_file(out / "vit.safetensors")
    assert student and all(torch.equal(v, checkpoint[f"visual.{k}"]) for k, v in student.items())
    for record in ranks(out, "zero3-vit-unpruned.prune.rank*.json"):
        assert record["report"]["method"] == "none" and record["report"]["sites"] == []
        assert record["report"]["model_params_before"] == record["report"]["model_params_after"]


def test_config_refuses_what_in_engine_pruning_cannot_do(tmp_path: Path) -> None:
    from trainer.config import from_dict
    from trainer.loop import train

    with pytest.raises(ValueError, match="prune.method: taylor needs"):
        from_dict({"prune": {"method": "taylor"}})
    with pytest.raises(ValueError, match="prune.student_init: cannot be combined"):
        from_dict({"prune": {"in_engine": True, "student_init": "x.safetensors"}})
    cfg = from_dict({"prune": {"in_engine": True}, "engine": {"name": "single"}})
    with pytest.raises(ValueError, match="prune.in_engine: engine 'single' has no sharded build"):
        train(cfg)
