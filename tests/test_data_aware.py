"""compress(..., calibration=, loss=) with the data-aware methods fwsvd, fvd, whitened."""

import math

import pytest
import torch
from torch import nn

import tensorslim
from tensorslim.calibrate import calibrate
from tensorslim.decompose import output_error, weighted_error
from tensorslim.errors import TensorSlimError
from tensorslim.layers import LowRankConv, LowRankLinear
from tests.models import MODELS

METHODS = ["fwsvd", "fvd", "whitened"]


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _mlp():
    torch.manual_seed(0)
    return MODELS["mlp"][0]().eval()


def _batches(x, y, size=32):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


class _XY(nn.Module):
    """Wraps a model so calibration batches can be (x, y) tuples; y is ignored by the forward."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, y=None):
        return self.net(x)


def _ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("allocator", ["uniform", "global"])
def test_data_aware_methods_hit_keep_and_run(method, allocator):
    x, y = _data()
    model = _XY(_mlp())
    small, plan = tensorslim.compress(
        model,
        0.4,
        method=method,
        allocator=allocator,
        calibration=_batches(x, y),
        loss=_ce,
        # options are per compressor: only fvd has `iters`
        method_options={"iters": 5} if method == "fvd" else None,
    )
    assert abs(plan.achieved_keep - 0.4) <= 0.02
    assert plan.meta["objective"] == {"fwsvd": "fisher", "fvd": "fisher"}.get(method, "feature")
    assert plan.factorized_layers
    for lp in plan.factorized_layers:
        assert lp.method == method
        assert isinstance(small.get_submodule(lp.name), LowRankLinear)
        if method == "whitened":
            assert 0 <= lp.extra["rel_output_error"] < 1
        else:
            assert lp.extra["svd_fisher_error"] >= lp.extra["weighted_fisher_error"] * (1 - 1e-9)
            assert lp.extra["svd_risk"] >= -1e-9
        if method == "fvd":
            assert lp.extra["fvd"]["objective"] <= lp.extra["fvd"]["start"]
    with torch.no_grad():
        out = small(x)
    assert out.shape == (96, 10) and torch.isfinite(out).all()


def test_whitened_beats_svd_on_calibration_outputs_of_one_layer():
    torch.manual_seed(1)
    lin = nn.Linear(24, 20)
    x = torch.randn(200, 24) * torch.linspace(3, 0.1, 24)  # anisotropic inputs
    batches = list(x.split(50))
    with torch.no_grad():
        ref = lin(x)
    for keep in (0.3, 0.5, 0.8):
        errs = {}
        for method in ("svd", "whitened"):
            small, plan = tensorslim.compress(
                nn.Sequential(lin), keep, method=method, calibration=batches
            )
            with torch.no_grad():
                errs[method] = float((small(x) - ref).pow(2).sum())
            assert plan.layers[0].rank == plan.layers[0].rank
        assert errs["whitened"] <= errs["svd"] * (1 + 1e-6)


def test_fwsvd_fvd_lower_fisher_error_than_svd_at_the_same_ranks():
    x, y = _data()
    model = _XY(_mlp())
    stats = calibrate(
        model,
        {"net.3": model.net[3]},
        _batches(x, y),
        loss=_ce,
        gram=False,
    )
    fisher = stats["net.3"].fisher
    w = model.net[3].weight.detach()
    errs = {}
    for method in ("svd", "fwsvd", "fvd"):
        small, plan = tensorslim.compress(
            model,
            0.3,
            method=method,
            allocator="uniform",
            include=["net.3"],
            calibration=_batches(x, y),
            loss=_ce,
            objective="weight" if method == "svd" else None,
        )
        w_hat = small.net[3].dense_weight().detach()
        errs[method] = weighted_error(w, w_hat, fisher)
    assert errs["fwsvd"] <= errs["svd"]
    assert errs["fvd"] <= errs["fwsvd"] * (1 + 1e-9)


@pytest.mark.parametrize("objective", ["fisher", "feature"])
def test_global_allocator_minimises_data_aware_objective(objective):
    """With a data-aware objective, global allocation of plain SVD ranks yields a summed error (in
    that objective) no larger than uniform allocation, and differs from the weight objective's."""
    x, y = _data()
    model = _XY(_mlp())
    names = ["net.1", "net.3", "net.5"]
    stats = calibrate(model, {n: model.get_submodule(n) for n in names}, _batches(x, y), loss=_ce)

    def total(small):
        s = 0.0
        for n in names:
            w = model.get_submodule(n).weight.detach()
            layer = small.get_submodule(n)
            w_hat = layer.dense_weight().detach() if isinstance(layer, LowRankLinear) else w
            st = stats[n]
            if objective == "fisher":
                s += 0.5 * weighted_error(w, w_hat, st.fisher)
            else:
                s += output_error(w, w_hat, st.gram) / output_error(w, torch.zeros_like(w), st.gram)
        return s

    kw = {"calibration": _batches(x, y), "loss": _ce, "objective": objective}
    got = {a: tensorslim.compress(model, 0.35, allocator=a, **kw) for a in ("uniform", "global")}
    assert total(got["global"][0]) <= total(got["uniform"][0]) * (1 + 1e-9)
    assert got["global"][1].meta["objective"] == objective


