"""Whole-model CPU latency: the dense and the compressed model timed alternately in one run
(`measure_speedup`), and where the time goes inside a model (`module_times`, `profile_breakdown`,
from torch.profiler).

Per-layer timings in isolation do not add up to a model's time (BatchNorm, activations, pooling,
memory layout and the narrow stages of factorized chains are what is left), so a speedup is only
claimed from timing the whole model on the user's input.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from tensorslim._nested import tensors_in
from tensorslim.core.discover import run_model
from tensorslim.core.modes import eval_mode
from tensorslim.errors import TensorSlimError
from tensorslim.search.timing import compare_models

# Prefix of the profiler ranges opened around each module's forward.
_RANGE = "tensorslim.module::"
# Forward calls profiled by module_times / profile_breakdown (after WARMUP untimed calls).
CALLS = 5
WARMUP = 2


@dataclass
class ModelTiming:
    """Dense vs compressed whole-model latency on one input, timed alternately in one run.

    dense_ms / compressed_ms: milliseconds per forward (median of blocked timed runs, the best of
    `rounds` rounds, since load from other processes only adds time); speedup = dense_ms /
    compressed_ms; threads: torch CPU threads; batch_shapes: shapes of the example input's tensors;
    dense_round_ms / compressed_round_ms: every round's median."""

    dense_ms: float
    compressed_ms: float
    speedup: float
    threads: int
    batch_shapes: list[list[int]]
    rounds: int
    dense_round_ms: list[float]
    compressed_round_ms: list[float]
    # a third model timed in the same alternating run (measure_speedup's `reference`), if any
    reference_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_shapes(example_input: Any) -> list[list[int]]:
    """The shapes of the tensors in `example_input` (a tensor, tuple, list or dict of them)."""
    return [list(t.shape) for t in tensors_in(example_input)]


def _check_timing_args(rounds: int, min_run_time: float) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise TensorSlimError(f"rounds must be an integer >= 1; got {rounds!r}")
    if (
        isinstance(min_run_time, bool)
        or not isinstance(min_run_time, (int, float))
        or not math.isfinite(min_run_time)
        or min_run_time <= 0
    ):
        raise TensorSlimError(f"min_run_time must be a number of seconds > 0; got {min_run_time!r}")


def measure_speedup(
    dense: nn.Module,
    compressed: nn.Module,
    example_input: Any,
    *,
    rounds: int = 5,
    min_run_time: float = 0.2,
    reference: nn.Module | None = None,
) -> ModelTiming:
    """Time `dense` and `compressed` on `example_input` alternately (eval mode, inference_mode,
    the process's torch threads): `rounds` rounds of blocked runs of at least `min_run_time`
    seconds each per model. `reference` (e.g. the dense model with the inference levers) is
    timed in the same alternation (`reference_ms`). The models' train/eval flags are restored
    afterwards."""
    _check_timing_args(rounds, min_run_time)
    if example_input is None:
        raise TensorSlimError("measuring a speedup needs example_input (the batch to time)")
    models = [dense, compressed] + ([reference] if reference is not None else [])
    d, c, *ref = compare_models(models, example_input, rounds, min_run_time)
    return ModelTiming(
        dense_ms=d.median_ms,
        compressed_ms=c.median_ms,
        speedup=d.median_ms / c.median_ms if c.median_ms > 0 else math.inf,
        threads=torch.get_num_threads(),
        batch_shapes=batch_shapes(example_input),
        rounds=rounds,
        dense_round_ms=list(d.round_medians_ms),
        compressed_round_ms=list(c.round_medians_ms),
        reference_ms=ref[0].median_ms if ref else None,
    )


# -- profiler ---------------------------------------------------------------------------------
def _units(model: nn.Module) -> list[str]:
    """Modules worth reporting: the leaves of the module tree, where a tensorslim layer (a
    factorized chain) counts as one leaf."""
    out: list[str] = []

    def walk(prefix: str, mod: nn.Module) -> None:
        kids = list(mod.named_children())
        if not kids or (prefix and type(mod).__module__.startswith("tensorslim.layers")):
            out.append(prefix)
            return
        for n, child in kids:
            walk(f"{prefix}.{n}" if prefix else n, child)

    walk("", model)
    return out


