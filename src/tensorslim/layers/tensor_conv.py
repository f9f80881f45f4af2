"""Convolutions factorized by tensor decompositions, each a chain of stock conv layers.

Every class is an nn.Sequential of nn.Conv1d / nn.Conv2d layers (1x1, depthwise, k x 1, 1 x k, ...),
so it exports to ONNX and runs on standard kernels. The first layers carry no bias, the last one
carries the dense layer's bias. Stride, padding and dilation of the dense conv are split per spatial
axis onto the layers that act on that axis; zero (and reflect/replicate/circular) padding commutes
with the bias-free channel maps before it, so the chain computes exactly the conv with the
reconstructed kernel (`dense_weight()`).

- CPConv (Lebedev et al., ICLR 2015): 1x1 in->R, depthwise kh x 1, depthwise 1 x kw, 1x1 R->out.
- Tucker2Conv (Kim et al., ICLR 2016): 1x1 in->r_in, k conv r_in->r_out, 1x1 r_out->out.
- TTConv (tensor-train, cores ordered in, kh, kw, out as in Schuurmans et al., ICLR 2023):
  1x1 in->r1, kh x 1 r1->r2, 1 x kw r2->r3, 1x1 r3->out.
- SpatialSVDConv (Jaderberg et al., BMVC 2014): kh x 1 in->r, 1 x kw r->out.

For Conv1d the two spatial layers of CP and TT become one layer with the 1-D kernel.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from tensorslim.decompose.tensor import (
    Decomposition,
    cp,
    cp_reconstruct,
    spatial_svd,
    spatial_svd_reconstruct,
    tt,
    tt_reconstruct,
    tucker2,
    tucker2_reconstruct,
)
from tensorslim.layers.additive import Compressed

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}


@dataclass(frozen=True)
class ConvGeometry:
    """What a factorized chain must reproduce of a dense Conv1d / Conv2d."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    padding_mode: str
    bias: bool
    device: Any = None
    dtype: Any = None

    @classmethod
    def of(cls, conv: nn.Module) -> ConvGeometry:
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d)) or isinstance(
            conv, (nn.ConvTranspose1d, nn.ConvTranspose2d)
        ):
            raise ValueError(f"expected nn.Conv1d or nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"grouped convolutions (groups={conv.groups}) are not supported")
        return cls(
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),
            tuple(conv.stride),
            conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            tuple(conv.dilation),
            conv.padding_mode,
            conv.bias is not None,
            conv.weight.device,
            conv.weight.dtype,
        )

    @property
    def dims(self) -> int:
        return len(self.kernel_size)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def conv(self, cin: int, cout: int, *, axis: int | None, groups: int = 1, bias: bool = False):
        """A stock conv; `axis` None: pointwise (1x1); -1: all axes (the dense geometry); 0 / 1:
        a kernel along that axis only, with that axis's stride, padding and dilation."""
        conv = _CONV[self.dims]
        kw = {"device": self.device, "dtype": self.dtype, "bias": bias, "groups": groups}
        if axis is None:
            return conv(cin, cout, 1, **kw)
        if axis == -1:
            return conv(
                cin,
                cout,
                self.kernel_size,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                padding_mode=self.padding_mode,
                **kw,
            )

        def only(values, other):
            return tuple(v if a == axis else other for a, v in enumerate(values))

        padding = self.padding if isinstance(self.padding, str) else only(self.padding, 0)
        return conv(
            cin,
            cout,
            only(self.kernel_size, 1),
            stride=only(self.stride, 1),
            padding=padding,
            dilation=only(self.dilation, 1),
            padding_mode=self.padding_mode,
            **kw,
        )


