"""Apply a Plan to a model: replace each compressed layer the plan names, through the one
materialize path (tensorslim.core.materialize).

Everything is checked against the model before any layer is built, so a hand-edited plan cannot
make tensorslim allocate what its numbers ask for: every compressed layer exists with the plan's
type and shape, has a handler, each component's compressor supports it, it shares no parameter
with a module that stays dense, and its parameters are valid (each compressor's `check`, then a
dry build on the meta device, which allocates nothing). A module used at several places is built
once and set at each of its names. Plans made with data-aware compressors are rebuilt from
calibration data (`calibration=`) as compress built them (a data-aware Tucker-2 from the inputs'
Gram, a sequential plan layer by layer), or raise a clear error saying what is missing.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorslim.core.compressor import Compressor, compressor_class, make_options
from tensorslim.core.discover import ModelIndex, layer_modules, sharing_reason
from tensorslim.core.handler import Handler, handler_for
from tensorslim.core.materialize import LayerJob, build_layer, check_spec, compressors_of
from tensorslim.core.materialize import materialize as _materialize
from tensorslim.core.surgery import get_submodule
from tensorslim.core.target import LayerSite
from tensorslim.errors import (
    InvalidRankError,
    PlanMismatchError,
    TensorSlimError,
    UnsupportedLayerError,
    WeightFileError,
    short_repr,
)
from tensorslim.plan.plan import LayerPlan, Plan, label

# A compressed structure may hold at most this many times the dense layer's parameters (every
# full-rank factorization tensorslim builds stays below it: a matrix's r(m + n) is at most 2mn).
MAX_SIZE_FACTOR = 4
_ACCEPTED = "the compressor's parameter form, each rank at most the layer's full rank"
# What building a module from bad parameters raises (TensorSlimError, a ValueError, is re-raised).
_BUILD_ERRORS = (ValueError, TypeError, IndexError, KeyError, RuntimeError, OverflowError)


@dataclass
class _Step:
    """One checked replacement: the plan's layer, all names of its module, its handler and spec."""

    lp: LayerPlan
    names: list[str]
    handler: Handler
    compressors: list[Compressor]


def apply_plan(
    model: nn.Module,
    plan: Plan,
    *,
    weights: str = "factorize",
    calibration: Iterable[Any] | None = None,
    loss: Any = None,
    progress: bool = False,
) -> nn.Module:
    """A copy of `model` with every compressed layer of `plan` replaced (the replacement itself
    when the plan compresses the model as a whole, layer name "").

    weights: "factorize" computes the compressed weights from the model's dense weights; "empty"
    only builds the structure (to load saved weights into). calibration / loss: batches of model
    inputs and loss(model, batch) -> scalar, needed when the plan uses a data-aware compressor
    ("fwsvd", "fvd", "whitened"), a Tucker-2 fitted to calibration inputs, or was built
    sequentially (`compress(..., sequential=True)`, rebuilt the same way); without them such a
    plan raises TensorSlimError naming the layers and what they need. With the calibration data
    compress had, the rebuilt weights are the compressed model's.

    Before anything is built, raises WeightFileError for a plan field of the wrong type or a
    duplicate layer, PlanMismatchError for a layer the model lacks or one of another type or shape,
    UnsupportedLayerError for a layer a compressor cannot compress (or one whose weight is tied to
    a dense module), InvalidRankError for parameters outside what the layer and compressor accept.
    """
    if weights not in ("factorize", "empty"):
        raise TensorSlimError(f"weights must be 'factorize' or 'empty'; got {weights!r}")
    if not isinstance(plan, Plan):
        raise TensorSlimError(f"plan must be a tensorslim Plan; got {type(plan).__name__}")
    steps = check_plan(model, plan)
    options = plan_options(plan)
    jobs = [LayerJob(st.names, st.lp.components, LayerSite(st.lp.name)) for st in steps]
    try:
        if weights == "factorize":
            rebuilt = _calibrated(model, plan, steps, jobs, calibration, loss, progress)
            if rebuilt is not None:  # the plan was built sequentially: rebuilt the same way
                from tensorslim.calibrate.sequential import sequential_materialize

                infos, batches = rebuilt
                by_name = {job.names[0]: job for job in jobs}
                return sequential_materialize(
                    model, infos, by_name, batches, options=options, progress=progress
                )[0]
        return _materialize(
            model, jobs, handler_of=handler_for, empty=weights == "empty", options=options
        )
    except TensorSlimError:
        raise
    except _BUILD_ERRORS as exc:
        raise InvalidRankError(f"cannot build the plan: {exc}") from exc


