"""Rank-Tuning (Maison, du Mas des Bourboux, Courtat 2023, arXiv 2310.12688, Sec. "Rank-Tuning").

For each weight matrix independently (all others at full rank), find the smallest rank whose
truncated SVD keeps the validation metric at a target; do it for several targets at once; a matrix
that never meets a target stays dense. Then every chosen rank is applied together, per target, and
the result is evaluated.

The paper tries r = 1, 2, 3, ... (only ranks with r(m+n) < mn). Here `search="bisect"` assumes the
metric is monotone in the rank of one matrix (truncating less never hurts) and bisects on
[1, r_max], sharing one cache of evaluations between all targets; `search="scan"` is the paper's
increasing scan (stopping once every target is met), kept for comparison and for metrics that are
far from monotone. Works on every matrix the "svd" factorizers handle: Linear, Conv (kernel
reshaped to out x in*k*k) and each gate matrix of GRU/LSTM.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorslim._progress import track
from tensorslim.decompose import max_useful_rank, svd
from tensorslim.errors import TensorSlimError
from tensorslim.layers.lowrank_rnn import rnn_matrices
from tensorslim.model import (
    RNNSVD,
    MatrixSVDFactorizer,
    count_params,
    find_layers,
    get_submodule,
)
from tensorslim.model.modes import eval_mode
from tensorslim.plan.apply import apply_plan
from tensorslim.plan.plan import LayerPlan, Plan


@dataclass(frozen=True)
class TunedMatrix:
    """One matrix: the layer holding it, the parameter name, its (m, n) view and largest useful rank."""

    layer: str
    param: str
    shape: tuple[int, int]
    r_max: int

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.param}" if self.param != "weight" else self.layer


@dataclass
class RankTuningResult:
    """`ranks[target][matrix key]` is the chosen rank (None: dense); `plans[target]` the Plan;
    `metrics[target]` the metric of the model with all of that target's ranks applied."""

    reference: float
    targets: list[float]
    higher_is_better: bool
    ranks: dict[float, dict[str, int | None]]
    plans: dict[float, Plan]
    metrics: dict[float, float] = field(default_factory=dict)
    evaluations: int = 0
    search: str = "bisect"
    # joint=True: the factor every rank of a target was scaled by so the combined model meets it.
    joint_scale: dict[float, float] = field(default_factory=dict)

    def threshold(self, target: float) -> float:
        """The metric value a truncation must reach for `target` (a tolerated relative loss)."""
        return _threshold(self.reference, target, self.higher_is_better)


def _threshold(reference: float, target: float, higher_is_better: bool) -> float:
    scale = abs(reference)
    return reference - target * scale if higher_is_better else reference + target * scale


def _matrices(model: nn.Module, include, exclude) -> list[tuple[TunedMatrix, Any]]:
    out = []
    for info in find_layers(model, "svd", include, exclude):
        if not info.compressible:
            continue
        f = info.factorizer
        if isinstance(f, MatrixSVDFactorizer):
            m, n = f.matrix(info.module).shape
            out.append((TunedMatrix(info.name, "weight", (m, n), max_useful_rank(m, n)), f))
        elif isinstance(f, RNNSVD):
            for p in rnn_matrices(info.module):
                m, n = getattr(info.module, p).shape
                if max_useful_rank(m, n) > 0:
                    out.append((TunedMatrix(info.name, p, (m, n), max_useful_rank(m, n)), f))
    return [(t, f) for t, f in out if t.r_max > 0]


