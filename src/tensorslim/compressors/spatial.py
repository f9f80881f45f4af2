"""Spatial SVD of a Conv2d kernel (kind "spatial", method name "spatial_svd"; Jaderberg, Vedaldi &
Zisserman, BMVC 2014, scheme 2; closed form of Tai et al., ICLR 2016): the matrix
M[(i,h),(o,w)] = K[o,i,h,w] truncated to rank r, built as a kh x 1 conv in->r then a 1 x kw conv
r->out. Rank: an integer r; parameters r(in kh + out kw).

Every rank's error is exact from M's singular values (Eckart-Young), so the grid lists every useful
rank. On a Conv1d (one spatial axis) the spatial SVD is the matrix SVD: it falls back to "lowrank".
Large kernels (`_tensor.is_large`) get M's singular values and its SVD QR-first with the small
factorization on one thread (decompose.large), cached per kernel: the same values, in seconds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tensorslim.compressors._tensor import (
    BELOW_DENSE,
    FALLBACK_KIND,
    Rank,
    TensorConvCompressor,
    analysis,
    is_conv,
    normalize_rank,
)
from tensorslim.core.compressor import register_compressor
from tensorslim.core.target import LayerTarget
from tensorslim.decompose import large
from tensorslim.decompose.tensor import (
    Decomposition,
    _check_kernel,
    _rel_error,
    spatial_output_errors,
    spatial_svd,
    spatial_svd_errors,
    spatial_svd_params,
    spatial_svd_rank_for_keep,
    spatial_svd_reconstruct,
)
from tensorslim.errors import is_int, short_repr
from tensorslim.layers.tensor_conv import SpatialSVDConv


@register_compressor("spatial", method="spatial_svd")
class SpatialCompressor(TensorConvCompressor):
    """Spatial SVD (kh x 1 then 1 x kw) at rank r; every useful rank with its exact error."""

    layer_cls = SpatialSVDConv
    closed_output = True

    def fallback(self, handler: Any, module: nn.Module) -> tuple[str, str] | None:
        if is_conv(handler, module) and handler.kernel(module).ndim == 3:
            return (
                FALLBACK_KIND,
                f"Conv1d has one spatial axis: {self.method!r} is the matrix SVD here",
            )
        return super().fallback(handler, module)

    def supports(self, handler: Any, module: nn.Module) -> str | None:
        if is_conv(handler, module) and handler.kernel(module).ndim != 4:
            return (
                f"{self.method!r} needs a kernel with two spatial axes (Conv2d); on a "
                f"{type(module).__name__} it is the matrix SVD: use method 'svd'"
            )
        return super().supports(handler, module)

    def _params(self, shape: tuple[int, ...], rank: Rank) -> int:
        return spatial_svd_params(shape, int(rank))

    def _rank_for_keep(self, shape: tuple[int, ...], keep: float, extra: int) -> Rank | None:
        return spatial_svd_rank_for_keep(shape, keep, extra) or None

    def ranks(self, shape: tuple[int, ...], extra: int = 0, data: bool = False) -> list[Rank]:
        """Every rank below the dense cost (1 .. the largest); output errors of all of them come
        from one contraction of the Gram (`spatial_output_errors`)."""
        top = self.rank_for_keep(shape, BELOW_DENSE, extra)
        return list(range(1, (top or 0) + 1))

    def check_rank(self, shape: tuple[int, ...], rank: Any) -> str | None:
        """An integer in [1, min(in kh, out kw)], the rank of M[(i, h), (o, w)] = K[o, i, h, w]."""
        if len(shape) != 4:
            return f"{self.method!r} needs a kernel with two spatial axes (Conv2d)"
        out, inp, kh, kw = shape
        full = min(inp * kh, out * kw)
        if is_int(rank) and 1 <= rank <= full:
            return None
        return (
            f"rank must be an integer in [1, {full}] (the full rank of the spatial-SVD matrix, "
            f"(in*kh) x (out*kw) = {inp * kh}x{out * kw}); got {short_repr(rank)}"
        )

    def _decompose(self, kernel: torch.Tensor, rank: Rank) -> Decomposition:
        if not self.fast(tuple(kernel.shape)) or self.check_rank(tuple(kernel.shape), rank):
            return spatial_svd(kernel, int(rank))
        u, s, vh = analysis(kernel, "spatial_svd", lambda k: large.thin_svd(_matrix(k)))
        k = _check_kernel(kernel)
        out, inp, kh, kw = k.shape
        r = int(rank)
        v = (u[:, :r] * s[:r].sqrt()).to(k.dtype)  # (in*kh, r)
        h = (s[:r].sqrt()[:, None] * vh[:r]).to(k.dtype)  # (r, out*kw)
        vertical = v.reshape(inp, kh, r).permute(2, 0, 1).unsqueeze(-1).contiguous()
        horizontal = h.reshape(r, out, kw).permute(1, 0, 2).unsqueeze(2).contiguous()
        s2 = s**2
        tail = float(s2[r:].sum() / s2.sum()) if float(s.sum()) > 0 else 0.0
        rel = _rel_error(k, spatial_svd_reconstruct(vertical, horizontal))
        return Decomposition("spatial_svd", r, [vertical, horizontal], rel, info={"tail": tail})

    def _reconstruct(self, factors: list[torch.Tensor]) -> torch.Tensor:
        return spatial_svd_reconstruct(*factors)

    def errors(
        self, target: LayerTarget, grid: list[dict[str, Any]], objective: str
    ) -> list[float]:
        """Exact errors of every rank from one SVD (objective "weight")."""
        if objective != "weight":
            return super().errors(target, grid, objective)
        errs = self._errors(target.handler.kernel(target.module)).tolist()
        return [errs[normalize_rank(p["rank"])] for p in grid]

    def weight_error(self, kernel: torch.Tensor, rank: Rank) -> float:
        return float(self._errors(kernel)[int(rank)])

    def output_errors(
        self, target: LayerTarget, grid: list[dict[str, Any]], st: Any
    ) -> list[float]:
        """Exact relative output errors of every grid rank on the calibration inputs, from one
        SVD and one contraction of the Gram (decompose.tensor.spatial_output_errors)."""
        kernel = target.handler.kernel(target.module)
        if kernel.ndim != 4:
            return super().output_errors(target, grid, st)
        svd = None
        if self.fast(tuple(kernel.shape)):
            svd = analysis(kernel, "spatial_svd", lambda k: large.thin_svd(_matrix(k)))
        ranks = [int(normalize_rank(p["rank"])) for p in grid]
        return spatial_output_errors(kernel, st.gram, ranks, svd)

    def _errors(self, kernel: torch.Tensor) -> torch.Tensor:
        if not self.fast(tuple(kernel.shape)) or kernel.ndim != 4:
            return spatial_svd_errors(kernel)
        return analysis(kernel, "spatial_errors", lambda k: tail_energy(_matrix(k)))


def _matrix(k: torch.Tensor) -> torch.Tensor:
    """M[(i, h), (o, w)] = K[o, i, h, w] (float64)."""
    out, inp, kh, kw = k.shape
    return k.permute(1, 2, 0, 3).reshape(inp * kh, out * kw).to(torch.float64)


def tail_energy(m: torch.Tensor) -> torch.Tensor:
    """Relative squared error of the truncated SVD of `m` at every rank 0..full."""
    s2 = large.singular_values(m) ** 2
    total = s2.sum()
    if total == 0:
        return torch.zeros(s2.numel() + 1, dtype=torch.float64)
    tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])
    return torch.cat([tail, torch.zeros(1, dtype=torch.float64)]) / total
