"""Rank-Tuning (Maison, du Mas des Bourboux, Courtat 2023, arXiv 2310.12688, Sec. "Rank-Tuning").

For each weight matrix independently (all others at full rank), find the smallest rank whose
truncated SVD keeps the validation metric at a target; do it for several targets at once; a matrix
that never meets a target stays dense. Then every chosen rank is applied together, per target, and
the result is evaluated.

The paper tries r = 1, 2, 3, ... (only ranks with r(m+n) < mn). Here `search="bisect"` assumes the
metric is monotone in the rank of one matrix (truncating less never hurts) and bisects on
[1, r_max], sharing one cache of evaluations between all targets; `search="scan"` is the paper's
increasing scan (stopping once every target is met), kept for comparison and for metrics that are
far from monotone.

The matrices are those of every layer the low-rank compressor (kind "lowrank", method "svd")
compresses, as its handler exposes them: Linear, Conv (kernel reshaped to out x in*k*k), GPT-2's
Conv1D, attention's "in_proj" / "out_proj" and each gate matrix of GRU/LSTM. A matrix at rank r is
evaluated by building its layer with only that matrix compressed, through the one path from a spec
to a module (core.materialize.build_layer), and swapping it into a working copy of the model.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorslim._progress import track
from tensorslim.core.discover import LayerInfo, find_layers
from tensorslim.core.handler import handler_for
from tensorslim.core.materialize import LayerJob, build_layer, materialize
from tensorslim.core.modes import eval_mode
from tensorslim.core.spec import Component, Spec
from tensorslim.core.surgery import replace_at
from tensorslim.decompose import max_useful_rank
from tensorslim.errors import TensorSlimError
from tensorslim.plan.account import layer_plan, make_plan
from tensorslim.plan.apply import apply_plan
from tensorslim.plan.plan import Plan
from tensorslim.search.methods import method_compressor, resolver

KIND = "lowrank"  # the compressor Rank-Tuning truncates with (method "svd")


@dataclass(frozen=True)
class TunedMatrix:
    """One matrix: the layer holding it, its name in the layer ("weight" for a layer with one
    matrix, else the handler's part name: an RNN's parameter name, attention's "in_proj" /
    "out_proj"), its (m, n) view and largest useful rank."""

    layer: str
    param: str
    shape: tuple[int, int]
    r_max: int

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.param}" if self.param != "weight" else self.layer

    @property
    def part(self) -> str:
        """The matrix's part name for its layer's handler ("" for a layer with one matrix)."""
        return "" if self.param == "weight" else self.param


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


# -- the matrices and their layers ----------------------------------------------------------------
def _tunable_layers(model: nn.Module, include, exclude) -> tuple[list[LayerInfo], list[LayerInfo]]:
    """(every layer found, the compressible ones) with the low-rank compressor."""
    layers = find_layers(model, resolver(method_compressor("svd")), include, exclude)
    return layers, [info for info in layers if info.compressible]


def _matrices(layers: Iterable[LayerInfo]) -> list[TunedMatrix]:
    """Every matrix of the layers with a useful rank (r(m + n) < mn), in layer and part order."""
    out = []
    for info in layers:
        for part, w in info.handler.matrices(info.module).items():
            m, n = int(w.shape[0]), int(w.shape[1])
            r_max = max_useful_rank(m, n)
            if r_max > 0:
                out.append(TunedMatrix(info.name, part or "weight", (m, n), r_max))
    return out


def _spec(info: LayerInfo, ranks: Mapping[str, int | None]) -> Spec:
    """The layer's low-rank spec with each part at `ranks[part]` (absent or None: dense); [] if no
    matrix is compressed. One matrix: {"rank": r}; several: the handler's packed form."""
    parts = list(info.handler.matrices(info.module))
    values = {p: ranks.get(p) for p in parts}
    if all(v is None for v in values.values()):
        return []
    return [Component(KIND, {"rank": info.handler.pack(info.module, values)})]


def _built(info: LayerInfo, ranks: Mapping[str, int | None]) -> nn.Module:
    """The layer with its matrices at `ranks`, built by core.materialize.build_layer, in the dense
    layer's train/eval mode."""
    new, _ = build_layer(info.module, info.handler, _spec(info, ranks), info.site)
    return new.train(info.module.training)


def _per_layer(mats: Iterable[TunedMatrix], ranks: Mapping[str, int | None]) -> dict[str, dict]:
    """layer name -> {part: rank} of the matrices with a rank."""
    out: dict[str, dict[str, int]] = {}
    for tm in mats:
        r = ranks.get(tm.key)
        if r is not None:
            out.setdefault(tm.layer, {})[tm.part] = r
    return out


