"""Memory planner: agreement with DeepSpeed's own estimators, the byte model on real tensors, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tools.plan import (
    GIB,
    activation_bytes,
    block_activation_bytes,
    main,
    plan_row,
    student_activation_bytes,
    student_states,
    teacher_states,
)
from trainer.models.meta import TowerShape

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
EVA_R1 = REPO / "configs" / "experiments" / "eva02_e_r1.yaml"

# Measured on the meta device (tests/unit/test_meta_counts.py, head stripped).
EVA_TEACHER = TowerShape(params=4_348_717_312, params_with_head=4_350_556_928, blocks=64, block_params=67_924_992,
                         tokens=257, width=1792, mlp_hidden=15360, image_size=224)
EVA_STUDENT = TowerShape(params=1_235_675_392, params_with_head=1_237_515_008, blocks=64, block_params=19_283_712,
                         tokens=257, width=1792, mlp_hidden=1792, image_size=224)
VIT_G_STUDENT = TowerShape(params=477_548_544, params_with_head=478_993_152, blocks=40, block_params=11_908_864,
                           tokens=257, width=1408, mlp_hidden=1408, image_size=224)
POINTS = [(shape, world) for shape in (EVA_TEACHER, EVA_STUDENT, VIT_G_STUDENT) for world in (1, 8, 64, 512)]


@pytest.mark.parametrize("shape,world", POINTS)
def test_zero2_states_equal_deepspeed_estimate(shape: TowerShape, world: int) -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, ds_gpu = estimate_zero2_model_states_mem_needs(shape.params, num_gpus_per_node=min(world, 8),
                                                      num_nodes=max(1, world // 8), cpu_offload=False)
    ours = student_states(shape, "deepspeed", 2, "bf16", world)
    # Same accounting (2 P bf16 weights + 18 P / N), up to rounding of the shards; the reduce bucket is extra.
    assert abs(ours.params + ours.grads + ours.optimizer - ds_gpu) <= 2
    assert ours.transient == 2 * min(500_000_000, shape.params)


@pytest.mark.parametrize("shape,world", POINTS)
def test_zero3_states_against_deepspeed_estimate(shape: TowerShape, world: int) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, ds_gpu, ds_largest = estimate_zero3_model_states_mem_needs(
        shape.params, shape.block_params, num_gpus_per_node=min(world, 8), num_nodes=max(1, world // 8),
        cpu_offload=False, cpu_offload_params=False)
    ours = student_states(shape, "deepspeed", 3, "bf16", world)
    states = ours.params + ours.grads + ours.optimizer
    # The systematic difference: DeepSpeed's ZeRO-3 estimate leaves out the bf16 weight shard (2 P / N)
    # that its ZeRO-2 estimate counts in full (2 P), so ours is 20 P / N against its 18 P / N.
    assert abs(states - (ds_gpu - ds_largest) - 2 * shape.params / world) <= 3
    assert 1.0 < states / (ds_gpu - ds_largest) < 1.12  # 20/18 up to rounding
    # Both add a gathered working set: DeepSpeed 4 bytes x largest unit (bf16 weights + gradients), we
    # two gathered blocks (current + prefetched) and one bf16 block gradient: 6 bytes x block, 1.5x theirs.
    assert ds_largest == 4 * shape.block_params
    # Plus the reduce bucket, two blocks of bf16 gradients (the engine's ZeRO-3 reduce_bucket_size).
    assert ours.transient - 2 * 2 * shape.block_params == 6 * shape.block_params


def test_single_engine_states_are_the_real_tensors() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).square().mean().backward()
    optimizer.step()
    n = sum(p.numel() for p in model.parameters())
    shape = TowerShape(params=n, params_with_head=n, blocks=1, block_params=n, tokens=1, width=64,
                       mlp_hidden=256, image_size=8)
    states = student_states(shape, "single", 0, "fp32", 1)
    moments = sum(s[k].numel() * s[k].element_size() for s in optimizer.state.values()
                  for k in ("exp_avg", "exp_avg_sq"))
    assert states.params == sum(p.numel() * p.element_size() for p in model.parameters())
    assert states.grads == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    assert states.optimizer == moments


def test_activation_formula() -> None:
    # All bf16 at H = 4 D the per-block estimate is the 34 T D bytes of Korthikanti et al. (flash, no dropout).
    shape = TowerShape(params=0, params_with_head=0, blocks=10, block_params=0, tokens=257, width=1024,
                       mlp_hidden=4096, image_size=224)
    bf16, fp32 = activation_bytes("deepspeed", "bf16"), activation_bytes("deepspeed", "fp32")
    assert block_activation_bytes(shape, bf16) == 34 * 257 * 1024
    assert block_activation_bytes(shape, fp32) == 2 * 34 * 257 * 1024
    # Autocast saves the two LayerNorm inputs in fp32.
    assert block_activation_bytes(shape, activation_bytes("fsdp", "bf16")) == 38 * 257 * 1024
    full = student_activation_bytes(shape, bf16, checkpointing=False)
    ckpt = student_activation_bytes(shape, bf16, checkpointing=True)
    assert full - ckpt == 10 * 34 * 257 * 1024 - 10 * 2 * 257 * 1024 - 34 * 257 * 1024
    single = activation_bytes("single", "bf16")
    assert student_activation_bytes(shape, single, True) - student_activation_bytes(shape, bf16, True) == (
        10 * 2 * 257 * 1024 + 2 * 4 * 257 * 1024)


@pytest.mark.parametrize("engine,stage", [("deepspeed", 2), ("deepspeed", 3), ("fsdp", 0), ("single", 0)])
def test_max_batch_is_the_largest_that_fits(engine: str, stage: int) -> None:
    world = 1 if engine == "single" else 8
    gpu = 80 * GIB
    row = plan_row(EVA_TEACHER, EVA_STUDENT, engine, stage, "bf16", world, 40, gpu, 2 * GIB)
    for per, best in ((row.act_per_sample, row.max_batch), (row.act_per_sample_checkpointed, row.max_batch_checkpointed)):
        fixed = row.total_at_batch - 40 * row.act_per_sample
        assert best > 0
        assert fixed + best * per <= gpu < fixed + (best + 1) * per
    assert row.max_batch_checkpointed > row.max_batch
    assert row.teacher.grads == row.teacher.optimizer == 0


def test_sharding_shrinks_with_world_size() -> None:
    for engine, stage in (("deepspeed", 3), ("fsdp", 0)):
        small, big = (student_states(EVA_STUDENT, engine, stage, "bf16", w) for w in (8, 64))
        assert big.params + big.grads + big.optimizer < (small.params + small.grads + small.optimizer) / 7.9
    # ZeRO-2 keeps every bf16 weight on every rank.
    assert student_states(EVA_STUDENT, "deepspeed", 2, "bf16", 64).params == 2 * EVA_STUDENT.params
    assert teacher_states(EVA_TEACHER, "deepspeed", "bf16", 8).params == 2 * EVA_TEACHER.params // 8


def test_cli_json_on_eva_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(EVA_R1), "optim.batch_size_per_rank=32", "--world-size", "8", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["student"]["params_with_head"] == 1_237_515_008
    assert result["teacher"]["params_with_head"] == 4_350_556_928
    assert result["batch_size_per_rank"] == 32
    assert [(r["label"], r["world_size"]) for r in result["rows"]] == [
        (label, w) for w in (8, 64) for label in ("deepspeed zero2", "deepspeed zero3", "fsdp")]
    assert all(r["max_batch_checkpointed"] >= 40 for r in result["rows"])
    assert [r["label"] for r in result["rows"] if r["configured"]] == ["deepspeed zero3"] * 2
    for r in result["rows"]:
        assert r["act_per_sample"] >= r["student_act_per_sample"] > r["student_act_per_sample_checkpointed"]
        assert r["total_at_batch"] == (r["student"]["total"] + r["teacher"]["total"] + r["reserve"]
                                       + 32 * r["act_per_sample"])


def test_cli_table_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(EVA_R1), "--world-size", "8"]) == 0
    table = capsys.readouterr().out
    assert "deepspeed zero3 *" in table and "max b AC" in table
    with pytest.raises(ValueError, match="--gpu-mem-gib"):
        main([str(EVA_R1), "--gpu-mem-gib", "0"])
    with pytest.raises(ValueError, match="prune.ratio"):
        main([str(EVA_R1), "prune.ratio=20"])
    with pytest.raises(ValueError, match="--world-size"):
        main([str(EVA_R1), "--world-size", "0"])


def _saved_bytes(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Bytes of distinct non-parameter storages autograd saves in a forward (real CPU kernels, flash SDPA)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images)
    return sum(seen.values())


@pytest.mark.parametrize("name", ["vit_giant_patch14_clip_224", "eva02_enormous_patch14_clip_224"])
@pytest.mark.parametrize("engine", ["deepspeed", "single"])
def test_activation_formula_bounds_real_saved_tensors(name: str, engine: str) -> None:
    # The full-size architectures (ViT-g block; EVA-E post-norm block with rope) at width 256: the
    # difference between depth 2 and depth 1 is one block's saved tensors. deepspeed: bf16 weights,
    # no autocast; single: fp32 weights under bf16 autocast.
    import timm

    saved = []
    torch.manual_seed(0)
    for depth in (1, 2):
        model = timm.create_model(name, pretrained=False, num_classes=0, embed_dim=256, depth=depth, num_heads=4)
        if engine == "deepspeed":
            model, images, autocast = model.to(torch.bfloat16), torch.randn(2, 3, 224, 224, dtype=torch.bfloat16), None
        else:
            images, autocast = torch.randn(2, 3, 224, 224), torch.autocast("cpu", dtype=torch.bfloat16)
        with autocast or torch.autocast("cpu", enabled=False):
            saved.append(_saved_bytes(model, images))
    block = model.blocks[0]
    # Autocast also saves bf16 copies of the block's matrices: weights, counted with the model states.
    weight_copies = 2 * sum(p.numel() for p in block.parameters() if p.dim() == 2) if engine == "single" else 0
    shape = TowerShape(params=0, params_with_head=0, blocks=depth, block_params=0, tokens=257, width=256,
                       mlp_hidden=block.mlp.fc2.in_features, image_size=224)
    predicted = 2 * block_activation_bytes(shape, activation_bytes(engine, "bf16"))
    measured = saved[1] - saved[0] - weight_copies
    # Measured 0.95-0.97 of the prediction: an upper bound within 10%. Except EVA under CPU autocast (0.90):
    # its post-norms read bf16 linear outputs, which CPU autocast keeps bf16 where CUDA autocast (planned
    # for) saves an fp32 copy for LayerNorm.
    low = 0.85 if (engine, name) == ("single", "eva02_enormous_patch14_clip_224") else 0.9
    assert low * predicted < measured <= predicted


def test_trainer_plan_subcommand_prints_the_same_table(capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.cli import run_subcommand

    assert main([str(EVA_R1), "--world-size", "8"]) == 0
    direct = capsys.readouterr().out
    assert run_subcommand(["plan", str(EVA_R1), "--world-size", "8"]) == 0
    assert capsys.readouterr().out == direct


def test_verdict_nodes_host_ram_and_overrides_anywhere(capsys: pytest.CaptureFixture[str]) -> None:
    # Overrides after the flags; --nodes x --gpus-per-node is the world size; a verdict per row.
    assert main([str(EVA_R1), "--nodes", "2", "--gpus-per-node", "8", "--json", "optim.batch_size_per_rank=2000",
                 "prune.in_engine=false"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {r["world_size"] for r in result["rows"]} == {16} and result["batch_size_per_rank"] == 2000
    for r in result["rows"]:
        # 2000 images exceed what fits without AC; the verdict names the largest batch that does fit with it.
        assert r["max_batch"] < 2000
        assert r["verdict"] == ("fits with AC" if r["max_batch_checkpointed"] >= 2000
                                else f"no: batch <= {r['max_batch_checkpointed']} with AC")
    # Host path: every one of a node's 8 ranks builds teacher + student (with heads) in fp32.
    want = 8 * 4 * (EVA_TEACHER.params_with_head + EVA_STUDENT.params_with_head)
    assert result["host_ram_per_node"]["16"] == {"in_engine": False, "bytes": want}
    assert main([str(EVA_R1), "--nodes", "2", "--gpus-per-node", "8", "--json", "prune.in_engine=true"]) == 0
    sharded = json.loads(capsys.readouterr().out)["host_ram_per_node"]["16"]
    assert sharded["in_engine"] and sharded["bytes"] < want / 10
    row = plan_row(EVA_TEACHER, EVA_STUDENT, "fsdp", 0, "bf16", 8, 1, 80 * GIB, 2 * GIB)
    assert row.verdict == "fits"
    assert plan_row(EVA_TEACHER, EVA_STUDENT, "fsdp", 0, "bf16", 1, 1, 4 * GIB, 2 * GIB).verdict == "does not fit"
    assert main([str(EVA_R1), "--world-size", "8"]) == 0
    assert "host RAM per node while building" in capsys.readouterr().out


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_cpu_mode_predicts_a_measured_in_engine_run(tmp_path: Path, engine: str) -> None:
    """``plan --cpu`` against the peak anonymous RSS of each rank of a real 2-rank in-engine prune (gloo):
    ViT-B-32 from a bf16 checkpoint, bf16, run.steps=0, measured by polling /proc like bench/full_size.py."""
    from bench.full_size import BASE_CONFIG, Launch, torchrun, write_random_checkpoint
    from tools.plan import cpu_peak_per_rank

    ckpt = tmp_path / "vit_b_32.safetensors"
    write_random_checkpoint("ViT-B-32", ckpt, whole_clip=False)
    engine_args = ["engine.name=fsdp"] if engine == "fsdp" else ["engine.name=deepspeed", "engine.zero_stage=3"]
    args = [f"run.dir={tmp_path / 'run'}", "run.steps=0", "model.family=open_clip", "model.name=ViT-B-32",
            f"model.pretrained={ckpt}", "prune.in_engine=true", "prune.ratio=1", *engine_args,
            "engine.precision=bf16", "data.kind=synthetic"]
    launch = Launch(torchrun(args), tmp_path / "log", 8 * GIB, torchrun=True)
    assert launch.wait(300) == 0, launch.text()[-3000:]
    measured = launch.peaks()["peak_rss_anon_gib"]
    planned = cpu_peak_per_rank(str(BASE_CONFIG), args, world_size=2)
    assert set(measured) == {0, 1}
    # At this size the process baseline (imports, gloo; ~0.45 GiB of ~0.7) is most of the figure, and on a loaded
    # 2-core machine it was measured up to 12 % below the plan (never above): the plan may not be short by more
    # than 10 %, nor more than 20 % above. The 10 % target itself is for the full-size rows (bench/full_size.py).
    for rank, peak in measured.items():
        want = planned["peak_gib"] if rank == 0 else planned["peak_other_ranks"]  # rank 0 writes what is whole
        assert 0.80 <= peak / want <= 1.10, (rank, peak, planned)
    # The model's own bytes are a visible part of the figure (not only the process baseline).
    assert planned["peak_gib"] - planned["baseline"] > 0.15