def plan_options(plan: Plan) -> dict[str, Any]:
    """The compressor options a plan was made with (meta["options"]: kind -> options),
    validated against each compressor's options."""
    raw = plan.meta.get("options") or {}
    if not isinstance(raw, dict):
        raise WeightFileError(f"plan meta 'options' must be an object; got {short_repr(raw)}")
    out = {}
    for kind, opts in raw.items():
        cls = compressor_class(kind) if isinstance(kind, str) else None
        if cls is None:
            continue  # options of a compressor this plan does not use
        try:
            out[kind] = make_options(cls, opts)
        except TensorSlimError as exc:
            raise WeightFileError(f"plan meta 'options': {exc}") from exc
    return out


def _calibrated(
    model: nn.Module,
    plan: Plan,
    steps: list[_Step],
    jobs: list[LayerJob],
    calibration: Any,
    loss: Any,
    progress: bool,
) -> tuple[list[Any], list[Any]] | None:
    """Set calibration statistics on the jobs whose build uses them, as compress had them:
    the compressors' own needs, the input Gram for a compressor that fits the data when the plan
    gathered one (data-aware Tucker-2), every layer of a sequentially built plan. Returns the
    layers and batches to rebuild a sequential plan with (None otherwise)."""
    from tensorslim.calibrate.sequential import as_batches

    sequential = bool(plan.meta.get("sequential"))
    gathered = plan.meta.get("calibration")
    gram = isinstance(gathered, dict) and gathered.get("gram") is True

    def uses_data(st: _Step) -> bool:
        return any(c.needs or (gram and c.fits_data) for c in st.compressors)

    needy = [(st, job) for st, job in zip(steps, jobs) if sequential or uses_data(st)]
    if not needy:
        return None
    needs = sorted({n for st, _ in needy for c in st.compressors for n in c.needs})
    fits = gram and any(c.fits_data for st, _ in needy for c in st.compressors)
    if calibration is None or ("fisher" in needs and loss is None):
        names = ", ".join(
            f"{label(st.lp.name)} ({st.lp.method})" for st, _ in needy[:4]
        ) + (f" and {len(needy) - 4} more" if len(needy) > 4 else "")
        what = "calibration=batches" + (" and loss=fn" if "fisher" in needs else "")
        made = (
            "was built sequentially (each layer from the compressed model's inputs)"
            if sequential
            else "compresses "
            + names
            + " with data-aware compressors, which need "
            + " and ".join(needs + (["gram"] if fits and "gram" not in needs else []))
            + " statistics"
        )
        raise TensorSlimError(
            f"the plan {made}: pass {what} to apply_plan (to rebuild a saved model without data "
            "use tensorslim.load)"
        )
    from tensorslim.calibrate.attach import attach, peek
    from tensorslim.core.discover import LayerInfo

    batches, _ = peek(calibration, None)
    if sequential:
        batches = as_batches(batches)
    infos = [
        LayerInfo(st.lp.name, get_submodule(model, st.lp.name), st.handler, st.compressors[0],
                  None, job.site, aliases=job.names[1:])
        for st, job in needy
    ]
    attach(
        model, infos, plan.method, batches, loss=loss,
        # the statistics building needs: the compressors' own, and the Gram a data fit uses
        objective="feature" if fits else "weight",
        options={}, progress=progress, verb="pass",
    )
    by_name = {info.name: info for info in infos}
    for job in jobs:
        info = by_name.get(job.names[0])
        if info is not None:
            if info.reason is not None:
                raise TensorSlimError(f"layer {label(info.name)}: {info.reason}")
            job.site = info.site
    return (infos, batches) if sequential else None


def check_plan(model: nn.Module, plan: Plan) -> list[_Step]:
    """Check every field of `plan` and every compressed layer against `model` (see apply_plan);
    returns the replacements to build, in plan order."""
    plan.validate()
    options = plan_options(plan)
    layers = layer_modules(model)
    index = ModelIndex(model)
    steps: list[_Step] = []
    owner: dict[int, str] = {}
    for lp in plan.factorized_layers:
        module = get_submodule(model, lp.name)
        _check_type_and_shape(lp, module)
        first = owner.setdefault(id(module), lp.name)
        if first != lp.name:
            raise PlanMismatchError(
                f"plan factorizes layers {label(first)} and {label(lp.name)}, which are the same "
                "module in the model; list it once"
            )
        names = _names(lp, module, layers, index)
        handler, comps = _compressors(lp, module, options)
        _check_params(lp, module, handler, options)
        steps.append(_Step(lp, names, handler, comps))
    return steps


