"""compress()'s propose step: every way to compress each layer, as allocation units.

A layer whose compressor takes it whole (form "layer", or "auto") or that has one matrix is one
unit; a layer with several matrices (an RNN's gate matrices, attention's two projections) has one
unit per matrix, so that the allocator chooses each matrix's rank (the global allocator's greedy
step then spends the budget across matrices as it does across layers). Parameters outside the
matrices (biases) are counted in the layer's first unit, dense or not, so that a unit's costs add
up to the layer's.

Each proposal's component is valid for the whole layer: on a multi-matrix layer its parameters map
the unit's matrix to its value and leave the others out (dense), and `merge` joins the chosen
proposals of a layer into its spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tensorslim.core.compressor import Component, Cost, Proposal
from tensorslim.core.cost import cost_model, dense_cost, extra_cost, matrix_targets
from tensorslim.core.discover import LayerInfo
from tensorslim.core.spec import Spec
from tensorslim.core.target import LayerTarget
from tensorslim.errors import TensorSlimError

# How many keep levels a multi-matrix layer's joint proposals (cost "latency") are measured at.
JOINT_LEVELS = 24


@dataclass
class Unit:
    """One allocation unit: a layer or one matrix of it, its dense cost and its proposals by
    rising cost (all cheaper than dense in the cost model), with their cost values."""

    info: LayerInfo
    part: str | None
    dense: Cost
    proposals: list[Proposal]
    dense_value: float = 0.0
    values: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.info.name if not self.part else f"{self.info.name}:{self.part}"


def propose(
    layers: list[LayerInfo],
    *,
    cost: str,
    objective: str | None,
    auto: Callable[[LayerInfo], list[Proposal]] | None = None,
    latency: Callable[[LayerInfo, list[Proposal]], tuple[list[Proposal], list[float], float]]
    | None = None,
    progress: Callable[[list[LayerInfo]], Any] = lambda x: x,
) -> list[Unit]:
    """The units of every compressible layer. auto(info): the pooled proposals of method "auto";
    latency(info, proposals): (kept proposals, their measured ms, dense ms) for cost "latency"."""
    model = cost_model(cost)
    units: list[Unit] = []
    for info in progress([i for i in layers if i.compressible]):
        layer_units = _layer_units(info, objective, auto)
        if cost == "latency":
            if latency is None:
                raise TensorSlimError("cost 'latency' needs a latency measure")
            layer_units = [_joint(info, layer_units)] if len(layer_units) > 1 else layer_units
            for u in layer_units:
                u.proposals, u.values, u.dense_value = latency(info, u.proposals)
        else:
            for u in layer_units:
                u.dense_value = model.of(u.dense)
                u.values = [model.of(p.cost) for p in u.proposals]
                kept = [(p, v) for p, v in zip(u.proposals, u.values) if v < u.dense_value]
                u.proposals, u.values = [p for p, _ in kept], [v for _, v in kept]
        units.extend(layer_units)
    return units


def _layer_units(
    info: LayerInfo, objective: str | None, auto: Callable[[LayerInfo], list[Proposal]] | None
) -> list[Unit]:
    module, handler, comp = info.module, info.handler, info.compressor
    extra = extra_cost(module, handler)
    if comp is None:  # method "auto"
        if auto is None:
            raise TensorSlimError(f"layer {info.name!r} has no compressor")
        target = LayerTarget(info.name, module, info.site, handler)
        return [_with_extra(Unit(info, None, dense_cost(target), auto(info)), extra)]
    if comp.form == "layer":
        target = LayerTarget(info.name, module, info.site, handler)
        props = comp.proposals(target, objective)
        return [_with_extra(Unit(info, None, dense_cost(target), props), extra)]
    targets = matrix_targets(module, handler, info.site)
    units = []
    for part, target in targets.items():
        props = comp.proposals(target, objective)
        if len(targets) > 1:
            props = [_for_part(p, part) for p in props]
        units.append(Unit(info, part if len(targets) > 1 else "", dense_cost(target), props))
    units[0] = _with_extra(units[0], extra)
    return units


def _for_part(p: Proposal, part: str) -> Proposal:
    params = {k: {part: v} for k, v in p.component.params.items()}
    return Proposal(Component(p.component.kind, params), p.cost, p.error)


def _with_extra(u: Unit, extra: Cost) -> Unit:
    u.dense = u.dense + extra
    u.proposals = [Proposal(p.component, p.cost + extra, p.error) for p in u.proposals]
    return u


def _joint(info: LayerInfo, units: list[Unit]) -> Unit:
    """One unit for a multi-matrix layer whose proposals compress every matrix at the same keep
    (JOINT_LEVELS levels): what latency is measured on, since a matrix alone has no latency."""
    dense = units[0].dense
    for u in units[1:]:
        dense = dense + u.dense
    joint: list[Proposal] = []
    for level in range(1, JOINT_LEVELS + 1):
        keep = level / (JOINT_LEVELS + 1)
        chosen = [_largest_within(u, keep) for u in units]
        if not any(chosen):
            continue
        picked = [p for p in chosen if p is not None]
        total = dense
        for u, p in zip(units, chosen):
            if p is not None:
                total = total + Cost(
                    p.cost.params - u.dense.params, p.cost.bits - u.dense.bits,
                    None if p.cost.flops is None or u.dense.flops is None
                    else p.cost.flops - u.dense.flops,
                )
        spec = merge(info, picked)
        prop = Proposal(spec[0], total, sum(p.error for p in picked))
        if not joint or joint[-1].component != prop.component:
            joint.append(prop)
    return Unit(info, None, dense, joint)


def _largest_within(u: Unit, keep: float) -> Proposal | None:
    fits = [p for p in u.proposals if p.cost.params <= keep * u.dense.params]
    return fits[-1] if fits else None


def merge(info: LayerInfo, chosen: list[Proposal]) -> Spec:
    """The layer's spec from its units' chosen proposals: components of the same kind on
    different matrices become one component whose parameters map each matrix to its value
    (packed as the handler stores it: a list for attention, a dict naming every RNN matrix)."""
    if len(chosen) == 1 and not _per_part(chosen[0].component):
        return [chosen[0].component]
    parts = list(info.handler.matrices(info.module))
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for p in chosen:
        per = by_kind.setdefault(p.component.kind, {})
        for key, value in p.component.params.items():
            per.setdefault(key, {}).update(value if isinstance(value, Mapping) else {})
    spec = []
    for kind, per in by_kind.items():
        params = {
            key: info.handler.pack(info.module, {part: values.get(part) for part in parts})
            for key, values in per.items()
        }
        spec.append(Component(kind, params))
    return spec


def _per_part(c: Component) -> bool:
    return any(isinstance(v, Mapping) for v in c.params.values())
