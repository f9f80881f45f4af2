"""Kendall rank correlation between an error proxy and the test error, in the groupings of
Schuurmans, Batselier & Kooij (ICLR 2023, Sec. 4).

- `kendall_tau`: scipy.stats.kendalltau (its τ-b, which the paper's code used; equal to τ-a when
  neither variable has ties); `tau_a`: τ-a = 2(k - d) / (m(m - 1)) over the m(m-1)/2 pairs, k
  concordant, d discordant (ties count as neither), by hand.
- `grouped_tau`: per run, τ over all trials together ("all"); across layers (method and keep
  fixed, τ over the layers, then averaged over the (method, keep) groups); across methods (layer
  and keep fixed, then averaged over the (layer, keep) groups); then mean and standard deviation
  (population, ddof 0) over the runs. A group whose τ is undefined (fewer than 2 trials, or a
  constant variable) is left out of its average, and `groups` says how many counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

GROUPINGS = {
    "all": (),  # one group per run
    "layers": ("method", "keep"),  # fixed within a group: τ runs across the layers
    "methods": ("layer", "keep"),  # τ runs across the methods
}


def _pairs(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length; got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("x and y must be finite")
    return a, b


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """scipy.stats.kendalltau(x, y) (τ-b); NaN for fewer than 2 points or a constant variable."""
    from scipy.stats import kendalltau

    a, b = _pairs(x, y)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(kendalltau(a, b).statistic)


def tau_a(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-a = 2(k - d) / (m(m - 1)) (Kendall 1938); NaN for fewer than 2 points."""
    a, b = _pairs(x, y)
    m = len(a)
    if m < 2:
        return math.nan
    s = np.sign(a[:, None] - a[None, :]) * np.sign(b[:, None] - b[None, :])
    k_minus_d = float(np.triu(s, 1).sum())
    return 2.0 * k_minus_d / (m * (m - 1))


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "runs": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "runs": len(vals)}


def grouped_tau(
    rows: Sequence[Mapping[str, Any]],
    proxy: str,
    target: str,
    grouping: str,
    tau: Callable[[Sequence[float], Sequence[float]], float] = kendall_tau,
) -> dict[str, Any]:
    """τ between rows' `proxy` and `target` values in `grouping` ("all", "layers", "methods"),
    per run averaged over groups, then {"mean", "std", "runs", "groups", "per_run"} over runs.
    Rows need "run", "layer", "method", "keep"; rows whose proxy or target is None are skipped."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}; got {grouping!r}")
    fixed = GROUPINGS[grouping]
    usable = [r for r in rows if r.get(proxy) is not None and r.get(target) is not None]
    per_run: dict[Any, list[float]] = {}
    groups_used = 0
    for run in sorted({r["run"] for r in usable}):
        in_run = [r for r in usable if r["run"] == run]
        groups: dict[tuple, list[Mapping[str, Any]]] = {}
        for r in in_run:
            groups.setdefault(tuple(r[k] for k in fixed), []).append(r)
        taus = [
            tau([r[proxy] for r in g], [r[target] for r in g]) for g in groups.values()
        ]
        valid = [t for t in taus if not math.isnan(t)]
        groups_used += len(valid)
        per_run[run] = [float(np.mean(valid))] if valid else [math.nan]
    out = _mean_std([v[0] for v in per_run.values()])
    out["groups"] = groups_used
    out["per_run"] = {str(k): (None if math.isnan(v[0]) else v[0]) for k, v in per_run.items()}
    return out
