"""Truncated-SVD factorizers for nn.Linear and nn.Conv1d/2d/3d (method "svd")."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tensorslim.decompose import (
    max_useful_rank,
    rank_for_keep,
    singular_values,
    tail_energy,
)
from tensorslim.errors import UnsupportedLayerError
from tensorslim.layers import LowRankConv, LowRankLinear
from tensorslim.model.registry import Factorizer, LayerSite, Option, register


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def refuse_overflow(
    new: nn.Module, module: nn.Module, site: LayerSite, method: str, rank: Any
) -> nn.Module:
    """`new` (the factorized `module`), or UnsupportedLayerError naming the layer and dtype where
    a factor does not fit the layer's dtype (a float16 layer whose factors exceed 65504 even after
    rescaling, see decompose.svd.cast_factors and layers.tensor_conv.fit_range)."""
    bad = [
        n
        for n, p in new.named_parameters()
        if p.is_floating_point() and not bool(torch.isfinite(p).all())
    ]
    if not bad:
        return new
    dtype = next((p.dtype for p in new.parameters() if p.is_floating_point()), torch.float32)
    name = site.name or type(module).__name__
    raise UnsupportedLayerError(
        f"layer {name!r} ({type(module).__name__}, {_dtype_name(dtype)}): the {method!r} factors "
        f"at rank {rank} do not fit in {_dtype_name(dtype)} (largest finite value "
        f"{torch.finfo(dtype).max:g}; {', '.join(bad)} overflow); compress a float32 copy of the "
        "model, or exclude this layer"
    )


def bias_params(module: nn.Module) -> int:
    """Parameters of the layer's `bias` (0 without one)."""
    return 0 if getattr(module, "bias", None) is None else module.bias.numel()


def output_positions(site: LayerSite, out_dim: int) -> int | None:
    """How many times the weight is applied on the site's input: output elements / `out_dim` (the
    weight's output size: out_features, out_channels), None if the output shape is unknown."""
    if site.output_shape is None:
        return None
    return math.prod(site.output_shape) // out_dim


def weight_dense_params(module: nn.Module) -> int:
    """Parameters of a dense layer with one `weight` and an optional `bias`."""
    return module.weight.numel() + bias_params(module)


def weight_dense_flops(module: nn.Module, site: LayerSite, out_dim: int) -> int | None:
    """FLOPs (2 per multiply-add) of a dense layer with one `weight` of output size `out_dim`:
    every weight entry multiplies once per output position (see output_positions)."""
    p = output_positions(site, out_dim)
    return None if p is None else 2 * p * module.weight.numel()


class MatrixSVDFactorizer(Factorizer):
    """Shared logic for layers whose weight is viewed as one (m x n) matrix W, factorized A @ B.

    Parameters of rank r: r(m + n) + bias. FLOPs: 2 * positions * r(m + n), where positions is the
    number of output vectors (tokens for Linear, batch * spatial positions for conv).
    """

    def matrix(self, module: nn.Module) -> torch.Tensor:
        w = module.weight.detach()
        return w.reshape(w.shape[0], -1)

    _bias = staticmethod(bias_params)

    def _positions(self, module: nn.Module, site: LayerSite) -> int | None:
        return output_positions(site, self.matrix(module).shape[0])

    def dense_params(self, module: nn.Module) -> int:
        return weight_dense_params(module)

    def dense_flops(self, module: nn.Module, site: LayerSite) -> int | None:
        # the matrix's rows, not weight.shape[0]: HF Conv1D stores its weight transposed
        return weight_dense_flops(module, site, self.matrix(module).shape[0])

    def options(self, module: nn.Module, site: LayerSite) -> list[Option]:
        w = self.matrix(module)
        m, n = w.shape
        r_max = max_useful_rank(m, n)
        if r_max == 0:
            return []
        tails = tail_energy(singular_values(w)).tolist()
        p = self._positions(module, site)
        bias = self._bias(module)
        return [
            Option(
                rank=r,
                params=r * (m + n) + bias,
                flops=None if p is None else 2 * p * r * (m + n),
                error=tails[r],
            )
            for r in range(1, r_max + 1)
        ]

    def rank_for_keep(self, module: nn.Module, keep: float) -> int | None:
        m, n = self.matrix(module).shape
        r = min(rank_for_keep(m, n, keep), max_useful_rank(m, n))
        return r if r >= 1 else None

    def apply_site(
        self, module: nn.Module, rank: Any, site: LayerSite
    ) -> tuple[nn.Module, dict[str, Any]]:
        return refuse_overflow(self.apply(module, rank), module, site, self.method, rank), {}

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach()

    def reconstructed_weight(self, factorized: nn.Module) -> torch.Tensor:
        return factorized.dense_weight().detach()


class LinearSVD(MatrixSVDFactorizer):
    def unsupported_reason(self, module: nn.Module) -> str | None:
        if max_useful_rank(module.out_features, module.in_features) == 0:
            return (
                f"too small to gain: no rank r gives r(m+n) < mn for a "
                f"{module.out_features}x{module.in_features} matrix"
            )
        return None

    def apply(self, module: nn.Module, rank: int) -> nn.Module:
        return LowRankLinear.from_dense(module, rank)

    def empty(self, module: nn.Module, rank: int) -> nn.Module:
        return LowRankLinear(
            module.in_features,
            module.out_features,
            rank,
            bias=module.bias is not None,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )


class ConvSVD(MatrixSVDFactorizer):
    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            return f"{kind} convolution (groups={module.groups}) is not supported by 'svd' yet"
        m, n = self.matrix(module).shape
        if max_useful_rank(m, n) == 0:
            return f"too small to gain: no rank r gives r(m+n) < mn for a {m}x{n} kernel matrix"
        return None

    def apply(self, module: nn.Module, rank: int) -> nn.Module:
        return LowRankConv.from_dense(module, rank)

    def empty(self, module: nn.Module, rank: int) -> nn.Module:
        return LowRankConv.empty_like(module, rank)


def register_builtin() -> None:
    """Register the built-in factorizers (called on import of tensorslim.model)."""
    register(nn.Linear, "svd", LinearSVD())
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        register(conv, "svd", ConvSVD())
