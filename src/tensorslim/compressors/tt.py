"""Tensor-train decomposition of a conv kernel (kind "tt"; TT-SVD of Oseledets 2011, used for
layers by Novikov et al., NeurIPS 2015), on the kernel ordered (in, kh, kw, out) as in Schuurmans
et al. (ICLR 2023): cores in x r1, r1 x kh x r2, r2 x kw x r3, r3 x out, built as 1x1 in->r1,
kh x 1 r1->r2, 1 x kw r2->r3, 1x1 r3->out (Conv1d: 1x1, k, 1x1).

TT-SVD via TensorLy's `tensor_train`. Rank: [r1, r2, r3] for Conv2d, [r1, r2] for Conv1d.

Large kernels (`_tensor.is_large`) take decompose.large's TT-SVD: the first step from the
eigenvectors of the input-channel Gram (computed once per kernel and shared with CP and Tucker-2),
the others QR-first; their errors at every grid rank are exact and come from nested truncations
(`decompose.large.tt_errors`), not one TT-SVD per rank.
"""

from __future__ import annotations

from typing import Any

import torch

from tensorslim.compressors._tensor import (
    Rank,
    TensorConvCompressor,
    ints_within,
    kernel_grams,
    normalize_rank,
    tt_order,
)
from tensorslim.core.compressor import register_compressor
from tensorslim.core.target import LayerTarget
from tensorslim.decompose import large
from tensorslim.decompose.tensor import (
    Decomposition,
    _check_kernel,
    _rel_error,
    tt,
    tt_feasible,
    tt_full_ranks,
    tt_params,
    tt_ranks_for_keep,
    tt_reconstruct,
)
from tensorslim.errors import short_repr
from tensorslim.layers.tensor_conv import TTConv


@register_compressor("tt")
class TTCompressor(TensorConvCompressor):
    """TT-SVD of the kernel at bond ranks [r1, r2(, r3)]."""

    layer_cls = TTConv

    def _params(self, shape: tuple[int, ...], rank: Rank) -> int:
        return tt_params(shape, tuple(rank))

    def _rank_for_keep(self, shape: tuple[int, ...], keep: float, extra: int) -> Rank | None:
        return tt_ranks_for_keep(shape, keep, extra)

    def check_rank(self, shape: tuple[int, ...], rank: Any) -> str | None:
        """One integer per inner bond of the (in, *k, out) train, r_j in [1, full_j]
        (`tt_full_ranks`), that TT-SVD can produce (`tt_feasible`)."""
        full = tt_full_ranks(shape)
        n = len(full)
        if not ints_within(rank, full):
            names = ", ".join(f"r{j + 1}" for j in range(n))
            bounds = ", ".join(f"r{j + 1} in [1, {f}]" for j, f in enumerate(full))
            return (
                f"rank must be {n} ranks ({names}: the TT bond ranks of the kernel ordered "
                f"{tt_order(n)}), integers with {bounds} (the full TT ranks); "
                f"got {short_repr(rank)}"
            )
        reachable = tt_feasible(shape, tuple(rank))
        if reachable != tuple(rank):
            return (
                f"TT ranks {short_repr(list(rank))} are not reachable by TT-SVD for kernel "
                f"{list(shape)} (need r_j <= r_(j-1) n_j and r_j <= n_(j+1) r_(j+1), n the sizes "
                f"of {tt_order(n)}); the largest reachable ranks within them are {list(reachable)}"
            )
        return None

    def _decompose(self, kernel: torch.Tensor, rank: Rank) -> Decomposition:
        if not self.fast(tuple(kernel.shape)):
            return tt(kernel, tuple(rank))
        k = _check_kernel(kernel)
        cores = large.tt_svd(_ordered(k), tuple(rank), kernel_grams(kernel)[1])
        got = tuple(c.shape[2] for c in cores[:-1])
        return Decomposition("tt", got, cores, _rel_error(k, tt_reconstruct(cores)))

    def errors(
        self, target: LayerTarget, grid: list[dict[str, Any]], objective: str
    ) -> list[float]:
        """Exact TT-SVD errors of every grid rank; on a large kernel from nested truncations
        (decompose.large.tt_errors) rather than one decomposition per rank."""
        kernel = target.handler.kernel(target.module)
        if objective != "weight" or not self.fast(tuple(kernel.shape)) or not grid:
            return super().errors(target, grid, objective)
        ranks = [tuple(normalize_rank(p["rank"])) for p in grid]
        return large.tt_errors(_ordered(_check_kernel(kernel)), ranks, kernel_grams(kernel)[1])

    def weight_error(self, kernel: torch.Tensor, rank: Rank) -> float:
        if not self.fast(tuple(kernel.shape)):
            return super().weight_error(kernel, rank)
        ranks = [tuple(normalize_rank(rank))]
        return large.tt_errors(_ordered(_check_kernel(kernel)), ranks, kernel_grams(kernel)[1])[0]

    def _reconstruct(self, factors: list[torch.Tensor]) -> torch.Tensor:
        return tt_reconstruct(factors)


def _ordered(k: torch.Tensor) -> torch.Tensor:
    """The kernel (out, in, *k) ordered (in, *k, out), as TT-SVD takes it."""
    return k.permute(1, *range(2, k.ndim), 0).contiguous()
