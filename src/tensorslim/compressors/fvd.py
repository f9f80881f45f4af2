"""Kind "fvd": element-wise Fisher-weighted low-rank approximation (Hua et al. 2022,
"Numerical optimizations for weighted low-rank estimation on language model", EMNLP,
arXiv 2211.09718).

min_{A (m x r), B (r x n)} sum_ij I_ij (W - A B)_ij^2 with the Fisher diagonal I (m x n) has no
closed form: a solver ("als", "em" or "adam", decompose.weighted.fvd) starts from the FWSVD factors
and never ends above them. FVD has no nested solution, so the allocator's errors are those of the
FWSVD start (an upper bound of what the solver reaches). Objective "fisher" by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tensorslim.compressors._factors import (
    EPS,
    Factors,
    OptionSpec,
    check_options,
    fisher_of,
    nested_fwsvd,
)
from tensorslim.compressors.lowrank import DataAwareLowRank
from tensorslim.core.compressor import register_compressor
from tensorslim.decompose import DEFAULT_SOLVER, SOLVERS, fvd

_SPECS = {
    "eps": EPS,
    "solver": OptionSpec(str, choices=SOLVERS),
    "iters": OptionSpec(int, 1),
    "tol": OptionSpec(float, 0.0),
    "lr": OptionSpec(float, 0.0, strict=True),
    "time_limit": OptionSpec(float, 0.0, strict=True, optional=True),
}


@register_compressor("fvd")
class FVD(DataAwareLowRank):
    """Element-wise Fisher-weighted factors A (m x r), B (r x n) of W (m x n) by an iterative
    solver from the FWSVD start; needs the Fisher estimate (calibration=batches and loss=fn)."""

    needs = frozenset({"fisher"})
    objective = "fisher"

    @dataclass(frozen=True)
    class Options:
        """eps: FWSVD start's row-importance floor; solver: "als", "em" or "adam"; iters: maximum
        iterations (Adam: steps); tol: stop when the objective improves by less than this
        (relative); lr: Adam's step relative to the factors' RMS; time_limit: seconds per matrix
        (None: no limit)."""

        eps: float = 1e-6
        solver: str = DEFAULT_SOLVER
        iters: int = 30
        tol: float = 1e-4
        lr: float = 1e-2
        time_limit: float | None = None

        def __post_init__(self) -> None:
            check_options(self, _SPECS)

    def nested(self, w: torch.Tensor, st: Any, k: int) -> Factors:
        """The FWSVD start (FVD has no nested solution)."""
        return nested_fwsvd(w, st, k, self.options.eps)

    def solve(self, w: torch.Tensor, st: Any, rank: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        o = self.options
        res = fvd(
            w.detach().to(torch.float64),
            fisher_of(st, w.shape),
            rank,
            solver=o.solver,
            iters=o.iters,
            tol=o.tol,
            lr=o.lr,
            time_limit=o.time_limit,
            init=self.nested(w, st, rank),
        )
        facts = {
            "fvd": {
                "solver": res.solver,
                "iterations": res.iterations,
                "converged": res.converged,
                "start": res.history[0],
                "objective": res.objective,
                "seconds": round(res.seconds[-1], 4),
            }
        }
        return res.a.to(torch.float64), res.b.to(torch.float64), facts
