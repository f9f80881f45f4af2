"""Find the layers of a model (each with its handler, and the compressor that will compress it or
the reason it stays dense), and measure each layer's shapes on one input."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorslim.core.compressor import Compressor
from tensorslim.core.cost import layer_dense_cost
from tensorslim.core.handler import Handler, handler_for
from tensorslim.core.target import LayerSite
from tensorslim.errors import ExampleInputError, NonFiniteWeightError, TensorSlimError, short_repr
from tensorslim.layers.additive import Compressed

# How a compress method is resolved on one layer: (compressor or None, note, reason it stays dense).
# `resolve` is given by the caller (api: a compressor kind, or "auto").
Resolver = Callable[[Handler, nn.Module], tuple[Compressor | None, str | None, str | None]]


@dataclass
class LayerInfo:
    """One layer found in a model, with why it is (not) compressible.

    A module used at several places (`self.b = self.a`) is one layer: `name` is its first name,
    `aliases` the others; it is factorized once and the replacement set at every name."""

    name: str
    module: nn.Module
    handler: Handler | None
    compressor: Compressor | None
    reason: str | None  # None: compressible with the requested method
    site: LayerSite
    # Set when another compressor does the method's work (a tensor method on a Linear: the SVD).
    note: str | None = None
    aliases: list[str] = field(default_factory=list)
    # False when include / exclude left the layer out.
    selected: bool = True

    @property
    def names(self) -> list[str]:
        return [self.name, *self.aliases]

    @property
    def type_name(self) -> str:
        return type(self.module).__name__

    @property
    def shape(self) -> tuple[int, ...]:
        w = getattr(self.module, "weight", None)
        if isinstance(w, torch.Tensor):
            return tuple(w.shape)
        return tuple(next(iter(self.module.parameters())).shape)

    @property
    def compressible(self) -> bool:
        return self.reason is None

    def params(self) -> int:
        if self.handler is not None:
            return layer_dense_cost(self.module, self.handler, self.site).params
        return sum(p.numel() for p in self.module.parameters())

    def flops(self) -> int | None:
        if self.handler is not None:
            return layer_dense_cost(self.module, self.handler, self.site).flops
        return None

    def bits(self) -> int | None:
        if self.handler is not None:
            return layer_dense_cost(self.module, self.handler, self.site).bits
        return None


class ModelIndex:
    """Every name of every module of a model, and every module holding each parameter (shared
    modules and tied parameters, as in a language model's head tied to its embedding)."""

    def __init__(self, model: nn.Module) -> None:
        self.names: dict[int, list[str]] = {}
        self.holders: dict[int, list[tuple[int, str]]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(module), []).append(name)
            for p_name, p in module._parameters.items():
                if p is not None:
                    full = f"{name}.{p_name}" if name else p_name
                    self.holders.setdefault(id(p), []).append((id(module), full))

    def names_of(self, module: nn.Module) -> list[str]:
        return self.names.get(id(module), [])

    def tie_reason(self, module: nn.Module) -> str | None:
        """Why `module` must stay dense when one of its parameters is also held by a module
        outside it (factorizing it would silently untie the two); None if none is."""
        inside = {id(m) for m in module.modules()}
        for local, p in module.named_parameters():
            outside = [n for owner, n in self.holders.get(id(p), []) if owner not in inside]
            if outside:
                return f"{local} tied to {outside[0]}, which stays dense"
        return None


def _matches(name: str, patterns: Sequence[str] | None) -> str | None:
    for p in patterns or ():
        if fnmatch.fnmatchcase(name, p):
            return p
    return None


def check_patterns(what: str, patterns: Any) -> list[str] | None:
    """`include` / `exclude` as a list of fnmatch patterns: None, one str, or a sequence of str."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    accepted = f"{what} must be a str or a sequence of str (fnmatch patterns on layer names)"
    if isinstance(patterns, (bytes, dict)) or not isinstance(patterns, Iterable):
        raise TensorSlimError(f"{accepted}; got {type(patterns).__name__} {short_repr(patterns)}")
    items = list(patterns)
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise TensorSlimError(f"{accepted}; item {i} is {type(p).__name__} {short_repr(p)}")
    return items


def layer_modules(model: nn.Module) -> dict[int, tuple[nn.Module, list[str]]]:
    """The modules `find_layers` reports (layers, not the containers around them), each with all
    its names in module order: id(module) -> (module, names). The model itself is one when it is
    a layer."""
    found: dict[int, tuple[nn.Module, list[str]]] = {}

    def visit(module: nn.Module, name: str, path: frozenset[int]) -> None:
        if id(module) in found:
            found[id(module)][1].append(name)
            return
        children = [(n, c) for n, c in module._modules.items() if c is not None]
        leaf = not children and any(p.ndim >= 2 for p in module.parameters(recurse=False))
        if _stops_search(module) or leaf:
            found[id(module)] = (module, [name])
            return
        inner = path | {id(module)}
        for child_name, child in children:
            if id(child) not in inner:  # a module holding itself would recurse forever
                visit(child, f"{name}.{child_name}" if name else child_name, inner)

    visit(model, "", frozenset())
    return found


def _stops_search(module: nn.Module) -> bool:
    """Compressed layers and layers with a handler are reported whole, never searched inside
    (nn.MultiheadAttention reads its children's weights directly)."""
    return isinstance(module, Compressed) or handler_for(module) is not None


def find_layers(
    model: nn.Module,
    resolve: Resolver,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[LayerInfo]:
    """Every layer with a weight matrix, in module order, each with its handler and compressor
    (from `resolve`) or the reason it stays dense. `include` / `exclude` are fnmatch patterns on dotted names ("features.*");
    the model itself is named "" when it is a layer.

    A module used at several places is listed once with its other names as `aliases`. A layer
    sharing a parameter with a module outside it (a tied weight) stays dense.
    Raises NonFiniteWeightError if a selected layer's weight holds NaN or Inf.
    """
    include = check_patterns("include", include)
    exclude = check_patterns("exclude", exclude)
    index = ModelIndex(model)
    found = []
    for module, names in layer_modules(model).values():
        info = _classify(module, names, resolve, include, exclude)
        if info.compressible:
            info.reason = sharing_reason(module, names, index)
            if info.reason is None:
                _check_finite(info)
        found.append(info)
    return found


def sharing_reason(module: nn.Module, names: list[str], index: ModelIndex) -> str | None:
    """Why a layer shared in a way its replacement cannot follow stays dense, else None."""
    hidden = [n for n in index.names_of(module) if n not in names]
    if hidden:  # e.g. also a child of an nn.MultiheadAttention, which reads it directly
        return f"also used as {hidden[0]!r} inside another layer, which stays dense"
    return index.tie_reason(module)


def _classify(
    module: nn.Module,
    names: list[str],
    resolve: Resolver,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
) -> LayerInfo:
    name, aliases = names[0], names[1:]
    handler = handler_for(module)

    def info(compressor, reason, note=None, selected=True) -> LayerInfo:
        site = LayerSite(name)
        return LayerInfo(name, module, handler, compressor, reason, site, note, aliases, selected)

    if isinstance(module, Compressed):
        return info(None, "already compressed")
    if handler is None:
        return info(None, f"no handler registered for {type(module).__name__}")
    compressor, note, why = resolve(handler, module)
    if compressor is None:
        return info(None, why or f"no compressor for {type(module).__name__}")
    if include and not any(_matches(n, include) for n in names):
        return info(compressor, "not matched by --include", selected=False)
    hit = next((h for n in names if (h := _matches(n, exclude)) is not None), None)
    if hit is not None:
        return info(compressor, f"excluded by pattern {hit!r}", selected=False)
    return info(compressor, handler.unsupported_reason(module) or why, note)


def _check_finite(info: LayerInfo) -> None:
    """NonFiniteWeightError naming the layer and parameter (weights, biases, RNN gates) if any
    floating-point parameter of a selected layer holds NaN or Inf."""
    for pname, p in info.module.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise NonFiniteWeightError(
                f"layer {info.name!r} ({info.type_name}) has {bad} NaN/Inf values in {pname!r}; "
                "fix or exclude it (exclude=[...] / --exclude)"
            )


def run_model(
    model: nn.Module,
    example_input: Any,
    name: str = "the example input",
    hint: str = "",
    grad: bool = False,
) -> Any:
    """Run `model` on `example_input` (a tensor, a tuple/list of positional inputs or a mapping of
    keyword inputs), without gradients unless `grad`. ExampleInputError naming the input (`name`,
    then `hint`) with the model's message if the model fails; a TensorSlimError (e.g. from a hook)
    passes as is."""

    try:
        with torch.enable_grad() if grad else torch.no_grad():
            if isinstance(example_input, Mapping):
                return model(**example_input)
            if isinstance(example_input, (tuple, list)):
                return model(*example_input)
            return model(example_input)
    except TensorSlimError:
        raise
    # the model's own error, whatever its type, is the user's input problem
    except Exception as exc:
        raise ExampleInputError(
            f"the model rejected {name} ({_describe(example_input)}): "
            f"{type(exc).__name__}: {exc}{hint}"
        ) from exc


def _describe(x: Any) -> str:

    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}"
    if isinstance(x, Mapping):
        return "dict with keys " + ", ".join(map(str, x))
    if isinstance(x, (tuple, list)):
        return f"{len(x)} positional inputs"
    return type(x).__name__


def trace_sites(model: nn.Module, layers: list[LayerInfo], example_input: Any) -> None:
    """Run one forward pass with hooks and fill each layer's input/output shapes in place."""
    hooks = []

    def make_hook(info: LayerInfo):
        def hook(_mod, inputs, output):
            x = inputs[0] if inputs else None
            if isinstance(output, (tuple, list)):  # e.g. nn.MultiheadAttention: (output, weights)
                output = next((o for o in output if isinstance(o, torch.Tensor)), None)
            info.site = LayerSite(
                info.name,
                tuple(x.shape) if isinstance(x, torch.Tensor) else None,
                tuple(output.shape) if isinstance(output, torch.Tensor) else None,
            )

        return hook

    for info in layers:
        hooks.append(info.module.register_forward_hook(make_hook(info)))
    try:
        run_model(model, example_input)
    finally:
        for h in hooks:
            h.remove()


def count_params(model: nn.Module) -> int:
    """Total number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def summed(values: list[int | None]) -> int | None:
    """Sum, or None if any value is unknown."""
    return None if any(v is None for v in values) else int(math.fsum(values))
