"""The only path from a spec to a module: `build_layer` builds one layer's replacement (from its
dense weights, or empty for loading) and `materialize` replaces every layer of a list of jobs in a
copy of the model. compress, apply_plan, load, rank_tuning, the hard low-rank training step and
the truncation study all go through here."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorslim.core.compressor import Compressor, Cost, get_compressor
from tensorslim.core.cost import dense_cost, extra_cost, matrix_targets
from tensorslim.core.handler import Handler, split_params
from tensorslim.core.spec import Component, Spec
from tensorslim.core.surgery import get_submodule, replace_at
from tensorslim.core.target import LayerSite, LayerTarget, MatrixTarget
from tensorslim.errors import TensorSlimError, short_repr

Options = Mapping[str, Any]  # compressor kind -> its options (a mapping or Options instance)


@dataclass
class LayerJob:
    """One layer to replace: all its names (a shared module has several), its spec and site."""

    names: list[str]
    spec: Spec
    site: LayerSite
    facts: dict[str, Any] = field(default_factory=dict)


def compressors_of(spec: Spec, options: Options | None = None) -> list[Compressor]:
    options = options or {}
    return [get_compressor(c.kind, options.get(c.kind)) for c in spec]


def _layer_form(comps: Sequence[Compressor], spec: Spec) -> Compressor | None:
    layer = [c for c in comps if c.form == "layer"]
    if not layer:
        return None
    if len(spec) > 1:
        raise TensorSlimError(
            f"compressor {layer[0].kind!r} takes a whole layer and cannot be summed with other "
            "components"
        )
    return layer[0]


def _parts(
    module: nn.Module, handler: Handler, comps: Sequence[Compressor], spec: Spec,
    targets: Mapping[str, MatrixTarget],
) -> list[tuple[Compressor, Component, MatrixTarget, dict[str, Any]]]:
    """(compressor, component, target, that matrix's params) for every compressed matrix."""
    out = []
    for comp, c in zip(comps, spec):
        for part, p in split_params(list(targets), c.params).items():
            if p is not None:
                out.append((comp, c, targets[part], p))
    return out


def check_spec(
    module: nn.Module, handler: Handler, spec: Spec, site: LayerSite, options: Options | None = None
) -> str | None:
    """None if every component of `spec` can be built on `module`, else what is wrong."""
    try:
        comps = compressors_of(spec, options)
        for comp in comps:
            why = comp.supports(handler, module)
            if why is not None:
                return why
        layer = _layer_form(comps, spec)
        if layer is not None:
            return layer.check(LayerTarget(site.name, module, site, handler), spec[0].params)
        targets = matrix_targets(module, handler, site, with_weights=False)
        parts = _parts(module, handler, comps, spec, targets)
    except TensorSlimError as exc:
        return str(exc)
    if spec and not parts:
        if list(targets) == [""]:  # one matrix: the compressor says what it accepts
            return comps[0].check(targets[""], spec[0].params) or "a null value keeps it dense"
        return (
            f"component {spec[0].kind!r} with {short_repr(dict(spec[0].params))} compresses no "
            f"matrix (null keeps a matrix dense); this layer's matrices: "
            + ", ".join(map(repr, targets))
        )
    for comp, _, target, p in parts:
        why = comp.check(target, p)
        if why is not None:
            return f"{target.part!r}: {why}" if target.part else why
    return None


def spec_cost(
    module: nn.Module, handler: Handler, spec: Spec, site: LayerSite, options: Options | None = None
) -> Cost:
    """Parameters, bits and FLOPs of the layer compressed by `spec` (biases included)."""
    comps = compressors_of(spec, options)
    total = extra_cost(module, handler)
    layer = _layer_form(comps, spec)
    if layer is not None:
        return total + layer.cost(LayerTarget(site.name, module, site, handler), spec[0].params)
    targets = matrix_targets(module, handler, site, with_weights=False)
    compressed: dict[str, list[tuple[Component, dict[str, Any], Cost]]] = {}
    for comp, c, target, p in _parts(module, handler, comps, spec, targets):
        cost = comp.cost(target, p)
        total = total + cost
        compressed.setdefault(target.part, []).append((c, p, cost))
    for part, target in targets.items():
        if part not in compressed:
            total = total + dense_cost(target)
    flops = handler.compressed_flops(module, site, targets, compressed)
    if flops is not None or total.flops is None:
        return Cost(total.params, total.bits, flops if flops is not None else total.flops)
    return total


def build_layer(
    module: nn.Module,
    handler: Handler,
    spec: Spec,
    site: LayerSite,
    *,
    empty: bool = False,
    options: Options | None = None,
    weights: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The replacement of `module` compressed by `spec` and facts for the plan (per matrix under
    "parts" on a layer with several). empty: only the structure, to load weights into.
    weights: per component, the (m x n) matrix of each part that component is built from (the
    learning-compression algorithm's Delta_k(Theta_k)); default: the first component from the
    layer's own weights, each later one from the residual the earlier ones leave."""
    from dataclasses import replace

    from tensorslim.layers.additive import SumOp

    comps = compressors_of(spec, options)
    layer = _layer_form(comps, spec)
    if layer is not None:
        target = LayerTarget(site.name, module, site, handler)
        if empty:
            return layer.empty(target, spec[0].params), {}
        return layer.build(target, spec[0].params)
    targets = matrix_targets(module, handler, site, with_weights=not empty)
    ops: dict[str, list[nn.Module]] = {part: [] for part in targets}
    facts: dict[str, Any] = {}
    index = {id(c): i for i, c in enumerate(spec)}
    for comp, c, target, p in _parts(module, handler, comps, spec, targets):
        if empty:
            ops[target.part].append(comp.empty(target, p))
            continue
        if weights is not None:
            target = replace(target, weight=weights[index[id(c)]][target.part])
        elif ops[target.part]:
            # a later component of a sum fits what the earlier ones left (greedy direct
            # compression of the residual; the LC algorithm passes its own `weights`)
            done = sum(op.dense_weight().detach().reshape(target.weight.shape) for op in ops[target.part])
            target = replace(target, weight=(target.weight - done.to(target.weight.dtype)))
        op, f = comp.build(target, p)
        ops[target.part].append(op)
        if f:
            if target.part:
                facts.setdefault("parts", {}).setdefault(target.part, {}).update(f)
            else:
                facts.update(f)
    joined = {
        part: None if not lst else lst[0] if len(lst) == 1 else SumOp(lst)
        for part, lst in ops.items()
    }
    return handler.assemble(module, joined), facts


def reconstructed(module: nn.Module, handler: Handler, new: nn.Module) -> dict[str, torch.Tensor]:
    """The matrices `new` computes with, by part (a layer-form replacement: its kernel under "")."""
    fn = getattr(new, "dense_matrices", None)
    if callable(fn):
        return {k: v.detach() for k, v in fn().items()}
    fn = getattr(new, "dense_weight", None)
    if callable(fn):
        w = fn().detach()
        return {"": w.reshape(w.shape[0], -1)}
    raise TensorSlimError(f"cannot read the weights of a {type(new).__name__}")


def materialize(
    model: nn.Module,
    jobs: Iterable[LayerJob],
    *,
    handler_of: Callable[[nn.Module], Handler | None],
    empty: bool = False,
    options: Options | None = None,
    progress: Callable[[Iterable[LayerJob]], Iterable[LayerJob]] | None = None,
) -> nn.Module:
    """A copy of `model` with each job's layer replaced by its spec's module (built once and set
    at every name of a shared module). Each job's `facts` receive what the compressors report.
    The model itself may be the layer (name ""): the replacement is then returned."""
    out = copy.deepcopy(model)
    jobs = list(jobs)
    for job in progress(jobs) if progress else jobs:
        if not job.spec:
            continue
        module = get_submodule(out, job.names[0])
        handler = handler_of(module)
        if handler is None:
            raise TensorSlimError(f"no handler for {type(module).__name__} at {job.names[0]!r}")
        new, facts = build_layer(module, handler, job.spec, job.site, empty=empty, options=options)
        job.facts.update(facts)
        out = replace_at(out, job.names, new)
    return out
