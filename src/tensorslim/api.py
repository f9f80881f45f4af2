"""The public functions: compress a model to a budget, apply a saved plan, analyze layers.

compress is a pipeline of named steps, each a function in its own room:
find layers (core.discover) -> trace shapes (core.discover) -> calibrate (calibrate.attach) ->
propose (search.propose) -> allocate (plan.allocate) -> materialize (core.materialize) ->
account (plan.account).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorslim._nested import tensors_in
from tensorslim._progress import track
from tensorslim._version import __version__
from tensorslim.calibrate.attach import attach, check_objective, peek
from tensorslim.calibrate.sequential import as_batches, sequential_materialize
from tensorslim.core.compressor import option_names
from tensorslim.core.cost import COST_MODELS
from tensorslim.core.discover import LayerInfo, find_layers, run_model, trace_sites
from tensorslim.core.handler import handler_for
from tensorslim.core.materialize import LayerJob, materialize
from tensorslim.core.modes import eval_mode
from tensorslim.decompose import max_useful_rank, singular_values, tail_energy
from tensorslim.errors import (
    ExampleInputError,
    InvalidKeepError,
    TensorSlimError,
    UnsupportedLayerError,
    check_keep,
)
from tensorslim.plan import ALLOCATORS, DENSE, Candidate, LayerPlan, Plan
from tensorslim.plan.account import layer_plan, make_plan
from tensorslim.plan.apply import apply_plan  # noqa: F401  (public API, re-exported)
from tensorslim.plan.plan import label
from tensorslim.search.methods import AUTO, method_compressor, methods, resolver
from tensorslim.search.propose import Unit, merge, propose

COSTS = tuple(COST_MODELS)
# How many layers the "nothing to compress" error lists before "and N more".
_SHOWN_LAYERS = 8


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise TensorSlimError(
            f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}"
        )


def _eval_mode_trace(model: nn.Module, layers: list[LayerInfo], example_input: Any) -> None:
    """Trace shapes in eval mode so BatchNorm statistics and dropout of the input model are untouched."""
    with eval_mode(model):
        trace_sites(model, layers, example_input)


def _check_example_input(example_input: Any) -> None:
    """ExampleInputError for an input with an empty tensor (a batch of size 0 measures nothing)."""
    for t in tensors_in(example_input):
        if t.numel() == 0:
            raise ExampleInputError(
                f"the example input holds a tensor of shape {tuple(t.shape)} with no elements "
                "(a batch of size 0?); give at least one sample"
            )


def _require_compressible(
    model: nn.Module,
    layers: list[LayerInfo],
    method: str,
    include: Any,
    exclude: Any,
) -> None:
    """UnsupportedLayerError listing why, when no layer can be factorized."""
    if any(info.compressible for info in layers):
        return
    if not layers:
        raise UnsupportedLayerError(
            f"nothing to compress: {type(model).__name__} has no layer with a weight matrix "
            "(Linear, Conv, RNN, attention, ...)"
        )
    candidates = [i for i in layers if i.compressor is not None]
    if candidates and not any(i.selected for i in candidates):
        given = [f"{k}={v!r}" for k, v in (("include", include), ("exclude", exclude)) if v]
        head = f"no layer matches {' and '.join(given)}"
    else:
        head = f"no layer can be factorized with method {method!r}"
    shown = [f"{label(i.name)} ({i.type_name}): {i.reason}" for i in layers[:_SHOWN_LAYERS]]
    if len(layers) > _SHOWN_LAYERS:
        shown.append(f"and {len(layers) - _SHOWN_LAYERS} more")
    raise UnsupportedLayerError(f"nothing to compress: {head}; " + "; ".join(shown))


def _input_shape(example_input: Any) -> Any:
    if isinstance(example_input, torch.Tensor):
        return list(example_input.shape)
    return None


def compress(
    model: nn.Module,
    keep: float | None = None,
    *,
    speedup: float | None = None,
    cost: str | None = None,
    method: str = "svd",
    allocator: str = "global",
    example_input: Any = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    progress: bool = False,
    calibration: Any = None,
    loss: Any = None,
    objective: str | None = None,
    method_options: dict[str, Any] | None = None,
    sequential: bool | None = None,
    measure: bool = False,
) -> tuple[nn.Module, Plan]:
    """Compress `model`'s layers so that a fraction `keep` of their cost remains, or so that the
    whole model runs `speedup` times faster on `example_input`.

    keep: in (0, 1], fraction of the compressible layers' cost that remains. speedup: > 1, the
    whole-model latency target (dense ms / compressed ms on `example_input`, measured): the
    latency budget is searched by bisection on keep, each step timed on the whole model against
    `model` (see tensorslim.speed.target.compress_for_speedup); the plan's `whole_model` says what
    was measured, the steps and, if the target is out of reach, the best speedup found and why.
    Give exactly one of keep and speedup. cost: "params" (default with keep), "bits" (storage),
    "flops" or "latency" (measured CPU ms; the default with speedup; FLOPs and latency need
    `example_input`, a tensor, tuple or dict of inputs). method: a registered compressor's method
    name or kind ("svd" = kind "lowrank", "fwsvd", "fvd", "whitened", "cp", "tucker2", "tt",
    "spatial", or any added with @tensorslim.register_compressor) or "auto" (per conv layer the
    best of several kinds). allocator: "global" (least summed error for the budget) or "uniform"
    (same keep for every layer). include / exclude: fnmatch patterns on dotted layer names.
    measure (with keep and example_input): also time the whole model, dense vs compressed, and
    record it in the plan's `whole_model` (a few seconds).

    Data-aware compression (methods "fwsvd", "fvd", "whitened", or any method with a data-aware
    objective): calibration is an iterable of model inputs (tensors, tuples of positional inputs or
    dicts of keyword inputs), consumed once; its first batch is the example input if none is given.
    loss(model, batch) -> scalar tensor, needed for the Fisher information ("fwsvd", "fvd",
    objective "fisher"). objective: what the allocator minimises per layer, "weight" (relative
    squared weight error), "fisher" (loss increase estimated from the Fisher diagonal) or "feature"
    (relative squared output error on the calibration inputs); default per compressor (svd:
    weight, fwsvd/fvd: fisher, whitened: feature). method_options: the method's compressor
    options, e.g. {"solver": "als", "iters": 30} for fvd, {"damp": 1e-6} for whitened (an unknown
    option is an error listing the compressor's options).

    sequential (needs calibration): build the layers in execution order, each from the inputs the
    already compressed earlier layers give it, with the output-side factor refit in closed form
    so the layer reproduces the original layer's outputs (a whitened layer solves for them
    directly). The ranks are allocated first, from the original model's statistics; the
    calibration batches are then kept as a list and run twice per group of layers that share
    an input (see tensorslim.calibrate.sequential). None (the default): on for method "whitened"
    (whose factors minimise the output error, the error sequential calibration refits) when
    `calibration` is a list or tuple of batches (already in memory). Measured with whitened: as
    good or better on every benchmark (all-MiniLM-L6-v2 keep 0.5 mean cosine 0.695 -> 0.703; a
    3-layer LSTM keep 0.1 0.9886 -> 0.9900; a GPT-2 keep 0.1 perplexity 172.1 -> 156.8), for 2 to
    9 times the compress time (two partial forward passes per layer group and batch). Off
    otherwise: svd, fwsvd and fvd keep their own objectives (pass True to refit them to the
    outputs too: svd on MiniLM 0.41 -> 0.64), and a generator or DataLoader is streamed once
    with bounded memory; sequential=False turns it off for whitened. A sequential plan is
    rebuilt by apply_plan only with the same calibration data.

    A module used at several places is compressed once and stays shared; a layer whose weight is
    tied to a module that stays dense (a language model's head tied to its embedding) stays dense.
    A model that is itself one layer (`nn.Linear(64, 64)`) is compressed as a whole: the returned
    model is then the replacement, and the plan names the layer "" ("(model)").

    Returns a new model (the input is never modified) and the Plan that was applied. Raises
    UnsupportedLayerError, listing each layer's reason, when no layer can be compressed (also
    with keep=1.0: there is nothing to compress).
    """
    if keep is not None and speedup is not None:
        raise TensorSlimError(
            f"give keep= or speedup=, not both (got keep={keep!r}, speedup={speedup!r}): keep is "
            "a cost budget, speedup a measured whole-model latency target"
        )
    if keep is None and speedup is None:
        raise InvalidKeepError(
            "keep must be a number in (0, 1] (the fraction of the compressible layers' cost that "
            "remains, e.g. 0.5), or give speedup= instead (a measured whole-model latency target, "
            "e.g. 2.0, with example_input=); got keep=None and speedup=None"
        )
    if not isinstance(measure, bool):
        raise TensorSlimError(f"measure must be True or False; got {measure!r}")
    kwargs = dict(
        method=method, allocator=allocator, include=include, exclude=exclude,
        progress=progress, calibration=calibration, loss=loss, objective=objective,
        method_options=method_options, sequential=sequential,
    )  # fmt: skip
    if speedup is not None:
        from tensorslim.speed.target import compress_for_speedup

        return compress_for_speedup(
            model, speedup, example_input, cost=cost or "latency", **kwargs
        )
    keep = check_keep(keep)
    if measure and example_input is None:
        raise TensorSlimError("measure=True needs example_input=: the whole model is timed on it")
    analysis = analyse(model, cost=cost or "params", example_input=example_input, **kwargs)
    compressed, plan = build(analysis, keep)
    if measure:
        from tensorslim.speed.target import measure_whole_model

        plan.whole_model = measure_whole_model(model, compressed, analysis.example_input)
    return compressed, plan


@dataclass
class Analysis:
    """compress()'s steps 1-4 (find layers, trace shapes, calibrate, propose), done once and
    reusable for several budgets (`build`): the speed target's search builds many keeps from one
    analysis."""

    model: nn.Module
    layers: list[LayerInfo]
    units: list[Unit]
    compressor: Any
    method: str
    cost: str
    allocator: str
    example_input: Any
    batches: Any
    sequential: bool
    progress: bool
    data_meta: dict[str, Any]

    @property
    def options(self) -> dict[str, Any]:
        c = self.compressor
        return {c.kind: c.options} if self.method != AUTO else {}

    def min_keep(self) -> float:
        """The smallest keep any allocation reaches: every unit at its cheapest proposal (in the
        analysis's cost unit)."""
        dense = sum(u.dense_value for u in self.units)
        least = sum(min([u.dense_value, *u.values]) for u in self.units)
        return least / dense if dense else 1.0

    def selection(self, keep: float) -> list[int]:
        """Each unit's choice (DENSE or a proposal index) for the budget keep x the dense cost."""
        return allocate(self.units, keep, self.allocator)


def analyse(
    model: nn.Module,
    *,
    cost: str = "params",
    method: str = "svd",
    allocator: str = "global",
    example_input: Any = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    progress: bool = False,
    calibration: Any = None,
    loss: Any = None,
    objective: str | None = None,
    method_options: dict[str, Any] | None = None,
    sequential: bool | None = None,
) -> Analysis:
    """Steps 1-4 of compress (arguments as there): the layers, their proposals and costs."""
    _check_choice("cost", cost, COSTS)
    _check_choice("method", method, methods())
    _check_choice("allocator", allocator, list(ALLOCATORS))
    objective = check_objective(objective)
    compressor = method_compressor(method, method_options)  # before any batch is read
    method = compressor.method  # a kind given as method ("lowrank") is recorded by its name
    example_given = example_input is not None
    if sequential is not None and not isinstance(sequential, bool):
        raise TensorSlimError(f"sequential must be True, False or None; got {sequential!r}")
    if sequential is None:  # auto: see compress
        sequential = method == "whitened" and isinstance(calibration, (list, tuple))
    if sequential and calibration is None:
        raise TensorSlimError("sequential=True needs calibration data: pass calibration=batches")
    batches, example_input = peek(calibration, example_input)
    if sequential:
        batches = as_batches(batches)  # read once per group of layers
    _check_example_input(example_input)
    if COST_MODELS[cost].needs_input and example_input is None:
        what = "FLOPs" if cost == "flops" else "CPU latency"
        raise TensorSlimError(
            f"cost={cost!r} needs example_input to measure the {what} of each layer"
        )

    # 1. find layers
    layers = find_layers(model, resolver(compressor), include, exclude)
    _require_compressible(model, layers, method, include, exclude)
    # 2. trace shapes
    if example_input is not None:
        _trace(model, layers, example_input, example_given)
        _require_compressible(model, layers, method, include, exclude)
    # 3. calibrate
    obj = objective or compressor.objective
    data_meta = attach(
        model, layers, method, batches, loss=loss, objective=obj,
        options=_options_dict(compressor), progress=progress,
    )
    _require_compressible(model, layers, method, include, exclude)
    # 4. propose
    units = propose(
        layers, cost=cost, objective=obj, latency=_latency_proposals if cost == "latency" else None,
        progress=lambda xs: track(xs, "Analysing layers", progress),
    )
    return Analysis(
        model, layers, units, compressor, method, cost, allocator, example_input, batches,
        sequential, progress, data_meta,
    )  # fmt: skip


def build(
    analysis: Analysis, keep: float, selection: list[int] | None = None
) -> tuple[nn.Module, Plan]:
    """Steps 5-7 of compress for one budget: allocate (unless `selection` is given, as from
    `analysis.selection(keep)`), materialize a new model, account. The analysed model is not
    modified; `build` may be called again with another keep."""
    a = analysis
    keep = check_keep(keep)
    # 5. allocate
    if selection is None:
        selection = a.selection(keep)
    # 6. materialize
    jobs = layer_jobs(a.layers, a.units, selection)
    data_meta = dict(a.data_meta)
    if a.sequential:
        compressed, data_meta["sequential"] = sequential_materialize(
            a.model, a.layers, jobs, a.batches, options=a.options, progress=a.progress
        )
    else:
        compressed = materialize(
            a.model, jobs.values(), handler_of=handler_for, options=a.options,
            progress=lambda xs: track(xs, "Factorizing", a.progress),
        )
    # 7. account
    plan = _account(
        a.model, compressed, a.layers, jobs, a.units, selection,
        keep=keep, cost=a.cost, method=a.method, allocator=a.allocator,
        example_input=a.example_input, meta=data_meta, compressor=a.compressor,
    )
    if a.example_input is not None:
        with eval_mode(compressed):
            run_model(compressed, a.example_input)
    return compressed, plan


def _trace(model: nn.Module, layers: list[LayerInfo], example_input: Any, given: bool) -> None:
    """Trace shapes in eval mode (BatchNorm statistics and dropout of the model untouched)."""
    try:
        with eval_mode(model):
            trace_sites(model, layers, example_input)
    except ExampleInputError as exc:
        if given:
            raise
        raise ExampleInputError(
            f"the model rejected calibration batch 0 (counting from 0), used as the example "
            f"input: {exc}"
        ) from exc
    for info in layers:
        if info.compressible and info.site.output_shape is None:
            info.reason = "not executed on the example input"


def _options_dict(compressor: Any) -> dict[str, Any]:
    opts = compressor.options
    return {k: getattr(opts, k) for k in option_names(type(compressor))}


def _latency_proposals(info: LayerInfo, proposals: list) -> tuple[list, list[float], float]:
    from tensorslim.search.latency import latency_proposals

    return latency_proposals(info.module, info.handler, info.site, proposals)


def allocate(units: list[Unit], keep: float, allocator: str) -> list[int]:
    """One choice per unit (DENSE or a proposal index) for the budget keep x the dense cost."""
    if keep >= 1.0:
        return [DENSE] * len(units)
    candidates = [
        Candidate(u.name, u.dense_value, u.values, [p.error for p in u.proposals]) for u in units
    ]
    budget = keep * sum(c.dense_cost for c in candidates)
    return ALLOCATORS[allocator](candidates, budget)


def layer_jobs(
    layers: list[LayerInfo], units: list[Unit], selection: list[int]
) -> dict[str, LayerJob]:
    """Each compressible layer's job: its spec merged from its units' chosen proposals."""
    chosen: dict[str, list] = {}
    for u, i in zip(units, selection):
        if i != DENSE:
            chosen.setdefault(u.info.name, []).append(u.proposals[i])
    jobs = {}
    for info in layers:
        if info.compressible:
            picked = chosen.get(info.name, [])
            spec = merge(info, picked) if picked else []
            jobs[info.name] = LayerJob(info.names, spec, info.site)
    return jobs


def _account(
    model: nn.Module,
    compressed: nn.Module,
    layers: list[LayerInfo],
    jobs: dict[str, LayerJob],
    units: list[Unit],
    selection: list[int],
    *,
    keep: float,
    cost: str,
    method: str,
    allocator: str,
    example_input: Any,
    meta: dict[str, Any],
    compressor: Any,
) -> Plan:
    options = {compressor.kind: compressor.options} if method != AUTO else {}
    dense_reason = "keep=1.0" if keep >= 1.0 else f"kept dense by the {allocator} allocator"
    plans = []
    for info in layers:
        job = jobs.get(info.name)
        lp = layer_plan(info, job, compressed, options=options, dense_reason=dense_reason)
        timed = cost == "latency" or compressor.form == "layer"  # tensor methods and "auto"
        if timed and job is not None and job.spec and info.site.input_shape:
            _flag_latency(info, lp, job)
        plans.append(lp)

    def latency_keep() -> float:
        before = sum(u.dense_value for u in units)
        after = sum(u.dense_value if i == DENSE else u.values[i] for u, i in zip(units, selection))
        return after / before if before else 1.0

    plan = make_plan(
        model, compressed, plans, keep=keep, cost=cost, method=method, allocator=allocator,
        flops_known=example_input is not None, latency_keep=latency_keep,
        meta={
            "tensorslim": __version__,
            "torch": torch.__version__,
            "model_class": type(model).__name__,
            "example_input_shape": _input_shape(example_input),
            **meta,
            "options": {k: _plain(v) for k, v in options.items()},
        },
    )
    if plan.achieved_keep > keep + 0.02:
        plan.meta["warning"] = (
            f"over budget: achieved keep {plan.achieved_keep:.3f} > requested {keep:.3f}; the "
            "smallest factorizations of the compressible layers already cost more than the budget"
        )
        warnings.warn(plan.meta["warning"], UserWarning, stacklevel=4)
    return plan


def _plain(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)


def _flag_latency(info: LayerInfo, lp: LayerPlan, job: LayerJob) -> None:
    """Record the compressed and dense layer's measured CPU latency on the layer's input; flag a
    compression that is not faster than its dense layer."""
    from tensorslim.search.latency import latency_facts

    facts = latency_facts(info.module, info.handler, job.spec, info.site)
    lp.extra.update(facts)
    if facts.get("slower_than_dense"):
        note = (
            f"measured slower than dense ({facts['latency_ms']:.3g} vs "
            f"{facts['dense_latency_ms']:.3g} ms)"
        )
        lp.reason = f"{lp.reason}; {note}" if lp.reason else note


@dataclass
class LayerReport:
    """What `analyze` says about one layer."""

    name: str
    type: str
    shape: list[int]
    params: int
    flops: int | None
    compressible: bool
    reason: str | None
    max_useful_rank: int | None = None
    rank90: int | None = None
    rank99: int | None = None
    singular_values: list[float] | None = None


def analyze(
    model: nn.Module,
    example_input: Any = None,
    *,
    method: str = "svd",
    progress: bool = False,
) -> list[LayerReport]:
    """Per-layer shapes, costs and spectrum summary: the smallest rank keeping 90% / 99% of the
    squared Frobenius norm (energy), and the largest rank that still saves parameters (layers
    with one weight matrix)."""
    _check_choice("method", method, methods())
    _check_example_input(example_input)
    layers = find_layers(model, resolver(method_compressor(method)))
    if example_input is not None:
        with eval_mode(model):
            trace_sites(model, layers, example_input)
    reports = []
    for info in track(layers, "Analysing spectra", progress):
        rep = LayerReport(
            info.name,
            info.type_name,
            list(info.shape),
            info.params(),
            info.flops(),
            info.compressible,
            info.reason,
        )
        mats = info.handler.matrices(info.module) if info.handler is not None else {}
        if len(mats) == 1:
            w = next(iter(mats.values()))
            if torch.isfinite(w).all():
                s = singular_values(w)
                tails = tail_energy(s)
                rep.rank90 = int((tails <= 0.10 + 1e-12).nonzero()[0])
                rep.rank99 = int((tails <= 0.01 + 1e-12).nonzero()[0])
                rep.singular_values = s.tolist()
                rep.max_useful_rank = max_useful_rank(*w.shape)
        reports.append(rep)
    return reports
