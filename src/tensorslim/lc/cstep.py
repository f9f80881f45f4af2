"""The C step of the learning-compression algorithm for one matrix and a spec.

One component: the compressor's exact projection (`Compressor.project`, e.g. truncated SVD for
"lowrank"). A sum of components (quantization + low rank + pruning, Idelbayev & Carreira-Perpinan
2021, "More general and effective model compression via an additive combination of compressions",
Sec. 3.2): alternating optimization over the parts, part k taking the C step of its own form on the
residual x - sum_{j != k} Delta_j, until the squared residual ||x - sum_k Delta_k||^2 stops
decreasing. Each part's update is accepted only if it does not increase its objective, so the
residual never increases even with an approximate projection.

Rank selection (Idelbayev & Carreira-Perpinan 2020, "Low-rank compression of neural nets: learning
the rank of each layer", Eq. 5): the component {"kind": "lowrank", "alpha": a} picks
r = argmin_{1 <= r <= min(m, n)} a * C(r) + mu/2 * sum_{i > r} s_i^2 from the singular values s of
its input, with C(r) = r (m + n) stored numbers ("criterion": "storage", default) or
r (m + n) * positions multiply-adds ("flops"). Rank 0 (dropping the matrix) is not offered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tensorslim.core.compressor import Compressor
from tensorslim.errors import TensorSlimError, short_repr

CRITERIA = ("storage", "flops")
# The additive C step stops when a round lowers the squared residual by less than this fraction.
ADDITIVE_TOL = 1e-4
ADDITIVE_ROUNDS = 50


def is_rank_selection(kind: str, params: Mapping[str, Any]) -> bool:
    """True for a lowrank component that learns its rank ({"kind": "lowrank", "alpha": a})."""
    return kind == "lowrank" and "alpha" in params


def rank_selection_problem(params: Mapping[str, Any], positions: int | None) -> str | None:
    """None if `params` of a rank-selection component are valid, else what is accepted."""
    unknown = [k for k in params if k not in ("alpha", "criterion")]
    if unknown:
        return (
            f"unknown parameter {short_repr(unknown[0])} for a rank-selection lowrank component; "
            "it takes alpha (> 0) and criterion (storage or flops), not rank"
        )
    alpha = params.get("alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        return f"alpha must be a number > 0; got {short_repr(alpha)}"
    if float(alpha) == float("inf"):
        return f"alpha must be finite; got {short_repr(alpha)}"
    criterion = params.get("criterion", "storage")
    if criterion not in CRITERIA:
        return f"criterion must be one of {', '.join(CRITERIA)}; got {short_repr(criterion)}"
    if criterion == "flops" and positions is None:
        return "criterion 'flops' needs the layer's input shape (trace the model on a batch)"
    return None


@dataclass
class Part:
    """One component's share of a matrix: its compressor and parameters, and (for rank selection)
    the number of positions the matrix is applied at per forward call."""

    compressor: Compressor
    params: Mapping[str, Any]
    positions: int | None = None

    @property
    def selects_rank(self) -> bool:
        return is_rank_selection(self.compressor.kind, self.params)

    def unit_cost(self, shape: tuple[int, int]) -> float:
        """C(r) / r of a rank-selection part: m + n numbers, times positions for FLOPs."""
        m, n = shape
        mult = self.positions if self.params.get("criterion", "storage") == "flops" else 1
        return float((m + n) * (mult or 1))


@dataclass
class Projection:
    """The C step's answer for one matrix: Delta_k per part (same shape as the input), the
    parameters each part was built with (a selected rank), and the squared residual
    ||x - sum_k Delta_k||^2 before the first round (the start values) and after every round."""

    values: list[torch.Tensor]
    params: list[dict[str, Any]]
    residuals: list[float] = field(default_factory=list)

    @property
    def total(self) -> torch.Tensor:
        out = self.values[0]
        for v in self.values[1:]:
            out = out + v
        return out


def _sq(x: torch.Tensor) -> float:
    x = x.detach().to(torch.float64)
    return float((x * x).sum())


def select_rank(
    x: torch.Tensor, alpha: float, mu: float, unit_cost: float
) -> tuple[torch.Tensor, int, float]:
    """(the best rank-r matrix to x (m x n), r, the objective) for
    r = argmin_{r >= 1} alpha * unit_cost * r + mu/2 * sum_{i > r} s_i^2."""
    w = x.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    sq = s * s
    tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])  # tail[r] = sum_{i >= r} s_i^2
    tail = torch.cat([tail, torch.zeros(1, dtype=tail.dtype)])
    ranks = torch.arange(1, len(s) + 1, dtype=torch.float64)
    objective = alpha * unit_cost * ranks + 0.5 * mu * tail[1:]
    best = int(torch.argmin(objective))
    r = best + 1
    value = (u[:, :r] * s[:r]) @ vh[:r]
    return value.to(x.dtype), r, float(objective[best])


def project_part(part: Part, x: torch.Tensor, mu: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """The C step of one part on x (m x n): its value and the parameters it was built with."""
    if part.selects_rank:
        value, r, _ = select_rank(x, float(part.params["alpha"]), mu, part.unit_cost(x.shape))
        return value, {"rank": r}
    value = part.compressor.project(x.detach(), part.params)
    if value.shape != x.shape:
        raise TensorSlimError(
            f"compressor {part.compressor.kind!r}: project returned shape {tuple(value.shape)} for "
            f"a {tuple(x.shape)} matrix"
        )
    return value.to(x.dtype), dict(part.params)


def _objective(part: Part, r: torch.Tensor, value: torch.Tensor, params: Mapping[str, Any],
               mu: float) -> float:
    """What part k minimises on its residual r: ||r - value||^2, plus 2 alpha C(rank) / mu for
    rank selection (the objective divided by mu/2)."""
    err = _sq(r - value)
    if part.selects_rank and mu > 0:
        rank = params.get("rank", 0)  # zeros (a fresh start) have rank 0
        err += 2.0 * float(part.params["alpha"]) * part.unit_cost(r.shape) * rank / mu
    return err


def c_step(
    x: torch.Tensor,
    parts: Sequence[Part],
    mu: float,
    start: Sequence[torch.Tensor] | None = None,
    start_params: Sequence[Mapping[str, Any]] | None = None,
    *,
    tol: float = ADDITIVE_TOL,
    max_rounds: int = ADDITIVE_ROUNDS,
) -> Projection:
    """Delta_k for every part, minimising ||x - sum_k Delta_k||^2 (plus the rank cost of
    rank-selection parts) over the parts' forms. x: (m x n). One part: its projection. Several:
    alternating projections of the residuals from `start` (the previous C step's values, with
    `start_params`; zeros if None) until a round lowers the squared residual by less than
    `tol` times its value, or `max_rounds`. A part's new value replaces its old one only if it
    does not raise that part's objective, so the residual never increases from round to round
    (with a fresh start, a rank-selection part always takes its first answer)."""
    if not parts:
        raise TensorSlimError("a C step needs at least one component")
    if len(parts) == 1:
        value, params = project_part(parts[0], x, mu)
        return Projection([value], [params], [_sq(x - value)])
    if start is None:
        values = [torch.zeros_like(x) for _ in parts]
        params: list[dict[str, Any]] = [dict(p.params) for p in parts]
        fresh = True
    else:
        values = [v.detach().clone() for v in start]
        params = [dict(p) for p in (start_params or [q.params for q in parts])]
        fresh = False
    total = values[0].clone()
    for v in values[1:]:
        total = total + v
    residuals = [_sq(x - total)]
    for round_ in range(max_rounds):
        for k, part in enumerate(parts):
            r = x - (total - values[k])
            new, new_params = project_part(part, r, mu)
            # a fresh rank-selection part takes its first answer even if rank 0 would be better
            accept = fresh and round_ == 0 and part.selects_rank
            if not accept:
                accept = _objective(part, r, new, new_params, mu) <= _objective(
                    part, r, values[k], params[k], mu
                )
            if accept:
                total = total - values[k] + new
                values[k], params[k] = new, new_params
        residuals.append(_sq(x - total))
        before, after = residuals[-2], residuals[-1]
        if before - after <= tol * max(before, 1e-300):
            break
    return Projection(values, params, residuals)
