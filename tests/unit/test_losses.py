"""Each distillation objective on constructed tokens against a hand computation; teacher std state and resume."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.cli import load_config
from trainer.config import LossConfig
from trainer.loop import train
from trainer.losses import STD_FLOOR, ChannelStd, term
from trainer.models.base import TokenLayout
from trainer.models.registry import get_adapter
from trainer.task import DistillTask

pytestmark = pytest.mark.unit

B, P, D = 2, 3, 4
TINY_TIMM = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "tiny_timm.yaml"


def tokens(seed: int) -> torch.Tensor:
    """[B, 1 + P, D] tokens with channels of very different scales (what standardising is for)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1 + P, D, generator=g) * torch.tensor([0.1, 1.0, 5.0, 30.0]) + 2.0


def layer_norm(weight: list[float], bias: list[float]) -> nn.LayerNorm:
    norm = nn.LayerNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(weight))
        norm.bias.copy_(torch.tensor(bias))
    return norm


NORM_S = layer_norm([1.0, 0.5, 2.0, 1.5], [0.1, -0.2, 0.0, 0.3])
NORM_T = layer_norm([0.9, 1.1, 1.0, 0.7], [0.0, 0.1, -0.1, 0.2])


# Hand computations on nested Python lists, independent of torch's kernels.
def vectors(x: torch.Tensor) -> list[list[float]]:
    return x.double().reshape(-1, D).tolist()


def hand_norm(v: list[float], norm: nn.LayerNorm) -> list[float]:
    mu = sum(v) / len(v)
    var = sum((a - mu) ** 2 for a in v) / len(v)
    w, b = norm.weight.tolist(), norm.bias.tolist()
    return [(a - mu) / math.sqrt(var + norm.eps) * w[i] + b[i] for i, a in enumerate(v)]


def hand_mse(s: list[list[float]], t: list[list[float]], scale: list[float] | None = None) -> float:
    scale = scale or [1.0] * D
    squares = [((a - b) / c) ** 2 for u, v in zip(s, t, strict=True) for a, b, c in zip(u, v, scale, strict=True)]
    return sum(squares) / (len(s) * D)


def hand_cosine_distance(s: list[list[float]], t: list[list[float]]) -> float:
    def cos(u, v):
        dot = sum(a * b for a, b in zip(u, v, strict=True))
        return dot / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))
    return sum(1 - cos(u, v) for u, v in zip(s, t, strict=True)) / len(s)


def hand_std(t: list[list[float]]) -> list[float]:
    cols = list(zip(*t, strict=True))
    return [math.sqrt(sum((a - sum(c) / len(c)) ** 2 for a in c) / len(c)) for c in cols]


@pytest.mark.parametrize("part", ["cls", "patch"])
@pytest.mark.parametrize("objective", ["mse", "mse_postnorm", "cosine", "mse_standardized"])
def test_objective_matches_hand_computation(objective: str, part: str) -> None:
    student, teacher = tokens(1), tokens(2)
    pick = (lambda x: x[:, 0]) if part == "cls" else (lambda x: x[:, 1:])
    s, t = pick(student), pick(teacher)
    stats = ChannelStd()
    stats.update(teacher)
    std = stats.std()
    hs, ht = vectors(s), vectors(t)
    if objective == "mse":
        expected = hand_mse(hs, ht)
    elif objective == "mse_postnorm":
        expected = hand_mse([hand_norm(v, NORM_S) for v in hs], [hand_norm(v, NORM_T) for v in ht])
    elif objective == "cosine":
        expected = hand_cosine_distance([hand_norm(v, NORM_S) for v in hs], [hand_norm(v, NORM_T) for v in ht])
    else:
        expected = hand_mse(hs, ht, hand_std(vectors(teacher)))
    got = term(objective, s, t, norm_s=NORM_S, norm_t=NORM_T, std=std)
    assert got.dim() == 0 and got.item() == pytest.approx(expected, rel=1e-5)
    # Per-image values average to the scalar (equal token counts per image): what validation relies on.
    per_image = term(objective, s, t, norm_s=NORM_S, norm_t=NORM_T, std=std, per_image=True)
    assert per_image.shape == (B,) and per_image.mean().item() == pytest.approx(expected, rel=1e-5)


