"""A registry keyed by module type that follows the class hierarchy (one implementation for every
per-layer-type table). Types of optional libraries may be registered by qualified name
("transformers.pytorch_utils.Conv1D") so that registering them imports nothing."""

from __future__ import annotations

from typing import Generic, TypeVar

from torch import nn

T = TypeVar("T")


def qualified_name(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


class TypeRegistry(Generic[T]):
    def __init__(self) -> None:
        self._by_type: dict[type, T] = {}
        self._by_name: dict[str, T] = {}

    def register(self, module_type: type[nn.Module] | str, value: T) -> None:
        if isinstance(module_type, str):
            self._by_name[module_type] = value
        else:
            self._by_type[module_type] = value

    def unregister(self, module_type: type[nn.Module] | str) -> None:
        if isinstance(module_type, str):
            self._by_name.pop(module_type, None)
        else:
            self._by_type.pop(module_type, None)

    def lookup(self, module: nn.Module) -> T | None:
        """The value for `module`'s class or its nearest registered base class."""
        for klass in type(module).__mro__:
            hit = self._by_type.get(klass)
            if hit is None:
                hit = self._by_name.get(qualified_name(klass))
            if hit is not None:
                return hit
        return None

    def values(self) -> list[T]:
        return list(dict.fromkeys([*self._by_type.values(), *self._by_name.values()]))
