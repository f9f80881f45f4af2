"""Measured per-layer CPU latency of factorizations, for cost="latency" and for flagging (and, in
"auto", avoiding) factorizations slower than their dense layer.

A layer's latency is the median time of one forward pass of the factorized structure (weights are
irrelevant to speed, so the structure is built with `factorizer.empty`) on a random input of the
layer's real input shape (from the example input), under torch.inference_mode, with the process's
torch threads; the best of ROUNDS round medians, since load from other processes only adds time. Results are cached by (layer geometry, input shape, method, rank, threads), so a
layer shape seen again (ResNet blocks, repeated compress calls) is not re-timed.

Rank rounding rule (measured in benchmarks/conv_speed.py, table "Rank rounding"): with oneDNN on
x86 CPUs, channel counts that are multiples of 8 fill the SIMD lanes; `round_rank` rounds a rank of
at least 8 down to a multiple of 8 (never up, so the parameter budget still holds), and ranks below 8
are left alone. cost="latency" measures these rounded ranks first.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tensorslim.model.latency import time_call
from tensorslim.model.registry import Factorizer, LayerSite, Option

ROUND_TO = 8
MAX_MEASURED = 12  # options timed per layer for cost="latency"
MIN_RUN_TIME = 0.01  # seconds of timed calls per round
ROUNDS = 3  # the best (lowest) of this many round medians: load from other processes only adds time

_CACHE: dict[tuple, float] = {}


def round_rank(rank: int, multiple: int = ROUND_TO) -> int:
    """A rank >= `multiple` rounded down to a multiple of it; smaller ranks unchanged."""
    return rank if rank < multiple else rank - rank % multiple


def _is_rounded(rank: Any) -> bool:
    ranks = rank if isinstance(rank, tuple) else (rank,)
    ranks = [r for r in ranks if isinstance(r, int)]
    return all(r < ROUND_TO or r % ROUND_TO == 0 for r in ranks)


def _signature(module: nn.Module) -> tuple:
    keys = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    w = getattr(module, "weight", None)
    return (
        type(module).__name__,
        tuple(w.shape) if isinstance(w, torch.Tensor) else None,
        getattr(module, "bias", None) is not None,
        tuple(str(getattr(module, k, None)) for k in keys),
    )


def _time(layer: nn.Module, input_shape: tuple[int, ...], min_run_time: float) -> float:
    layer = layer.eval()
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        layer(x)  # warm-up (oneDNN primitive creation)
        return min(time_call(lambda: layer(x), min_run_time) for _ in range(ROUNDS))


def dense_latency(
    module: nn.Module, input_shape: tuple[int, ...], min_run_time: float = MIN_RUN_TIME
) -> float:
    """Milliseconds per forward of the dense layer on `input_shape` (cached)."""
    key = (_signature(module), tuple(input_shape), "dense", None, torch.get_num_threads())
    if key not in _CACHE:
        _CACHE[key] = _time(module, input_shape, min_run_time)
    return _CACHE[key]


def factorized_latency(
    factorizer: Factorizer,
    module: nn.Module,
    rank: Any,
    input_shape: tuple[int, ...],
    min_run_time: float = MIN_RUN_TIME,
) -> float:
    """Milliseconds per forward of `factorizer`'s structure at `rank` on `input_shape` (cached)."""
    key = (
        _signature(module),
        tuple(input_shape),
        factorizer.method,
        rank,
        torch.get_num_threads(),
    )
    if key not in _CACHE:
        _CACHE[key] = _time(factorizer.empty(module, rank), input_shape, min_run_time)
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()


def _thin(opts: list[Option], n: int) -> list[Option]:
    """At most n options spread over the cost range, rounded ranks preferred, cheapest and dearest
    kept."""
    if len(opts) <= n:
        return list(opts)
    rounded = [o for o in opts if _is_rounded(o.rank)]
    pool = rounded if len(rounded) >= n // 2 else opts
    idx = sorted({round(i * (len(pool) - 1) / (n - 1)) for i in range(n)})
    picked = [pool[i] for i in idx]
    for end in (opts[0], opts[-1]):
        if end not in picked:
            picked.append(end)
    return sorted(picked, key=lambda o: o.params)


def latency_options(
    factorizer: Factorizer, module: nn.Module, site: LayerSite, opts: list[Option]
) -> tuple[list[Option], list[float], float]:
    """For cost="latency": (options, their measured latencies in ms, dense latency in ms).

    At most MAX_MEASURED options are timed (spread over the cost range, rounded ranks first).
    Options not faster than the dense layer are dropped, and so is every option that a faster one
    beats on error (the allocators need costs rising and errors falling). For "auto" (options with
    Option.method) each is timed with its own method's structure.
    """
    if site.input_shape is None:
        raise ValueError(f"layer {site.name!r} did not run on the example input")
    from tensorslim.model.registry import find

    dense = dense_latency(module, site.input_shape)
    timed = []
    for o in _thin(opts, MAX_MEASURED):
        if o.method:
            f, rank = find(module, o.method), o.rank[1]
        else:
            f, rank = factorizer, o.rank
        ms = factorized_latency(f, module, rank, site.input_shape)
        if ms < dense:
            timed.append((ms, o))
    timed.sort(key=lambda t: (t[0], t[1].error))
    front, best = [], math.inf
    for ms, o in timed:
        if o.error < best - 1e-15:
            front.append((ms, o))
            best = o.error
    return [o for _, o in front], [ms for ms, _ in front], dense


def flag_latency(
    factorizer: Factorizer, module: nn.Module, rank: Any, site: LayerSite
) -> dict[str, Any]:
    """Facts for the plan: the factorized and dense latencies, and whether it is slower."""
    if site.input_shape is None:
        return {}
    dense = dense_latency(module, site.input_shape)
    ms = factorized_latency(factorizer, module, rank, site.input_shape)
    facts = {
        "latency_ms": round(ms, 4),
        "dense_latency_ms": round(dense, 4),
        "input_shape": list(site.input_shape),
    }
    if ms >= dense:
        facts["slower_than_dense"] = True
    return facts
