"""The compressor protocol and its registry.

A compressor is one kind of compressed weight (a low-rank product, a Tucker-2 chain, ...). Written
once for "a matrix" (form "matrix"), it works on every layer whose handler exposes matrices: Linear,
convolutions (kernel reshaped to out x in*k), GPT-2's Conv1D, attention projections, RNN gate
matrices. A compressor of form "layer" takes a whole layer (tensor decompositions of a conv kernel).

Add one with the decorator::

    @tensorslim.register_compressor("rank_diag")
    class RankDiag(tensorslim.Compressor):
        @dataclass
        class Options: ...
        def check(self, target, params): ...
        def cost(self, target, params): ...
        def grid(self, target): ...
        def project(self, weight, params): ...
        def build(self, target, params): ...
        def empty(self, target, params): ...

A matrix compressor's `build` returns an operator module: ``forward(x)`` maps (..., n) to (..., m)
without bias and ``dense_weight()`` returns the (m, n) matrix it computes with. The layer's handler
sums the operators of a spec's components and rebuilds the layer around them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tensorslim.core.spec import Component
from tensorslim.core.target import LayerTarget, MatrixTarget
from tensorslim.errors import TensorSlimError, short_repr

Target = MatrixTarget | LayerTarget


@dataclass(frozen=True)
class Cost:
    """Cost of one compressed target: stored parameters (numbers kept, codes counted once each),
    storage bits (factors at their dtype, codebooks, indices, positions) and FLOPs (2 per
    multiply-add) of one forward call (None if the input shape is unknown)."""

    params: int
    bits: int
    flops: int | None

    def __add__(self, other: Cost) -> Cost:
        flops = None if self.flops is None or other.flops is None else self.flops + other.flops
        return Cost(self.params + other.params, self.bits + other.bits, flops)


@dataclass(frozen=True)
class Proposal:
    """One way to compress a target: the component, its cost and its error under the objective."""

    component: Component
    cost: Cost
    error: float


@dataclass(frozen=True)
class NoOptions:
    """This compressor has no options."""


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits of one element of `dtype`."""
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


