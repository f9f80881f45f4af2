"""Get and replace sub-modules by dotted name (as printed by `model.named_modules()`).

The name "" is the model itself: a model that is one layer (`nn.Linear(64, 64)`) is replaced
whole, so `set_submodule` returns the model to use afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from tensorslim.errors import PlanMismatchError


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """The sub-module at dotted `name` ("" is the model itself); PlanMismatchError if absent."""
    if name == "":
        return model
    module = model
    for part in name.split("."):
        child = module._modules.get(part) if isinstance(module, nn.Module) else None
        if not isinstance(child, nn.Module):
            raise PlanMismatchError(f"the model has no layer named {name!r} (no {part!r} in it)")
        module = child
    return module


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the sub-module at dotted `name` by `new` (works inside Sequential and ModuleList).

    Returns the model: `model` itself, or `new` when `name` is "" (the model is the layer)."""
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(model, parent_name)
    if not isinstance(parent._modules.get(child), nn.Module):
        raise PlanMismatchError(f"the model has no layer named {name!r}")
    setattr(parent, child, new)
    return model


def replace_at(model: nn.Module, names: Iterable[str], new: nn.Module) -> nn.Module:
    """Put `new` at every name of a shared module, so it stays shared; returns the model."""
    for name in names:
        model = set_submodule(model, name, new)
    return model
