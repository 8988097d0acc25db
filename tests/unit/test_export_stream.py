"""Export reads the student one block at a time and takes the untrained head from the teacher's file."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from trainer.checkpoint import checkpoint_name
from trainer.cli import load_config
from trainer.export import export_checkpoint, student_layout, trained_student
from trainer.loop import train
from trainer.models.registry import get_adapter
from trainer.student import build_models

pytestmark = pytest.mark.unit

TINY_TIMM = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "tiny_timm.yaml"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two steps of the tiny timm ViT whose teacher comes from a safetensors file with a non-trivial final norm."""
    root = tmp_path_factory.mktemp("export_stream")
    cfg = load_config(TINY_TIMM, ["engine.name=single"])
    teacher = get_adapter("timm").build(cfg.model)
    with torch.no_grad():
        teacher.norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
        teacher.norm.bias.normal_(generator=torch.Generator().manual_seed(4))
    weights = root / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, weights)
    run_dir = root / "run"
    train(load_config(TINY_TIMM, ["engine.name=single", f"run.dir={run_dir}", "run.steps=2",
                                       "optim.base_lr=0.05", f"model.pretrained={weights}", "run.seed=7"]))
    return run_dir / "checkpoints" / checkpoint_name(2), weights


def test_groups_are_the_transformer_blocks_then_the_rest(trained_run: tuple[Path, Path]) -> None:
    checkpoint, weights = trained_run
    cfg = load_config(checkpoint / "config.yaml", [])
    layout = student_layout(cfg)
    *blocks, rest = layout.trained_groups
    adapter = get_adapter("timm")
    _, student, _ = build_models(cfg, adapter)
    assert len(blocks) == len(adapter.blocks(student)) == 2
    for i, group in enumerate(blocks):
        block_keys = {f"blocks.{i}.{k}" for k in adapter.blocks(student)[i].state_dict()}
        assert set(group) == block_keys
    assert all(not k.startswith("blocks.") for k in rest) and "pos_embed" in rest
    assert set(layout.head) == {"norm.weight", "norm.bias"}
    full = dict(student.state_dict())
    assert {name: (shape, dtype) for name, shape, dtype in layout.specs()} == {
        k: (tuple(v.shape), v.dtype) for k, v in full.items()}


def test_streamed_export_equals_the_in_memory_student(trained_run: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, weights = trained_run
    out = export_checkpoint(checkpoint, tmp_path / "export")
    stock = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    student, _ = trained_student(checkpoint)  # the whole student in memory, head from the built teacher
    for name, tensor in student.state_dict().items():
        assert torch.equal(stock.state_dict()[name], tensor), name
    assert stock.norm.bias.abs().sum() > 0  # the teacher file's final norm, not a fresh init
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(stock(images), student(images), rtol=0, atol=0)