class FactorizedConv(nn.Sequential, Compressed):
    """Base of the tensor-factorized convs: a named chain of stock conv layers."""

    method: str = ""

    def __init__(self, geometry: ConvGeometry, rank: Any, layers: OrderedDict) -> None:
        super().__init__(layers)
        self.geometry = geometry
        self.rank = rank
        self.in_channels = geometry.in_channels
        self.out_channels = geometry.out_channels
        self.kernel_size = geometry.kernel_size
        # Facts about the decomposition that produced the weights (iterations, error), if any.
        self.decomposition_info: dict[str, Any] = {}

    # The dense conv's geometry, read-only (see LowRankConv).
    @property
    def stride(self) -> tuple[int, ...]:
        return self.geometry.stride

    @property
    def padding(self) -> tuple[int, ...] | str:
        return self.geometry.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.geometry.dilation

    @property
    def padding_mode(self) -> str:
        return self.geometry.padding_mode

    @property
    def groups(self) -> int:
        return 1

    @classmethod
    def empty_like(cls, conv: nn.Module, rank: Any) -> FactorizedConv:
        """The chain with the geometry of `conv` and uninitialized weights."""
        return cls(ConvGeometry.of(conv), rank)

    @classmethod
    def from_dense(cls, conv: nn.Module, rank: Any, **options: Any) -> FactorizedConv:
        """Decompose `conv.weight` at `rank` (options go to the decomposition) and build the chain."""
        dec = cls.decompose(conv.weight.detach(), rank, **options)
        return cls.from_decomposition(conv, dec)

    @classmethod
    def from_decomposition(cls, conv: nn.Module, dec: Decomposition) -> FactorizedConv:
        """The chain holding `dec`'s factors, in `conv`'s dtype and on its device.

        The factors are loaded in their own dtype (float32, or float64 for float64 kernels) and cast
        once; where a factor would overflow `conv`'s dtype (float16 holds at most 65504), the
        chain's layers are first rescaled by scalars whose product is 1 (`fit_range`). A chain that
        still does not fit has non-finite weights: the caller refuses it."""
        g = ConvGeometry.of(conv)
        work = dec.factors[0].dtype if dec.factors[0].is_floating_point() else torch.float32
        layer = cls(replace(g, device="cpu", dtype=work), dec.rank)
        with torch.no_grad():
            layer.load_factors(dec.factors)
            last = layer[-1]
            if conv.bias is not None:
                last.bias.copy_(conv.bias.detach())
        fit_range(layer, g.dtype)
        layer = layer.to(device=g.device, dtype=g.dtype)
        layer.geometry = g
        layer.decomposition_info = dec.summary()
        return layer

    @staticmethod
    def decompose(kernel: torch.Tensor, rank: Any, **options: Any) -> Decomposition:
        raise NotImplementedError

    def load_factors(self, factors: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The reconstructed kernel (out, in, *kernel_size)."""
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        """A stock conv computing the same function."""
        g = self.geometry
        w = self.dense_weight()
        conv = g.conv(g.in_channels, g.out_channels, axis=-1, bias=g.bias)
        conv = conv.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            if g.bias:
                conv.bias.copy_(self[-1].bias)
        return conv

    def extra_repr(self) -> str:
        return f"method={self.method}, rank={self.rank}"


def fit_range(layer: nn.Sequential, dtype: torch.dtype | None) -> None:
    """Where a layer's weight would overflow `dtype`, rescale every layer's weight by a scalar so
    that all have the same largest magnitude (their geometric mean). The scalars multiply to 1 and
    every layer but the last is a bias-free linear map (padding included), so the chain computes
    the same function. Nothing changes for dtypes of 32 bits or more, or where everything fits."""
    if dtype is None or not dtype.is_floating_point or torch.finfo(dtype).bits >= 32:
        return
    weights = [m.weight for m in layer]
    peaks = [float(w.detach().abs().amax()) if w.numel() else 0.0 for w in weights]
    if max(peaks) <= torch.finfo(dtype).max or min(peaks) == 0.0:
        return
    target = math.exp(sum(math.log(p) for p in peaks) / len(peaks))
    with torch.no_grad():
        for w, p in zip(weights, peaks):
            w.mul_(target / p)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src.reshape(dst.shape).to(dst.dtype))


class CPConv(FactorizedConv):
    """CP rank R: 1x1 in->R, depthwise kernel(s) per spatial axis on R channels, 1x1 R->out."""

    method = "cp"

    def __init__(self, geometry: ConvGeometry, rank: int) -> None:
        g, r = geometry, int(rank)
        if r < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        layers = OrderedDict(pointwise_in=g.conv(g.in_channels, r, axis=None))
        if g.dims == 2:
            layers["vertical"] = g.conv(r, r, axis=0, groups=r)
            layers["horizontal"] = g.conv(r, r, axis=1, groups=r)
        else:
            layers["spatial"] = g.conv(r, r, axis=0, groups=r)
        layers["pointwise_out"] = g.conv(r, g.out_channels, axis=None, bias=g.bias)
        super().__init__(geometry, r, layers)

    @staticmethod
    def decompose(kernel: torch.Tensor, rank: int, **options: Any) -> Decomposition:
        return cp(kernel, int(rank), **options)

    def _spatial(self) -> list[nn.Module]:
        return [self.vertical, self.horizontal] if self.geometry.dims == 2 else [self.spatial]

    def load_factors(self, factors: list[torch.Tensor]) -> None:
        a, b, *spatial = factors  # A (out, R), B (in, R), C (kh, R), D (kw, R)
        _copy(self.pointwise_in.weight, b.T)
        for layer, f in zip(self._spatial(), spatial):
            _copy(layer.weight, f.T)
        _copy(self.pointwise_out.weight, a)

    def dense_weight(self) -> torch.Tensor:
        r = self.rank
        factors = [
            self.pointwise_out.weight.reshape(self.out_channels, r),
            self.pointwise_in.weight.reshape(r, self.in_channels).T,
        ]
        factors += [layer.weight.reshape(r, -1).T for layer in self._spatial()]
        return cp_reconstruct(factors)


class Tucker2Conv(FactorizedConv):
    """Tucker-2 ranks (r_out, r_in): 1x1 in->r_in, dense-geometry conv r_in->r_out, 1x1 r_out->out."""

    method = "tucker2"

    def __init__(self, geometry: ConvGeometry, rank: tuple[int, int]) -> None:
        g = geometry
        r_out, r_in = (int(v) for v in rank)
        if r_out < 1 or r_in < 1:
            raise ValueError(f"ranks must be >= 1, got {rank}")
        layers = OrderedDict(
            pointwise_in=g.conv(g.in_channels, r_in, axis=None),
            core=g.conv(r_in, r_out, axis=-1),
            pointwise_out=g.conv(r_out, g.out_channels, axis=None, bias=g.bias),
        )
        super().__init__(geometry, (r_out, r_in), layers)

    @staticmethod
    def decompose(kernel: torch.Tensor, rank: tuple[int, int], **options: Any) -> Decomposition:
        return tucker2(kernel, tuple(rank), **options)

    def load_factors(self, factors: list[torch.Tensor]) -> None:
        core, u_out, u_in = factors
        _copy(self.pointwise_in.weight, u_in.T)
        _copy(self.core.weight, core)
        _copy(self.pointwise_out.weight, u_out)

    def dense_weight(self) -> torch.Tensor:
        r_out, r_in = self.rank
        return tucker2_reconstruct(
            self.core.weight,
            self.pointwise_out.weight.reshape(self.out_channels, r_out),
            self.pointwise_in.weight.reshape(r_in, self.in_channels).T,
        )


class TTConv(FactorizedConv):
    """Tensor-train ranks (r1, r2, r3) (Conv1d: (r1, r2)): 1x1 in->r1, one conv per spatial axis
    r1->r2(->r3), 1x1 ->out."""

    method = "tt"

    def __init__(self, geometry: ConvGeometry, rank: tuple[int, ...]) -> None:
        g = geometry
        ranks = tuple(int(v) for v in rank)
        if len(ranks) != g.dims + 1 or min(ranks) < 1:
            raise ValueError(f"TT needs {g.dims + 1} ranks >= 1 for a {g.dims}-D conv, got {rank}")
        layers = OrderedDict(pointwise_in=g.conv(g.in_channels, ranks[0], axis=None))
        names = ("vertical", "horizontal") if g.dims == 2 else ("spatial",)
        for axis, name in enumerate(names):
            layers[name] = g.conv(ranks[axis], ranks[axis + 1], axis=axis)
        layers["pointwise_out"] = g.conv(ranks[-1], g.out_channels, axis=None, bias=g.bias)
        super().__init__(geometry, ranks, layers)

    @staticmethod
    def decompose(kernel: torch.Tensor, rank: tuple[int, ...], **options: Any) -> Decomposition:
        return tt(kernel, tuple(rank), **options)

    def _spatial(self) -> list[nn.Module]:
        return [self.vertical, self.horizontal] if self.geometry.dims == 2 else [self.spatial]

    def load_factors(self, factors: list[torch.Tensor]) -> None:
        first, *middle, last = factors  # (1, in, r1), (r_j, k_j, r_j+1)..., (r_last, out, 1)
        _copy(self.pointwise_in.weight, first[0].T)
        for layer, core in zip(self._spatial(), middle):
            # conv weight (r_next, r_prev, k along its axis): core (r_prev, k, r_next) permuted
            _copy(layer.weight, core.permute(2, 0, 1))
        _copy(self.pointwise_out.weight, last[:, :, 0].T)

    def dense_weight(self) -> torch.Tensor:
        r = self.rank
        cores = [self.pointwise_in.weight.reshape(r[0], self.in_channels).T.unsqueeze(0)]
        for layer in self._spatial():
            w = layer.weight  # (r_next, r_prev, k) with singleton axes for 2-D
            cores.append(w.reshape(w.shape[0], w.shape[1], -1).permute(1, 2, 0))
        cores.append(self.pointwise_out.weight.reshape(self.out_channels, r[-1]).T.unsqueeze(-1))
        return tt_reconstruct(cores)


class SpatialSVDConv(FactorizedConv):
    """Spatial SVD rank r (Conv2d only): kh x 1 conv in->r, then 1 x kw conv r->out."""

    method = "spatial_svd"

    def __init__(self, geometry: ConvGeometry, rank: int) -> None:
        g, r = geometry, int(rank)
        if g.dims != 2:
            raise ValueError("spatial SVD needs a Conv2d")
        if r < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        layers = OrderedDict(
            vertical=g.conv(g.in_channels, r, axis=0),
            horizontal=g.conv(r, g.out_channels, axis=1, bias=g.bias),
        )
        super().__init__(geometry, r, layers)

    @staticmethod
    def decompose(kernel: torch.Tensor, rank: int, **options: Any) -> Decomposition:
        return spatial_svd(kernel, int(rank), **options)

    def load_factors(self, factors: list[torch.Tensor]) -> None:
        vertical, horizontal = factors
        _copy(self.vertical.weight, vertical)
        _copy(self.horizontal.weight, horizontal)

    def dense_weight(self) -> torch.Tensor:
        return spatial_svd_reconstruct(self.vertical.weight, self.horizontal.weight)


TENSOR_CONVS: dict[str, type[FactorizedConv]] = {
    cls.method: cls for cls in (CPConv, Tucker2Conv, TTConv, SpatialSVDConv)
}