@contextlib.contextmanager
def _ranges(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Open a torch.profiler record_function range named _RANGE + name around each named
    module's forward (forward pre/post hooks), removed on exit."""
    modules = dict(model.named_modules())
    handles = []
    open_ranges: dict[tuple[int, str], list[Any]] = {}

    def hooks(name: str):
        def pre(mod, _args):
            rf = torch.profiler.record_function(_RANGE + name)
            rf.__enter__()
            open_ranges.setdefault((id(mod), name), []).append(rf)

        def post(mod, _args, _out):
            stack = open_ranges.get((id(mod), name))
            if stack:
                stack.pop().__exit__(None, None, None)

        return pre, post

    try:
        for name in dict.fromkeys(names):
            if name not in modules:
                raise TensorSlimError(
                    f"module_times: the model has no module {name!r}; names are dotted module "
                    "names as in model.named_modules()"
                )
            pre, post = hooks(name)
            handles.append(modules[name].register_forward_pre_hook(pre))
            handles.append(modules[name].register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()
        for stack in open_ranges.values():  # a forward that raised leaves its ranges open
            while stack:
                stack.pop().__exit__(None, None, None)


def _profile(model: nn.Module, example_input: Any, names: list[str], calls: int) -> Any:
    """The profiler's key averages over `calls` forwards (after WARMUP), with module ranges."""
    from torch.profiler import ProfilerActivity, profile

    if example_input is None:
        raise TensorSlimError("profiling a model needs example_input (the batch to run)")
    with eval_mode(model), torch.inference_mode():
        for _ in range(WARMUP):
            run_model(model, example_input)
        with _ranges(model, names), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                run_model(model, example_input)
    return prof.key_averages()


def module_times(
    model: nn.Module, example_input: Any, names: Iterable[str] | None = None, *, calls: int = CALLS
) -> dict[str, float]:
    """Milliseconds per forward spent inside each named module (inclusive of its children), from
    torch.profiler ranges opened and closed by forward hooks, averaged over `calls` forwards after
    WARMUP untimed ones (eval mode, inference_mode). `names`: dotted module names (default: the
    leaves, a tensorslim factorized layer counting as one leaf). The result also holds the whole
    forward under "" (the root module), so a share of the model's time is t[name] / t[""]; the
    profiler's per-op overhead is in every number alike. A module that never ran reads 0.0; one
    run several times per forward (shared) sums its calls."""
    names = _units(model) if names is None else list(names)
    wanted = list(dict.fromkeys(["", *names]))
    stats = _profile(model, example_input, wanted, calls)
    by_key = {e.key: e for e in stats}
    out = {}
    for name in wanted:
        e = by_key.get(_RANGE + name)
        out[name] = 0.0 if e is None else e.cpu_time_total / 1e3 / calls
    return out


def profile_breakdown(
    model: nn.Module, example_input: Any, top: int = 10, *, calls: int = CALLS
) -> list[dict[str, Any]]:
    """Where the time goes: the `top` modules (leaves, a factorized layer as one) by time inside
    them and the `top` operators by self time, each a dict {"kind": "module" | "op", "name",
    "type" (the module's class; the op's name for ops), "ms" (per forward), "share" (of the whole
    forward under the profiler), "calls" (per forward)}. Modules first, each group by falling ms."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise TensorSlimError(f"top must be an integer >= 1; got {top!r}")
    units = [n for n in _units(model) if n]
    stats = _profile(model, example_input, ["", *units], calls)
    by_key = {e.key: e for e in stats}
    root = by_key.get(_RANGE)
    total = root.cpu_time_total / 1e3 / calls if root is not None else 0.0
    modules = dict(model.named_modules())

    def share(ms: float) -> float:
        return round(ms / total, 4) if total > 0 else 0.0

    rows = []
    for name in units:
        e = by_key.get(_RANGE + name)
        if e is None:
            continue
        ms = e.cpu_time_total / 1e3 / calls
        rows.append(
            {"kind": "module", "name": name, "type": type(modules[name]).__name__,
             "ms": round(ms, 4), "share": share(ms), "calls": round(e.count / calls, 3)}
        )  # fmt: skip
    rows.sort(key=lambda r: -r["ms"])
    ops = []
    for e in stats:
        if e.key.startswith(_RANGE):
            continue
        ms = e.self_cpu_time_total / 1e3 / calls
        ops.append(
            {"kind": "op", "name": e.key, "type": e.key, "ms": round(ms, 4), "share": share(ms),
             "calls": round(e.count / calls, 3)}
        )  # fmt: skip
    ops.sort(key=lambda r: -r["ms"])
    return rows[:top] + ops[:top]
