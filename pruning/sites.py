"""Find the MLP of every transformer block, whatever the model family calls its layers.

An ``MlpSite`` names the Linear(s) reading the block input into hidden units, the Linear writing them back and an
optional LayerNorm over them; family-specific names live here only. Gated MLPs (SwiGLU) keep one index set in both
halves, ranked on the gate half (the one through the non-linearity, like fc1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

PLAIN = "plain"  # fc_in -> act -> fc_out
GATED_SPLIT = "gated_split"  # act(fc1_g(x)) * fc1_x(x) -> fc2 (timm SwiGLU)
GATED_FUSED = "gated_fused"  # one Linear of 2M rows, chunked into two halves (timm GluMlp, DINOv2 w12)

# (input Linear names, output Linear name, layout) per family, checked in this order.
_SPLIT_GATED_NAMES = (("fc1_g", "fc1_x"), "fc2")  # timm SwiGLU (EVA02)
_FUSED_GATED_NAMES = (("w12",), "w3")  # DINOv2 SwiGLUFFN
_PLAIN_NAMES = ((("c_fc",), "c_proj"), (("fc1",), "fc2"))  # open_clip, timm Mlp


@dataclass(frozen=True)
class MlpSite:
    """One block's MLP: module path, its layout, and the attribute names of its layers."""

    path: str
    """Dotted module path of the MLP inside the model, e.g. ``visual.transformer.resblocks.0.mlp``."""
    layout: str
    """``plain``, ``gated_split`` or ``gated_fused``."""
    in_names: tuple[str, ...]
    """Attributes of the Linear layers producing hidden units; for ``gated_split`` (gate, value)."""
    out_name: str
    """Attribute of the Linear consuming hidden units."""
    hidden: int
    """Number of hidden units (M)."""
    width: int
    """Block width (N), the input size of the MLP."""
    norm_name: str | None = None
    """LayerNorm over the hidden units (timm ``scale_mlp``), sliced with them; None if absent."""
    gate_last: bool = False
    """For ``gated_fused``: the second half is the gate (timm ``GluMlp(gate_last=True)``)."""

    def module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.path)

    def selection_rows(self, fc_in_weight: torch.Tensor) -> torch.Tensor:
        """The [hidden, width] rows of a ``{in_names[0]}.weight`` tensor that rank the units (gate half if gated)."""
        if self.layout == GATED_FUSED:
            gate, value = fc_in_weight.chunk(2, dim=0)
            return value if self.gate_last else gate
        return fc_in_weight

    @property
    def selection_tensor_name(self) -> str:
        """Name (relative to ``path``) of the tensor that ``selection_rows`` takes."""
        return f"{self.in_names[0]}.weight"

    def layer_names(self) -> list[str]:
        """Attributes of every layer whose shape depends on the hidden width (inputs, output, norm)."""
        return [*self.in_names, self.out_name] + ([self.norm_name] if self.norm_name else [])

    def tensor_names(self) -> list[str]:
        """Every weight and bias name of those layers (relative to ``path``), fc_out's bias included."""
        return [f"{m}.{p}" for m in self.layer_names() for p in ("weight", "bias")]

    def parameter_names(self) -> list[str]:
        """Names of every tensor (relative to ``path``) whose shape depends on the hidden width."""
        return [n for n in self.tensor_names() if n != f"{self.out_name}.bias"]


def find_mlp_sites(model: nn.Module) -> list[MlpSite]:
    """Every recognised MLP in ``model``, in module order. Raises ValueError if there is none."""
    sites = [site for path, module in model.named_modules() if (site := mlp_site_of(path, module))]
    if not sites:
        raise ValueError(f"no MLP block found in {type(model).__name__}: expected open_clip (c_fc/c_proj), "
                         "timm (fc1/fc2, fc1_g/fc1_x/fc2) or DINOv2 (w12/w3) layouts")
    return sites


def mlp_site_of(path: str, module: nn.Module) -> MlpSite | None:
    """The site if ``module`` is an MLP of a known layout, else None."""

    def linear(name: str) -> nn.Linear | None:
        child = getattr(module, name, None)
        return child if isinstance(child, nn.Linear) else None

    (gate_name, value_name), out_name = _SPLIT_GATED_NAMES
    gate, value, out = linear(gate_name), linear(value_name), linear(out_name)
    if gate and value and out and gate.out_features == value.out_features == out.in_features:
        return _site(path, module, GATED_SPLIT, (gate_name, value_name), out_name, gate)

    (fused_name,), out_name = _FUSED_GATED_NAMES
    fused, out = linear(fused_name), linear(out_name)
    if fused and out and fused.out_features == 2 * out.in_features:
        return _site(path, module, GATED_FUSED, (fused_name,), out_name, fused)

    for (in_name,), out_name in _PLAIN_NAMES:
        fc_in, out = linear(in_name), linear(out_name)
        if not (fc_in and out):
            continue
        if fc_in.out_features == out.in_features:
            return _site(path, module, PLAIN, (in_name,), out_name, fc_in)
        if fc_in.out_features == 2 * out.in_features:  # timm GluMlp / SwiGLUPacked
            return _site(path, module, GATED_FUSED, (in_name,), out_name, fc_in)
    return None


def _site(path: str, module: nn.Module, layout: str, in_names: tuple[str, ...], out_name: str,
          first: nn.Linear) -> MlpSite:
    hidden = getattr(module, out_name).in_features
    norm = getattr(module, "norm", None)
    has_norm = isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (hidden,)
    return MlpSite(path, layout, in_names, out_name, hidden, first.in_features, "norm" if has_norm else None,
                   bool(getattr(module, "gate_last", False)))


def prefix_token_count(tower: nn.Module) -> int:
    """Class and register tokens before the patch tokens: timm's ``num_prefix_tokens``, 1 for an open_clip
    ``VisionTransformer`` (``class_embedding``); anything else raises ValueError (never guessed)."""
    count = getattr(tower, "num_prefix_tokens", None)
    if isinstance(count, int):
        return count
    trunk = getattr(tower, "trunk", None)  # open_clip's TimmModel wraps a timm tower
    if trunk is not None and isinstance(getattr(trunk, "num_prefix_tokens", None), int):
        return trunk.num_prefix_tokens
    if isinstance(getattr(tower, "class_embedding", None), torch.Tensor):
        return 1
    raise ValueError(f"{type(tower).__name__}: cannot tell how many class/register tokens precede the patch tokens")


@contextlib.contextmanager
def out_inputs(model: nn.Module, sites: list[MlpSite], receive: Callable[[str, torch.Tensor], None]
               ) -> Iterator[None]:
    """While open, every forward calls ``receive(site.path, x)`` with the input of each site's output Linear
    (the hidden units after the activation; gated: their product), through forward pre-hooks removed on exit."""
    handles = [getattr(s.module(model), s.out_name).register_forward_pre_hook(
        lambda _module, args, path=s.path: receive(path, args[0])) for s in sites]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
