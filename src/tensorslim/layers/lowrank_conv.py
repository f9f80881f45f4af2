"""LowRankConv: a Conv1d/Conv2d/Conv3d factorized by the SVD of its reshaped kernel.

The kernel K (out, in, *k) is reshaped to W (out, in * prod(k)) and factorized W ~= A B. B becomes a
conv with the original kernel size, stride, padding and dilation into r channels; A becomes a 1x1
conv from r channels to `out`, carrying the bias. Both are stock conv layers, so the result exports to
ONNX and runs on standard kernels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tensorslim.decompose import truncated_svd
from tensorslim.layers.additive import Compressed

_CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class LowRankConv(nn.Module, Compressed):
    """conv(in -> r, kernel k, stride, padding, dilation) followed by conv(r -> out, 1x1, bias)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, ...],
        rank: int,
        stride: tuple[int, ...] | int = 1,
        padding: tuple[int, ...] | int | str = 0,
        dilation: tuple[int, ...] | int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        kernel_size = tuple(kernel_size)
        dims = len(kernel_size)
        if dims not in _CONV_TYPES:
            raise ValueError(f"only 1-D, 2-D and 3-D convolutions are supported, got {dims}-D")
        conv = _CONV_TYPES[dims]
        kw = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.rank = rank
        self.first = conv(
            in_channels,
            rank,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
            padding_mode=padding_mode,
            **kw,
        )
        self.second = conv(rank, out_channels, 1, bias=bias, **kw)

    # The dense conv's geometry, read-only, for code that inspects the layer it replaced (e.g.
    # Hugging Face MobileNetV2's TF-style padding reads `stride`, `kernel_size`, `dilation`).
    @property
    def stride(self) -> tuple[int, ...]:
        return self.first.stride

    @property
    def padding(self) -> tuple[int, ...] | str:
        return self.first.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.first.dilation

    @property
    def padding_mode(self) -> str:
        return self.first.padding_mode

    @property
    def groups(self) -> int:
        return 1

    @classmethod
    def empty_like(cls, conv: nn.Module, rank: int) -> LowRankConv:
        """A LowRankConv with the geometry of `conv` and uninitialized factors."""
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            rank,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )

    @classmethod
    def from_dense(cls, conv: nn.Module, rank: int, svd_method: str = "auto") -> LowRankConv:
        """Truncated SVD of the kernel reshaped to (out, in * prod(kernel_size))."""
        _check_groups(conv)
        w = conv.weight.detach()
        a, b = truncated_svd(w.reshape(w.shape[0], -1), rank, method=svd_method)
        return cls.from_factors(a, b, conv)

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, like: nn.Module) -> LowRankConv:
        """The conv `like` with kernel matrix A (out x r) @ B (r x in * prod(k)); bias and geometry
        of `like` kept. Same structure and state-dict keys as `from_dense`."""
        _check_groups(like)
        rank = a.shape[1]
        shape = tuple(like.weight.shape)
        if a.shape[0] != shape[0] or b.shape != (rank, math.prod(shape[1:])):
            raise ValueError(
                f"factors {tuple(a.shape)} @ {tuple(b.shape)} do not fit a kernel of shape {shape}"
            )
        layer = cls.empty_like(like, rank)
        with torch.no_grad():
            layer.first.weight.copy_(b.detach().reshape(rank, *shape[1:]))
            layer.second.weight.copy_(a.detach().reshape(shape[0], rank, *([1] * (len(shape) - 2))))
            if like.bias is not None:
                layer.second.bias.copy_(like.bias.detach())
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(input))

    def balance_(self) -> None:
        """Rescale the two convs' weights along the rank in place, the kernel unchanged (see
        layers.lowrank_linear.balance_factors_)."""
        from tensorslim.layers.lowrank_linear import balance_factors_

        balance_factors_(self.second.weight, self.first.weight)

    def dense_weight(self) -> torch.Tensor:
        """The reconstructed kernel (out, in, *kernel_size)."""
        a = self.second.weight.reshape(self.out_channels, self.rank)
        b = self.first.weight.reshape(self.rank, -1)
        return (a @ b).reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def to_dense(self) -> nn.Module:
        """A stock conv layer computing the same function."""
        f = self.first
        conv = _CONV_TYPES[len(self.kernel_size)](
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=f.stride,
            padding=f.padding,
            dilation=f.dilation,
            bias=self.second.bias is not None,
            padding_mode=f.padding_mode,
            device=f.weight.device,
            dtype=f.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.second.bias is not None:
                conv.bias.copy_(self.second.bias)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"rank={self.rank}, kernel_numel={math.prod(self.kernel_size)}"
        )


def _check_groups(conv: nn.Module) -> None:
    if conv.groups != 1:
        raise ValueError(f"grouped convolutions (groups={conv.groups}) are not supported")
