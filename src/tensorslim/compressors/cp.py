"""CP decomposition of a conv kernel (kind "cp"): K[o,i,h,w] = sum_r A[o,r] B[i,r] C[h,r] D[w,r],
built as 1x1 in->R, depthwise kh x 1, depthwise 1 x kw, 1x1 R->out (Lebedev et al., ICLR 2015).

Fitted by CP-ALS (TensorLy `parafac`, torch backend) from a seeded random uniform initialisation,
as in Schuurmans et al. (ICLR 2023). Rank: an integer R; parameters R(out + in + sum k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tensorslim.compressors._factors import OptionSpec, check_options
from tensorslim.compressors._tensor import BELOW_DENSE, Rank, TensorConvCompressor
from tensorslim.core.compressor import register_compressor
from tensorslim.decompose.tensor import (
    Decomposition,
    cp,
    cp_params,
    cp_rank_for_keep,
    cp_reconstruct,
)
from tensorslim.errors import is_int, short_repr
from tensorslim.layers.tensor_conv import CPConv


@dataclass(frozen=True)
class CPOptions:
    """CP-ALS settings (see decompose.tensor.cp): at most `n_iter_max` sweeps, stop when the
    relative error changes by less than `tol`; `init` "random" (seeded by `seed`) or "svd";
    `ridge` regularises the normal equations."""

    n_iter_max: int = 60
    tol: float = 1e-5
    init: str = "random"
    seed: int = 0
    ridge: float = 1e-6

    def __post_init__(self) -> None:
        check_options(self, _SPECS)


_SPECS = {
    "n_iter_max": OptionSpec(int, 1),
    "tol": OptionSpec(float, 0),
    "init": OptionSpec(str, choices=("random", "svd")),
    "seed": OptionSpec(int),
    "ridge": OptionSpec(float, 0),
}


@register_compressor("cp")
class CPCompressor(TensorConvCompressor):
    """CP-ALS of the kernel at rank R (an integer)."""

    Options = CPOptions
    layer_cls = CPConv

    def _params(self, shape: tuple[int, ...], rank: Rank) -> int:
        return cp_params(shape, int(rank))

    def _rank_for_keep(self, shape: tuple[int, ...], keep: float, extra: int) -> Rank | None:
        return cp_rank_for_keep(shape, keep, extra) or None

    def check_rank(self, shape: tuple[int, ...], rank: Any) -> str | None:
        """An integer R in [1, the largest R whose R(out + in + sum k) parameters stay below the
        dense kernel's] (the same bound as the grid and `supports`)."""
        top = self.rank_for_keep(shape, BELOW_DENSE) or 0
        if is_int(rank) and 1 <= rank <= top:
            return None
        sizes = "out + in + kh + kw" if len(shape) == 4 else "out + in + k"
        return (
            f"rank must be an integer in [1, {top}] (the largest CP rank R whose R({sizes}) "
            f"parameters stay below the dense kernel's {math.prod(shape)}); "
            f"got {short_repr(rank)}"
        )

    def _decompose(self, kernel: torch.Tensor, rank: Rank) -> Decomposition:
        o = self.options
        return cp(
            kernel, int(rank), n_iter_max=o.n_iter_max, tol=o.tol, init=o.init, seed=o.seed,
            ridge=o.ridge,
        )

    def _reconstruct(self, factors: list[torch.Tensor]) -> torch.Tensor:
        return cp_reconstruct(factors)
