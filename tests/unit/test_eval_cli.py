"""``python -m trainer.eval`` on a tiny trained timm student: export dir, checkpoint and run dir, local data only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from pruning.export import load_pruned
from trainer.checkpoint import CONFIG, checkpoint_name
from trainer.cli import load_config
from trainer.config import from_dict
from trainer.data.make_shards import write_shards
from trainer.eval import extract_features, image_batches, knn_accuracy, linear_probe_accuracy, model_fidelity
from trainer.eval.cli import main
from trainer.eval.images import read_heldout_images
from trainer.export import export_checkpoint, trained_student
from trainer.loop import train
from trainer.models.registry import get_adapter
from trainer.models.timm_family import TimmAdapter

pytestmark = pytest.mark.unit


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict[str, Path]:
    """A 2-step tiny timm run (r=0.5), its export, a fake Fashion-MNIST and a folder of held-out pictures."""
    root = tmp_path_factory.mktemp("eval_cli")
    yaml_path = Path(request.config.rootpath) / "configs" / "experiments" / "tiny_timm.yaml"
    cfg = load_config(yaml_path, ["engine.name=single", f"run.dir={root / 'run'}", "run.steps=2",
                                  "prune.ratio=0.5", "optim.base_lr=0.05", "checkpoint.every_steps=2"])
    train(cfg)
    checkpoint = root / "run" / "checkpoints" / checkpoint_name(2)
    export = export_checkpoint(checkpoint, root / "export")
    gen = np.random.default_rng(0)
    fm = root / "fashion"
    fm.mkdir()
    for prefix, n in (("train", 48), ("t10k", 24)):
        labels = gen.integers(0, 4, n)
        # Class-dependent brightness so the probes have something to find.
        images = np.clip(gen.normal(40 * labels[:, None, None], 90, (n, 28, 28)), 0, 255)
        _write_idx(fm / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(fm / f"{prefix}-labels-idx1-ubyte", labels)
    pictures = root / "pictures" / "cat"
    pictures.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(gen.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(pictures / f"{i}.png")
    return {"root": root, "run": root / "run", "checkpoint": checkpoint, "export": export, "fashion": fm,
            "pictures": root / "pictures"}


def _timm_cls(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = model.forward_features(x)
    return tokens[:, 0], tokens[:, model.num_prefix_tokens:]


def test_knn_and_linear_probe_of_an_export_equal_the_library_on_the_same_model(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert main([str(tiny["export"]), "--fashion-mnist", str(tiny["fashion"]), "--train-images", "0",
                 "--test-images", "0", "--knn", "--linear-probe", "--k", "5", "--batch-size", "16",
                 "--device", "cpu", "--json", str(out)]) == 0
    got = json.loads(out.read_text())

    model = load_pruned(tiny["export"]).eval()
    spec = TimmAdapter().input_spec(model)
    from trainer.eval import load_fashion_mnist

    (tx, ty), (vx, vy) = load_fashion_mnist("train", tiny["fashion"]), load_fashion_mnist("test", tiny["fashion"])
    with torch.no_grad():
        train_f = extract_features(model, image_batches(tx, spec, 16), _timm_cls, show_progress=False).cls
        test_f = extract_features(model, image_batches(vx, spec, 16), _timm_cls, show_progress=False).cls
    assert got["knn_top1"] == knn_accuracy(train_f, ty, test_f, vy, k=5)
    assert got["linear_top1"] == linear_probe_accuracy(train_f, ty, test_f, vy)
    assert got["kind"] == "export" and got["mlp_widths"] == [32, 32]  # r=0.5 of the tiny ViT's width 64
    assert got["fashion_mnist"]["train_images"] == 48 and got["fashion_mnist"]["test_images"] == 24
    assert "fidelity" not in got and "cls_cosine" not in got


def test_fidelity_of_checkpoint_and_run_dir_against_the_pretrained_teacher(tiny: dict, tmp_path: Path) -> None:
    results = {}
    for name in ("checkpoint", "run"):
        out = tmp_path / f"{name}.json"
        assert main([str(tiny[name]), "--teacher", "pretrained", "--heldout", str(tiny["pictures"]), "--fidelity",
                     "--batch-size", "2", "--json", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    assert results["run"]["model"] == str(tiny["checkpoint"])  # the run's newest checkpoint
    assert results["run"]["cls_cosine"] == results["checkpoint"]["cls_cosine"]

    student, _ = trained_student(tiny["checkpoint"])
    cfg = from_dict(yaml.safe_load((tiny["checkpoint"] / CONFIG).read_text()))
    torch.manual_seed(cfg.run.seed)
    teacher = get_adapter("timm").build(cfg.model)
    images = read_heldout_images(tiny["pictures"], 32)
    spec = TimmAdapter().input_spec(student)
    want = model_fidelity(student, teacher, image_batches(images, spec, 2), _timm_cls, show_progress=False)
    got = results["checkpoint"]
    assert (got["cls_cosine"], got["patch_cosine"]) == (want["cls_cosine"], want["patch_cosine"])
    assert got["cls_cosine"] < 0.999  # a pruned, barely trained student is not its teacher
    assert got["heldout"]["images"] == 5 and "knn_top1" not in got


def test_the_export_against_itself_has_cosine_one(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "self.json"
    assert main([str(tiny["export"]), "--teacher", str(tiny["export"]), "--heldout", str(tiny["pictures"]),
                 "--fidelity", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["cls_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert got["patch_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_heldout_reads_the_same_pictures_from_a_folder_and_from_its_shards(tiny: dict, tmp_path: Path) -> None:
    write_shards(tiny["pictures"], tmp_path / "shards", shard_size=2)
    folder = read_heldout_images(tiny["pictures"], 24)
    assert folder.shape == (5, 24, 24, 3) and folder.dtype == torch.uint8
    for path in (tmp_path / "shards", tmp_path / "shards" / "shards.txt"):
        assert torch.equal(read_heldout_images(path, 24), folder)
    assert torch.equal(read_heldout_images(tmp_path / "shards" / "00000.tar", 24, limit=2), folder[:2])


def test_user_errors_print_one_line_and_return_2(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "nope"), "--knn"]) == 2
    assert f"model not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert main([str(tiny["export"]), "--fidelity"]) == 2
    assert "--fidelity needs --heldout" in capsys.readouterr().err
    assert main([str(tiny["export"]), "--knn", "--fashion-mnist", str(tmp_path)]) == 2
    assert "Fashion-MNIST" in capsys.readouterr().err


def test_a_teacher_weights_file_adds_teacher_and_difference_columns(tiny: dict, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    cfg = from_dict(yaml.safe_load((tiny["checkpoint"] / CONFIG).read_text()))
    torch.manual_seed(123)  # not the run's seed: a teacher the run never saw, so nothing matches by accident
    teacher = get_adapter("timm").build(cfg.model).eval()
    save_file(teacher.state_dict(), tmp_path / "teacher.safetensors")
    out = tmp_path / "eval.json"
    assert main([str(tiny["export"]), "--teacher", str(tmp_path / "teacher.safetensors"), "--fashion-mnist",
                 str(tiny["fashion"]), "--train-images", "0", "--test-images", "0", "--k", "5", "--batch-size", "16",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    base = got["teacher_baseline"]

    spec = TimmAdapter().input_spec(teacher)
    from trainer.eval import load_fashion_mnist

    (tx, ty), (vx, vy) = load_fashion_mnist("train", tiny["fashion"]), load_fashion_mnist("test", tiny["fashion"])
    with torch.no_grad():
        train_f = extract_features(teacher, image_batches(tx, spec, 16), _timm_cls, show_progress=False).cls
        test_f = extract_features(teacher, image_batches(vx, spec, 16), _timm_cls, show_progress=False).cls
    assert base["knn_top1"] == knn_accuracy(train_f, ty, test_f, vy, k=5)
    assert base["linear_top1"] == linear_probe_accuracy(train_f, ty, test_f, vy)
    assert base["params"] == sum(p.numel() for p in teacher.parameters()) and base["mlp_widths"] == [256, 256]
    assert base["model"].endswith("(" + str(tmp_path / "teacher.safetensors") + ")")
    assert "| metric | student | teacher | difference |" in printed
    knn_row = (f"| kNN top-1 (%) | {100 * got['knn_top1']:.2f} | {100 * base['knn_top1']:.2f} | "
               f"{100 * (got['knn_top1'] - base['knn_top1']):+.2f} |")
    assert knn_row in printed
    assert "| MLP hidden per block | 32 x 2 | 256 x 2 | |" in printed


def test_a_run_directory_as_teacher_is_the_same_model_difference_zero(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert main([str(tiny["checkpoint"]), "--teacher", str(tiny["run"]), "--fashion-mnist", str(tiny["fashion"]),
                 "--knn", "--k", "5", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["teacher_baseline"]["knn_top1"] == got["knn_top1"]
    assert got["teacher_baseline"]["model"] == str(tiny["checkpoint"])  # the run's newest checkpoint


def test_a_teacher_file_of_another_architecture_is_one_line(tiny: dict, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    save_file({"other.weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    assert main([str(tiny["export"]), "--teacher", str(tmp_path / "other.safetensors"), "--knn",
                 "--fashion-mnist", str(tiny["fashion"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --teacher {tmp_path / 'other.safetensors'}: does not fit the run's teacher "
                          "architecture") and err.count("\n") == 1


def test_zero_shot_of_a_whole_clip_export_with_the_teacher_column(tiny: dict, tmp_path: Path, request) -> None:
    """An open_clip run exported as a whole CLIP: zero-shot top-1 of student and teacher, each equal to stock
    open_clip classifying the same images with the same prompts; a tower-only export is refused in one line."""
    import open_clip
    import torch.nn.functional as F

    from trainer.eval.fashion_mnist import CLASSES, load_fashion_mnist

    yaml_path = Path(request.config.rootpath) / "configs" / "experiments" / "tiny_open_clip_fsdp.yaml"
    cfg = load_config(yaml_path, ["engine.name=single", f"run.dir={tmp_path / 'run'}", "run.steps=1"])
    train(cfg)
    export = export_checkpoint(tmp_path / "run", tmp_path / "export")
    out = tmp_path / "eval.json"
    assert main([str(export), "--zero-shot", "--teacher", "pretrained", "--fashion-mnist", str(tiny["fashion"]),
                 "--test-images", "0", "--device", "cpu", "--json", str(out)]) == 0
    got = json.loads(out.read_text())

    images, labels = load_fashion_mnist("test", tiny["fashion"])
    tokenizer = open_clip.get_tokenizer(cfg.model.name)
    torch.manual_seed(cfg.run.seed)
    teacher = open_clip.create_model(cfg.model.name, pretrained=None).eval()
    student = load_pruned(export).eval()
    for model, top1 in ((student, got["zero_shot_top1"]), (teacher, got["teacher_baseline"]["zero_shot_top1"])):
        spec = get_adapter("open_clip").input_spec(model.visual)
        with torch.no_grad():
            text = torch.stack([F.normalize(F.normalize(model.encode_text(tokenizer([t.format(c) for t in (
                "a photo of a {}.", "a picture of a {}.", "an image of a {}.")])), dim=-1).mean(0), dim=0)
                for c in CLASSES])
            feats = torch.cat([model.encode_image(b) for b in image_batches(images, spec, 64)])
        want = float(((F.normalize(feats, dim=-1) @ text.T).argmax(1) == labels).float().mean())
        assert top1 == pytest.approx(want)
    visual_only = export_checkpoint(tmp_path / "run", tmp_path / "visual", visual_only=True)
    assert main([str(visual_only), "--zero-shot", "--fashion-mnist", str(tiny["fashion"]), "--device", "cpu"]) == 2
