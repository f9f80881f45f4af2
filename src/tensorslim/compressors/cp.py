"""CP decomposition of a conv kernel (kind "cp"): K[o,i,h,w] = sum_r A[o,r] B[i,r] C[h,r] D[w,r],
built as 1x1 in->R, depthwise kh x 1, depthwise 1 x kw, 1x1 R->out (Lebedev et al., ICLR 2015).

Fitted by CP-ALS (TensorLy `parafac`, torch backend) from a seeded random uniform initialisation,
as in Schuurmans et al. (ICLR 2023). Rank: an integer R; parameters R(out + in + sum k).

Large kernels (`fast`: entries x the rank at keep 0.9 above `CP_FAST_SIZE`, e.g. a 128 x 64 x 64
Conv1d or a 256 x 256 x 3 x 3 Conv2d) take decompose.large's path, since full CP-ALS at every
keep level of such kernels took hours:
- proposals: the error of the sliced CP (`decompose.large.SlicedCP`: the R strongest orthogonal
  terms of the kernel's slices after rotating the other modes to their principal axes), in closed
  form at every rank from the channel Grams. No ALS runs for proposals. It is the error of the
  build's starting point, so it bounds the built error from above.
- build (the chosen rank only): CP-ALS warm-started from that sliced CP (option `init` and `seed`
  do not apply), at most `n_iter_max` sweeps and at most `CP_BUILD_FLOPS` floating-point
  operations (at least one sweep), keeping the best fit met (never worse than the start). The plan
  records the built error, the sweeps run (`iterations`, `max_sweeps`), `converged`, `init`
  ("sliced") and the start's error (`start_rel_error`).

With calibration inputs (objective "feature") the proposals' errors are output errors on those
inputs (compressors._tensor): of the CP-ALS factors, or on a large kernel of the sliced CP (no ALS
per rank); the build there keeps whichever of the sliced start and its ALS refinement has the
smaller output error (ALS fits the kernel, not the data), so the proposal's error bounds the built
layer's from above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tensorslim.compressors._factors import OptionSpec, check_options
from tensorslim.compressors._tensor import (
    BELOW_DENSE,
    Rank,
    TensorConvCompressor,
    analysis,
    kernel_grams,
    normalize_rank,
    relative_output_error,
)
from tensorslim.core.compressor import register_compressor
from tensorslim.core.target import LayerTarget
from tensorslim.decompose import large
from tensorslim.decompose.tensor import (
    Decomposition,
    _check_kernel,
    balance_cp,
    cp,
    cp_params,
    cp_rank_for_keep,
    cp_reconstruct,
)
from tensorslim.errors import is_int, short_repr
from tensorslim.layers.tensor_conv import CPConv

# Kernels whose entries x CP rank at keep 0.9 exceed this take the fast path (see the docstring):
# a 128 x 128 x 3 x 3 kernel (7.5e7) keeps the exact path, 256 x 256 x 3 x 3 (6e8) does not.
CP_FAST_SIZE = 1e8
# Floating-point operations the build's CP-ALS may spend on one large kernel (about 2 sweeps of a
# 1024 x 256 x 64 kernel at rank 4400).
CP_BUILD_FLOPS = 6e11


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

    def fast(self, shape: tuple[int, ...]) -> bool:
        """True for a kernel whose entries x rank at keep 0.9 exceed CP_FAST_SIZE."""
        return math.prod(shape) * cp_rank_for_keep(shape, 0.9) > CP_FAST_SIZE

    def sliced(self, kernel: torch.Tensor) -> large.SlicedCP:
        """The kernel's sliced CP (cached by content)."""
        grams = kernel_grams(kernel)
        return analysis(kernel, "sliced_cp", lambda k: large.SlicedCP(k, grams))

    def errors(
        self, target: LayerTarget, grid: list[dict[str, Any]], objective: str
    ) -> list[float]:
        """CP-ALS errors of every grid rank (objective "weight"); on a large kernel the sliced
        CP's errors (closed form, no ALS)."""
        kernel = target.handler.kernel(target.module)
        if objective != "weight" or not self.fast(tuple(kernel.shape)):
            return super().errors(target, grid, objective)
        sliced = self.sliced(kernel)
        return [sliced.errors(int(normalize_rank(p["rank"]))) for p in grid]

    def weight_error(self, kernel: torch.Tensor, rank: Rank) -> float:
        if self.fast(tuple(kernel.shape)):
            return self.sliced(kernel).errors(int(rank))
        return super().weight_error(kernel, rank)

    def _decompose(self, kernel: torch.Tensor, rank: Rank) -> Decomposition:
        o = self.options
        if self.fast(tuple(kernel.shape)):
            return self._decompose_large(kernel, int(rank))
        return cp(
            kernel, int(rank), n_iter_max=o.n_iter_max, tol=o.tol, init=o.init, seed=o.seed,
            ridge=o.ridge,
        )

    def _decompose_large(self, kernel: torch.Tensor, rank: int) -> Decomposition:
        """CP-ALS warm-started from the sliced CP, within CP_BUILD_FLOPS (see the docstring)."""
        o = self.options
        k = _check_kernel(kernel)
        scale = float(torch.linalg.norm(k)) or 1.0
        start = self.sliced(kernel).factors(rank)
        start[0] = start[0] / scale
        sweeps = large.als_sweeps(tuple(k.shape), rank, o.n_iter_max, CP_BUILD_FLOPS)
        factors, errors, start_err, converged = large.cp_als(
            k / scale, start, n_iter_max=sweeps, tol=o.tol, ridge=o.ridge
        )
        factors = [f.to(k.dtype) for f in factors]
        factors[0] = factors[0] * scale
        factors = balance_cp(factors)
        rel = large.cp_rel_error(k, factors)
        info = {"init": "sliced", "start_rel_error": round(start_err, 6), "max_sweeps": sweeps}
        return Decomposition("cp", rank, factors, rel, len(errors), converged, info)

    def _reconstruct(self, factors: list[torch.Tensor]) -> torch.Tensor:
        if len(factors) and math.prod(f.shape[0] for f in factors) * factors[0].shape[1] > 1 << 24:
            shape = tuple(f.shape[0] for f in factors)
            return large.cp_matrix(factors, factors[0].dtype).reshape(shape)
        return cp_reconstruct(factors)

    # -- calibration inputs (objective "feature") ---------------------------------------------
    def proposal_kernel(self, kernel: torch.Tensor, rank: Rank) -> torch.Tensor:
        """The CP-ALS reconstruction; on a large kernel the sliced CP's (closed form)."""
        if not self.fast(tuple(kernel.shape)):
            return super().proposal_kernel(kernel, rank)
        factors = self.sliced(kernel).factors(int(rank))
        return large.cp_matrix(factors).reshape(kernel.shape)

    def decompose_data(self, kernel: torch.Tensor, rank: Rank, st: Any) -> Decomposition:
        """On a large kernel, the sliced start or its ALS refinement, whichever has the smaller
        output error on the calibration inputs (see the module docstring)."""
        dec = self.decompose(kernel, rank)
        if not self.fast(tuple(kernel.shape)):
            return dec
        start = self.sliced(kernel).factors(int(rank))
        k_start = large.cp_matrix(start).reshape(kernel.shape)
        k_als = large.cp_matrix(dec.factors).reshape(kernel.shape)
        if relative_output_error(kernel, k_start, st) >= relative_output_error(kernel, k_als, st):
            return dec
        k = _check_kernel(kernel)
        factors = balance_cp([f.to(k.dtype) for f in start])
        info = {**dec.info, "init": "sliced", "als": "not kept: more output error than its start"}
        rel = large.cp_rel_error(k, factors)
        return Decomposition("cp", int(rank), factors, rel, 0, None, info)
