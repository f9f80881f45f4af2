"""Allocators: given each layer's options (cost, error) and a total budget, pick one option per layer.

Every layer may also stay dense (cost = its dense cost, error 0); the dense-or-factorized switch is
an explicit choice in both allocators, never an option whose cost reaches the dense cost.
A selection is a list of indices, one per layer: -1 means dense, i >= 0 means `costs[i]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DENSE = -1


@dataclass(frozen=True)
class Candidate:
    """One compressible layer: its dense cost and its options, sorted by rising cost (all < dense)."""

    name: str
    dense_cost: float
    costs: Sequence[float]
    errors: Sequence[float]

    def cost(self, i: int) -> float:
        return self.dense_cost if i == DENSE else self.costs[i]

    def error(self, i: int) -> float:
        return 0.0 if i == DENSE else self.errors[i]

    def next_up(self, i: int) -> int | None:
        """The next more expensive choice after `i` (the next option, then dense), or None."""
        if i == DENSE:
            return None
        return i + 1 if i + 1 < len(self.costs) else DENSE


def total_cost(cands: Sequence[Candidate], sel: Sequence[int]) -> float:
    return sum(c.cost(i) for c, i in zip(cands, sel))


def total_error(cands: Sequence[Candidate], sel: Sequence[int]) -> float:
    return sum(c.error(i) for c, i in zip(cands, sel))


def _cheapest(c: Candidate) -> int:
    return 0 if len(c.costs) else DENSE


def _fill(cands: Sequence[Candidate], sel: list[int], budget: float, by_error: bool) -> list[int]:
    """Spend what is left of the budget one step at a time.

    by_error: take the step with the largest error reduction per unit cost (global); otherwise the
    step of the layer with the lowest kept fraction (uniform). Considers the next option and the
    switch to dense for each layer.
    """
    remaining = budget - total_cost(cands, sel)
    while True:
        best, best_score = None, None
        for li, (c, i) in enumerate(zip(cands, sel)):
            steps = {c.next_up(i), DENSE if i != DENSE else None} - {None}
            for j in steps:
                dc = c.cost(j) - c.cost(i)
                if dc <= 0 or dc > remaining + 1e-9:
                    continue
                if by_error:
                    gain = c.error(i) - c.error(j)
                    if gain <= 0:
                        continue
                    score = gain / dc
                else:
                    score = -c.cost(i) / c.dense_cost
                if best_score is None or score > best_score:
                    best, best_score = (li, j), score
        if best is None:
            return sel
        li, j = best
        remaining -= cands[li].cost(j) - cands[li].cost(sel[li])
        sel[li] = j


def uniform(cands: Sequence[Candidate], budget: float) -> list[int]:
    """The same kept fraction k for every layer (each takes its largest option with cost <= k * dense),
    with k the largest value that fits the budget (bisection), then leftover budget spent on the
    layers with the lowest kept fraction. If even the cheapest options exceed the budget, returns them.
    """

    def pick(k: float) -> list[int]:
        sel = []
        for c in cands:
            if k * c.dense_cost >= c.dense_cost:
                sel.append(DENSE)
                continue
            fits = [i for i, cost in enumerate(c.costs) if cost <= k * c.dense_cost]
            sel.append(fits[-1] if fits else _cheapest(c))
        return sel

    if total_cost(cands, pick(1.0)) <= budget:
        return pick(1.0)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if total_cost(cands, pick(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    sel = pick(lo)
    if total_cost(cands, sel) > budget:
        return sel
    return _fill(cands, sel, budget, by_error=False)


def global_(cands: Sequence[Candidate], budget: float) -> list[int]:
    """Minimize the summed error subject to total cost <= budget.

    Lagrangian relaxation: for a price lam, each layer independently takes the choice (dense
    included) minimizing error + lam * cost / base; lam is bisected so the total just fits, and the
    leftover budget is spent greedily on the steps with the most error reduction per unit cost. The
    uniform allocation is evaluated too and kept if it is better, so global is never worse than
    uniform at the same budget.
    """
    base = sum(c.dense_cost for c in cands) or 1.0

    def pick(lam: float) -> list[int]:
        sel = []
        for c in cands:
            best, best_val = DENSE, c.dense_cost * lam / base
            for i, (cost, err) in enumerate(zip(c.costs, c.errors)):
                val = err + lam * cost / base
                if val < best_val - 1e-15 or (abs(val - best_val) <= 1e-15 and cost < c.cost(best)):
                    best, best_val = i, val
            sel.append(best)
        return sel

    sel0 = pick(0.0)
    if total_cost(cands, sel0) <= budget:
        sel = sel0
    else:
        hi = 1.0
        while total_cost(cands, pick(hi)) > budget and hi < 1e15:
            hi *= 4
        if total_cost(cands, pick(hi)) > budget:
            return [_cheapest(c) for c in cands]
        lo = 0.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if total_cost(cands, pick(mid)) <= budget:
                hi = mid
            else:
                lo = mid
        sel = _fill(cands, pick(hi), budget, by_error=True)
    uni = uniform(cands, budget)
    if total_cost(cands, uni) <= budget and total_error(cands, uni) < total_error(cands, sel):
        return uni
    return sel


ALLOCATORS = {"uniform": uniform, "global": global_}
