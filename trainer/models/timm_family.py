"""timm vision transformers (VisionTransformer, Eva, DINOv2 variants) built by name."""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

from trainer.config import ModelConfig
from trainer.data import InputSpec
from trainer.models.base import TokenLayout, first_line

HEAD_PARTS = ("norm", "fc_norm", "head_drop", "head")


def strip_timm_head(model: nn.Module, prefix: str = "") -> TokenLayout:
    """Identity for the final norm and head, no pooling: the trunk returns pre-norm tokens."""
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"model.name: {type(model).__name__} pools by attention; not supported for distillation")
    pool = getattr(model, "global_pool", "token")
    layout = TokenLayout(int(model.num_prefix_tokens), pooled_is_class_token=pool != "avg")
    for name in HEAD_PARTS:
        if hasattr(model, name):
            layout.removed[prefix + name] = getattr(model, name)
            setattr(model, name, nn.Identity())
    layout.removed[prefix + "global_pool"] = pool
    model.global_pool = ""
    return layout


def removed_timm_norm(layout: TokenLayout, prefix: str = "") -> nn.Module:
    """``norm`` (token pooling) or, when that is an Identity, ``fc_norm`` (avg pooling normalises the pool)."""
    norm = layout.removed.get(prefix + "norm")
    if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
        return norm
    fc_norm = layout.removed.get(prefix + "fc_norm")
    return fc_norm if isinstance(fc_norm, nn.Module) else nn.Identity()


class TimmAdapter:
    """A headless timm model (``num_classes=0``); blocks are ``model.blocks``."""

    def build(self, cfg: ModelConfig) -> nn.Module:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **cfg.kwargs)
        if cfg.pretrained is not None:
            if not Path(cfg.pretrained).is_file():
                raise FileNotFoundError(f"model.pretrained: no such file {cfg.pretrained}")
            try:
                timm.models.load_checkpoint(model, cfg.pretrained, strict=True)
            except RuntimeError as err:  # load_state_dict's size mismatch / missing / unexpected keys
                raise ValueError(f"model.pretrained: {cfg.pretrained} does not fit timm {cfg.name!r}: "
                                 f"{first_line(err)}") from None
        return model

    def input_spec(self, model: nn.Module) -> InputSpec:
        data_cfg = timm.data.resolve_data_config({}, model=model)
        # pretrained_cfg keeps the default size; the built patch embedding knows an img_size override.
        size = getattr(getattr(model, "patch_embed", None), "img_size", None) or data_cfg["input_size"][-1:]
        return InputSpec(int(size[-1]), tuple(data_cfg["mean"]), tuple(data_cfg["std"]))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def strip_head(self, model: nn.Module) -> TokenLayout:
        return strip_timm_head(model)

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        model.set_grad_checkpointing(True)

    def final_norm(self, layout: TokenLayout) -> nn.Module:
        return removed_timm_norm(layout)
