"""Apply a Plan to a model: replace each factorized layer the plan names.

Everything is checked against the model before any layer is built, so a hand-edited plan cannot
make tensorslim allocate what its numbers ask for: every factorized layer exists with the plan's
type and shape, its method applies to it, it shares no parameter with a module that stays dense,
and its rank is valid (`Factorizer.check_rank`, then a dry build on the meta device, which
allocates nothing). A module used at several places is built once and set at each of its names.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorslim.errors import (
    InvalidRankError,
    PlanMismatchError,
    TensorSlimError,
    UnsupportedLayerError,
    short_repr,
)
from tensorslim.model import (
    Factorizer,
    ModelIndex,
    find,
    get_submodule,
    layer_modules,
    registered_methods,
    replace_at,
)
from tensorslim.model.profile import sharing_reason
from tensorslim.plan.plan import LayerPlan, Plan, label

# A factorized structure may hold at most this many times the dense layer's parameters (every
# full-rank factorization tensorslim builds stays below it: a matrix's r(m + n) is at most 2mn).
MAX_SIZE_FACTOR = 4
_ACCEPTED = "the method's rank form, each rank at most the layer's full rank"
# What building a module from a bad rank raises (TensorSlimError, a ValueError, is re-raised).
_BUILD_ERRORS = (ValueError, TypeError, IndexError, KeyError, RuntimeError, OverflowError)


@dataclass
class _Step:
    """One checked replacement: the plan's layer, all names of its module, how to build it."""

    lp: LayerPlan
    names: list[str]
    factorizer: Factorizer
    rank: Any


def apply_plan(model: nn.Module, plan: Plan, *, weights: str = "factorize") -> nn.Module:
    """A copy of `model` with every factorized layer of `plan` replaced (the replacement itself
    when the plan factorizes the model as a whole, layer name "").

    weights: "factorize" computes the factors from the model's dense weights; "empty" only builds
    the structure (to load saved weights into). Before anything is built, raises WeightFileError
    for a plan field of the wrong type or a duplicate layer, PlanMismatchError for a layer the
    model lacks or one of another type or shape, UnsupportedLayerError for a layer the method
    cannot factorize (or one whose weight is tied to a dense module), InvalidRankError for a rank
    outside what the layer and method accept.
    """
    if weights not in ("factorize", "empty"):
        raise TensorSlimError(f"weights must be 'factorize' or 'empty'; got {weights!r}")
    if not isinstance(plan, Plan):
        raise TensorSlimError(f"plan must be a tensorslim Plan; got {type(plan).__name__}")
    steps = check_plan(model, plan)
    out = copy.deepcopy(model)
    for step in steps:
        new = _build(step, get_submodule(out, step.names[0]), weights)
        out = replace_at(out, step.names, new)
    return out


def check_plan(model: nn.Module, plan: Plan) -> list[_Step]:
    """Check every field of `plan` and every factorized layer against `model` (see apply_plan);
    returns the replacements to build, in plan order."""
    plan.validate()
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
        factorizer = _factorizer(lp, module)
        rank = tuple(lp.rank) if isinstance(lp.rank, list) else lp.rank
        _check_rank(lp, module, factorizer, rank)
        steps.append(_Step(lp, names, factorizer, rank))
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


def _factorizer(lp: LayerPlan, module: nn.Module) -> Factorizer:
    factorizer = find(module, lp.method)
    if factorizer is None:
        known = registered_methods()
        if lp.method in known:
            raise PlanMismatchError(
                f"plan asks for method {lp.method!r} on {label(lp.name)}, but {lp.method!r} does "
                f"not apply to {lp.type} layers"
            )
        raise PlanMismatchError(
            f"plan asks for method {lp.method!r} on {label(lp.name)} ({lp.type}), which is not "
            f"registered; known methods: {', '.join(known)}"
        )
    why = factorizer.unsupported_reason(module)
    if why is not None:
        raise UnsupportedLayerError(f"{_where(lp)} cannot be factorized: {why}")
    return factorizer


def _check_rank(lp: LayerPlan, module: nn.Module, factorizer: Factorizer, rank: Any) -> None:
    why = factorizer.check_rank(module, rank)
    if why is None:
        why = _dry_build_problem(module, factorizer, rank)
    if why is not None:
        raise InvalidRankError(f"{_where(lp)}: {why}")


def _dry_build_problem(module: nn.Module, factorizer: Factorizer, rank: Any) -> str | None:
    """Build the structure on the meta device: None if it builds at a sane size, else why not."""
    try:
        built = factorizer.empty(_meta_twin(module), rank)
    except TensorSlimError:
        raise
    except _BUILD_ERRORS as exc:
        return f"rank {short_repr(rank)} does not fit this layer ({exc}); accepted: {_ACCEPTED}"
    size = sum(p.numel() for p in built.parameters())
    dense = factorizer.dense_params(module)
    if size > MAX_SIZE_FACTOR * dense:
        return (
            f"rank {short_repr(rank)} would build {size} parameters, over {MAX_SIZE_FACTOR}x the "
            f"dense layer's {dense}; accepted: {_ACCEPTED}"
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


def _build(step: _Step, module: nn.Module, weights: str) -> nn.Module:
    """The replacement of `module`; a failure the checks could not foresee names the layer."""
    build = step.factorizer.apply if weights == "factorize" else step.factorizer.empty
    try:
        return build(module, step.rank)
    except TensorSlimError:
        raise
    except _BUILD_ERRORS as exc:
        raise InvalidRankError(
            f"{_where(step.lp)}: cannot build it at rank {short_repr(step.rank)}: {exc}"
        ) from exc


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape a plan records for a layer (LayerInfo.shape): its weight's, else its first
    parameter's (nn.MultiheadAttention: in_proj_weight)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        w = next(iter(module.parameters()), torch.empty(0))
    return tuple(w.shape)
