"""What the LC algorithm compresses: the layers named by the user's specs, and in each the matrices
(`Unit`s) that carry at least one component, seen through the layer's handler."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorslim.core.compressor import get_compressor
from tensorslim.core.cost import matrix_targets
from tensorslim.core.discover import LayerInfo, find_layers, trace_sites
from tensorslim.core.handler import Handler, split_params
from tensorslim.core.materialize import compressors_of
from tensorslim.core.modes import eval_mode
from tensorslim.core.spec import Component, SpecError, parse_spec, spec_to_json
from tensorslim.errors import ExampleInputError, TensorSlimError, short_repr
from tensorslim.lc.cstep import Part, is_rank_selection, rank_selection_problem

# How many layer names an error lists.
_SHOWN = 8
_WILDCARDS = set("*?[")


@dataclass
class Unit:
    """One compressed matrix W (m x n): the parameter holding it, seen through the layer's handler
    (`matrix()` is differentiable), and the spec components that compress it (`parts`, with their
    index in the layer's spec in `slots`)."""

    layer: str
    part: str
    module: nn.Module
    handler: Handler
    param: nn.Parameter
    shape: tuple[int, int]
    parts: list[Part]
    slots: list[int]
    _index: torch.Tensor | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return f"{self.layer}:{self.part}" if self.part else self.layer

    @property
    def label(self) -> str:
        name = repr(self.layer) if self.layer else "(model)"
        return f"{name} matrix {self.part!r}" if self.part else name

    def matrix(self) -> torch.Tensor:
        """W (m x n) as a differentiable view of the parameter."""
        return self.handler.grad_matrix(self.module, self.part, self.param)

    def set_matrix(self, value: torch.Tensor) -> None:
        """Write W (m x n) into the parameter (in place, without gradient)."""
        if self._index is None:
            idx = torch.arange(self.param.numel(), device=self.param.device)
            self._index = self.handler.grad_matrix(self.module, self.part, idx.reshape(
                self.param.shape)).reshape(-1)
        with torch.no_grad():
            flat = self.param.detach().reshape(-1).clone()
            flat[self._index] = value.detach().to(flat.dtype).reshape(-1)
            self.param.copy_(flat.reshape(self.param.shape))


@dataclass
class Choice:
    """A selected layer: its LayerInfo, its spec (as given: a rank-selection component has no rank
    yet) and its units."""

    info: LayerInfo
    spec: list[Component]
    units: list[Unit]


def parse_specs(specs: Any) -> dict[str | None, list[Component]]:
    """{pattern: spec} from lc.compress's `specs`: a mapping of fnmatch patterns (or layer names)
    to specs, or one spec (a list of components, or one component) for every compressible layer
    (key None)."""
    if isinstance(specs, (bool, int, float)):
        raise TensorSlimError(
            f"lc.compress takes specs, not a budget ({short_repr(specs)}): give one spec for all "
            'layers (e.g. [{"kind": "lowrank", "rank": 8}]) or {layer pattern: spec}'
        )
    if isinstance(specs, Mapping) and "kind" not in specs:
        if not specs:
            raise TensorSlimError("specs is an empty mapping: name at least one layer pattern")
        out: dict[str | None, list[Component]] = {}
        for pattern, spec in specs.items():
            if not isinstance(pattern, str) or not pattern:
                raise TensorSlimError(
                    f"specs keys must be layer names or fnmatch patterns; got {short_repr(pattern)}"
                )
            try:
                out[pattern] = parse_spec(spec)
            except SpecError as exc:
                raise TensorSlimError(f"spec for {pattern!r}: {exc}") from None
        return out
    try:
        spec = parse_spec(specs)
    except SpecError as exc:
        raise TensorSlimError(f"specs: {exc}") from None
    if not spec:
        raise TensorSlimError("the spec is empty: give at least one component to compress with")
    return {None: spec}


def every_layer(handler: Handler, module: nn.Module) -> tuple[Any, None, None]:
    """A find_layers resolver that accepts every layer with a handler (the specs decide)."""
    return get_compressor("lowrank"), None, None


def _names(layers: list[LayerInfo]) -> str:
    names = [repr(i.name) for i in layers]
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def choose(
    model: nn.Module,
    specs: dict[str | None, list[Component]],
    example_input: Any,
    options: Mapping[str, Any] | None = None,
) -> tuple[list[LayerInfo], list[Choice]]:
    """Every layer of `model` and the selected ones with their units. A pattern must match a
    layer; a layer named exactly that cannot be compressed is an error with the reason; a layer a
    wildcard (or the one-spec form) reaches but cannot compress stays dense with the reason."""
    layers = find_layers(model, every_layer)
    picked: dict[int, tuple[LayerInfo, list[Component], bool]] = {}
    for pattern, spec in specs.items():
        if pattern is None:
            hits = [i for i in layers if i.reason is None]
            if not hits:
                raise TensorSlimError(
                    "the model has no compressible layer (layers: "
                    + (_names(layers) or "none")
                    + ")"
                )
        else:
            hits = [i for i in layers if any(fnmatch.fnmatchcase(n, pattern) for n in i.names)]
            if not hits:
                raise TensorSlimError(
                    f"layer pattern {pattern!r} matches no layer; the model's layers: "
                    + (_names(layers) or "none")
                )
        exact = pattern is not None and not (_WILDCARDS & set(pattern))
        for info in hits:
            if id(info.module) in picked:
                continue  # the first pattern naming a layer wins
            if info.reason is not None:
                if exact:
                    raise TensorSlimError(f"layer {info.name!r} cannot be compressed: {info.reason}")
                continue
            picked[id(info.module)] = (info, spec, exact or pattern is not None)
    chosen = [(info, spec, strict) for info, spec, strict in picked.values() if spec]
    if chosen and example_input is not None:
        try:
            with eval_mode(model):
                trace_sites(model, [c[0] for c in chosen], example_input)
        except ExampleInputError as exc:
            raise TensorSlimError(f"the model rejected the first batch's inputs: {exc}") from exc
    out = []
    for info, spec, strict in chosen:
        units, why = _units(info, spec, options)
        if why is not None:
            if strict:
                raise TensorSlimError(f"layer {info.name!r}: {why}")
            info.reason = why
            continue
        out.append(Choice(info, spec, units))
    if not out:
        raise TensorSlimError(
            "no layer can be compressed with the given specs: "
            + "; ".join(f"{i.name!r}: {i.reason}" for i, _, _ in chosen[:_SHOWN])
        )
    return layers, out


def _units(
    info: LayerInfo, spec: list[Component], options: Mapping[str, Any] | None
) -> tuple[list[Unit], str | None]:
    """The layer's units, or why the spec cannot compress it."""
    module, handler = info.module, info.handler
    try:
        comps = compressors_of(spec, options)
    except TensorSlimError as exc:
        return [], str(exc)
    for comp in comps:
        if comp.form != "matrix":
            return [], (
                f"compressor {comp.kind!r} takes a whole layer; the LC algorithm compresses "
                "matrices (lowrank, and matrix kinds such as quantization and pruning)"
            )
        why = comp.supports(handler, module)
        if why is not None:
            return [], why
    targets = matrix_targets(module, handler, info.site)
    weights = handler.weight_parameters(module)
    positions = handler.positions(module, info.site)
    per_part: dict[str, list[tuple[int, Part]]] = {part: [] for part in targets}
    for slot, (comp, c) in enumerate(zip(comps, spec)):
        try:
            split = split_params(list(targets), c.params)
        except TensorSlimError as exc:
            return [], f"component {c.kind!r}: {exc}"
        for part, p in split.items():
            if p is None:
                continue
            target = targets[part]
            if is_rank_selection(c.kind, p):
                why = rank_selection_problem(p, positions.get(part))
            else:
                why = comp.check(target, p)
            if why is not None:
                where = f"matrix {part!r}: " if part else ""
                return [], f"{where}component {short_repr(spec_to_json([c])[0])}: {why}"
            per_part[part].append((slot, Part(comp, p, positions.get(part))))
    units = []
    for part, entries in per_part.items():
        if not entries:
            continue
        param = weights.get(part)
        if not isinstance(param, nn.Parameter) or not param.is_floating_point():
            return [], f"matrix {part!r} is not a floating-point parameter"
        if not param.requires_grad:
            return [], f"matrix {part!r} does not require grad (frozen); the L step trains it"
        m, n = targets[part].shape
        unit = Unit(info.name, part, module, handler, param, (m, n),
                    [p for _, p in entries], [s for s, _ in entries])
        view = unit.matrix().detach()
        if tuple(view.shape) != (m, n) or view.numel() != param.numel():
            return [], f"the handler's view of matrix {part!r} is not its (m x n) matrix"
        units.append(unit)
    if not units:
        return [], "the spec compresses none of its matrices (null keeps a matrix dense)"
    return units, None
