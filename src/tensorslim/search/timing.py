"""Measured CPU latency: medians of timed forward passes (torch.utils.benchmark), and side-by-side
comparisons that alternate two models so background load affects both alike."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark as tbench

from tensorslim.core.discover import run_model
from tensorslim.core.modes import eval_mode


@dataclass(frozen=True)
class Latency:
    """Milliseconds per call: the best (lowest) of `rounds` medians, and every round's median."""

    median_ms: float
    round_medians_ms: tuple[float, ...]


def time_call(fn: Callable[[], Any], min_run_time: float = 0.1) -> float:
    """Median milliseconds per call of `fn` over blocked runs lasting at least `min_run_time` s."""
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _forward(model: nn.Module, example_input: Any) -> Callable[[], Any]:
    def call():
        return run_model(model, example_input)

    return call


def compare_calls(
    fns: list[Callable[[], Any]], rounds: int = 3, min_run_time: float = 0.1
) -> list[Latency]:
    """Time several callables alternately for `rounds` rounds; best-of-rounds median for each."""
    for fn in fns:  # warm-up (allocator, lazy init, caches)
        fn()
    per: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            per[i].append(time_call(fn, min_run_time))
    return [Latency(min(t), tuple(t)) for t in per]


def measure_latency(
    model: nn.Module, example_input: Any, rounds: int = 3, min_run_time: float = 0.1
) -> Latency:
    """Latency of `model` on `example_input` in eval mode under inference_mode."""
    return compare_models([model], example_input, rounds, min_run_time)[0]


def compare_models(
    models: list[nn.Module], example_input: Any, rounds: int = 3, min_run_time: float = 0.1
) -> list[Latency]:
    """Latencies of several models on the same input, timed alternately (see compare_calls)."""
    with contextlib.ExitStack() as stack:
        for m in models:
            stack.enter_context(eval_mode(m))
        with torch.inference_mode():
            return compare_calls([_forward(m, example_input) for m in models], rounds, min_run_time)
