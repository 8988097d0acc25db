"""The image tower of an open_clip CLIP: native VisionTransformer or a timm trunk (EVA)."""

from __future__ import annotations

from pathlib import Path

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

from pruning.export import weights_loaded_elsewhere
from trainer.config import ModelConfig
from trainer.data import InputSpec
from trainer.models.base import TokenLayout, first_line
from trainer.models.timm_family import removed_timm_norm, strip_timm_head

# Small architectures shipped with the repo (tests, benchmarks) become known by name to the factory.
REPO_MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "open_clip"
if REPO_MODEL_CONFIGS.is_dir():
    open_clip.add_model_config(REPO_MODEL_CONFIGS)


class OpenClipAdapter:
    """``create_model(name).visual``; the text tower is dropped after building."""

    def build(self, cfg: ModelConfig) -> nn.Module:
        if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
            raise FileNotFoundError(f"model.pretrained: no such file {cfg.pretrained}")
        # pretrained=None: a random init the config asks for, or a skeleton whose weights the caller loads.
        with weights_loaded_elsewhere():
            try:
                clip = open_clip.create_model(cfg.name, pretrained=cfg.pretrained, **cfg.kwargs)
            except RuntimeError as err:  # load_state_dict's size mismatch / missing / unexpected keys
                raise ValueError(f"model.pretrained: {cfg.pretrained} does not fit open_clip {cfg.name!r}: "
                                 f"{first_line(err)}") from None
        return clip.visual

    def input_spec(self, model: nn.Module) -> InputSpec:
        size = model.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = getattr(model, "image_mean", None) or OPENAI_DATASET_MEAN
        std = getattr(model, "image_std", None) or OPENAI_DATASET_STD
        return InputSpec(int(size), tuple(mean), tuple(std))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        if isinstance(model, TimmModel):
            return list(model.trunk.blocks)
        return list(model.transformer.resblocks)

    def strip_head(self, model: nn.Module) -> TokenLayout:
        if isinstance(model, TimmModel):
            layout = strip_timm_head(model.trunk, prefix="trunk.")
            layout.removed["head"] = model.head
            model.head = nn.Identity()
            return layout
        assert isinstance(model, VisionTransformer), type(model)
        if model.attn_pool is not None:
            raise ValueError(f"model.name: {type(model).__name__} pools by attention; not supported for distillation")
        layout = TokenLayout(1, pooled_is_class_token=model.pool_type != "avg")
        layout.removed.update(ln_post=model.ln_post, proj=model.proj, pool_type=model.pool_type,
                              output_tokens=model.output_tokens)
        # With no pooling, no final norm and no projection, forward returns the whole sequence.
        model.ln_post, model.proj, model.pool_type, model.output_tokens = nn.Identity(), None, "none", False
        return layout

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        model.set_grad_checkpointing(True)

    def final_norm(self, layout: TokenLayout) -> nn.Module:
        if "ln_post" in layout.removed:
            return layout.removed["ln_post"]
        return removed_timm_norm(layout, prefix="trunk.")
