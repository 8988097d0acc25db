"""Build a model with its parameters on the meta device and its buffers real.

Parameters hold the memory and come from checkpoints, so they can stay shapes only; buffers are small
and some exist in no checkpoint (non-persistent ones computed at build time: rotary tables, EVA's
zero ``k_bias``), so a later real copy of the model can only get them from the build.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

CAST_REFUSED = "building with parameters on meta: a dtype / precision cast of the model is not supported"


@contextlib.contextmanager
def parameters_on_meta(cast_error: str = CAST_REFUSED) -> Iterator[None]:
    """Build models inside this context to get parameters on meta and real buffers.

    Parameters are created where the library creates them and moved to meta as they are registered
    (one tensor at a time, never initialised in place). ``Module.to`` is a no-op meanwhile: factories
    that move the finished model (open_clip) would try to copy meta tensors out; a dtype cast there
    raises ValueError(``cast_error``), since it would leave the buffers in another dtype than asked.
    """
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
