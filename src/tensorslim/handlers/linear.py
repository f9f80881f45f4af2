"""nn.Linear: one matrix W = weight (out x in), applied once per output vector."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tensorslim.core.handler import Handler, register_handler
from tensorslim.core.target import LayerSite
from tensorslim.layers.lowrank_linear import linear_from_op


def output_positions(site: LayerSite, out_dim: int) -> int | None:
    """How many output vectors of size `out_dim` one forward call produces (output elements /
    out_dim), None if the output shape is unknown."""
    if site.output_shape is None:
        return None
    return math.prod(site.output_shape) // out_dim


def bias_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """{"bias": the layer's bias} when it has one, else {}."""
    bias = getattr(module, "bias", None)
    return {} if bias is None else {"bias": bias.detach()}


def first_input(args: tuple, kwargs: dict[str, Any], name: str) -> torch.Tensor:
    """The forward call's first positional input, else its keyword input `name`."""
    return args[0] if args else kwargs[name]


@register_handler(nn.Linear)
class LinearHandler(Handler):
    """y = W x + b on (..., in); the replacement is a LowRankLinear (low-rank operator) or an
    OpLinear around any other operator, with the bias kept."""

    name = "linear"

    def matrices(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"": module.weight.detach()}

    def positions(self, module: nn.Module, site: LayerSite) -> dict[str, int | None]:
        return {"": output_positions(site, module.out_features)}

    def extra_params(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return bias_params(module)

    def assemble(self, module: nn.Module, ops: Mapping[str, nn.Module | None]) -> nn.Module:
        op = ops.get("")
        if op is None:
            return module
        new = linear_from_op(op, module.bias, module.in_features, module.out_features)
        return new.train(module.training)

    def rows(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> dict[str, torch.Tensor]:
        """The input vectors, (N x in)."""
        x = first_input(args, kwargs, "input")
        return {"": x.reshape(-1, x.shape[-1])}
