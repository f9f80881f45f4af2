"""Hugging Face GPT-2 `Conv1D` (transformers.pytorch_utils.Conv1D): y = x @ weight + bias with
weight stored (in, out), so its matrix is W = weight^T (out x in). Registered by qualified name:
transformers is never imported here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tensorslim.core.handler import Handler, register_handler
from tensorslim.core.target import LayerSite
from tensorslim.handlers.linear import bias_params, first_input, output_positions
from tensorslim.layers.lowrank_linear import linear_from_op

CONV1D = "transformers.pytorch_utils.Conv1D"


@register_handler(CONV1D)
class HFConv1DHandler(Handler):
    """GPT-2's Conv1D as a Linear: the replacement is a LowRankLinear or an OpLinear, bias kept."""

    name = "hf_conv1d"

    def matrices(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"": module.weight.detach().T}

    def positions(self, module: nn.Module, site: LayerSite) -> dict[str, int | None]:
        return {"": output_positions(site, module.weight.shape[1])}

    def extra_params(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return bias_params(module)

    def grad_matrix(self, module: nn.Module, part: str, grad: torch.Tensor) -> torch.Tensor:
        """The weight's gradient (in x out) as W's (out x in)."""
        return grad.T

    def assemble(self, module: nn.Module, ops: Mapping[str, nn.Module | None]) -> nn.Module:
        op = ops.get("")
        if op is None:
            return module
        n_in, n_out = module.weight.shape
        return linear_from_op(op, module.bias, n_in, n_out).train(module.training)

    def rows(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> dict[str, torch.Tensor]:
        """The input vectors, (N x in)."""
        x = first_input(args, kwargs, "x")
        return {"": x.reshape(-1, x.shape[-1])}