class Compressor:
    """One kind of compressed weight; see the module docstring. Subclasses set the class
    attributes and implement the methods that raise NotImplementedError."""

    kind: ClassVar[str] = ""
    # The name users pass as compress(method=...); the kind unless registered otherwise.
    method: ClassVar[str] = ""
    # "matrix": works on any layer's matrices; "layer": takes a whole layer (see `supports`).
    form: ClassVar[str] = "matrix"
    Options: ClassVar[type] = NoOptions
    # Calibration statistics `build` needs: "gram" (inputs' X^T X), "fisher" (Fisher diagonal).
    needs: ClassVar[frozenset[str]] = frozenset()
    # True when `build` fits the calibration inputs given an input Gram it does not need (the
    # data-aware Tucker-2): apply_plan then rebuilds such a plan from calibration data too.
    fits_data: ClassVar[bool] = False
    # The objective the allocator minimises by default: "weight", "fisher" or "feature".
    objective: ClassVar[str] = "weight"

    def __init__(self, options: Any = None) -> None:
        self.options = make_options(type(self), options)

    # -- what it accepts ----------------------------------------------------------------------
    def supports(self, handler: Any, module: nn.Module) -> str | None:
        """None if this compressor can compress `module` (seen through `handler`), else why not.
        Matrix compressors accept every handler with matrices."""
        if self.form == "matrix":
            return None
        return f"{self.kind!r} does not support {type(module).__name__}"

    def fallback(self, handler: Any, module: nn.Module) -> tuple[str, str] | None:
        """(kind, note) of the compressor that does this one's work on `module` where the two
        coincide (a tensor method on a matrix is a matrix factorization), else None."""
        return None

    def check(self, target: Target, params: Mapping[str, Any]) -> str | None:
        """None if `params` are valid for `target`, else what is wrong and what is accepted."""
        raise NotImplementedError

    # -- what it costs and loses --------------------------------------------------------------
    def cost(self, target: Target, params: Mapping[str, Any]) -> Cost:
        """Parameters, storage bits and FLOPs of this component on `target` (bias excluded)."""
        raise NotImplementedError

    def grid(self, target: Target) -> list[dict[str, Any]]:
        """Parameters worth proposing, by rising cost, each smaller than the dense target."""
        raise NotImplementedError

    def too_small(self, target: Target) -> str | None:
        """Why `target` has nothing to propose (every entry would cost as much as dense), else
        None."""
        if self.grid(target):
            return None
        return f"too small to gain: no {self.kind!r} form is smaller than the dense matrix"

    def project(self, weight: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """The nearest weight of this form to `weight` (same shape): the C step of the
        learning-compression algorithm, the hard low-rank step, a truncation."""
        raise NotImplementedError

    def errors(
        self, target: Target, grid: list[dict[str, Any]], objective: str
    ) -> list[float]:
        """The error of each grid entry under `objective` (see core.objective); by default each
        entry is projected and measured."""
        from tensorslim.core.objective import objective_error

        w = target_weight(target)
        return [
            objective_error(objective, w, self.project(w, p), target_stats(target))
            for p in grid
        ]

    def proposals(self, target: Target, objective: str | None = None) -> list[Proposal]:
        """Every grid entry with its cost and error, by rising cost. Without `objective`, a
        matrix target's settings (the compress call's) name it, else the compressor's default."""
        if objective is None and isinstance(target, MatrixTarget):
            objective = (target.settings or {}).get("objective")
        grid = self.grid(target)
        errs = self.errors(target, grid, objective or self.objective) if grid else []
        return [
            Proposal(Component(self.kind, p), self.cost(target, p), e) for p, e in zip(grid, errs)
        ]

    def for_keep(self, target: Target, keep: float) -> dict[str, Any] | None:
        """The largest grid entry whose parameters are at most `keep` times the dense target's
        (None if none), bias excluded (compress's allocators count a layer's bias in its first
        unit, so their rank at the same keep can be lower by one)."""
        from tensorslim.core.cost import dense_cost

        limit = keep * dense_cost(target).params
        best = None
        for p in self.grid(target):
            if self.cost(target, p).params <= limit:
                best = p
        return best

    # -- building -----------------------------------------------------------------------------
    def build(self, target: Target, params: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        """The compressed module computed from the target's weights, and facts for the plan."""
        raise NotImplementedError

    def empty(self, target: Target, params: Mapping[str, Any]) -> nn.Module:
        """The same structure with unset weights (to load saved weights into)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, options={self.options!r})"


def target_weight(target: Target) -> torch.Tensor:
    if isinstance(target, MatrixTarget):
        if target.weight is None:
            raise TensorSlimError(f"{target.label}: no weight to compress (an empty target)")
        return target.weight
    return target.handler.kernel(target.module)


def target_stats(target: Target) -> Any:
    return target.stats if isinstance(target, MatrixTarget) else target.site.stats


# -- options --------------------------------------------------------------------------------------
def option_names(cls: type[Compressor]) -> list[str]:
    opts = cls.Options
    return [f.name for f in dataclasses.fields(opts)] if dataclasses.is_dataclass(opts) else []


def make_options(cls: type[Compressor], value: Any) -> Any:
    """`value` (None, a mapping or an Options instance) as `cls.Options`; TensorSlimError naming
    the compressor, the unknown option and the options it has."""
    if value is None:
        return cls.Options()
    if isinstance(value, cls.Options):
        return value
    if not isinstance(value, Mapping):
        raise TensorSlimError(
            f"options of compressor {cls.kind!r} must be a mapping; got {short_repr(value)}"
        )
    names = option_names(cls)
    unknown = [k for k in value if k not in names]
    if unknown:
        has = ", ".join(names) if names else "none"
        who = f"method {cls.method!r}" if cls.method != cls.kind else f"compressor {cls.kind!r}"
        if cls.method != cls.kind:
            who += f" (compressor {cls.kind!r})"
        hint = ""
        if unknown[0] == "objective":
            hint = "; objective is compress's own argument (objective=...)"
        raise TensorSlimError(
            f"unknown option {short_repr(unknown[0])} for {who}; its options are: {has}{hint}"
        )
    try:
        return cls.Options(**{k: v for k, v in value.items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise TensorSlimError(f"compressor {cls.kind!r}: {exc}") from exc


# -- the registry ---------------------------------------------------------------------------------
_COMPRESSORS: dict[str, type[Compressor]] = {}


def register_compressor(kind: str, *, method: str | None = None):
    """Class decorator: make `cls` the compressor of `kind` (usable as compress(method=method or
    kind) and as {"kind": kind, ...} in a spec). Registering a kind again replaces it."""
    if not isinstance(kind, str) or not kind.isidentifier():
        raise TensorSlimError(f"a compressor kind must be an identifier; got {short_repr(kind)}")

    def decorate(cls: type[Compressor]) -> type[Compressor]:
        if not (isinstance(cls, type) and issubclass(cls, Compressor)):
            raise TensorSlimError(
                f"@register_compressor({kind!r}) decorates a tensorslim.Compressor subclass; "
                f"got {short_repr(cls)}"
            )
        if cls.form not in ("matrix", "layer"):
            raise TensorSlimError(f"compressor {kind!r}: form must be 'matrix' or 'layer'")
        name = method or kind
        clash = next((k for k, c in _COMPRESSORS.items() if k != kind and c.method == name), None)
        if clash is not None or (name != kind and name in _COMPRESSORS):
            raise TensorSlimError(f"method name {name!r} is already used by another compressor")
        cls.kind = kind
        cls.method = name
        _COMPRESSORS[kind] = cls
        return cls

    return decorate


def unregister_compressor(kind: str) -> None:
    """Remove the compressor of `kind` (plugins and tests that register one for a while)."""
    _COMPRESSORS.pop(kind, None)


def compressor_class(name: str) -> type[Compressor] | None:
    """The compressor registered under kind or method `name`, None if none."""
    if name in _COMPRESSORS:
        return _COMPRESSORS[name]
    return next((c for c in _COMPRESSORS.values() if c.method == name), None)


def get_compressor(name: str, options: Any = None) -> Compressor:
    """An instance of the compressor of kind or method `name`; TensorSlimError listing the kinds."""
    cls = compressor_class(name)
    if cls is None:
        raise TensorSlimError(
            f"unknown compressor {short_repr(name)}; known: {', '.join(compressor_kinds())}"
        )
    return cls(options)


def compressor_kinds() -> list[str]:
    return sorted(_COMPRESSORS)


def method_names() -> list[str]:
    return sorted(c.method for c in _COMPRESSORS.values())
