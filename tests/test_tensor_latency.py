"""Latency-aware choices: cost="latency", flags for factorizations slower than dense, auto's guard,
and the rank-rounding rule. Timing-dependent facts are checked for consistency, not for speed."""

import pytest
import torch
from torch import nn

import tensorslim.handlers  # noqa: F401  (registers the handlers)
from tensorslim import compress
from tensorslim.core import Component, LayerSite, LayerTarget, get_compressor, handler_for
from tensorslim.errors import ExampleInputError, TensorSlimError
from tensorslim.search import auto
from tensorslim.search import latency as lc
from tensorslim.search.timing import Latency, compare_models, measure_latency


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


def test_latency_proposals_are_faster_than_dense_and_pareto():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    h = handler_for(conv)
    site = LayerSite("b", (4, 16, 12, 12), (4, 24, 12, 12))
    props = get_compressor("tucker2").proposals(LayerTarget("b", conv, site, h))
    kept, costs, dense = lc.latency_proposals(conv, h, site, props)
    assert len(kept) == len(costs) <= lc.MAX_MEASURED
    assert all(c < dense for c in costs)
    assert costs == sorted(costs)
    errors = [p.error for p in kept]
    assert errors == sorted(errors, reverse=True)
    assert all(p in props for p in kept)
    # cached: the same shape, kind and rank is not timed again
    n = len(lc._CACHE)
    lc.latency_proposals(conv, h, site, props)
    assert len(lc._CACHE) == n


def test_latency_proposals_need_the_input_shape():
    conv = nn.Conv2d(16, 24, 3, padding=1)
    with pytest.raises(ExampleInputError, match="did not run on the example input"):
        lc.latency_proposals(conv, handler_for(conv), LayerSite("b"), [])


def test_latency_facts_time_the_spec_built_empty():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    h = handler_for(conv)
    site = LayerSite("b", (2, 16, 10, 10), (2, 24, 10, 10))
    for spec in ([Component("cp", {"rank": 12})], [{"kind": "lowrank", "rank": 8}]):
        facts = lc.latency_facts(conv, h, spec, site)
        assert facts["latency_ms"] > 0 and facts["dense_latency_ms"] > 0
        assert facts["input_shape"] == [2, 16, 10, 10]
        assert facts["latency_dtype"] == "float32" and "latency_dtype_note" not in facts
        slower = facts["latency_ms"] >= facts["dense_latency_ms"]
        assert facts.get("slower_than_dense", False) == slower
    assert lc.latency_facts(conv, h, [], site) == {}
    assert lc.latency_facts(conv, h, [Component("cp", {"rank": 12})], LayerSite("b")) == {}
    assert lc.describe([Component("lowrank", {"rank": 8})]) == "its 'svd' factorization at rank 8"


def test_measure_and_compare_models_restore_modes():
    net = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1)).train()
    x = torch.randn(4, 8)
    lat = measure_latency(net, x, rounds=2, min_run_time=0.001)
    assert isinstance(lat, Latency) and lat.median_ms > 0 and len(lat.round_medians_ms) == 2
    assert lat.median_ms == min(lat.round_medians_ms)
    a, b = compare_models([net, nn.Linear(8, 8)], x, rounds=1, min_run_time=0.001)
    assert a.median_ms > 0 and b.median_ms > 0
    assert net.training and net[1].training


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


def test_auto_guard_drops_proposals_slower_than_dense(monkeypatch):
    """With a synthetic latency model (CP slower than dense beyond rank 10, every other kind
    faster), auto keeps no CP proposal above rank 10 where a fast one is near its cost; and where
    nothing is faster, slow proposals stay so that a budget can be met."""
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, 3, padding=1)
    h = handler_for(conv)
    site = LayerSite("x", (1, 12, 8, 8), (1, 20, 8, 8))

    def slow(p):
        return p.component.kind == "cp" and p.component["rank"] > 10

    def fake(module, handler, spec, site, min_run_time=0.0):
        (c,) = spec
        if c.kind == "cp":
            return 2.0 if c["rank"] > 10 else 0.5
        return 0.1

    monkeypatch.setattr(lc, "spec_latency", fake)
    monkeypatch.setattr(lc, "dense_latency", lambda module, shape, min_run_time=0.0: 1.0)
    assert auto.auto_proposals(conv, h, site)
    pooled = [
        p
        for comp in auto.auto_members(conv, h)
        for p in comp.proposals(auto._target(comp, conv, h, site))
    ]
    kept = auto.faster_than_dense(conv, h, site, pooled)
    slack = 1 - auto.LATENCY_SWAP_SLACK
    fast_params = [p.cost.params for p in kept if not slow(p)]
    for p in kept:
        if slow(p):  # kept only where no fast proposal is near its cost
            assert not any(slack * p.cost.params <= q <= p.cost.params for q in fast_params)
    assert len(kept) < len(pooled)
    free = auto.auto_proposals(conv, h, site, latency_guard=False)
    assert any(slow(p) for p in free)

    monkeypatch.setattr(lc, "spec_latency", lambda *a, **k: 5.0)  # everything slower
    assert auto.auto_proposals(conv, h, site) == free
