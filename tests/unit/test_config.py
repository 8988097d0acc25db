"""Config loading: every shipped YAML validates; unknown keys and bad values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.cli import apply_overrides, deep_merge, load_config, load_yaml_tree, parse_args
from trainer.config import TrainConfig, from_dict

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE = CONFIGS / "base.yaml"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_yaml_validates(path: Path) -> None:
    tree = load_yaml_tree(path)
    # Model files are fragments: they are checked on top of the base defaults.
    cfg = from_dict(deep_merge(load_yaml_tree(BASE), tree))
    assert isinstance(cfg, TrainConfig)


def test_experiment_is_a_diff_over_base() -> None:
    cfg = load_config(CONFIGS / "experiments" / "tiny_timm.yaml")
    assert cfg.model.family == "timm" and cfg.model.kwargs["depth"] == 2
    assert cfg.optim.betas == (0.9, 0.95)  # from base.yaml
    assert cfg.run.steps == 20  # from the experiment


def test_overrides_win_and_are_typed() -> None:
    cfg = load_config(CONFIGS / "experiments" / "tiny_timm.yaml",
                      ["optim.base_lr=1e-4", "engine.name=fsdp", "optim.betas=[0.8, 0.9]", "model.kwargs.depth=3"])
    assert cfg.optim.base_lr == 1e-4 and isinstance(cfg.optim.base_lr, float)
    assert cfg.engine.name == "fsdp"
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.kwargs == {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 64, "num_heads": 2}


@pytest.mark.parametrize(("override", "key"), [
    ("optim.base_lr_typo=1", "optim.base_lr_typo"),
    ("nosection.x=1", "nosection"),
    ("optim.base_lr=-1", "optim.base_lr"),
    ("run.steps=1.5", "run.steps"),
    ("engine.name=fairscale", "engine.name"),
    ("engine.zero_stage=1", "engine.zero_stage"),
    ("engine.precision=fp16", "engine.precision"),
    ("model.family=hf", "model.family"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("engine.activation_checkpointing=yes please", "engine.activation_checkpointing"),
    ("data.kind=csv", "data.kind"),
    ("loss.cls_weight=-1", "loss.cls_weight"),
    ("optim.base_lr=abc", "optim.base_lr"),
])
def test_bad_key_or_value_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "experiments" / "tiny_timm.yaml", [override])


def test_override_syntax_errors() -> None:
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["optim.base_lr"])
    with pytest.raises(ValueError, match="optim.base_lr"):
        apply_overrides({"optim": {"base_lr": 1.0}}, ["optim.base_lr.x=1"])


def test_defaults_chain_and_cycle(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\nrun: {steps: 3}\n")
    (tmp_path / "b.yaml").write_text("run: {steps: 2, seed: 7}\n")
    assert load_yaml_tree(tmp_path / "a.yaml") == {"run": {"steps": 3, "seed": 7}}
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ValueError, match="cycle"):
        load_yaml_tree(tmp_path / "a.yaml")
    with pytest.raises(FileNotFoundError):
        load_yaml_tree(tmp_path / "missing.yaml")


def test_resolved_config_round_trips_through_yaml() -> None:
    cfg = load_config(CONFIGS / "experiments" / "eva02_e_r1.yaml")
    again = from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


def test_cli_accepts_the_deepspeed_launcher_flag() -> None:
    cfg = parse_args([str(CONFIGS / "experiments" / "tiny_timm.yaml"), "--local_rank=1", "run.seed=3"])
    assert cfg.run.seed == 3


def test_warmup_of_a_compensated_start() -> None:
    tiny = CONFIGS / "experiments" / "tiny_timm.yaml"
    init = "prune.student_init=compensated.safetensors"
    assert load_config(tiny, ["run.steps=50"]).warmup_steps() == 0  # base.yaml: warmup_steps null
    assert load_config(tiny, ["run.steps=50", init]).warmup_steps() == 10
    assert load_config(tiny, ["run.steps=50", "prune.in_engine=true", "prune.compensate=true"]).warmup_steps() == 10
    assert load_config(tiny, ["run.steps=50", init, "optim.warmup_steps=3"]).warmup_steps() == 3
    assert load_config(tiny, ["run.steps=50", init, "optim.warmup_fraction=0"]).warmup_steps() == 0
    assert load_config(tiny, ["run.steps=50", init, "optim.warmup_steps=0"]).warmup_steps() == 0  # said: kept
    assert load_config(tiny, ["run.steps=50", "optim.warmup_fraction=0.5"]).warmup_steps() == 25
    with pytest.raises(ValueError, match="optim.warmup_fraction: set either"):
        load_config(tiny, ["optim.warmup_steps=3", "optim.warmup_fraction=0.1"])
    with pytest.raises(ValueError, match=r"optim.warmup_fraction: must be in \[0, 1\)"):
        load_config(tiny, ["optim.warmup_fraction=1"])
