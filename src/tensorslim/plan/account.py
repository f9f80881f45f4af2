"""compress()'s account step: the Plan of what was done, with every layer's cost before and after
in each cost model (parameters, storage bits, FLOPs) and its weight error."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tensorslim.core.cost import layer_dense_cost, matrix_targets
from tensorslim.core.discover import LayerInfo, count_params, summed
from tensorslim.core.materialize import LayerJob, reconstructed, spec_cost
from tensorslim.core.spec import spec_to_json
from tensorslim.core.surgery import get_submodule
from tensorslim.plan.plan import LayerPlan, Plan


def layer_plan(
    info: LayerInfo,
    job: LayerJob | None,
    compressed: nn.Module,
    *,
    options: Mapping[str, Any] | None = None,
    dense_reason: str | None = None,
) -> LayerPlan:
    """One layer's plan entry: dense (with its reason) when `job` is None or has an empty spec."""
    dense = layer_dense_cost(info.module, info.handler, info.site) if info.handler else None
    lp = LayerPlan(
        name=info.name,
        type=info.type_name,
        shape=list(info.shape),
        params_before=info.params(),
        params_after=info.params(),
        flops_before=info.flops(),
        flops_after=info.flops(),
        bits_before=None if dense is None else dense.bits,
        bits_after=None if dense is None else dense.bits,
        reason=info.reason,
        compressible=info.compressible,
    )
    if info.aliases:
        lp.extra["aliases"] = list(info.aliases)
    if job is None or not job.spec:
        if info.compressible:
            lp.reason = dense_reason
            lp.rel_error = 0.0
        return lp
    after = spec_cost(info.module, info.handler, job.spec, info.site, options)
    lp.spec = spec_to_json(job.spec)
    lp.params_after, lp.flops_after, lp.bits_after = after.params, after.flops, after.bits
    if info.note:
        lp.reason = info.note
    lp.extra.update(job.facts)
    dense_parts = _dense_parts(info, job)
    if dense_parts:
        lp.extra["dense_matrices"] = dense_parts
    lp.extra["keep"] = round(after.params / lp.params_before, 6)
    lp.extra["compression"] = round(1 - after.params / lp.params_before, 6)
    new = get_submodule(compressed, info.name)
    lp.rel_error = relative_error_of(info, new)
    impl = getattr(new, "impl", None)
    if isinstance(impl, str):  # GRU/LSTM: which implementation runs (see layers/lowrank_rnn.py)
        lp.extra["impl"] = impl
    return lp


def _dense_parts(info: LayerInfo, job: LayerJob) -> dict[str, str]:
    """Matrices of a multi-matrix layer the compressor cannot shrink, with the reason."""
    comp = info.compressor
    if comp is None or comp.form != "matrix":
        return {}
    targets = matrix_targets(info.module, info.handler, info.site, with_weights=False)
    if len(targets) < 2:
        return {}
    out = {}
    for part, target in targets.items():
        why = comp.too_small(target)
        if why is not None:
            out[part] = why
    return out


def relative_error_of(info: LayerInfo, new: nn.Module) -> float:
    """||W - W_hat|| / ||W|| over all the layer's matrices (Frobenius), W_hat what `new` computes
    with (a matrix it keeps dense counts with no error)."""
    dense = info.handler.matrices(info.module)
    if info.handler.kernel(info.module) is not None and len(dense) == 1:
        dense = {"": info.handler.kernel(info.module)}
    got = reconstructed(info.module, info.handler, new)
    num = den = 0.0
    for part, w in dense.items():
        w64 = w.detach().to(torch.float64)
        den += float((w64 * w64).sum())
        if part in got:
            d = w64.reshape(-1) - got[part].detach().to(torch.float64).reshape(-1)
            num += float((d * d).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def make_plan(
    model: nn.Module,
    compressed: nn.Module,
    layers: list[LayerPlan],
    *,
    keep: float,
    cost: str,
    method: str,
    allocator: str,
    flops_known: bool,
    meta: dict[str, Any],
    latency_keep: Callable[[], float] | None = None,
) -> Plan:
    """The Plan with totals: achieved keep over the compressible layers in the cost unit
    (`latency_keep()` for measured latency), whole-model parameters, FLOPs and bits."""
    base = [lp for lp in layers if lp.compressible]
    key = {"params": "params", "flops": "flops", "bits": "bits"}.get(cost, "params")
    before = sum(getattr(lp, f"{key}_before") or 0 for lp in base)
    after = sum(getattr(lp, f"{key}_after") or 0 for lp in base)
    achieved = (after / before) if before else 1.0
    if cost == "latency" and latency_keep is not None:
        achieved = latency_keep()
    return Plan(
        layers=layers,
        keep=keep,
        cost=cost,
        method=method,
        allocator=allocator,
        achieved_keep=achieved,
        model_params_before=count_params(model),
        model_params_after=_model_total(model, layers, "params_after", params_only=True),
        model_flops_before=_sum(layers, "flops_before") if flops_known else None,
        model_flops_after=_sum(layers, "flops_after") if flops_known else None,
        model_bits_before=_model_bits(model, layers, "bits_before"),
        model_bits_after=_model_bits(model, layers, "bits_after"),
        meta=meta,
    )


def _sum(plans: list[LayerPlan], key: str) -> int | None:
    vals = [getattr(lp, key) for lp in plans if getattr(lp, key) is not None]
    return sum(vals) if vals else None


def _model_bits(model: nn.Module, layers: list[LayerPlan], key: str) -> int:
    """Storage bits of the whole model: the layers' (as the plan counts them) plus every other
    parameter and buffer at its dtype (shared tensors once)."""
    return _model_total(model, layers, key, params_only=False)


def _model_total(
    model: nn.Module, layers: list[LayerPlan], key: str, *, params_only: bool
) -> int:
    """The layers' `key` (as the plan counts them: a quantized layer's codes and codebook are
    numbers stored, whatever its modules' parameter count) plus every other parameter (and, for
    bits, buffer: counted at its dtype's bits) of `model` outside them, shared tensors once."""
    from tensorslim.core.compressor import dtype_bits

    # compressed layers count as the plan says; every other tensor (dense layers included, so
    # a weight tied between two dense layers counts once) at its size
    layers = [lp for lp in layers if lp.components and getattr(lp, key) is not None]
    in_layers: set[int] = set()
    for lp in layers:
        try:
            module = get_submodule(model, lp.name)
        except Exception:  # noqa: BLE001 - a plan layer the model lacks counts nothing
            continue
        in_layers.update(id(p) for p in module.parameters())
    rest = 0
    seen: set[int] = set()
    tensors = [*model.parameters()] if params_only else [*model.parameters(), *model.buffers()]
    for t in tensors:
        if id(t) in seen or id(t) in in_layers:
            continue
        seen.add(id(t))
        rest += t.numel() * (1 if params_only else dtype_bits(t.dtype))
    return rest + (summed([getattr(lp, key) for lp in layers]) or 0)