def test_convs_with_fwsvd_and_whitened():
    torch.manual_seed(0)
    factory, make_input = MODELS["resnetish"]
    model = factory().eval()
    xs = [make_input() for _ in range(3)]

    def loss(m, b):
        return m(b).pow(2).mean()

    for method in ("fwsvd", "whitened"):
        small, plan = tensorslim.compress(model, 0.5, method=method, calibration=xs, loss=loss)
        assert any(isinstance(m, LowRankConv) for m in small.modules())
        with torch.no_grad():
            assert torch.isfinite(small(xs[0])).all()
        assert plan.layer("dw").reason  # depthwise stays dense with a reason


def test_data_aware_refusals():
    x, y = _data()
    model = _XY(_mlp())
    with pytest.raises(TensorSlimError, match="loss"):
        tensorslim.compress(model, 0.5, method="fwsvd", calibration=_batches(x, y))
    with pytest.raises(TensorSlimError, match="calibration"):
        tensorslim.compress(model, 0.5, method="whitened")
    with pytest.raises(TensorSlimError, match="objective"):
        tensorslim.compress(model, 0.5, calibration=_batches(x, y), objective="bogus")
    with pytest.raises(TensorSlimError, match="unknown option 'x'.*'whitened'.*options are: damp"):
        tensorslim.compress(
            model, 0.5, method="whitened", calibration=_batches(x, y), method_options={"x": 1}
        )
    with pytest.raises(TensorSlimError, match="iterable"):
        tensorslim.compress(model, 0.5, method="whitened", calibration=x)
    # a plan made with a data-aware method cannot be re-factorized without data, only loaded
    _, plan = tensorslim.compress(model, 0.5, method="whitened", calibration=_batches(x, y))
    with pytest.raises(TensorSlimError, match="calibration"):
        tensorslim.apply_plan(model, plan)


def test_save_and_load_a_data_aware_model(tmp_path):
    x, y = _data()
    model = _XY(_mlp())
    small, plan = tensorslim.compress(
        model, 0.4, method="fvd", calibration=_batches(x, y), loss=_ce, method_options={"iters": 3}
    )
    tensorslim.save(small, plan, tmp_path / "out")
    back = tensorslim.load(_XY(_mlp()), tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    assert math.isclose(
        tensorslim.Plan.from_json(tmp_path / "out" / "plan.json").achieved_keep,
        plan.achieved_keep,
    )


def test_svd_default_unchanged_by_calibration_with_weight_objective():
    x, y = _data()
    model = _XY(_mlp())
    a, pa = tensorslim.compress(model, 0.4)
    b, pb = tensorslim.compress(model, 0.4, calibration=_batches(x, y))
    assert [lp.rank for lp in pa.layers] == [lp.rank for lp in pb.layers]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
