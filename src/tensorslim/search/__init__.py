"""Choosing among compressions by measurement: the "auto" method (pooled proposals of several
kinds, Pareto front, latency guard) and measured latency (per layer and per model)."""

from tensorslim.search.auto import AUTO_KINDS, auto_members, auto_proposals, auto_reason
from tensorslim.search.latency import (
    dense_latency,
    latency_facts,
    latency_proposals,
    pareto_front,
    round_rank,
    spec_latency,
)
from tensorslim.search.timing import (
    Latency,
    compare_calls,
    compare_models,
    measure_latency,
    time_call,
)

__all__ = [
    "AUTO_KINDS",
    "Latency",
    "auto_members",
    "auto_proposals",
    "auto_reason",
    "compare_calls",
    "compare_models",
    "dense_latency",
    "latency_facts",
    "latency_proposals",
    "measure_latency",
    "pareto_front",
    "round_rank",
    "spec_latency",
    "time_call",
]
