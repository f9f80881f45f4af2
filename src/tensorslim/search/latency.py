"""Measured per-layer CPU latency of compressed layers, for cost="latency" and for flagging (and,
in "auto", avoiding) compressions slower than their dense layer.

A layer's latency is the median time of one forward pass of the compressed structure (weights are
irrelevant to speed, so the structure is built empty through core.materialize.build_layer and
filled with random values) on a random input of the layer's real input shape (from the example
input), under torch.inference_mode, with the process's torch threads; the best of ROUNDS round
medians, since load from other processes only adds time. A layer whose single call takes at least
SLOW_CALL seconds is timed by the best of ROUNDS single calls instead (a round of blocked timing
runs it several times: a 1024-channel Conv1d with 64 taps cost 7 calls per measurement). Results are cached by (layer geometry,
dtype, input shape, spec, threads), so a layer shape seen again (ResNet blocks, repeated compress
calls) is not re-timed.

Timing is on the CPU, in the layer's dtype (float16, bfloat16, float32, float64): a layer on
another device is timed on a CPU copy, and where the CPU has no kernel for the layer's dtype (some
builds lack float16 / bfloat16 convolutions) it is timed in float32; `latency_dtype` says which
one (the plan records it in the layer's facts, with `latency_dtype_note` for a fallback). The
input model's layers are never changed: timing runs on copies or in eval mode restored afterwards.

Rank rounding rule (measured in benchmarks/conv_speed.py, table "Rank rounding"): with oneDNN on
x86 CPUs, channel counts that are multiples of 8 fill the SIMD lanes; `round_rank` rounds a rank of
at least 8 down to a multiple of 8 (never up, so the parameter budget still holds), and ranks below
8 are left alone. cost="latency" measures these rounded ranks first.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from tensorslim.core.compressor import Proposal, compressor_class
from tensorslim.core.handler import Handler
from tensorslim.core.materialize import build_layer
from tensorslim.core.modes import eval_mode
from tensorslim.core.spec import Component, Spec
from tensorslim.core.target import LayerSite
from tensorslim.errors import ExampleInputError, TensorSlimError, UnsupportedLayerError
from tensorslim.layers.routed_mha import RoutedMultiheadAttention
from tensorslim.search.timing import time_call

T = TypeVar("T")

ROUND_TO = 8
MAX_MEASURED = 12  # proposals timed per layer for cost="latency"
MIN_RUN_TIME = 0.01  # seconds of timed calls per round
ROUNDS = 3  # the best (lowest) of this many round medians: load from other processes only adds time
SLOW_CALL = 0.02  # seconds: a call at least this long is timed by single calls (best of ROUNDS)

_CACHE: dict[tuple, float] = {}
_DTYPE_OF: dict[tuple, torch.dtype] = {}  # cache key -> the dtype it was timed in
# (layer type name, its dtype) -> the dtype it was timed in (float32 where the CPU lacked a kernel)
_TIMED_IN: dict[tuple[str, torch.dtype], torch.dtype] = {}


def round_rank(rank: int, multiple: int = ROUND_TO) -> int:
    """A rank >= `multiple` rounded down to a multiple of it; smaller ranks unchanged."""
    return rank if rank < multiple else rank - rank % multiple


def _is_rounded(rank: Any) -> bool:
    """True if every integer in `rank` (an int, a list, or a mapping of them) is rounded."""
    if isinstance(rank, Mapping):
        ranks = list(rank.values())
    else:
        ranks = list(rank) if isinstance(rank, (list, tuple)) else [rank]
    ints = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    return all(r < ROUND_TO or r % ROUND_TO == 0 for r in ints)


def _signature(module: nn.Module) -> tuple:
    keys = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    w = getattr(module, "weight", None)
    return (
        type(module).__name__,
        tuple(w.shape) if isinstance(w, torch.Tensor) else None,
        tuple((n, tuple(p.shape)) for n, p in module.named_parameters()),
        getattr(module, "bias", None) is not None,
        tuple(str(getattr(module, k, None)) for k in keys),
        str(_dtype(module)),
    )


def _dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of the layer's parameters (float32 if it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _hashable(value: Any) -> Any:
    """A cache key for a parameter: ints, lists and mappings of them."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(r) for r in value)
    return value


