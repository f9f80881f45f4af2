"""Which module types can be factorized, and how: a registry keyed by (module type, method).

A factorizer knows one layer type and one method. It tells why a layer cannot be factorized, lists
the options (rank, cost, error) an allocator may choose from, and builds the factorized module. A new
layer type or method is added with `register(ModuleType, "method", factorizer)`; nothing else in
the package needs to change. Lookup walks the module's class hierarchy, so subclasses of a registered
type are handled unless they register their own factorizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorslim.errors import is_int, short_repr


@dataclass(frozen=True)
class LayerSite:
    """What one forward pass told us about a layer: its input and output shapes (None if unknown).

    `stats` holds calibration statistics (tensorslim.calibrate.LayerStats) when compress was given
    calibration data, and `settings` the data-aware options (objective, solver, ...); both stay None
    otherwise and only data-aware factorizers read them.
    """

    name: str
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    stats: Any = field(default=None, compare=False, repr=False)
    settings: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Option:
    """One way to factorize a layer: `rank` (int or tuple), its params, FLOPs and error.

    `error` is the relative squared weight error ||W - W_hat||^2 / ||W||^2 unless a data-aware
    objective replaced it.
    """

    rank: Any
    params: int
    flops: int | None
    error: float
    # The method that produces this option when a factorizer pools several (method "auto").
    method: str | None = None


class Factorizer(ABC):
    """Factorizes one kind of layer with one method."""

    method: str = ""

    @abstractmethod
    def unsupported_reason(self, module: nn.Module) -> str | None:
        """None if `module` can be factorized, else a one-line reason it stays dense."""

    @abstractmethod
    def dense_params(self, module: nn.Module) -> int:
        """Parameters of the dense layer (weight and bias)."""

    @abstractmethod
    def dense_flops(self, module: nn.Module, site: LayerSite) -> int | None:
        """FLOPs (2 per multiply-add) of the dense layer on the site's input, None if unknown."""

    @abstractmethod
    def options(self, module: nn.Module, site: LayerSite) -> list[Option]:
        """Every factorization strictly smaller (in params) than the dense layer, by rising cost."""

    @abstractmethod
    def rank_for_keep(self, module: nn.Module, keep: float) -> Any:
        """The largest rank whose parameters are at most `keep` times the dense layer's (None if none)."""

    @abstractmethod
    def apply(self, module: nn.Module, rank: Any) -> nn.Module:
        """The factorized replacement of `module` at `rank`, weights computed from the dense layer."""

    # What calibration a data-aware factorizer needs: "gram" (inputs' X^T X) and/or "fisher".
    needs: frozenset[str] = frozenset()

    def apply_site(
        self, module: nn.Module, rank: Any, site: LayerSite
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Like `apply`, with the layer's site (calibration statistics); data-aware methods
        override it. Returns (replacement, facts for the plan's LayerPlan.extra)."""
        return self.apply(module, rank), {}

    @abstractmethod
    def empty(self, module: nn.Module, rank: Any) -> nn.Module:
        """The factorized structure at `rank` with unset weights (to load saved weights into)."""

    @abstractmethod
    def weight(self, module: nn.Module) -> torch.Tensor:
        """The dense weight tensor whose approximation error is reported."""

    @abstractmethod
    def reconstructed_weight(self, factorized: nn.Module) -> torch.Tensor:
        """The dense weight the factorized module computes with, shaped like `weight`."""

    def check_rank(self, module: nn.Module, rank: Any) -> str | None:
        """None if `rank` is a valid rank of this method for `module`, else what is wrong and what
        is accepted (apply_plan raises InvalidRankError with the layer's name).

        Default: a matrix factorizer (one with `matrix(module)`) takes an integer in [1, min(m, n)].
        Factorizers with other ranks should override it; for them the default accepts any rank
        made of integers in [1, the dense layer's parameter count] (apply_plan also dry-builds the
        structure on the meta device, which bounds its size)."""
        matrix = getattr(self, "matrix", None)
        if callable(matrix):
            return int_rank_problem(rank, min(matrix(module).shape))
        return rank_leaves_problem(rank, self.dense_params(module))




def int_rank_problem(rank: Any, full: int) -> str | None:
    """None if `rank` is an integer in [1, full], else what is accepted."""
    if is_int(rank) and 1 <= rank <= full:
        return None
    return f"rank must be an integer in [1, {full}] (the full rank); got {short_repr(rank)}"


def rank_leaves_problem(rank: Any, limit: int) -> str | None:
    """None if `rank` is an integer in [1, limit], a list of them, or a mapping of names to such
    an integer or None with at least one integer; else what is accepted."""
    if isinstance(rank, dict):
        leaves = [v for v in rank.values() if v is not None]
        ok = all(isinstance(k, str) for k in rank)
    elif isinstance(rank, (list, tuple)):
        leaves, ok = list(rank), True
    else:
        leaves, ok = [rank], True
    if ok and leaves and all(is_int(v) and 1 <= v <= limit for v in leaves):
        return None
    return (
        f"rank must be an integer in [1, {limit}], a list of them, or an object mapping matrix "
        f"names to such an integer or null (at least one integer); got {short_repr(rank)}"
    )


_REGISTRY: dict[tuple[type[nn.Module], str], Factorizer] = {}
# Types of optional libraries registered by qualified name ("transformers.pytorch_utils.Conv1D"),
# so that registering them needs no import of the library.
_BY_NAME: dict[tuple[str, str], Factorizer] = {}


def _qualname(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


def register(module_type: type[nn.Module] | str, method: str, factorizer: Factorizer) -> None:
    """Make `method` available for layers of `module_type` (and subclasses without their own).

    `module_type` may also be a class's qualified name, "package.module.Class"."""
    factorizer.method = method
    if isinstance(module_type, str):
        _BY_NAME[(module_type, method)] = factorizer
    else:
        _REGISTRY[(module_type, method)] = factorizer


def registered_methods() -> list[str]:
    """All method names known to the registry."""
    return sorted({m for _, m in _REGISTRY} | {m for _, m in _BY_NAME})


def registered_types() -> list[type[nn.Module]]:
    """All module types with at least one registered method."""
    return list(dict.fromkeys(t for t, _ in _REGISTRY))


def find(module: nn.Module, method: str) -> Factorizer | None:
    """The factorizer for `module` and `method`, following the class hierarchy; None if none."""
    for klass in type(module).__mro__:
        f = _REGISTRY.get((klass, method)) or _BY_NAME.get((_qualname(klass), method))
        if f is not None:
            return f
    return None


# method -> the method used instead on layer types without a factorizer of their own (a tensor
# method on nn.Linear is a matrix factorization, so it falls back to the matrix SVD).
_FALLBACKS: dict[str, str] = {}


def register_fallback(method: str, fallback: str) -> None:
    """Layers with no `method` factorizer but one for `fallback` use that one, with a note."""
    _FALLBACKS[method] = fallback


def resolve(module: nn.Module, method: str) -> tuple[Factorizer | None, str | None]:
    """The factorizer that handles `module` for `method`, and a note when it is a fallback.

    A factorizer may define `delegate(module) -> (factorizer, note) | None` to hand layers where
    its method reduces to another (a 1x1 conv is a matrix) to that method's factorizer.
    """
    f = find(module, method)
    if f is not None:
        delegate = getattr(f, "delegate", None)
        handed = delegate(module) if delegate is not None else None
        return handed if handed is not None else (f, None)
    fallback = _FALLBACKS.get(method)
    g = find(module, fallback) if fallback else None
    if g is None:
        return None, None
    kind = type(module).__name__
    if isinstance(module, nn.Linear):
        why = f"{kind} is a matrix: {method!r} reduces to a matrix factorization"
    else:
        why = f"no {method!r} factorizer for {kind}"
    return g, f"{why}; falls back to {fallback!r}"


def is_registered_type(module: nn.Module) -> bool:
    """True if some method is registered for this module's type."""
    if any(isinstance(module, t) for t in registered_types()):
        return True
    names = {_qualname(k) for k in type(module).__mro__}
    return any(n in names for n, _ in _BY_NAME)
