"""nn.Conv1d / Conv2d / Conv3d: one matrix, the kernel (out, in, *k) reshaped to
W (out x in * prod(k)), applied once per output position (batch x spatial)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorslim.core.handler import Handler, register_handler
from tensorslim.core.target import LayerSite
from tensorslim.handlers.linear import bias_params, first_input, output_positions
from tensorslim.layers.additive import OpConv
from tensorslim.layers.lowrank_conv import LowRankConv
from tensorslim.layers.lowrank_linear import factors_of


@register_handler(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvHandler(Handler):
    """The replacement is a LowRankConv (low-rank operator: a k-conv into r channels, then a 1x1
    conv) or an OpConv around any other operator; geometry, padding mode and bias are kept."""

    name = "conv"

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            return f"{kind} convolution (groups={module.groups}) is not supported yet"
        return None

    def matrices(self, module: nn.Module) -> dict[str, torch.Tensor]:
        w = module.weight.detach()
        return {"": w.reshape(w.shape[0], -1)}

    def positions(self, module: nn.Module, site: LayerSite) -> dict[str, int | None]:
        return {"": output_positions(site, module.out_channels)}

    def extra_params(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return bias_params(module)

    def kernel(self, module: nn.Module) -> torch.Tensor:
        """The kernel (out, in, *kernel_size)."""
        return module.weight.detach()

    def assemble(self, module: nn.Module, ops: Mapping[str, nn.Module | None]) -> nn.Module:
        op = ops.get("")
        if op is None:
            return module
        factors = factors_of(op)
        new = LowRankConv.from_factors(*factors, module) if factors else OpConv(op, module)
        return new.train(module.training)

    # -- calibration --------------------------------------------------------------------------
    def calibration_reason(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} (give explicit padding to calibrate this conv)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
            return f"{type(module).__name__} (only Conv1d and Conv2d inputs are unfolded)"
        return None

    def rows(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> dict[str, torch.Tensor]:
        """The unfolded input patches (N x in * prod(k)), matching the kernel matrix's columns,
        so that X^T X is the Gram matrix of its inputs."""
        x = first_input(args, kwargs, "input")
        cols = _unfold1d(module, x) if isinstance(module, nn.Conv1d) else _unfold2d(module, x)
        return {"": cols.transpose(1, 2).reshape(-1, cols.shape[1])}


def _unfold1d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patches of a (N, C, L) or (C, L) input as (N, C * k, positions)."""
    if x.ndim == 2:
        x = x.unsqueeze(0)
    return F.unfold(
        x.unsqueeze(2),
        (1, module.kernel_size[0]),
        dilation=(1, module.dilation[0]),
        padding=(0, module.padding[0]),
        stride=(1, module.stride[0]),
    )


def _unfold2d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patches of a (N, C, H, W) or (C, H, W) input as (N, C * kh * kw, positions)."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    return F.unfold(
        x,
        module.kernel_size,
        dilation=module.dilation,
        padding=module.padding,
        stride=module.stride,
    )
