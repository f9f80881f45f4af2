"""Compress method "auto": per layer, the proposal of the kinds in AUTO_KINDS with the lowest
error at each cost.

The proposals are the Pareto front (parameters, error) of all kinds' proposals on the layer, each
naming the kind it came from (so the plan records the chosen kind). Where two kinds tie, the
earlier one in AUTO_KINDS wins. A kind that falls back to another on this layer (every tensor
method on a 1x1 conv or a Linear is the matrix SVD) is pooled once. When the layer's input shape
is known, proposals measured slower than the dense layer are avoided (`latency_guard`, see
`faster_than_dense`); only the proposals on the pooled Pareto front are timed (a proposal off it
can never be chosen), so a layer costs a few timings per kind on the front (binary search) rather
than per kind's whole grid. "auto" is a compress method, not a compressor kind.

With calibration inputs and objective "feature" (the layer's site carries its patch Gram) every
kind's proposals carry the relative output error on those inputs, tr(E G E^T) / tr(W G W^T), so
the front compares the kinds by what the layer outputs: Tucker-2 is fitted to the data
(compressors.tucker2), CP, TT and spatial SVD report the output error of their weight-fitted
factors (compressors._tensor), and the matrix kind is the whitened SVD (SVD-LLM, Wang et al.
2024; `DATA_KINDS`), the rank-r matrix of least output error, instead of the plain SVD.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any

from torch import nn

import tensorslim.search.latency as lat
from tensorslim.compressors import (  # noqa: F401  (registers the kinds)
    cp,
    spatial,
    tt,
    tucker2,
    whitened,
)
from tensorslim.core.compressor import Compressor, Proposal, compressor_class
from tensorslim.core.cost import matrix_targets
from tensorslim.core.handler import Handler
from tensorslim.core.target import LayerSite, LayerTarget

AUTO_KINDS = ("lowrank", "cp", "tucker2", "tt", "spatial")
# The kind pooled instead of another when the layer has calibration inputs (objective "feature").
DATA_KINDS = {"lowrank": "whitened"}
# A proposal slower than dense is dropped where a faster one costs at least (1 - this) as much.
LATENCY_SWAP_SLACK = 0.1
# Time only the pooled Pareto front's proposals (False: every pooled proposal is a candidate, as
# before; kept for comparisons in benchmarks/compress_speed.py).
TIME_FRONT_ONLY = True

Options = Mapping[str, Any]  # compressor kind -> its options


def _compressor(kind: str, options: Options | None) -> Compressor | None:
    cls = compressor_class(kind)
    return None if cls is None else cls((options or {}).get(kind))


def _candidates(
    module: nn.Module, handler: Handler, options: Options | None, data: bool = False
) -> list[tuple[Compressor, str | None]]:
    """(compressor, why it cannot compress the layer or None) for each kind of AUTO_KINDS after
    its fallback on this layer, each kind once; `data`: with calibration inputs (DATA_KINDS)."""
    seen: set[str] = set()
    out = []
    for kind in AUTO_KINDS:
        comp = _compressor(kind, options)
        fb = comp.fallback(handler, module) if comp is not None else None
        if fb is not None:
            comp = _compressor(fb[0], options)
        if comp is not None and data and comp.kind in DATA_KINDS:
            comp = _compressor(DATA_KINDS[comp.kind], options)
        if comp is None or comp.kind in seen:
            continue
        seen.add(comp.kind)
        out.append((comp, comp.supports(handler, module)))
    return out


def auto_members(
    module: nn.Module, handler: Handler, options: Options | None = None, data: bool = False
) -> list[Compressor]:
    """The compressors "auto" pools on this layer (after fallbacks, each kind once); `data`: the
    layer has calibration inputs and the objective is "feature" (DATA_KINDS replace kinds)."""
    return [c for c, why in _candidates(module, handler, options, data) if why is None]


def data_objective(site: LayerSite, objective: str | None) -> tuple[str | None, bool]:
    """(objective, data): `objective`, else the one of this compress call's data-aware settings;
    data is True when it is "feature" and the site has the layer's input Gram."""
    if objective is None and isinstance(site.settings, Mapping):
        objective = site.settings.get("objective")
    data = objective == "feature" and getattr(site.stats, "gram", None) is not None
    return objective, data


