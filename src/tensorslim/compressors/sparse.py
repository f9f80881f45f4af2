"""Kind "sparse": a weight with few nonzeros (pruning), as a C step of the learning-compression
framework (Carreira-Perpinan & Idelbayev 2018, "'Learning-compression' algorithms for neural net
pruning"; Idelbayev & Carreira-Perpinan 2021, "An empirical comparison of quantization, pruning
and low-rank neural network compression using the LC toolkit").

- l0-constrained (option penalty="l0", the default): params {"keep": f} (fraction of the
  matrix's entries kept, 0 < f <= 1; kappa = round(f * size), at least 1) or {"nonzeros": kappa}.
  min ||W - W_hat||^2 s.t. ||W_hat||_0 <= kappa is solved exactly by keeping the kappa largest
  |w| (any other support loses more of ||W||^2).
- l1-penalised (option penalty="l1"): params {"alpha": a >= 0}. min a ||W_hat||_1 +
  1/2 ||W - W_hat||^2 is solved exactly by soft thresholding, sign(w) max(|w| - a, 0) (the prox
  of the l1 norm; an LC C step with penalty a ||.||_1 and weight mu passes alpha = a / mu). The
  number of nonzeros it leaves depends on the weights, so an l1 component is a projection only:
  to build or store it, give the count it left as {"nonzeros": kappa} (see `l1_nonzeros`).

Storage ("bits"): kappa values at the weight's dtype plus kappa positions at
ceil(log2(m * n)) bits each (absolute flat positions, bit-packed: layers.sparse.SparseOp).
Parameters ("params"): kappa, the nonzero values (positions are counted in bits only), so
compress(keep, method="sparse") keeps that fraction of the weights. FLOPs: 2 * kappa per input
vector (SparseOp's gather + index_add on Linear; a convolution rebuilds its dense kernel).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorslim.compressors._factors import (
    OptionSpec,
    check_options,
    layer_errors,
    matrix_view,
)
from tensorslim.core.compressor import (
    Compressor,
    Cost,
    dtype_bits,
    register_compressor,
    target_stats,
    target_weight,
)
from tensorslim.core.objective import objective_error
from tensorslim.core.target import MatrixTarget
from tensorslim.errors import NonFiniteWeightError, TensorSlimError, is_int, short_repr
from tensorslim.layers.sparse import SparseOp, index_bits

PENALTIES = ("l0", "l1")
# Fractions of the entries that compress proposes keeping (each layer gets the distinct counts
# below its size).
KEEP_GRID = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35,
    0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
)


# -- the math ---------------------------------------------------------------------------------
def _finite(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach()
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteWeightError("the weight contains NaN or infinite values; cannot prune it")
    return w


def nonzeros_for_keep(keep: float, size: int) -> int:
    """kappa for a kept fraction: round(keep * size) (halves up), between 1 and size."""
    return min(size, max(1, math.floor(keep * size + 0.5)))


def top_k(weight: torch.Tensor, nonzeros: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions ascending, values) of the `nonzeros` largest |w| of `weight`: the exact
    l0 projection's support."""
    flat = _finite(weight).reshape(-1)
    if not 1 <= nonzeros <= flat.numel():
        raise TensorSlimError(f"nonzeros must be in [1, {flat.numel()}]; got {nonzeros}")
    pos = torch.topk(flat.abs(), nonzeros, sorted=False).indices
    pos = torch.sort(pos).values
    return pos, flat[pos]


def prune(weight: torch.Tensor, nonzeros: int) -> torch.Tensor:
    """`weight` with all but its `nonzeros` largest |w| set to 0 (same shape and dtype)."""
    pos, vals = top_k(weight, nonzeros)
    out = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
    return out.index_copy(0, pos, vals).reshape(weight.shape)


