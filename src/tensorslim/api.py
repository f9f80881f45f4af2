"""The public functions: compress a model to a budget, apply a saved plan, analyze layers."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import tensorslim._calibration as _calibration
from tensorslim._nested import tensors_in
from tensorslim._progress import track
from tensorslim._version import __version__
from tensorslim.decompose import relative_error, singular_values, tail_energy
from tensorslim.errors import (
    ExampleInputError,
    TensorSlimError,
    UnsupportedLayerError,
    check_keep,
)
from tensorslim.model import (
    LayerInfo,
    count_params,
    find,
    find_layers,
    get_submodule,
    registered_methods,
    replace_at,
    run_model,
    trace_sites,
    with_objective,
)
from tensorslim.model.data_aware import check_method_options
from tensorslim.model.latency_cost import flag_latency, latency_options
from tensorslim.model.modes import eval_mode
from tensorslim.model.tensor_factorizers import TENSOR_METHODS
from tensorslim.plan import ALLOCATORS, DENSE, Candidate, LayerPlan, Plan
from tensorslim.plan.apply import apply_plan  # noqa: F401  (public API, re-exported)
from tensorslim.plan.plan import label

COSTS = ("params", "flops", "latency")
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
    candidates = [i for i in layers if i.factorizer is not None]
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
    keep: float = 0.5,
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
) -> tuple[nn.Module, Plan]:
    """Factorize `model`'s layers so that a fraction `keep` of their cost remains.

    keep: in (0, 1], fraction of the compressible layers' cost (parameters or FLOPs) that remains.
    cost: "params" or "flops" (FLOPs need `example_input`, a tensor, tuple or dict of inputs).
    method: a registered decomposition ("svd"). allocator: "global" (least summed relative squared
    weight error for the budget) or "uniform" (same keep for every layer).
    include / exclude: fnmatch patterns on dotted layer names.

    Data-aware compression (methods "fwsvd", "fvd", "whitened", or any method with a data-aware
    objective): calibration is an iterable of model inputs (tensors, tuples of positional inputs or
    dicts of keyword inputs), consumed once; its first batch is the example input if none is given.
    loss(model, batch) -> scalar tensor, needed for the Fisher information ("fwsvd", "fvd",
    objective "fisher"). objective: what the allocator minimises per layer, "weight" (relative
    squared weight error), "fisher" (loss increase estimated from the Fisher diagonal) or "feature"
    (relative squared output error on the calibration inputs); default per method (svd: weight,
    fwsvd/fvd: fisher, whitened: feature). method_options: e.g. {"solver": "als", "iters": 30} for
    fvd, {"damp": 1e-6} for whitened (tensorslim.model.data_aware.DEFAULTS lists them).

    A module used at several places is factorized once and stays shared; a layer whose weight
    is tied to a module that stays dense (a language model's head tied to its embedding) stays
    dense. A model that is itself one layer (`nn.Linear(64, 64)`) is factorized as a whole: the
    returned model is then the replacement, and the plan names the layer "" ("(model)").

    Returns a new model (the input is never modified) and the Plan that was applied. Raises
    UnsupportedLayerError, listing each layer's reason, when no layer can be factorized (also
    with keep=1.0: there is nothing to compress).
    """
    keep = check_keep(keep)
    _check_choice("cost", cost, COSTS)
    _check_choice("method", method, registered_methods())
    _check_choice("allocator", allocator, list(ALLOCATORS))
    _calibration.check_objective(objective)
    check_method_options(method_options)  # before any batch is read or the model is run
    example_given = example_input is not None
    batches, example_input = _calibration.peek(calibration, example_input)
    _check_example_input(example_input)
    if cost in ("flops", "latency") and example_input is None:
        what = "FLOPs" if cost == "flops" else "CPU latency"
        raise TensorSlimError(
            f"cost={cost!r} needs example_input to measure the {what} of each layer"
        )

    layers = find_layers(model, method, include, exclude)
    _require_compressible(model, layers, method, include, exclude)
    if example_input is not None:
        try:
            _eval_mode_trace(model, layers, example_input)
        except ExampleInputError as exc:
            if example_given:
                raise
            raise ExampleInputError(
                f"the model rejected calibration batch 0 (counting from 0), used as the example "
                f"input: {exc}"
            ) from exc
        for info in layers:
            if info.compressible and info.site.output_shape is None:
                info.reason = "not executed on the example input"
        _require_compressible(model, layers, method, include, exclude)
    data_meta = _calibration.attach(
        model,
        layers,
        method,
        batches,
        loss=loss,
        objective=objective,
        method_options=method_options,
        progress=progress,
    )
    _require_compressible(model, layers, method, include, exclude)
    compressible = [info for info in layers if info.compressible]

    candidates, options = [], []
    for info in track(compressible, "Analysing layers", progress):
        opts = with_objective(
            info.factorizer, info.module, info.site, info.factorizer.options(info.module, info.site)
        )
        dense = info.params() if cost == "params" else info.flops()
        costs = [o.params if cost == "params" else o.flops for o in opts]
        if cost == "latency":  # measured milliseconds on the layer's input (model/latency_cost.py)
            opts, costs, dense = latency_options(info.factorizer, info.module, info.site, opts)
        candidates.append(Candidate(info.name, dense, costs, [o.error for o in opts]))
        options.append(opts)

    if keep >= 1.0:
        selection = [DENSE] * len(candidates)
    else:
        budget = keep * sum(c.dense_cost for c in candidates)
        selection = ALLOCATORS[allocator](candidates, budget)

    compressed = copy.deepcopy(model)
    chosen = {c.name: (i, opts) for c, i, opts in zip(candidates, selection, options)}
    plans = []
    for info in track(layers, "Factorizing", progress):
        lp = LayerPlan(
            name=info.name,
            type=info.type_name,
            shape=list(info.shape),
            params_before=info.params(),
            params_after=info.params(),
            flops_before=info.flops(),
            flops_after=info.flops(),
            reason=info.reason,
            compressible=info.compressible,
        )
        if info.aliases:
            lp.extra["aliases"] = list(info.aliases)
        if info.compressible:
            i, opts = chosen[info.name]
            if i == DENSE:
                lp.reason = (
                    "keep=1.0" if keep >= 1.0 else f"kept dense by the {allocator} allocator"
                )
                lp.rel_error = 0.0
            else:
                opt = opts[i]
                new, extra = info.factorizer.apply_site(
                    get_submodule(compressed, info.name), opt.rank, info.site
                )
                lp.extra.update(extra)
                compressed = replace_at(compressed, info.names, new)
                lp.method, lp.rank = _plan_method(info, opt, method)
                lp.params_after, lp.flops_after = opt.params, opt.flops
                if info.note:
                    lp.reason = info.note
                lp.extra["keep"] = round(opt.params / lp.params_before, 6)
                lp.extra["compression"] = round(1 - opt.params / lp.params_before, 6)
                if info.site.input_shape and (cost == "latency" or method in TENSOR_METHODS):
                    _flag_latency(info, lp)
                lp.rel_error = relative_error(
                    info.factorizer.weight(info.module), info.factorizer.reconstructed_weight(new)
                )
        plans.append(lp)

    base = [lp for lp in plans if lp.compressible]
    key_before = "params_before" if cost == "params" else "flops_before"
    key_after = "params_after" if cost == "params" else "flops_after"
    before = sum(getattr(lp, key_before) for lp in base)
    after = sum(getattr(lp, key_after) for lp in base)
    if cost == "latency":  # measured milliseconds of the compressible layers
        before = sum(c.dense_cost for c in candidates)
        after = sum(c.cost(i) for c, i in zip(candidates, selection))
    flops_known = example_input is not None
    plan = Plan(
        layers=plans,
        keep=keep,
        cost=cost,
        method=method,
        allocator=allocator,
        achieved_keep=(after / before) if before else 1.0,
        model_params_before=count_params(model),
        model_params_after=count_params(compressed),
        model_flops_before=_sum_flops(plans, "flops_before") if flops_known else None,
        model_flops_after=_sum_flops(plans, "flops_after") if flops_known else None,
        meta={
            "tensorslim": __version__,
            "torch": torch.__version__,
            "model_class": type(model).__name__,
            "example_input_shape": _input_shape(example_input),
            **data_meta,
        },
    )
    if plan.achieved_keep > keep + 0.02:
        plan.meta["warning"] = (
            f"over budget: achieved keep {plan.achieved_keep:.3f} > requested {keep:.3f}; the "
            "smallest factorizations of the compressible layers already cost more than the budget"
        )
        warnings.warn(plan.meta["warning"], UserWarning, stacklevel=2)
    if example_input is not None:
        with eval_mode(compressed):
            run_model(compressed, example_input)
    return compressed, plan


def _flag_latency(info: LayerInfo, lp: LayerPlan) -> None:
    """Record the factorized and dense layer's measured CPU latency on the layer's input; flag a
    factorization that is not faster than its dense layer."""
    factorizer = find(info.module, lp.method)
    if factorizer is None:
        return
    facts = flag_latency(factorizer, info.module, lp.rank, info.site)
    lp.extra.update(facts)
    if facts.get("slower_than_dense"):
        note = (
            f"measured slower than dense ({facts['latency_ms']:.3g} vs "
            f"{facts['dense_latency_ms']:.3g} ms)"
        )
        lp.reason = f"{lp.reason}; {note}" if lp.reason else note


def _plan_method(info: LayerInfo, opt: Any, method: str) -> tuple[str, Any]:
    """The method and rank a plan records for the chosen option: "auto" records the method it
    picked (its options carry it, their rank is (method, rank)); a fallback (a tensor method on a
    Linear layer) records the method that did the work."""
    if getattr(opt, "method", None):
        return opt.method, opt.rank[1]
    if info.note:
        return info.factorizer.method, opt.rank
    return method, opt.rank


def _sum_flops(plans: list[LayerPlan], key: str) -> int | None:
    vals = [getattr(lp, key) for lp in plans if getattr(lp, key) is not None]
    return sum(vals) if vals else None


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
    squared Frobenius norm (energy), and the largest rank that still saves parameters."""
    _check_choice("method", method, registered_methods())
    _check_example_input(example_input)
    layers = find_layers(model, method)
    if example_input is not None:
        _eval_mode_trace(model, layers, example_input)
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
        if info.factorizer is not None and hasattr(info.factorizer, "matrix"):
            w = info.factorizer.matrix(info.module)
            if torch.isfinite(w).all():
                s = singular_values(w)
                tails = tail_energy(s)
                rep.rank90 = int((tails <= 0.10 + 1e-12).nonzero()[0])
                rep.rank99 = int((tails <= 0.01 + 1e-12).nonzero()[0])
                rep.singular_values = s.tolist()
                opts = info.factorizer.options(info.module, info.site)
                rep.max_useful_rank = opts[-1].rank if opts else 0
        reports.append(rep)
    return reports