def _on_cpu(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`layer` itself when it is already on the CPU in `dtype`, else a CPU copy in `dtype`."""
    tensors = [*layer.parameters(), *layer.buffers()]
    if all(
        t.device.type == "cpu" and (t.dtype == dtype or not t.is_floating_point()) for t in tensors
    ):
        return layer
    return copy.deepcopy(layer).to(device="cpu", dtype=dtype)


def _call(layer: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """One forward of `layer` on `x`; attention runs as self-attention (query = key = value)."""
    if isinstance(layer, (nn.MultiheadAttention, RoutedMultiheadAttention)):
        return lambda: layer(x, x, x, need_weights=False)
    return lambda: layer(x)


def _time_in(layer: nn.Module, input_shape: tuple[int, ...], dtype, min_run_time: float) -> float:
    layer = _on_cpu(layer, dtype)
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    # eval_mode restores the modes: the input model's layers are timed in place
    with eval_mode(layer), torch.inference_mode():
        run = _call(layer, x)
        run()  # warm-up (oneDNN primitive creation)
        first = _once(run)
        if first >= SLOW_CALL * 1e3:
            return min([first] + [_once(run) for _ in range(ROUNDS - 1)])
        return min(time_call(run, min_run_time) for _ in range(ROUNDS))


def _once(run: Callable[[], Any]) -> float:
    """Milliseconds of one call."""
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def _time(
    layer: nn.Module, input_shape: tuple[int, ...], min_run_time: float
) -> tuple[float, torch.dtype]:
    """(milliseconds per forward, the dtype timed in): on the CPU in the layer's dtype, or in
    float32 where the CPU has no kernel for it (remembered per layer type in _TIMED_IN)."""
    dtype = _dtype(layer)
    key = (type(layer).__name__, dtype)
    if _TIMED_IN.get(key, dtype) == dtype:
        try:
            ms = _time_in(layer, input_shape, dtype, min_run_time)
            _TIMED_IN[key] = dtype
            return ms, dtype
        except (RuntimeError, NotImplementedError):
            if dtype in (torch.float32, torch.float64):
                raise
            _TIMED_IN[key] = torch.float32  # e.g. "... not implemented for 'Half'"
    return _time_in(layer, input_shape, torch.float32, min_run_time), torch.float32


def _dense_key(module: nn.Module, input_shape: tuple[int, ...]) -> tuple:
    return (_signature(module), tuple(input_shape), "dense", None, torch.get_num_threads())


def _spec_key(module: nn.Module, spec: Spec, input_shape: tuple[int, ...]) -> tuple:
    kinds = tuple(c.kind for c in spec)
    params = tuple(_hashable(dict(c.params)) for c in spec)
    return (_signature(module), tuple(input_shape), kinds, params, torch.get_num_threads())


def _randomized(layer: nn.Module) -> nn.Module:
    """`layer` with random weights: an empty structure's memory may hold NaN or denormals, which
    some kernels run far slower on."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            if p.is_floating_point() and p.device.type != "meta":
                p.copy_(torch.randn(p.shape, generator=gen).mul_(0.02))
    return layer


def dense_latency(
    module: nn.Module, input_shape: tuple[int, ...], min_run_time: float = MIN_RUN_TIME
) -> float:
    """Milliseconds per forward of the dense layer on `input_shape` (cached)."""
    key = _dense_key(module, input_shape)
    if key not in _CACHE:
        _CACHE[key], _DTYPE_OF[key] = _time(module, input_shape, min_run_time)
    return _CACHE[key]


def spec_latency(
    module: nn.Module,
    handler: Handler,
    spec: Spec,
    site: LayerSite,
    min_run_time: float = MIN_RUN_TIME,
) -> float:
    """Milliseconds per forward of `module` compressed by `spec` (built empty) on the site's input
    shape (cached)."""
    shape = tuple(site.input_shape)
    key = _spec_key(module, spec, shape)
    if key not in _CACHE:
        layer, _ = build_layer(module, handler, spec, site, empty=True)
        _CACHE[key], _DTYPE_OF[key] = _time(_randomized(layer), shape, min_run_time)
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()
    _DTYPE_OF.clear()
    _TIMED_IN.clear()


def latency_dtype_facts(module: nn.Module, *keys: tuple) -> dict[str, str]:
    """For the plan: `latency_dtype`, the dtype the layer was timed in (the dense layer and its
    compression, cache keys `keys`), and `latency_dtype_note` where that is float32 because the
    CPU had no kernel for the layer's own dtype."""
    own = _dtype(module)
    used = {_DTYPE_OF.get(k, own) for k in keys} or {own}
    dtype = torch.float32 if torch.float32 in used else own
    facts = {"latency_dtype": _name(dtype)}
    if dtype != own:
        facts["latency_dtype_note"] = (
            f"timed in float32: this CPU has no {_name(own)} kernel for this layer or its "
            "factorization"
        )
    return facts


def describe(spec: Spec) -> str:
    """`spec` in words for messages: "its 'svd' factorization at rank 8"."""
    if len(spec) == 1 and set(spec[0].params) == {"rank"}:
        cls = compressor_class(spec[0].kind)
        method = cls.method if cls is not None else spec[0].kind
        return f"its {method!r} factorization at rank {spec[0]['rank']}"
    return "its compression " + ", ".join(str(c.to_dict()) for c in spec)


def _measured(site: LayerSite, module: nn.Module, what: str, fn: Callable[[], T]) -> T:
    """Run a timing; a layer that cannot be timed on the CPU is refused with its name."""
    try:
        return fn()
    except TensorSlimError:
        raise
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        raise UnsupportedLayerError(
            f"layer {site.name!r} ({type(module).__name__}, {_name(_dtype(module))}): cannot "
            f"measure the CPU latency of {what} on input shape {list(site.input_shape)} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use "
            "cost='params' or cost='flops'"
        ) from e


def _thin(proposals: list[Proposal], n: int) -> list[Proposal]:
    """At most n proposals spread over the cost range, rounded ranks preferred, cheapest and
    dearest kept."""
    if len(proposals) <= n:
        return list(proposals)
    rounded = [p for p in proposals if _is_rounded(p.component.get("rank"))]
    pool = rounded if len(rounded) >= n // 2 else proposals
    idx = sorted({round(i * (len(pool) - 1) / (n - 1)) for i in range(n)})
    picked = [pool[i] for i in idx]
    for end in (proposals[0], proposals[-1]):
        if end not in picked:
            picked.append(end)
    return sorted(picked, key=lambda p: p.cost.params)


def pareto_front(
    items: Iterable[T], cost: Callable[[T], float], error: Callable[[T], float], tol: float
) -> list[T]:
    """The items by rising cost that each beat every cheaper item's error by more than `tol`
    (ties in cost: the lower error first; ties in both: the first given). Costs rise and errors
    fall along the result, as the allocators need."""
    front, best = [], math.inf
    for item in sorted(items, key=lambda i: (cost(i), error(i))):
        if error(item) < best - tol:
            front.append(item)
            best = error(item)
    return front


def _need_input(site: LayerSite) -> tuple[int, ...]:
    if site.input_shape is None:
        raise ExampleInputError(
            f"layer {site.name!r} did not run on the example input, so its CPU latency cannot be "
            "measured; give an example input that runs it, or exclude it"
        )
    return tuple(site.input_shape)


def latency_proposals(
    module: nn.Module, handler: Handler, site: LayerSite, proposals: list[Proposal]
) -> tuple[list[Proposal], list[float], float]:
    """For cost="latency": (proposals, their measured latencies in ms, dense latency in ms).

    `proposals` by rising cost. At most MAX_MEASURED are timed (spread over the cost range, rounded
    ranks first), each built empty from its own component (so "auto"'s pooled proposals are timed
    with their own kind's structure). Proposals not faster than the dense layer are dropped, and so
    is every proposal that a faster one beats on error (the allocators need costs rising and
    errors falling)."""
    shape = _need_input(site)
    dense = _measured(site, module, "the dense layer", lambda: dense_latency(module, shape))
    timed = []
    for p in _thin(proposals, MAX_MEASURED):
        spec = [p.component]
        ms = _measured(
            site, module, describe(spec), lambda spec=spec: spec_latency(module, handler, spec, site)
        )
        if ms < dense:
            timed.append((ms, p))
    front = pareto_front(timed, lambda t: t[0], lambda t: t[1].error, 1e-15)
    return [p for _, p in front], [ms for ms, _ in front], dense


def latency_facts(
    module: nn.Module, handler: Handler, spec: Spec | list[Component], site: LayerSite
) -> dict[str, Any]:
    """Facts for the plan: latency_ms, dense_latency_ms, input_shape, latency_dtype (and its
    note) and, where the compressed layer is not faster, slower_than_dense: True. {} without the
    site's input shape or for the dense spec []."""
    if site.input_shape is None or not spec:
        return {}
    shape = tuple(site.input_shape)
    spec = [Component.from_dict(c) for c in spec]
    dense = _measured(site, module, "the dense layer", lambda: dense_latency(module, shape))
    ms = _measured(
        site, module, describe(spec), lambda: spec_latency(module, handler, spec, site)
    )
    keys = (_dense_key(module, shape), _spec_key(module, spec, shape))
    facts: dict[str, Any] = {
        "latency_ms": round(ms, 4),
        "dense_latency_ms": round(dense, 4),
        "input_shape": list(shape),
        **latency_dtype_facts(module, *keys),
    }
    if ms >= dense:
        facts["slower_than_dense"] = True
    return facts
