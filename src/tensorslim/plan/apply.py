"""Apply a Plan to a model: replace each factorized layer the plan names."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from tensorslim.errors import PlanMismatchError, TensorSlimError
from tensorslim.model import find, get_submodule, registered_methods, set_submodule
from tensorslim.plan.plan import Plan


def apply_plan(model: nn.Module, plan: Plan, *, weights: str = "factorize") -> nn.Module:
    """A copy of `model` with every factorized layer of `plan` replaced.

    weights: "factorize" computes the factors from the model's dense weights; "empty" only builds the
    structure (to load saved weights into). Raises PlanMismatchError if the plan names a layer the
    model lacks or one of another type or shape.
    """
    if weights not in ("factorize", "empty"):
        raise TensorSlimError(f"weights must be 'factorize' or 'empty'; got {weights!r}")
    out = copy.deepcopy(model)
    for lp in plan.factorized_layers:
        module = get_submodule(out, lp.name)
        if type(module).__name__ != lp.type:
            raise PlanMismatchError(
                f"plan says layer {lp.name!r} is a {lp.type}, but the model has a "
                f"{type(module).__name__} there"
            )
        shape = list(_weight_shape(module))
        if shape != list(lp.shape):
            raise PlanMismatchError(
                f"plan says layer {lp.name!r} has weight shape {lp.shape}, the model's is {shape}"
            )
        factorizer = find(module, lp.method)
        if factorizer is None:
            raise PlanMismatchError(
                f"plan asks for method {lp.method!r} on {lp.name!r} ({lp.type}), which is not "
                f"registered; known methods: {', '.join(registered_methods())}"
            )
        build = factorizer.apply if weights == "factorize" else factorizer.empty
        set_submodule(out, lp.name, build(module, _rank(lp.rank)))
    return out


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape a plan records for a layer (LayerInfo.shape): its weight's, else its first
    parameter's (nn.MultiheadAttention: in_proj_weight)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        w = next(iter(module.parameters()), torch.empty(0))
    return tuple(w.shape)


def _rank(rank: Any) -> Any:
    """Ranks come back from JSON as int or list; tuple ranks are restored as tuples."""
    return tuple(rank) if isinstance(rank, list) else rank
