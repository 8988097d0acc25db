"""The student's starting weights: the pruned teacher, or a given safetensors file (prune.student_init)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.cli import load_config
from trainer.models.registry import get_adapter
from trainer.student import build_models

pytestmark = pytest.mark.unit


def build(yaml_path, *overrides):
    cfg = load_config(yaml_path, list(overrides))
    return build_models(cfg, get_adapter(cfg.model.family))


def test_student_init_replaces_the_pruned_weights(tiny_timm_yaml, tmp_path) -> None:
    _, student, _ = build(tiny_timm_yaml)
    state = {k: v + 1.0 for k, v in student.state_dict().items()}
    path = tmp_path / "compensated.safetensors"
    save_file(state, path)
    _, loaded, _ = build(tiny_timm_yaml, f"prune.student_init={path}")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_student_init_errors_name_the_key(tiny_timm_yaml, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="prune.student_init"):
        build(tiny_timm_yaml, f"prune.student_init={tmp_path / 'missing.safetensors'}")
    _, teacher_sized, _ = build(tiny_timm_yaml, "prune.ratio=4")  # MLPs not pruned: other shapes
    path = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in teacher_sized.state_dict().items()}, path)
    with pytest.raises(ValueError, match="prune.student_init.*does not fit"):
        build(tiny_timm_yaml, f"prune.student_init={path}")
    with pytest.raises(ValueError, match="prune.student_init"):
        load_config(tiny_timm_yaml, ["prune.student_init=weights.pt"])


def test_student_init_takes_the_prune_tools_output_directory(tiny_open_clip_yaml, tmp_path) -> None:
    """A whole-CLIP export of ``python -m pruning prune`` (its directory or its file) starts the student; a
    directory pruned from another model or at another ratio is refused before any model is built."""
    import open_clip

    import pruning
    from trainer.cli import preflight

    cfg = load_config(tiny_open_clip_yaml, [])
    torch.manual_seed(3)
    clip = open_clip.create_model(cfg.model.name, pretrained=None)
    ckpt = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, ckpt)
    out = tmp_path / "pruned"
    pruning.prune_checkpoint(cfg.model.name, out, checkpoint=ckpt, ratio=cfg.prune.ratio)
    exported = {k[len("visual."):]: v for k, v in load_file(out / "open_clip_model.safetensors").items()
                if k.startswith("visual.")}
    for init in (out, out / "open_clip_model.safetensors"):
        _, student, _ = build(tiny_open_clip_yaml, f"prune.student_init={init}")
        assert student.state_dict().keys() == exported.keys()
        assert all(torch.equal(student.state_dict()[k], v) for k, v in exported.items())
    other = load_config(tiny_open_clip_yaml, [f"prune.student_init={out}", "prune.ratio=0.5"])
    with pytest.raises(ValueError, match=r"prune.student_init: .* has MLP widths \[\d+\], prune.ratio=0.5 gives"):
        preflight(other, 1)
    (out / "open_clip_config.json").write_text(
        (out / "open_clip_config.json").read_text().replace(f'"base_model": "{cfg.model.name}"', '"base_model": "x"'))
    with pytest.raises(ValueError, match=f"was pruned from open_clip 'x', the teacher .* is open_clip '{cfg.model.name}'"):
        preflight(load_config(tiny_open_clip_yaml, [f"prune.student_init={out}"]), 1)


def test_student_init_with_per_block_widths_sets_the_students_architecture(tiny_open_clip_yaml, tmp_path) -> None:
    """A ``--budget`` prune output starts the student at its own per-block widths, for training, export and the
    planner alike; a prune.ratio other than the budget's is refused by name."""
    import open_clip

    import pruning
    from pruning.calib_images import input_spec
    from trainer.cli import preflight
    from trainer.student import student_architecture

    cfg = load_config(tiny_open_clip_yaml, [])
    torch.manual_seed(3)
    clip = open_clip.create_model(cfg.model.name, pretrained=None)
    with torch.no_grad():  # block 0's MLP hardly writes to the residual stream: its units go to block 1
        clip.visual.transformer.resblocks[0].mlp.c_proj.weight.mul_(1e-3)
    ckpt = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, ckpt)
    size = input_spec(clip, "open_clip").size
    out = tmp_path / "adaptive"
    report = pruning.prune_checkpoint(cfg.model.name, out, checkpoint=ckpt, budget=pruning.Budget(cfg.prune.ratio, grid=8),
                                      calibration=pruning.Calibration(batch_size=4),
                                      images=torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0)))
    assert len(set(report.widths)) > 1
    _, student, _ = build(tiny_open_clip_yaml, f"prune.student_init={out}")
    assert [s.hidden for s in pruning.find_mlp_sites(student)] == report.widths
    exported = {k[len("visual."):]: v for k, v in load_file(out / "open_clip_model.safetensors").items()
                if k.startswith("visual.")}
    assert all(torch.equal(student.state_dict()[k], v) for k, v in exported.items())
    init = load_config(tiny_open_clip_yaml, [f"prune.student_init={out}"])
    meta = student_architecture(init.model, init.prune, get_adapter(init.model.family), on="meta")
    assert [s.hidden for s in pruning.find_mlp_sites(meta)] == report.widths
    other = load_config(tiny_open_clip_yaml, [f"prune.student_init={out}", "prune.ratio=0.5"])
    with pytest.raises(ValueError, match=r"per-block widths at budget r=1 \(--budget\), prune.ratio is 0.5"):
        preflight(other, 1)


def test_prune_widths_set_each_blocks_width(tiny_timm_yaml, tmp_path) -> None:
    """prune.widths (what prune.budget's plan stores in the saved config) builds the student block by block, and a
    student_init file of those widths loads into it."""
    import pruning

    _, student, report = build(tiny_timm_yaml, "prune.widths=[32, 96]")
    assert [s.hidden for s in pruning.find_mlp_sites(student)] == [32, 96] == report.widths
    path = tmp_path / "adaptive.safetensors"
    save_file({k: v + 1.0 for k, v in student.state_dict().items()}, path)
    _, loaded, _ = build(tiny_timm_yaml, "prune.widths=[32, 96]", f"prune.student_init={path}")
    assert all(torch.equal(loaded.state_dict()[k], v + 1.0) for k, v in student.state_dict().items())
    with pytest.raises(ValueError, match=r"prune.widths: num_keep: 3 widths for 2 MLP blocks"):
        build(tiny_timm_yaml, "prune.widths=[32, 96, 64]")
