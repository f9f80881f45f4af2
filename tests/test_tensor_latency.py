"""Latency-aware choices: cost="latency", flags for factorizations slower than dense, auto's guard,
and the rank-rounding rule. Timing-dependent facts are checked for consistency, not for speed."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from tensorslim import compress
from tensorslim.errors import TensorSlimError
from tensorslim.model import find
from tensorslim.model import latency_cost as lc
from tensorslim.model import tensor_factorizers as tf
from tensorslim.model.registry import LayerSite


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 24, 3, padding=1)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def test_round_rank_rule():
    assert [lc.round_rank(r) for r in (1, 7, 8, 9, 15, 16, 23, 100)] == [1, 7, 8, 8, 8, 16, 16, 96]
    assert lc.round_rank(37, 16) == 32


def test_latency_cost_needs_an_example_input():
    with pytest.raises(TensorSlimError, match="example_input"):
        compress(Small(), 0.5, cost="latency")


def test_latency_options_are_faster_than_dense_and_pareto():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    site = LayerSite("b", (4, 16, 12, 12), (4, 24, 12, 12))
    f = find(conv, "tucker2")
    opts, costs, dense = lc.latency_options(f, conv, site, f.options(conv, site))
    assert len(opts) == len(costs) <= lc.MAX_MEASURED
    assert all(c < dense for c in costs)
    assert costs == sorted(costs)
    errors = [o.error for o in opts]
    assert errors == sorted(errors, reverse=True)
    # cached: the same shape, method and rank is not timed again
    n = len(lc._CACHE)
    lc.latency_options(f, conv, site, f.options(conv, site))
    assert len(lc._CACHE) == n


def test_compress_with_latency_cost_spends_a_latency_budget():
    torch.manual_seed(0)
    net, x = Small().eval(), torch.randn(4, 3, 12, 12)
    small, plan = compress(net, 0.6, cost="latency", method="tucker2", example_input=x)
    assert plan.cost == "latency"
    assert plan.achieved_keep <= 0.6 + 1e-9 or "warning" in plan.meta
    for lp in plan.factorized_layers:
        assert lp.extra["latency_ms"] > 0 and lp.extra["dense_latency_ms"] > 0
    assert small(x).shape == (4, 5)


def test_tensor_methods_record_latency_and_flag_slow_layers():
    torch.manual_seed(0)
    net, x = Small().eval(), torch.randn(2, 3, 10, 10)
    _, plan = compress(net, 0.4, method="cp", example_input=x)
    for lp in plan.factorized_layers:
        if lp.type == "Conv2d":
            slower = lp.extra["latency_ms"] >= lp.extra["dense_latency_ms"]
            assert lp.extra.get("slower_than_dense", False) == slower
            if slower:
                assert "slower than dense" in lp.reason


def test_auto_guard_drops_options_slower_than_dense(monkeypatch):
    """With a synthetic latency model (CP slower than dense beyond rank 10, every other method
    faster), auto keeps no CP option above rank 10; and where nothing is faster, slow options stay
    so that a budget can be met."""
    conv = nn.Conv2d(12, 20, 3, padding=1)
    site = LayerSite("x", (1, 12, 8, 8), (1, 20, 8, 8))

    def fake(factorizer, module, rank, input_shape, min_run_time=0.0):
        if factorizer.method == "cp":
            return 2.0 if rank > 10 else 0.5
        return 0.1

    monkeypatch.setattr(lc, "factorized_latency", fake)
    monkeypatch.setattr(lc, "dense_latency", lambda module, shape, min_run_time=0.0: 1.0)
    auto = find(conv, "auto")
    assert auto.options(conv, site)
    slack = 1 - tf.LATENCY_SWAP_SLACK
    pooled = auto._faster_than_dense(
        conv,
        site,
        [
            replace(o, rank=(f.method, o.rank), method=f.method)
            for f in auto._members(conv)
            for o in f.options(conv, site)
        ],
    )
    fast_params = [o.params for o in pooled if not (o.method == "cp" and o.rank[1] > 10)]
    for o in pooled:
        if o.method == "cp" and o.rank[1] > 10:  # kept only where no fast option is near its cost
            assert not any(slack * o.params <= p <= o.params for p in fast_params)
    assert len(pooled) < sum(len(f.options(conv, site)) for f in auto._members(conv))
    auto.latency_guard = False
    try:
        free = auto.options(conv, site)
    finally:
        auto.latency_guard = True
    assert any(o.method == "cp" and o.rank[1] > 10 for o in free)

    monkeypatch.setattr(lc, "factorized_latency", lambda *a, **k: 5.0)  # everything slower
    assert [o.rank for o in auto.options(conv, site)] == [o.rank for o in free]