def soft_threshold(weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """sign(w) max(|w| - alpha, 0): the prox of alpha ||.||_1 (same shape and dtype)."""
    w = _finite(weight)
    return torch.sign(w) * torch.clamp(w.abs() - alpha, min=0)


def l1_nonzeros(weight: torch.Tensor, alpha: float) -> int:
    """How many entries soft thresholding at `alpha` keeps (the l0 count to store it with)."""
    return int((_finite(weight).abs() > alpha).sum())


# -- the compressor ---------------------------------------------------------------------------
@register_compressor("sparse")
class Sparse(Compressor):
    """Pruning: params {"keep": f} or {"nonzeros": kappa} (penalty "l0"), {"alpha": a} (penalty
    "l1", projection only); operator SparseOp (values + packed positions)."""

    @dataclass(frozen=True)
    class Options:
        """penalty: "l0" (keep the largest entries; buildable) or "l1" (soft thresholding; the
        LC algorithm's penalty form, a projection only)."""

        penalty: str = "l0"

        def __post_init__(self) -> None:
            check_options(self, {"penalty": OptionSpec(str, choices=PENALTIES)})

    # -- parameters ---------------------------------------------------------------------------
    def check(self, target: MatrixTarget, params: Mapping[str, Any]) -> str | None:
        m, n = target.shape
        if self.options.penalty == "l1":
            unknown = [k for k in params if k != "alpha"]
            if unknown:
                return (
                    f"unknown parameter {short_repr(unknown[0])} for 'sparse' with penalty "
                    "'l1'; it takes: alpha"
                )
            return _alpha_problem(params.get("alpha"))
        unknown = [k for k in params if k not in ("keep", "nonzeros")]
        if unknown:
            hint = " (alpha needs option penalty='l1')" if unknown[0] == "alpha" else ""
            return (
                f"unknown parameter {short_repr(unknown[0])} for 'sparse'; it takes: keep or "
                f"nonzeros{hint}"
            )
        if ("keep" in params) == ("nonzeros" in params):
            return "give one of keep (fraction of entries kept) or nonzeros (their count)"
        if "keep" in params:
            keep = params["keep"]
            ok = isinstance(keep, numbers.Real) and not isinstance(keep, bool)
            if not (ok and math.isfinite(keep) and 0 < keep <= 1):
                return f"keep must be a number in (0, 1]; got {short_repr(keep)}"
            return None
        kappa = params["nonzeros"]
        if not (is_int(kappa) and 1 <= kappa <= m * n):
            return (
                f"nonzeros must be an integer in [1, {m * n}] (the matrix's size); "
                f"got {short_repr(kappa)}"
            )
        return None

    def _checked(self, target_or_size: Any, params: Mapping[str, Any]) -> int:
        """kappa of valid l0 `params` (TensorSlimError otherwise)."""
        if self.options.penalty == "l1":
            raise TensorSlimError(
                "a 'sparse' component with penalty 'l1' (alpha) is a projection only: its number "
                "of nonzeros depends on the weights; store it as {'kind': 'sparse', 'nonzeros': "
                "kappa} with kappa = compressors.sparse.l1_nonzeros(weight, alpha)"
            )
        if isinstance(target_or_size, MatrixTarget):
            target = target_or_size
        else:
            target = MatrixTarget("", "", (1, int(target_or_size)))
        why = self.check(target, params)
        if why:
            raise TensorSlimError(f"'sparse': {why}")
        size = target.shape[0] * target.shape[1]
        if "keep" in params:
            return nonzeros_for_keep(float(params["keep"]), size)
        return int(params["nonzeros"])

    # -- what it costs and loses --------------------------------------------------------------
    def cost(self, target: MatrixTarget, params: Mapping[str, Any]) -> Cost:
        m, n = target.shape
        kappa = self._checked(target, params)
        bits = kappa * (dtype_bits(target.dtype) + index_bits(m * n))
        return Cost(kappa, bits, target.flops(kappa))

    def grid(self, target: MatrixTarget) -> list[dict[str, Any]]:
        """Fractions of KEEP_GRID with distinct counts below the matrix's size, rising (l0)."""
        if self.options.penalty == "l1":
            return []
        size = target.shape[0] * target.shape[1]
        out, seen = [], set()
        for keep in KEEP_GRID:
            kappa = nonzeros_for_keep(keep, size)
            if kappa < size and kappa not in seen:
                seen.add(kappa)
                out.append({"keep": keep})
        return out

    def too_small(self, target: MatrixTarget) -> str | None:
        if self.options.penalty == "l1":
            return "penalty 'l1' proposes no sizes (it is a projection); use penalty 'l0'"
        return super().too_small(target)

    def errors(
        self, target: MatrixTarget, grid: list[dict[str, Any]], objective: str
    ) -> list[float]:
        if not grid:
            return []
        w = target_weight(target)
        kappas = [self._checked(target, p) for p in grid]
        with layer_errors(self.method, target):
            if objective == "weight":  # the tail energy of the sorted squares
                sq = torch.sort(_finite(w).reshape(-1).to(torch.float64) ** 2, descending=True)
                total = float(sq.values.sum()) or 1.0
                kept = torch.cumsum(sq.values, 0)
                return [max(0.0, (total - float(kept[k - 1])) / total) for k in kappas]
            stats = target_stats(target)
            return [objective_error(objective, w, prune(w, k), stats) for k in kappas]

    # -- projection and building --------------------------------------------------------------
    def project(self, weight: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """l0: the nearest matrix with at most kappa nonzeros (the kappa largest |w| kept); l1:
        soft thresholding at alpha. Same shape and dtype."""
        if self.options.penalty == "l1":
            why = self.check(MatrixTarget("", "", (1, max(1, weight.numel()))), params)
            if why:
                raise TensorSlimError(f"'sparse': {why}")
            return soft_threshold(weight, float(params["alpha"]))
        return prune(weight, self._checked(weight.numel(), params))

    def build(
        self, target: MatrixTarget, params: Mapping[str, Any]
    ) -> tuple[nn.Module, dict[str, Any]]:
        kappa = self._checked(target, params)
        w = matrix_view(target_weight(target))
        with layer_errors(self.method, target):
            pos, vals = top_k(w, kappa)
        return SparseOp.from_entries(target.shape, pos, vals), {}

    def empty(self, target: MatrixTarget, params: Mapping[str, Any]) -> nn.Module:
        m, n = target.shape
        return SparseOp(
            n, m, self._checked(target, params), device=target.device, dtype=target.dtype
        )


def _alpha_problem(alpha: Any) -> str | None:
    ok = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
    if ok and math.isfinite(alpha) and alpha >= 0:
        return None
    return f"alpha must be a finite number >= 0; got {short_repr(alpha)}"
