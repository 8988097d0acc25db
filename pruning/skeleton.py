"""Build a model with its parameters on the meta device and its buffers real.

Parameters come from checkpoints, so shapes suffice; buffers are small and some are in no checkpoint
(non-persistent ones built at init: rotary tables, EVA's zero ``k_bias``), so they must be real.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

CAST_REFUSED = "building with parameters on meta: a dtype / precision cast of the model is not supported"


@contextlib.contextmanager
def parameters_on_meta(cast_error: str = CAST_REFUSED) -> Iterator[None]:
    """Models built inside get each parameter moved to meta as it is registered, and real buffers.
    ``Module.to`` is a no-op meanwhile (open_clip moves the finished model); a dtype cast raises
    ValueError(``cast_error``), as it would leave the buffers in another dtype than asked."""
    register, move = nn.Module.register_parameter, nn.Module.to

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    def stay(module: nn.Module, *args: object, **kwargs: object) -> nn.Module:
        if kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args):
            raise ValueError(cast_error)
        return module

    nn.Module.register_parameter, nn.Module.to = register_on_meta, stay  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.to = register, move  # type: ignore[method-assign]
