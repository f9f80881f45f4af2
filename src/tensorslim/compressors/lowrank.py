"""Kind "lowrank" (method "svd"): W (m x n) ~= A (m x r) @ B (r x n) by the truncated SVD.

By Eckart-Young the truncated SVD is the best rank-r approximation in the Frobenius norm, and its
relative squared error is the tail energy of the singular values. A rank-r component stores
r(m + n) numbers instead of mn, and multiplies in r(m + n) multiply-adds per input vector.

`DataAwareLowRank` is the shared base of the data-aware kinds (fwsvd, fvd, whitened): the same
rank, cost and operator, with factors computed from calibration statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tensorslim.compressors._factors import (
    Factors,
    OptionSpec,
    anchored_stats,
    check_options,
    is_sequential,
    layer_errors,
    matrix_view,
    nested_svd,
    objective_errors,
    objective_of,
    output_facts,
    refit_outer,
    refuse_overflow,
    require_stats,
    risk_facts,
    sequential_facts,
)
from tensorslim.core.compressor import (
    Compressor,
    Cost,
    dtype_bits,
    register_compressor,
    target_weight,
)
from tensorslim.core.objective import OBJECTIVE_NEEDS
from tensorslim.core.target import MatrixTarget
from tensorslim.decompose import max_useful_rank, singular_values, tail_energy, truncated_svd
from tensorslim.decompose.svd import cast_factors
from tensorslim.errors import is_int, short_repr
from tensorslim.layers import LowRankLinear

# The `svd` option: "auto" (randomized on large matrices at small ranks, see
# decompose.svd.use_randomized), "full" (exact LAPACK SVD; "exact" is accepted for it) or
# "randomized" (Halko, Martinsson & Tropp 2011).
SVD_METHODS = ("auto", "full", "randomized")
_TRUNCATED_SVD = {"auto": "auto", "full": "exact", "randomized": "randomized"}


def int_rank_problem(rank: Any, full: int) -> str | None:
    """None if `rank` is an integer (not a bool) in [1, full], else what is accepted."""
    if is_int(rank) and 1 <= rank <= full:
        return None
    return f"rank must be an integer in [1, {full}] (the full rank); got {short_repr(rank)}"


def too_small_reason(handler: Any, module: nn.Module) -> str | None:
    """None if some matrix of the layer has a useful rank (r(m + n) < mn), else why not."""
    shapes = [tuple(w.shape) for w in handler.matrices(module).values()]
    if not shapes or any(max_useful_rank(m, n) > 0 for m, n in shapes):
        return None
    kernel = handler.kernel(module)
    what = "kernel matrix" if kernel is not None and kernel.ndim > 2 else "matrix"
    dims = list(dict.fromkeys(f"{m}x{n}" for m, n in shapes))
    if len(dims) == 1:
        where = f"a {dims[0]} {what}"
    else:
        where = f"its {', '.join(dims)} {what.replace('matrix', 'matrices')}"
    return f"too small to gain: no rank r gives r(m+n) < mn for {where}"


def _rank(params: Mapping[str, Any]) -> int:
    return int(params["rank"])


@register_compressor("lowrank", method="svd")
class LowRank(Compressor):
    """Truncated SVD: component params {"rank": r}, r in [1, min(m, n)]; operator
    LowRankLinear(in=n, out=m, rank=r, bias=False) holding A = U_r S_r (m x r), B = V_r^T (r x n)."""

    @dataclass(frozen=True)
    class Options:
        """svd: how the truncated SVD is computed, one of SVD_METHODS."""

        svd: str = "auto"

        def __post_init__(self) -> None:
            if self.svd == "exact":
                object.__setattr__(self, "svd", "full")
            check_options(self, {"svd": OptionSpec(str, choices=SVD_METHODS)})

    # -- what it accepts ----------------------------------------------------------------------
    def supports(self, handler: Any, module: nn.Module) -> str | None:
        return too_small_reason(handler, module)

    def check(self, target: MatrixTarget, params: Mapping[str, Any]) -> str | None:
        unknown = [k for k in params if k != "rank"]
        if unknown:
            return f"unknown parameter {short_repr(unknown[0])} for {self.kind!r}; it takes: rank"
        return int_rank_problem(params.get("rank"), min(target.shape))

    # -- what it costs and loses --------------------------------------------------------------
    def cost(self, target: MatrixTarget, params: Mapping[str, Any]) -> Cost:
        m, n = target.shape
        size = _rank(params) * (m + n)
        return Cost(size, size * dtype_bits(target.dtype), target.flops(size))

    def grid(self, target: MatrixTarget) -> list[dict[str, Any]]:
        """Every rank r with r(m + n) < mn, rising."""
        return [{"rank": r} for r in range(1, max_useful_rank(*target.shape) + 1)]

    def too_small(self, target: MatrixTarget) -> str | None:
        if max_useful_rank(*target.shape) > 0:
            return None
        return "too small to gain: no rank r gives r(m+n) < mn"

    def project(self, weight: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """The best rank-r matrix to `weight` (m x n, or a kernel viewed as (m, rest)) in the
        Frobenius norm, same shape and dtype (computed in float64)."""
        w = matrix_view(weight).detach().to(torch.float64)
        a, b = truncated_svd(w, _rank(params), method=self._svd_method())
        return (a @ b).to(weight.dtype).reshape(weight.shape)

    def errors(
        self, target: MatrixTarget, grid: list[dict[str, Any]], objective: str
    ) -> list[float]:
        """The error of each rank of `grid` from one nested factorization (no projection)."""
        if not grid:
            return []
        objective = objective_of(target, objective, self.objective)
        ranks = [_rank(p) for p in grid]
        w = target_weight(target)
        with layer_errors(self.method, target):
            curve = self._curve(target, w, max(ranks), objective)
        return [curve[r] for r in ranks]

    def _curve(self, target: MatrixTarget, w: torch.Tensor, k: int, objective: str) -> list[float]:
        """Error of every truncation r = 0..k (or more) of the SVD under `objective`."""
        if objective == "weight":  # Eckart-Young: the tail energy of the singular values
            return tail_energy(singular_values(w)).tolist()
        st = require_stats(target.stats, self.method, OBJECTIVE_NEEDS[objective], target.label)
        a, b = nested_svd(w, st, k)
        return objective_errors(objective, w, a, b, st)

    # -- building -----------------------------------------------------------------------------
    def build(
        self, target: MatrixTarget, params: Mapping[str, Any]
    ) -> tuple[nn.Module, dict[str, Any]]:
        r = _rank(params)
        w = target_weight(target)
        st = target.stats
        with layer_errors(self.method, target):
            if not is_sequential(st):
                a, b = truncated_svd(w, r, method=self._svd_method())  # cast to W's dtype
                return refuse_overflow(LowRankLinear.from_factors(a, b, None), target, self.method, r), {}
            # sequential calibration: the SVD's input-side factor, the output-side factor refit
            # to the original outputs (compressors/_factors.refit_outer)
            a, b = truncated_svd(w.detach().to(torch.float64), r, method=self._svd_method())
            a = refit_outer(w, anchored_stats(st), b)
            facts = sequential_facts(w, st, a @ b)
        op = LowRankLinear.from_factors(*cast_factors(a, b, w.dtype), None)
        return refuse_overflow(op, target, self.method, r), facts

    def empty(self, target: MatrixTarget, params: Mapping[str, Any]) -> nn.Module:
        m, n = target.shape
        return LowRankLinear(
            n, m, _rank(params), bias=False, device=target.device, dtype=target.dtype
        )

    def _svd_method(self) -> str:
        return _TRUNCATED_SVD[getattr(self.options, "svd", "auto")]


class DataAwareLowRank(LowRank):
    """Base of the data-aware low-rank kinds (not registered): rank, cost, grid and operator as
    LowRank; factors, errors and facts from the target's calibration statistics (`needs`).
    Subclasses implement `nested` and may override `solve`.

    `project(weight, params)` has no statistics: it is the plain SVD projection; `project_with`
    takes them and gives the weighted solution."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def supports(self, handler: Any, module: nn.Module) -> str | None:
        why = super().supports(handler, module)
        if why is None and "gram" in self.needs:
            reason = handler.calibration_reason(module)
            if reason is not None:
                return (
                    f"{self.method!r} cannot collect inputs of this {type(module).__name__}: "
                    f"{reason}"
                )
        return why

    def nested(self, w: torch.Tensor, st: Any, k: int) -> Factors:
        """Float64 nested factors A (m x k), B (k x n): A[:, :r] @ B[:r] is this kind's rank-r
        answer (or, for kinds without a nested solution, the start of its solver)."""
        raise NotImplementedError

    def solve(self, w: torch.Tensor, st: Any, rank: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Float64 rank-`rank` factors A (m x r), B (r x n) of W (m x n) and facts for the plan."""
        a, b = self.nested(w, st, rank)
        return a, b, {}

    def project_with(
        self, weight: torch.Tensor, params: Mapping[str, Any], stats: Any
    ) -> torch.Tensor:
        """The weighted rank-r solution for `weight` (m x n) given its calibration statistics
        (LayerStats), same shape and dtype."""
        st = require_stats(stats, self.method, self.needs)
        w = matrix_view(weight)
        a, b, _ = self.solve(w, st, _rank(params))
        return (a @ b).to(weight.dtype).reshape(weight.shape)

    def _curve(self, target: MatrixTarget, w: torch.Tensor, k: int, objective: str) -> list[float]:
        need = self.needs | OBJECTIVE_NEEDS[objective]
        st = require_stats(target.stats, self.method, need, target.label)
        a, b = self.nested(w, st, k)
        return objective_errors(objective, w, a, b, st)

    def build(
        self, target: MatrixTarget, params: Mapping[str, Any]
    ) -> tuple[nn.Module, dict[str, Any]]:
        r = _rank(params)
        w = target_weight(target)
        with layer_errors(self.method, target):
            st = require_stats(target.stats, self.method, self.needs, target.label)
            damp = getattr(self.options, "damp", 0.0)
            if is_sequential(st):
                # sequential calibration: this kind's input-side factor (a whitened one under
                # the compressed model's inputs), the output-side factor refit to the original
                # outputs (compressors/_factors.refit_outer)
                anchored = anchored_stats(st)
                a, b, facts = self.solve(w, anchored, r)
                a = refit_outer(w, anchored, b, damp)
            else:
                a, b, facts = self.solve(w, st, r)
            w_hat = a @ b
            facts.update(risk_facts(w, st, r, w_hat, getattr(self.options, "eps", 1e-6)))
            facts.update(output_facts(w, st, w_hat))
        op = LowRankLinear.from_factors(*cast_factors(a, b, w.dtype), None)
        return refuse_overflow(op, target, self.method, r), facts
