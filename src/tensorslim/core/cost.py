"""Cost models in one registry: parameters, storage bits, FLOPs and measured latency.

Every cost is computed from `Cost` records: a compressor gives the cost of its component on a
target (core.compressor.Compressor.cost), a dense matrix costs m*n parameters, m*n elements at its
dtype's bits and 2 * positions * m*n FLOPs, and parameters outside the matrices (biases) are kept
at their dtype. Latency is measured, not computed (search/latency).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorslim.core.compressor import Cost, dtype_bits
from tensorslim.core.target import LayerSite, LayerTarget, MatrixTarget
from tensorslim.errors import TensorSlimError


@dataclass(frozen=True)
class CostModel:
    """How a plan measures cost: `of` reads a Cost (None for measured models), `unit` names it,
    `needs_input` says whether the layer's input shape must be known."""

    name: str
    unit: str
    of: Callable[[Cost], float | None] | None
    needs_input: bool = False


COST_MODELS: dict[str, CostModel] = {}


def register_cost_model(model: CostModel) -> CostModel:
    COST_MODELS[model.name] = model
    return model


register_cost_model(CostModel("params", "parameters", lambda c: c.params))
register_cost_model(CostModel("bits", "bits", lambda c: c.bits))
register_cost_model(CostModel("flops", "FLOPs", lambda c: c.flops, needs_input=True))
register_cost_model(CostModel("latency", "ms", None, needs_input=True))


def cost_model(name: str) -> CostModel:
    if name not in COST_MODELS:
        raise TensorSlimError(
            f"cost must be one of {', '.join(map(repr, COST_MODELS))}; got {name!r}"
        )
    return COST_MODELS[name]


def tensor_cost(t: torch.Tensor) -> Cost:
    """A tensor kept as it is: its elements at its dtype (no FLOPs)."""
    return Cost(t.numel(), t.numel() * dtype_bits(t.dtype), 0)


def dense_cost(target: MatrixTarget | LayerTarget) -> Cost:
    """The cost of the uncompressed target (bias excluded)."""
    if isinstance(target, MatrixTarget):
        m, n = target.shape
        return Cost(m * n, m * n * dtype_bits(target.dtype), target.flops(m * n))
    handler = target.handler
    kernel = handler.kernel(target.module)
    positions = handler.positions(target.module, target.site).get("")
    m = kernel.shape[0]
    flops = None if positions is None else 2 * positions * kernel.numel()
    del m
    return Cost(kernel.numel(), kernel.numel() * dtype_bits(kernel.dtype), flops)


def matrix_targets(
    module: nn.Module,
    handler: Any,
    site: LayerSite,
    *,
    with_weights: bool = True,
) -> dict[str, MatrixTarget]:
    """One MatrixTarget per matrix of the layer, with its calibration statistics if the site has
    them."""
    mats = handler.matrices(module)
    positions = handler.positions(module, site)
    stats = site.stats
    out = {}
    for part, w in mats.items():
        part_stats = None
        if stats is not None:
            part_stats = stats if part == "" else stats.parts.get(part)
        out[part] = MatrixTarget(
            layer=site.name,
            part=part,
            shape=(int(w.shape[0]), int(w.shape[1])),
            dtype=w.dtype,
            device=w.device,
            weight=w if with_weights else None,
            positions=positions.get(part),
            stats=part_stats,
            settings=site.settings,
        )
    return out


def extra_cost(module: nn.Module, handler: Any) -> Cost:
    """Parameters outside the matrices (biases), kept as they are."""
    total = Cost(0, 0, 0)
    for t in handler.extra_params(module).values():
        if t is not None:
            total = total + tensor_cost(t)
    return total


def layer_dense_cost(module: nn.Module, handler: Any, site: LayerSite) -> Cost:
    """Parameters, bits and FLOPs of the dense layer (matrices and biases)."""
    total = extra_cost(module, handler)
    for target in matrix_targets(module, handler, site, with_weights=False).values():
        total = total + dense_cost(target)
    return total
