"""Tucker-2 decomposition of a conv kernel (kind "tucker2"; Kim et al., ICLR 2016):
K = G x_0 U_out x_1 U_in with the spatial modes kept at full rank, built as 1x1 in->r_in, a conv
with the dense geometry r_in->r_out, 1x1 r_out->out.

HOOI (De Lathauwer et al. 2000b, TensorLy `partial_tucker`) by default, HOSVD (one SVD per channel
unfolding) with algorithm="hosvd". Rank: [r_out, r_in]. The errors the allocators see are the HOSVD
errors of every grid rank, from one SVD per channel unfolding (an upper bound of the HOOI error
the built layer gets; the plan records the built error).

Large kernels (`_tensor.is_large`) take decompose.large's path: the HOSVD from the eigenvectors of
the two channel Grams (computed once per kernel and shared with CP and TT), and HOOI from it with
each sweep's factors from the Gram of the projected kernel, at most `n_iter_max` sweeps and at
most `HOOI_FLOPS` floating-point operations in all (HOOI's gain over the HOSVD is small: the plan
records the sweeps run, `converged` and `max_sweeps`).

With calibration inputs (compress(..., calibration=batches, objective="feature"): the conv's patch
Gram G = X^T X is attached to the layer) Tucker-2 minimises the layer's output error on those
inputs instead of the kernel error (decompose.tensor.DataTucker2): the input factor U_in from a
data-weighted input-mode Gram (the kernel whitened by the inputs' channel and offset second
moments, as whitened SVD in SVD-LLM, Wang et al. 2024, and the channel scaling of ASVD, Yuan et
al. 2023) or the HOSVD's, whichever fits the data better at each rank pair, then U_out and the core
by least squares on the data (a reduced-rank regression). The proposals' errors are the exact
relative output errors tr(E G E^T) / tr(W G W^T) of the layer that is built (up to a damping of
1e-9 of G's mean diagonal), for every rank pair from two Cholesky factorizations of the rotated
Gram (O(n^3), n = in prod(k)) and one out x out eigendecomposition per rank: no decomposition per
rank, on large kernels too. Never worse in output error than the HOSVD at the same ranks, exact at
full ranks. `algorithm`, `n_iter_max` and `tol` do not apply there; the plan records
`algorithm` "data", the `basis` ("data" or "kernel") and `rel_output_error`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tensorslim.compressors._factors import OptionSpec, anchored_stats, check_options
from tensorslim.compressors._tensor import (
    Rank,
    TensorConvCompressor,
    analysis,
    data_kernel,
    fingerprint,
    ints_within,
    kernel_grams,
    normalize_rank,
)
from tensorslim.core.compressor import register_compressor
from tensorslim.core.target import LayerTarget
from tensorslim.decompose import large
from tensorslim.decompose.tensor import (
    DataTucker2,
    Decomposition,
    _check_kernel,
    _rel_error,
    tucker2,
    tucker2_full_ranks,
    tucker2_params,
    tucker2_ranks_for_keep,
    tucker2_reconstruct,
)
from tensorslim.errors import short_repr
from tensorslim.layers.tensor_conv import Tucker2Conv

ALGORITHMS = ("hooi", "hosvd")
# Floating-point operations HOOI may spend on one large kernel (about 4 sweeps of a 1024 x 256 x 64
# kernel at ranks (573, 143)).
HOOI_FLOPS = 2e11


@dataclass(frozen=True)
class Tucker2Options:
    """`algorithm` "hooi" (at most `n_iter_max` sweeps from the HOSVD, stopping when the error
    changes by less than `tol`) or "hosvd"."""

    algorithm: str = "hooi"
    n_iter_max: int = 50
    tol: float = 1e-6

    def __post_init__(self) -> None:
        check_options(self, _SPECS)


_SPECS = {
    "algorithm": OptionSpec(str, choices=ALGORITHMS),
    "n_iter_max": OptionSpec(int, 1),
    "tol": OptionSpec(float, 0),
}


@register_compressor("tucker2")
class Tucker2Compressor(TensorConvCompressor):
    """Tucker-2 of the kernel at ranks [r_out, r_in]."""

    Options = Tucker2Options
    layer_cls = Tucker2Conv
    closed_output = True
    fits_data = True  # with an input Gram, `build` fits the outputs (DataTucker2)

    def _params(self, shape: tuple[int, ...], rank: Rank) -> int:
        return tucker2_params(shape, tuple(rank))

    def _rank_for_keep(self, shape: tuple[int, ...], keep: float, extra: int) -> Rank | None:
        return tucker2_ranks_for_keep(shape, keep, extra)

    def check_rank(self, shape: tuple[int, ...], rank: Any) -> str | None:
        """2 integers [r_out, r_in], each at most its full rank (`tucker2_full_ranks`)."""
        full = tucker2_full_ranks(shape)
        if ints_within(rank, full):
            return None
        return (
            "rank must be 2 integers (r_out, r_in: the output and input channel ranks) with "
            f"r_out in [1, {full[0]}] and r_in in [1, {full[1]}] (the full ranks); "
            f"got {short_repr(rank)}"
        )

    def _decompose(self, kernel: torch.Tensor, rank: Rank) -> Decomposition:
        o = self.options
        if self.fast(tuple(kernel.shape)):
            return self._decompose_large(kernel, tuple(rank))
        return tucker2(
            kernel, tuple(rank), algorithm=o.algorithm, n_iter_max=o.n_iter_max, tol=o.tol
        )

    def _decompose_large(self, kernel: torch.Tensor, rank: tuple[int, int]) -> Decomposition:
        """HOSVD / HOOI of a large kernel from its cached channel Grams (decompose.large)."""
        o = self.options
        k, grams = _check_kernel(kernel), kernel_grams(kernel)
        r_out, r_in = rank
        info: dict = {"algorithm": o.algorithm}
        if o.algorithm == "hosvd":
            u_out = large.eig_desc(grams[0])[1][:, :r_out].to(k.dtype)
            u_in = large.eig_desc(grams[1])[1][:, :r_in].to(k.dtype)
            core = torch.einsum("oi...,oa,ib->ab...", k, u_out, u_in)
            factors = [core.contiguous(), u_out.contiguous(), u_in.contiguous()]
            iterations, converged = None, None
        else:
            factors, iterations, converged, _ = large.tucker2_hooi(
                k, rank, grams, n_iter_max=o.n_iter_max, tol=o.tol, work=HOOI_FLOPS
            )
            info["max_sweeps"] = large.hooi_sweeps(tuple(k.shape), rank, o.n_iter_max, HOOI_FLOPS)
        rel = _rel_error(k, tucker2_reconstruct(*factors))
        return Decomposition("tucker2", rank, factors, rel, iterations, converged, info)

    def _reconstruct(self, factors: list[torch.Tensor]) -> torch.Tensor:
        return tucker2_reconstruct(*factors)

    def errors(
        self, target: LayerTarget, grid: list[dict[str, Any]], objective: str
    ) -> list[float]:
        """HOSVD errors of every grid rank (objective "weight"), see `hosvd_energy`."""
        if objective != "weight":
            return super().errors(target, grid, objective)
        cum = self._energy(target.handler.kernel(target.module))
        return [_hosvd_error(cum, normalize_rank(p["rank"])) for p in grid]

    def weight_error(self, kernel: torch.Tensor, rank: Rank) -> float:
        return _hosvd_error(self._energy(kernel), normalize_rank(rank))

    # -- data-aware (calibration inputs) ------------------------------------------------------
    def data_fit(self, kernel: torch.Tensor, st: Any) -> DataTucker2:
        """The data-aware Tucker-2 of `kernel` on the statistics `st` (cached in them for this
        compress call; sequential statistics fit W* on the compressed model's inputs)."""
        key = ("tucker2_data", fingerprint(kernel), getattr(st, "cross", None) is not None)
        fit = st.cache.get(key)
        if fit is None:
            fit_st = anchored_stats(st)  # sequential statistics: anchored; others as they are
            target = data_kernel(kernel, fit_st)
            in_gram = None
            if target is kernel and self.fast(tuple(kernel.shape)):
                in_gram = kernel_grams(kernel)[1]
            fit = DataTucker2(target, fit_st.gram, in_gram=in_gram)
            st.cache[key] = fit
        return fit

    def output_errors(
        self, target: LayerTarget, grid: list[dict[str, Any]], st: Any
    ) -> list[float]:
        """Relative output errors of the data-aware Tucker-2 at every grid rank, closed form."""
        fit = self.data_fit(target.handler.kernel(target.module), st)
        ranks = [tuple(normalize_rank(p["rank"])) for p in grid]
        return [err for err, _ in fit.errors(ranks)]

    def decompose_data(self, kernel: torch.Tensor, rank: Rank, st: Any) -> Decomposition:
        return self.data_fit(kernel, st).decompose(tuple(normalize_rank(rank)))

    def _energy(self, kernel: torch.Tensor) -> torch.Tensor:
        if self.fast(tuple(kernel.shape)):
            grams = kernel_grams(kernel)
            return analysis(kernel, "hosvd_energy", lambda k: large.hosvd_energy(k, grams))
        return hosvd_energy(kernel)


def hosvd_energy(kernel: torch.Tensor) -> torch.Tensor:
    """E (r_out_max, r_in_max): E[a-1, b-1] is the fraction of ||K||^2 the HOSVD keeps at ranks
    (a, b). With orthonormal U_out, U_in (leading left singular vectors of the channel
    unfoldings) the kept energy is ||K x_0 U_out^T x_1 U_in^T||^2; prefix sums of the projections
    onto all leading vectors at once give every rank pair from one SVD per unfolding."""
    w = kernel.detach().to("cpu", torch.float64)
    u_out = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)[0]
    u_in = torch.linalg.svd(w.transpose(0, 1).reshape(w.shape[1], -1), full_matrices=False)[0]
    total = float((w**2).sum()) or 1.0
    proj = torch.einsum("oi...,oa,ib->ab...", w, u_out, u_in)
    energy = (proj**2).reshape(proj.shape[0], proj.shape[1], -1).sum(-1)
    return energy.cumsum(0).cumsum(1) / total


def _hosvd_error(cum: torch.Tensor, rank: Rank) -> float:
    r_out, r_in = rank
    return max(0.0, 1.0 - float(cum[r_out - 1, r_in - 1]))
