"""Measured CPU latency of a model on one input: median of repeated timed forward passes."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorslim.model.profile import run_model


@dataclass(frozen=True)
class Latency:
    """Milliseconds per forward pass: median and the 10th / 90th percentiles over `repeats`."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int


def measure_latency(
    model: nn.Module, example_input: Any, warmup: int = 5, repeats: int = 30
) -> Latency:
    """Time `repeats` forward passes after `warmup` untimed ones, in eval mode without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                run_model(model, example_input)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run_model(model, example_input)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        model.train(was_training)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return Latency(statistics.median(times), q[0], q[-1], repeats)