def _where(lp: LayerPlan) -> str:
    return f"plan layer {label(lp.name)} ({lp.type}, method {lp.method!r})"


def _check_type_and_shape(lp: LayerPlan, module: nn.Module) -> None:
    if type(module).__name__ != lp.type:
        raise PlanMismatchError(
            f"plan says layer {label(lp.name)} is a {lp.type}, but the model has a "
            f"{type(module).__name__} there"
        )
    shape = list(_weight_shape(module))
    if shape != list(lp.shape):
        raise PlanMismatchError(
            f"plan says layer {label(lp.name)} has weight shape {list(lp.shape)}, the model's "
            f"is {shape}"
        )


def _names(
    lp: LayerPlan,
    module: nn.Module,
    layers: dict[int, tuple[nn.Module, list[str]]],
    index: ModelIndex,
) -> list[str]:
    """Every name of the layer's module (the plan's first), checked against its recorded aliases."""
    entry = layers.get(id(module))
    if entry is None:
        raise PlanMismatchError(
            f"plan factorizes {label(lp.name)}, which is part of another layer of the model "
            "(e.g. a projection of an nn.MultiheadAttention), not a layer of its own"
        )
    why = sharing_reason(module, entry[1], index)
    if why is not None:
        raise UnsupportedLayerError(f"{_where(lp)} must stay dense: {why}")
    names = [lp.name, *(n for n in entry[1] if n != lp.name)]
    recorded = lp.extra.get("aliases")
    if recorded is not None and sorted(recorded) != sorted(names[1:]):
        raise PlanMismatchError(
            f"plan says layer {label(lp.name)} is also used as {sorted(recorded)}, but in the "
            f"model it is also used as {sorted(names[1:])}"
        )
    return names


def _compressors(lp: LayerPlan, module: nn.Module, options: dict) -> tuple[Handler, list]:
    handler = handler_for(module)
    if handler is None:
        raise PlanMismatchError(
            f"plan compresses {label(lp.name)}, a {lp.type}, which no handler knows"
        )
    why = handler.unsupported_reason(module)
    if why is not None:
        raise UnsupportedLayerError(f"{_where(lp)} cannot be compressed: {why}")
    try:
        comps = compressors_of(lp.components, options)
    except TensorSlimError as exc:
        raise PlanMismatchError(f"{_where(lp)}: {exc}") from exc
    for comp in comps:
        why = comp.supports(handler, module)
        if why is None:
            continue
        fb = comp.fallback(handler, module)
        if fb is not None:  # compress would have used the fallback and recorded its kind
            why = (
                f"kind {comp.kind!r} does not apply to this {type(module).__name__} "
                f"({fb[1].split('; falls back')[0]}); use kind {fb[0]!r}"
            )
        raise UnsupportedLayerError(f"{_where(lp)} cannot be compressed: {why}")
    return handler, comps


def _check_params(lp: LayerPlan, module: nn.Module, handler: Handler, options: dict) -> None:
    site = LayerSite(lp.name)
    why = check_spec(module, handler, lp.components, site, options)
    if why is None:
        why = _dry_build_problem(lp, module, handler, options)
    if why is not None:
        raise InvalidRankError(f"{_where(lp)}: {why}")


def _dry_build_problem(
    lp: LayerPlan, module: nn.Module, handler: Handler, options: dict
) -> str | None:
    """Build the structure on the meta device: None if it builds at a sane size, else why not."""
    spec = lp.components
    try:
        built, _ = build_layer(
            _meta_twin(module), handler, spec, LayerSite(lp.name), empty=True, options=options
        )
    except TensorSlimError:
        raise
    except _BUILD_ERRORS as exc:
        return f"spec {short_repr(lp.spec)} does not fit this layer ({exc}); accepted: {_ACCEPTED}"
    size = sum(p.numel() for p in built.parameters())
    dense = sum(p.numel() for p in module.parameters())
    if size > MAX_SIZE_FACTOR * dense:
        return (
            f"spec {short_repr(lp.spec)} would build {size} parameters, over {MAX_SIZE_FACTOR}x "
            f"the dense layer's {dense}; accepted: {_ACCEPTED}"
        )
    return None


def _meta_twin(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers are on the meta device (no data copied)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        is_param = isinstance(t, nn.Parameter)
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if is_param else meta
    return copy.deepcopy(module, memo)


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape a plan records for a layer (LayerInfo.shape): its weight's, else its first
    parameter's (nn.MultiheadAttention: in_proj_weight)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        w = next(iter(module.parameters()), torch.empty(0))
    return tuple(w.shape)
