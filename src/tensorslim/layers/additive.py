"""Layers rebuilt around operator modules (what a matrix compressor builds).

An operator maps (..., n) to (..., m) without bias and reports the (m x n) matrix it computes
with through `dense_weight()`. `SumOp` adds operators (a spec with several components: low-rank
plus sparse plus quantized, Idelbayev & Carreira-Perpinan 2021); `OpLinear` and `OpConv` put an
operator in the place of a Linear's or a convolution's weight, keeping bias and geometry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Compressed:
    """Marker base of every module tensorslim builds: never searched again for layers."""


class SumOp(nn.Module, Compressed):
    """The sum of operators: y = sum_i op_i(x); dense_weight() = sum_i op_i.dense_weight()."""

    def __init__(self, ops: list[nn.Module]) -> None:
        super().__init__()
        self.ops = nn.ModuleList(ops)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self.ops[0](input)
        for op in self.ops[1:]:
            out = out + op(input)
        return out

    def dense_weight(self) -> torch.Tensor:
        w = self.ops[0].dense_weight()
        for op in self.ops[1:]:
            w = w + op.dense_weight()
        return w


class OpLinear(nn.Module, Compressed):
    """A Linear layer whose weight is an operator: y = op(x) + bias. Input (..., in)."""

    def __init__(
        self, op: nn.Module, bias: torch.Tensor | None, in_features: int, out_features: int
    ) -> None:
        super().__init__()
        self.op = op
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        y = self.op(input)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        return self.op.dense_weight()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class OpConv(nn.Module, Compressed):
    """A convolution whose kernel matrix (out x in/groups * prod(k)) is an operator: the kernel is
    rebuilt from `op.dense_weight()` on each call (storage is the operator's, compute the dense
    convolution's). Keeps stride, padding (incl. padding_mode), dilation, groups and bias."""

    def __init__(self, op: nn.Module, like: nn.Module) -> None:
        super().__init__()
        self.op = op
        self.kernel_shape = tuple(like.weight.shape)
        self.in_channels, self.out_channels = like.in_channels, like.out_channels
        self.kernel_size = tuple(like.kernel_size)
        self.stride, self.dilation, self.groups = like.stride, like.dilation, like.groups
        self.padding = like.padding
        self.padding_mode = like.padding_mode
        self._reversed_padding = getattr(like, "_reversed_padding_repeated_twice", None)
        self.bias = None if like.bias is None else nn.Parameter(like.bias.detach().clone())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        kernel = self.op.dense_weight().reshape(self.kernel_shape)
        conv = _CONV[len(self.kernel_size)]
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding, mode=self.padding_mode)
            return conv(input, kernel, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(input, kernel, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def dense_weight(self) -> torch.Tensor:
        return self.op.dense_weight()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