def auto_reason(module: nn.Module, handler: Handler) -> str | None:
    """None if some kind of AUTO_KINDS can compress the layer, else the first kind's reason."""
    cands = _candidates(module, handler, None)
    if any(why is None for _, why in cands):
        return None
    return next((why for _, why in cands), "no method supports this layer")


def _target(comp: Compressor, module: nn.Module, handler: Handler, site: LayerSite):
    """The layer (form "layer") or its only matrix (form "matrix"; None on a layer with several)."""
    if comp.form == "layer":
        return LayerTarget(site.name, module, site, handler)
    return matrix_targets(module, handler, site).get("")


def auto_proposals(
    module: nn.Module,
    handler: Handler,
    site: LayerSite,
    *,
    latency_guard: bool = True,
    objective: str | None = None,
    options: Options | None = None,
) -> list[Proposal]:
    """The Pareto front (parameters, error) of the pooled proposals of `auto_members`, by rising
    cost. `objective`: None for the one in the site's data-aware settings, else each
    compressor's default ("weight", the relative squared weight error, for all of AUTO_KINDS);
    "feature" with the layer's calibration inputs: every proposal's error is its relative output
    error on them (see the module docstring). `options`: compressor kind -> options. With the
    site's input shape and `latency_guard`, proposals of the front slower than the dense layer
    are avoided (`faster_than_dense` on the front's proposals)."""
    objective, data = data_objective(site, objective)
    pooled: list[Proposal] = []
    for comp in auto_members(module, handler, options, data):
        target = _target(comp, module, handler, site)
        if target is not None:
            pooled += comp.proposals(target, objective)
    front = lat.pareto_front(pooled, lambda p: p.cost.params, lambda p: p.error, 1e-12)
    if site.input_shape is not None and latency_guard:
        # only the front's proposals are timed: a slow one is replaced by a faster one on the front
        timed = front if TIME_FRONT_ONLY else pooled
        front = lat.pareto_front(
            faster_than_dense(module, handler, site, timed),
            lambda p: p.cost.params, lambda p: p.error, 1e-12,
        )
    return front


def faster_than_dense(
    module: nn.Module, handler: Handler, site: LayerSite, pooled: list[Proposal]
) -> list[Proposal]:
    """Avoid proposals that measure no faster than the dense layer on the site's input shape:
    each is dropped where a proposal that is faster costs between (1 - LATENCY_SWAP_SLACK) and 1
    times its parameters; otherwise it stays, so every budget can still be met (the plan then
    flags it). Per kind, latency is taken to grow with cost, so a binary search over its
    proposals (a handful of timings, cached) finds the dearest one still faster."""
    dense = lat.dense_latency(module, tuple(site.input_shape))
    fast: list[Proposal] = []
    slow: list[Proposal] = []
    for kind in dict.fromkeys(p.component.kind for p in pooled):
        mine = sorted((p for p in pooled if p.component.kind == kind), key=lambda p: p.cost.params)
        lo, hi = 0, len(mine)  # mine[:lo] faster; mine[hi:] not
        while lo < hi:
            mid = (lo + hi) // 2
            if lat.spec_latency(module, handler, [mine[mid].component], site) < dense:
                lo = mid + 1
            else:
                hi = mid
        fast += mine[:lo]
        slow += mine[lo:]
    lows = sorted(p.cost.params for p in fast)

    def replaceable(p: Proposal) -> bool:
        i = bisect.bisect_right(lows, p.cost.params)
        return i > 0 and lows[i - 1] >= (1 - LATENCY_SWAP_SLACK) * p.cost.params

    return fast + [p for p in slow if not replaceable(p)]