def _real(value: Any) -> float | None:
    """`value` as a float if it is a real number (Python, numpy or a one-element torch tensor),
    None for anything else: bools, strings, None, complex, several elements."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.detach().reshape(()))
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d numpy array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None  # numpy's bool_ is no numbers.Real either
    return float(value)


def _check_targets(targets: Any) -> list[float]:
    """Sorted distinct targets: one number or an iterable of finite numbers >= 0."""
    accepted = "a number or a list of finite numbers >= 0 (tolerated relative metric losses)"
    one = _real(targets)
    if one is not None:
        items: list[Any] = [targets]
    elif isinstance(targets, (str, bytes)) or not isinstance(targets, Iterable):
        raise TensorSlimError(f"targets must be {accepted}; got {targets!r}")
    else:
        items = list(targets)
    if not items:
        raise TensorSlimError(f"targets must be {accepted}; got an empty {type(targets).__name__}")
    out = []
    for t in items:
        v = _real(t)
        if v is None or not math.isfinite(v) or v < 0:
            raise TensorSlimError(f"targets must be {accepted}; got {t!r} in {targets!r}")
        out.append(v)
    return sorted(set(out))


def _check_arguments(metric: Any, higher_is_better: Any, search: Any) -> None:
    if not callable(metric):
        raise TensorSlimError(
            f"metric must be a function metric(model) -> float; got {type(metric).__name__}"
        )
    if not isinstance(higher_is_better, bool):
        raise TensorSlimError(f"higher_is_better must be True or False; got {higher_is_better!r}")
    if not isinstance(search, str) or search not in ("bisect", "scan"):
        raise TensorSlimError(f"search must be 'bisect' or 'scan'; got {search!r}")


def _metric_value(raw: Any, step: str, higher_is_better: bool, baseline: bool) -> float:
    """The metric's result as a float, or TensorSlimError naming what it returned at `step`.

    NaN is always refused, and so is an infinite baseline (no threshold can be derived from it) or
    an infinitely *good* value; an infinitely bad one (e.g. an overflowing perplexity at rank 1)
    is a legitimate miss of every target."""
    value = _real(raw)
    if value is None:
        problem = f"{type(raw).__name__} {raw!r:.80}"
    elif math.isnan(value) or (math.isinf(value) and (baseline or (value > 0) == higher_is_better)):
        problem = f"{value}"
    else:
        return value
    raise TensorSlimError(
        f"the metric returned {problem} at {step}; metric(model) must return a finite real "
        "number (a float, int, or one-element numpy / torch value)"
    )


def rank_tuning(
    model: nn.Module,
    metric: Callable[[nn.Module], float],
    targets: Sequence[float] = (0.0, 0.005, 0.01),
    *,
    higher_is_better: bool = True,
    search: str = "bisect",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    evaluate: bool = True,
    progress: bool = False,
    joint: bool = False,
) -> RankTuningResult:
    """Smallest rank per matrix meeting each target, and a Plan per target.

    metric(model) -> float is computed on the caller's validation data (a subset keeps it fast);
    `higher_is_better` says its direction. targets are tolerated relative losses: 0.01 means the
    metric may fall 1 % below the uncompressed model's (or rise 1 % above it when lower is better).
    The input model is not modified.

    joint: the paper's per-matrix search ignores that truncation errors of many matrices add up;
    with joint=True each target's combined model is checked on the metric and, if it misses the
    target, every chosen rank r becomes min(ceil(s * r), r_max) with the smallest scale s found by
    bisection (monotone in s assumed) that meets it; if even every tuned matrix at r_max misses it,
    the target's matrices stay dense. These metric calls are counted in `evaluations`.

    Raises TensorSlimError for targets that are not finite numbers >= 0, and for a metric result
    that is not a real number, is NaN, or is infinite at the baseline or in the good direction
    (the message names the step: baseline, matrix at a rank, joint check or final evaluation).
    """
    _check_arguments(metric, higher_is_better, search)
    targets = _check_targets(targets)
    work = copy.deepcopy(model)
    with eval_mode(work):
        evaluations = 0

        def run_metric(step: str, baseline: bool = False) -> float:
            nonlocal evaluations
            evaluations += 1
            with torch.no_grad():
                raw = metric(work)
            return _metric_value(raw, step, higher_is_better, baseline)

        reference = run_metric("the baseline (the uncompressed model)", baseline=True)
        thresholds = {t: _threshold(reference, t, higher_is_better) for t in targets}

        def meets(value: float, t: float) -> bool:
            return value >= thresholds[t] if higher_is_better else value <= thresholds[t]

        mats = _matrices(work, include, exclude)
        factors: dict[str, tuple] = {}
        ranks: dict[float, dict[str, int | None]] = {t: {} for t in targets}
        for tm, _ in track(mats, "Rank-Tuning", progress, total=len(mats)):
            param = getattr(get_submodule(work, tm.layer), tm.param)
            original = param.detach().clone()
            u, s, vh = svd(original.reshape(tm.shape[0], -1))
            factors[tm.key] = (param, original, u, s, vh)
            cache: dict[int, float] = {}

            def value_at(
                r: int, param=param, original=original, u=u, s=s, vh=vh, cache=cache, key=tm.key
            ) -> float:
                if r not in cache:
                    with torch.no_grad():
                        param.copy_(((u[:, :r] * s[:r]) @ vh[:r]).reshape(original.shape))
                    try:
                        cache[r] = run_metric(f"matrix {key!r} truncated to rank {r}")
                    finally:
                        with torch.no_grad():
                            param.copy_(original)
                return cache[r]

            for t in targets:
                ranks[t][tm.key] = _search(value_at, lambda v, t=t: meets(v, t), tm.r_max, search)
        scales: dict[float, float] = {}
        if joint:
            for t in targets:
                ranks[t], scales[t] = _joint_repair(
                    factors,
                    mats,
                    ranks[t],
                    lambda v, t=t: meets(v, t),
                    lambda scale, t=t: run_metric(
                        f"the joint check of target {t:g} at scale {scale:g}"
                    ),
                )

    plans = {t: _plan(model, mats, ranks[t], t) for t in targets}
    result = RankTuningResult(
        reference, targets, higher_is_better, ranks, plans, {}, evaluations, search, scales
    )
    if evaluate:
        for t in targets:
            tuned = apply_plan(model, plans[t]).eval()
            with torch.no_grad():
                raw = metric(tuned)
            step = f"the final evaluation of target {t:g}"
            result.metrics[t] = _metric_value(raw, step, higher_is_better, baseline=False)
            result.evaluations += 1
    return result


def _search(value_at, ok, r_max: int, search: str) -> int | None:
    """Smallest r in [1, r_max] with ok(value_at(r)), or None if r_max itself fails."""
    if search == "scan":
        for r in range(1, r_max + 1):
            if ok(value_at(r)):
                return r
        return None
    if not ok(value_at(r_max)):
        return None
    lo, hi = 0, r_max  # invariant: hi meets the target; lo does not (0 = nothing kept)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(value_at(mid)):
            hi = mid
        else:
            lo = mid
    return hi


def _joint_repair(factors, mats, chosen, ok, run_metric) -> tuple[dict[str, int | None], float]:
    """Scale the chosen ranks up until the model with all of them applied meets the target."""
    r_max = {tm.key: tm.r_max for tm, _ in mats}
    tuned = {k: r for k, r in chosen.items() if r is not None}
    if not tuned:
        return chosen, 1.0
    cache: dict[tuple, bool] = {}

    def ranks_at(scale: float) -> dict[str, int | None]:
        out = dict(chosen)
        for k, r in tuned.items():
            out[k] = min(r_max[k], math.ceil(scale * r - 1e-9))
        return out

    def passes(scale: float) -> bool:
        rk = ranks_at(scale)
        key = tuple(sorted(rk.items(), key=lambda kv: kv[0]))
        if key not in cache:
            with torch.no_grad():
                for k in tuned:
                    param, original, u, s, vh = factors[k]
                    param.copy_(
                        ((u[:, : rk[k]] * s[: rk[k]]) @ vh[: rk[k]]).reshape(original.shape)
                    )
                try:
                    cache[key] = ok(run_metric(scale))
                finally:
                    for k in tuned:
                        param, original = factors[k][:2]
                        param.copy_(original)
        return cache[key]

    if passes(1.0):
        return chosen, 1.0
    hi = max(r_max[k] / r for k, r in tuned.items())
    if not passes(hi):
        return {k: None for k in chosen}, math.inf
    lo = 1.0  # invariant: lo fails, hi passes; stop when the ranks no longer change
    while ranks_at(lo) != ranks_at(hi) and hi - lo > 1e-3:
        mid = (lo + hi) / 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return ranks_at(hi), hi


def _plan(model: nn.Module, mats, chosen: dict[str, int | None], target: float) -> Plan:
    layers: dict[str, LayerPlan] = {}
    for tm, f in mats:
        module = get_submodule(model, tm.layer)
        lp = layers.get(tm.layer)
        if lp is None:
            before = f.dense_params(module)
            w = module.weight if hasattr(module, "weight") else getattr(module, tm.param)
            lp = layers[tm.layer] = LayerPlan(
                name=tm.layer,
                type=type(module).__name__,
                shape=list(w.shape),
                params_before=before,
                params_after=before,
                compressible=True,
                reason=f"no rank met target {target}",
            )
            if isinstance(f, RNNSVD):
                lp.rank = {p: None for p in rnn_matrices(module)}
        r = chosen[tm.key]
        if isinstance(f, RNNSVD):
            lp.rank[tm.param] = r
        elif r is not None:
            lp.rank = r
        if r is not None:
            lp.method, lp.reason = "svd", None
            m, n = tm.shape
            lp.params_after -= m * n - r * (m + n)
    base = list(layers.values())
    before = sum(lp.params_before for lp in base)
    after = sum(lp.params_after for lp in base)
    total = count_params(model)
    return Plan(
        layers=base,
        keep=after / before if before else 1.0,
        cost="params",
        method="svd",
        allocator="rank_tuning",
        achieved_keep=after / before if before else 1.0,
        model_params_before=total,
        model_params_after=total - (before - after),
        meta={"rank_tuning_target": target},
    )
