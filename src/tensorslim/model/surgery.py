"""Get and replace sub-modules by dotted name (as printed by `model.named_modules()`)."""

from __future__ import annotations

from torch import nn

from tensorslim.errors import PlanMismatchError


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """The sub-module at dotted `name` ("" is the model itself); PlanMismatchError if absent."""
    if name == "":
        return model
    module = model
    for part in name.split("."):
        if not hasattr(module, part) or not isinstance(getattr(module, part), nn.Module):
            raise PlanMismatchError(f"the model has no layer named {name!r} (no {part!r} in it)")
        module = getattr(module, part)
    return module


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the sub-module at dotted `name` by `new` (works inside Sequential and ModuleList)."""
    if name == "":
        raise PlanMismatchError("cannot replace the whole model; name a layer inside it")
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(model, parent_name)
    if not hasattr(parent, child):
        raise PlanMismatchError(f"the model has no layer named {name!r}")
    setattr(parent, child, new)