def test_default_mse_is_bit_identical_to_the_old_loss() -> None:
    s, t = tokens(1), tokens(2)
    assert torch.equal(term("mse", s, t, norm_s=NORM_S, norm_t=NORM_T, std=None), F.mse_loss(s, t))


def test_channel_std_is_cumulative_and_restorable() -> None:
    a, b = tokens(3), tokens(4)
    stats = ChannelStd()
    assert stats.std() is None
    stats.update(a)
    stats.update(b)
    expected = hand_std(vectors(torch.cat([a, b])))
    assert stats.std().tolist() == pytest.approx(expected, rel=1e-6)
    restored = ChannelStd()
    restored.load_state_dict(stats.state_dict())
    assert torch.equal(restored.std(), stats.std())
    constant = ChannelStd()
    constant.update(torch.ones(2, 3, D))
    assert constant.std().tolist() == pytest.approx([STD_FLOOR] * D, rel=1e-6)


def test_task_combines_configured_objectives_per_term() -> None:
    student, teacher = tokens(5), tokens(6)
    layout = TokenLayout(1, pooled_is_class_token=True)
    cfg = LossConfig(cls_weight=0.5, patch_weight=2.0, cls_objective="cosine", patch_objective="mse_standardized")
    task = DistillTask(lambda _: student, lambda _: teacher, student_layout=layout, teacher_layout=layout,
                       loss=cfg, student_norm=NORM_S, teacher_norm=NORM_T)
    out = task(torch.zeros(B, 3, 8, 8))
    cls = hand_cosine_distance([hand_norm(v, NORM_S) for v in vectors(student[:, 0])],
                               [hand_norm(v, NORM_T) for v in vectors(teacher[:, 0])])
    patch = hand_mse(vectors(student[:, 1:]), vectors(teacher[:, 1:]), hand_std(vectors(teacher)))
    assert out["loss_cls"].item() == pytest.approx(cls, rel=1e-5)
    assert out["loss_patch"].item() == pytest.approx(patch, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * cls + 2.0 * patch, rel=1e-5)
    assert task.state_dict()["teacher_std"]["count"].item() == B * (1 + P)
    # The final norms are frozen: a post-norm loss must not leave gradients in them.
    assert not any(p.requires_grad for p in NORM_S.parameters())


def test_unknown_objective_names_the_key() -> None:
    with pytest.raises(ValueError, match="loss.patch_objective"):
        LossConfig(patch_objective="l1")


def test_standardized_resume_is_exact(tmp_path: Path) -> None:
    # The teacher std is trainer state: a resumed run must divide by the same std as the uninterrupted one.
    def run(run_dir: Path, *extra: str) -> dict[int, float]:
        cfg = load_config(TINY_TIMM, [
            "engine.name=single", f"run.dir={run_dir}", "run.steps=4", "run.log_every_steps=1",
            "optim.base_lr=0.05", "checkpoint.every_steps=2", "loss.cls_objective=mse_standardized",
            "loss.patch_objective=mse_standardized", *extra])
        return train(cfg).losses

    reference = run(tmp_path / "ref")
    resumed = run(tmp_path / "resumed", f"checkpoint.resume={tmp_path / 'ref' / 'checkpoints' / 'step-00000002'}")
    assert sorted(resumed) == [2, 3]
    assert all(resumed[s] == reference[s] for s in resumed)
    # Without the saved statistics the resumed std would come from 2 batches instead of 4: losses would differ.
    stateless = torch.load(tmp_path / "ref" / "checkpoints" / "step-00000002" / "rank-00000.pt", weights_only=False)
    assert stateless["trainer"]["task"]["teacher_std"]["count"].item() > 0


@pytest.mark.parametrize("which", ["tiny_timm_yaml", "tiny_open_clip_yaml"])
def test_final_norm_gives_the_models_own_normed_features(which: str, request: pytest.FixtureRequest) -> None:
    cfg = load_config(request.getfixturevalue(which))
    adapter = get_adapter(cfg.model.family)
    model = adapter.build(cfg.model).eval()
    full = copy.deepcopy(model)
    layout = adapter.strip_head(model)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        normed = adapter.final_norm(layout)(model(images))
        if cfg.model.family == "timm":
            expected, got = full.forward_features(images), normed
        else:  # open_clip: without the projection, forward is the normed class token
            full.proj = None
            expected, got = full(images), normed[:, 0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
