"""compress(method=...) with the tensor methods on CNNs the library has never seen."""

import pytest
import torch
from models import MODELS
from torch import nn

from tensorslim import apply_plan, compress
from tensorslim.core import LayerSite, LayerTarget, handler_for
from tensorslim.core.cost import matrix_targets
from tensorslim.io import load, save
from tensorslim.search.auto import AUTO_KINDS, auto_members, auto_proposals

METHODS = ["cp", "tucker2", "tt", "spatial_svd", "auto"]


class OddCNN(nn.Module):
    """Strides, dilation, 'same' padding, reflect padding, no bias, a 1x1 conv, BatchNorm, a
    grouped conv and a Linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, (3, 5), stride=(2, 1), padding=(1, 2), bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.b = nn.Conv2d(12, 20, 3, dilation=2, padding="same", padding_mode="reflect")
        self.c = nn.Conv2d(20, 24, 1)
        self.g = nn.Conv2d(24, 24, 3, padding=1, groups=4)
        self.d = nn.Conv2d(24, 16, 3, stride=2)
        self.head = nn.Linear(16, 7)

    def forward(self, x):
        x = torch.relu(self.bn(self.a(x)))
        x = torch.relu(self.c(torch.relu(self.b(x))))
        x = torch.relu(self.d(self.g(x)))
        return self.head(x.mean((2, 3)))


UNSEEN = {
    "odd": (OddCNN, lambda: torch.randn(2, 3, 17, 15)),
    "resnetish": MODELS["resnetish"],
    "audio1d": MODELS["audio1d"],
}


@pytest.mark.parametrize("model_name", list(UNSEEN))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_hits_keep_on_unseen_cnns(model_name, method):
    build, make_input = UNSEEN[model_name]
    torch.manual_seed(0)
    net, x = build().eval(), make_input()
    for keep, allocator in ((0.25, "global"), (0.5, "uniform")):
        small, plan = compress(net, keep, method=method, allocator=allocator, example_input=x)
        assert abs(plan.achieved_keep - keep) <= 0.03, (keep, allocator, plan.achieved_keep)
        assert small(x).shape == net(x).shape
        factorized = plan.factorized_layers
        assert factorized
        for lp in factorized:
            assert lp.extra["keep"] == pytest.approx(lp.params_after / lp.params_before, abs=1e-6)
            assert lp.extra["compression"] == pytest.approx(1 - lp.extra["keep"], abs=1e-6)
        # the model's parameter count matches the plan's accounting
        assert sum(p.numel() for p in small.parameters()) == plan.model_params_after


def test_linear_layers_fall_back_to_svd_and_the_plan_says_so():
    build, make_input = MODELS["mlp"]
    net = build()
    for method in METHODS:
        _, plan = compress(net, 0.3, method=method, example_input=make_input())
        for lp in plan.factorized_layers:
            assert lp.method == "svd"
            assert "falls back" in lp.reason


def test_mixed_model_records_actual_methods_and_reasons():
    torch.manual_seed(0)
    net, x = OddCNN().eval(), torch.randn(2, 3, 17, 15)
    _, plan = compress(net, 0.4, method="tucker2", example_input=x)
    assert plan.layer("head").method in ("svd", "dense")
    assert "groups=4" in plan.layer("g").reason and not plan.layer("g").factorized
    c = plan.layer("c")
    if c.factorized:
        assert c.method == "svd" and "1x1" in c.reason
    b = plan.layer("b")
    assert b.method == "tucker2" and b.extra["decomposition"] == "tucker2"
    assert b.extra["algorithm"] == "hooi" and "iterations" in b.extra


def test_cp_plan_records_convergence():
    torch.manual_seed(0)
    net, x = OddCNN().eval(), torch.randn(2, 3, 17, 15)
    _, plan = compress(net, 0.3, method="cp", example_input=x)
    lp = plan.layer("b")
    assert lp.method == "cp"
    assert lp.extra["iterations"] >= 1 and isinstance(lp.extra["converged"], bool)
    assert lp.extra["kernel_rel_error"] == pytest.approx(lp.rel_error, abs=1e-5)


def test_auto_options_dominate_every_method():
    """Every proposal of every kind is matched or beaten (cost and error) by an auto proposal."""
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, 3, padding=1)
    h = handler_for(conv)
    site = LayerSite("x", None, (1, 20, 8, 8))  # no input shape: no latency guard
    auto = auto_proposals(conv, h, site)
    errors = [p.error for p in auto]
    assert errors == sorted(errors, reverse=True)
    assert {p.component.kind for p in auto} <= set(AUTO_KINDS)
    members = auto_members(conv, h)
    assert {c.kind for c in members} == set(AUTO_KINDS)
    for comp in members:
        target = LayerTarget("x", conv, site, h) if comp.form == "layer" else None
        if target is None:
            target = matrix_targets(conv, h, site)[""]
        for o in comp.proposals(target):
            assert any(
                a.cost.params <= o.cost.params and a.error <= o.error + 1e-12 for a in auto
            )


def test_auto_is_at_least_as_good_as_each_method_per_layer():
    torch.manual_seed(0)
    net = OddCNN().eval()
    # no example input: auto's latency guard (which may trade error for speed) stays off
    _, auto = compress(net, 0.3, method="auto", allocator="uniform")
    for method in ("cp", "tucker2", "tt", "spatial_svd", "svd"):
        _, other = compress(net, 0.3, method=method, allocator="uniform")
        for name in ("b", "d"):
            a, o = auto.layer(name), other.layer(name)
            if o.factorized and o.params_after <= a.params_after:
                assert a.rel_error <= o.rel_error + 1e-6, (method, name)


@pytest.mark.parametrize("method", ["cp", "tt", "auto"])
def test_save_load_and_apply_plan_round_trip(method, tmp_path):
    torch.manual_seed(0)
    net, x = OddCNN().eval(), torch.randn(2, 3, 17, 15)
    small, plan = compress(net, 0.35, method=method, example_input=x)
    save(small, plan, tmp_path / "out")
    restored = load(OddCNN(), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), small.eval()(x))
        again = apply_plan(net, plan).eval()
        torch.testing.assert_close(again(x), small(x), rtol=1e-4, atol=1e-5)


def test_keep_one_leaves_everything_dense():
    torch.manual_seed(0)
    net, x = OddCNN().eval(), torch.randn(2, 3, 17, 15)
    small, plan = compress(net, 1.0, method="tt", example_input=x)
    assert not plan.factorized_layers
    torch.testing.assert_close(small(x), net(x))