class _Work:
    """The working copy of the model, into which compressed layers are swapped for one metric call
    (a model that is itself the layer is replaced whole: use `model` after each swap)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @contextlib.contextmanager
    def swapped(self, replacements: list[tuple[LayerInfo, nn.Module]]) -> Iterator[nn.Module]:
        for info, new in replacements:
            self.model = replace_at(self.model, info.names, new)
        try:
            yield self.model
        finally:
            for info, _ in replacements:
                self.model = replace_at(self.model, info.names, info.module)


# -- arguments and metric values ------------------------------------------------------------------
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


# -- the search -----------------------------------------------------------------------------------
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
    work = _Work(copy.deepcopy(model))
    with eval_mode(work.model):
        evaluations = 0

        def run_metric(step: str, baseline: bool = False) -> float:
            nonlocal evaluations
            evaluations += 1
            with torch.no_grad():
                raw = metric(work.model)
            return _metric_value(raw, step, higher_is_better, baseline)

        reference = run_metric("the baseline (the uncompressed model)", baseline=True)
        thresholds = {t: _threshold(reference, t, higher_is_better) for t in targets}

        def meets(value: float, t: float) -> bool:
            return value >= thresholds[t] if higher_is_better else value <= thresholds[t]

        layers, tunable = _tunable_layers(work.model, include, exclude)
        by_name = {info.name: info for info in tunable}
        mats = _matrices(tunable)
        ranks: dict[float, dict[str, int | None]] = {t: {} for t in targets}
        for tm in track(mats, "Rank-Tuning", progress, total=len(mats)):
            value_at = _matrix_curve(work, by_name[tm.layer], tm, run_metric)
            for t in targets:
                ranks[t][tm.key] = _search(value_at, lambda v, t=t: meets(v, t), tm.r_max, search)

        def run_with(rk: Mapping[str, int | None], t: float, scale: float) -> float:
            swaps = [(by_name[n], _built(by_name[n], r)) for n, r in _per_layer(mats, rk).items()]
            with work.swapped(swaps):
                return run_metric(f"the joint check of target {t:g} at scale {scale:g}")

        scales: dict[float, float] = {}
        if joint:
            for t in targets:
                ranks[t], scales[t] = _joint_repair(
                    mats,
                    ranks[t],
                    lambda v, t=t: meets(v, t),
                    lambda rk, scale, t=t: run_with(rk, t, scale),
                )

    plans = {t: _plan(model, layers, mats, ranks[t], t) for t in targets}
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


def _matrix_curve(
    work: _Work, info: LayerInfo, tm: TunedMatrix, run_metric: Callable[[str], float]
) -> Callable[[int], float]:
    """value_at(r): the metric with only `tm` at rank r (its layer built by build_layer and
    swapped into the working copy, then the dense layer restored), cached per rank."""
    cache: dict[int, float] = {}

    def value_at(r: int) -> float:
        if r not in cache:
            with work.swapped([(info, _built(info, {tm.part: r}))]):
                cache[r] = run_metric(f"matrix {tm.key!r} truncated to rank {r}")
        return cache[r]

    return value_at


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


def _joint_repair(
    mats: list[TunedMatrix],
    chosen: dict[str, int | None],
    ok: Callable[[float], bool],
    run_with: Callable[[dict[str, int | None], float], float],
) -> tuple[dict[str, int | None], float]:
    """Scale the chosen ranks up until the model with all of them applied meets the target.
    run_with(ranks, scale) is the metric of the working copy with every matrix at its rank."""
    r_max = {tm.key: tm.r_max for tm in mats}
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
            cache[key] = ok(run_with(rk, scale))
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


# -- the plans ------------------------------------------------------------------------------------
def _plan(
    model: nn.Module,
    layers: list[LayerInfo],
    mats: list[TunedMatrix],
    chosen: Mapping[str, int | None],
    target: float,
) -> Plan:
    """The Plan of one target: every compressible layer with its matrices at their chosen ranks
    (a matrix without one stays dense), materialized and accounted like compress's plans."""
    per_layer = _per_layer(mats, chosen)
    jobs = {
        info.name: LayerJob(info.names, _spec(info, per_layer.get(info.name, {})), info.site)
        for info in layers
        if info.compressible
    }
    compressed = materialize(model, jobs.values(), handler_of=handler_for)
    dense_reason = f"no rank met target {target}"
    plans = [
        layer_plan(info, jobs.get(info.name), compressed, dense_reason=dense_reason)
        for info in layers
    ]
    plan = make_plan(
        model, compressed, plans, keep=1.0, cost="params", method="svd",
        allocator="rank_tuning", flops_known=False, meta={"rank_tuning_target": target},
    )  # fmt: skip
    plan.keep = plan.achieved_keep  # no keep was requested: the plan's is what the ranks give
    return plan
