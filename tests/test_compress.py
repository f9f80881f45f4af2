import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tensorslim
from tensorslim.errors import (
    ExampleInputError,
    InvalidKeepError,
    NonFiniteWeightError,
    TensorSlimError,
    UnsupportedLayerError,
)
from tensorslim.layers import LowRankConv, LowRankLinear, LowRankRNN
from tensorslim.layers.routed_mha import RoutedMultiheadAttention
from tests.models import MODELS


def _build(name):
    factory, make_input = MODELS[name]
    torch.manual_seed(0)
    return factory().eval(), make_input()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_keep_one_reproduces_outputs_exactly(name):
    model, x = _build(name)
    small, plan = tensorslim.compress(model, 1.0, example_input=x)
    assert not plan.factorized_layers
    with torch.no_grad():
        assert torch.equal(small(x), model(x))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("allocator", ["uniform", "global"])
@pytest.mark.parametrize("keep", [0.7, 0.4, 0.15])
def test_unseen_models_hit_keep_and_still_run(name, allocator, keep):
    model, x = _build(name)
    before = copy.deepcopy(model.state_dict())
    small, plan = tensorslim.compress(model, keep, allocator=allocator, example_input=x)
    assert abs(plan.achieved_keep - keep) <= 0.02, str(plan)
    with torch.no_grad():
        y = small(x)
    assert y.shape == model(x).shape and torch.isfinite(y).all()
    # the input model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # achieved keep is what the layers really hold
    base = [lp for lp in plan.layers if lp.compressible]
    real = sum(lp.params_after for lp in base) / sum(lp.params_before for lp in base)
    assert math.isclose(real, plan.achieved_keep)
    for lp in plan.factorized_layers:
        assert lp.params_after < lp.params_before
        layer = small.get_submodule(lp.name)
        assert isinstance(layer, (LowRankLinear, LowRankConv, RoutedMultiheadAttention, LowRankRNN))
        assert sum(p.numel() for p in layer.parameters()) == lp.params_after


def test_unsupported_layers_are_reported_with_reasons():
    model, x = _build("tokens")
    _, plan = tensorslim.compress(model, 0.5, example_input=x)
    reasons = {lp.name: lp.reason for lp in plan.layers}
    assert "no handler registered for Embedding" in reasons["emb"]
    # nn.MultiheadAttention is factorized through its projections (model/attention.py)
    assert "MultiheadAttention" in (reasons["attn"] or "") or plan.layer("attn").compressible
    assert plan.layer("rnn").factorized  # recurrent matrices are factorized per matrix
    model, x = _build("resnetish")
    _, plan = tensorslim.compress(model, 0.5, example_input=x)
    assert "depthwise" in plan.layer("dw").reason
    assert not plan.layer("dw").compressible
    # a 1-channel-in conv whose factorization never saves anything
    tiny = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 64), nn.Linear(64, 64))
    _, plan = tensorslim.compress(tiny, 0.5)
    assert "too small to gain" in plan.layer("0").reason


def test_global_beats_uniform_on_summed_relative_squared_error():
    for name in ("mlp", "resnetish", "audio1d"):
        model, x = _build(name)
        for keep in (0.6, 0.3, 0.1):
            errs = {}
            for allocator in ("uniform", "global"):
                _, plan = tensorslim.compress(model, keep, allocator=allocator, example_input=x)
                errs[allocator] = sum((lp.rel_error or 0.0) ** 2 for lp in plan.layers)
            assert errs["global"] <= errs["uniform"] + 1e-6, (name, keep, errs)


def test_global_strictly_better_when_spectra_differ():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():  # layer 0 is nearly rank 4; layer 1 is white noise
        model[0].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) + 1e-3 * torch.randn(64, 64))
    errs = {}
    for allocator in ("uniform", "global"):
        _, plan = tensorslim.compress(model, 0.4, allocator=allocator)
        errs[allocator] = sum(lp.rel_error**2 for lp in plan.layers)
    assert errs["global"] < 0.9 * errs["uniform"]


def test_flops_budget():
    model, x = _build("resnetish")
    _, plan = tensorslim.compress(model, 0.5, cost="flops", example_input=x)
    base = [lp for lp in plan.layers if lp.compressible]
    real = sum(lp.flops_after for lp in base) / sum(lp.flops_before for lp in base)
    assert abs(real - 0.5) <= 0.02 and math.isclose(real, plan.achieved_keep)
    assert plan.model_flops_after < plan.model_flops_before


def test_include_and_exclude_patterns():
    model, x = _build("resnetish")
    _, plan = tensorslim.compress(model, 0.5, example_input=x, include=["blocks.*"])
    assert {lp.name for lp in plan.layers if lp.compressible} == {
        "blocks.0.conv1",
        "blocks.0.conv2",
        "blocks.1.conv1",
        "blocks.1.conv2",
    }
    _, plan = tensorslim.compress(model, 0.5, example_input=x, exclude=["stem", "head"])
    assert plan.layer("stem").reason == "excluded by pattern 'stem'"
    assert not plan.layer("head").compressible


def test_training_mode_and_batchnorm_stats_untouched():
    model, x = _build("resnetish")
    model.train()
    stats = model.blocks[0].bn.running_mean.clone()
    small, _ = tensorslim.compress(model, 0.5, example_input=x)
    assert model.training and small.training
    assert torch.equal(model.blocks[0].bn.running_mean, stats)


def test_plan_json_round_trip_and_table():
    model, x = _build("resnetish")
    _, plan = tensorslim.compress(model, 0.3, example_input=x)
    again = tensorslim.Plan.from_json(plan.to_json())
    assert again == plan
    text = str(plan)
    for col in ("layer", "type", "shape", "method", "rank", "params", "FLOPs", "rel err"):
        assert col in text
    assert "depthwise" in text and "blocks.0.conv1" in text


def test_compress_again_skips_factorized_layers():
    model, x = _build("mlp")
    small, _ = tensorslim.compress(model, 0.5, example_input=x)
    _, plan2 = tensorslim.compress(small, 0.5, example_input=x)
    assert all(lp.reason == "already compressed" for lp in plan2.layers if not lp.compressible)
    # with every layer factorized there is nothing left to compress: a clear error, not a no-op
    smaller, _ = tensorslim.compress(small, 0.1, example_input=x)
    with pytest.raises(UnsupportedLayerError, match="nothing to compress.*already compressed"):
        tensorslim.compress(smaller, 0.5, example_input=x)


def test_apply_plan_reproduces_compress():
    model, x = _build("audio1d")
    small, plan = tensorslim.compress(model, 0.4, example_input=x)
    again = tensorslim.apply_plan(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x))


@pytest.mark.parametrize("keep", [0, -0.1, 1.01, float("nan"), "abc", None])
def test_bad_keep_rejected(keep):
    model, x = _build("mlp")
    with pytest.raises(InvalidKeepError, match=r"keep must"):
        tensorslim.compress(model, keep)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="nope"), "method must be one of"),
        (dict(allocator="nope"), "allocator must be one of"),
        (dict(cost="bytes"), "cost must be one of"),
        (dict(cost="flops"), "needs example_input"),
    ],
)
def test_bad_options_rejected(kwargs, match):
    model, _ = _build("mlp")
    with pytest.raises(TensorSlimError, match=match):
        tensorslim.compress(model, 0.5, **kwargs)


def test_nan_weights_rejected_with_layer_name():
    model, x = _build("mlp")
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="'3'"):
        tensorslim.compress(model, 0.5, example_input=x)
    # excluding the broken layer is the way out
    tensorslim.compress(model, 0.5, example_input=x, exclude=["3"])


def test_example_input_rejected_by_model():
    model, _ = _build("mlp")
    with pytest.raises(ExampleInputError, match="rejected the example input"):
        tensorslim.compress(model, 0.5, example_input=torch.randn(2, 3))


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(3, 96), min_size=2, max_size=5),
    keep=st.floats(0.1, 0.95),
    allocator=st.sampled_from(["uniform", "global"]),
)
def test_random_mlps_hit_the_budget(widths, keep, allocator):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers)
    x = torch.randn(3, widths[0])
    small, plan = tensorslim.compress(model, keep, allocator=allocator, example_input=x)
    small(x)
    if plan.achieved_keep > keep + 1e-9:
        # only when even rank 1 everywhere is over budget; beyond the 0.02 tolerance the plan says so
        assert all(lp.rank == 1 for lp in plan.layers if lp.compressible)
        assert plan.achieved_keep <= keep + 0.02 or "over budget" in plan.meta["warning"]
        return
    assert plan.achieved_keep <= keep + 1e-9
    # what is left of the budget is smaller than any single step up (one more rank, or dense)
    base = [lp for lp in plan.layers if lp.compressible]
    left = keep * sum(lp.params_before for lp in base) - sum(lp.params_after for lp in base)
    steps = []
    for lp in base:
        if lp.factorized:
            m, n = lp.shape
            more = lp.params_after + (m + n)
            steps.append((more if more < lp.params_before else lp.params_before) - lp.params_after)
    assert not steps or left < min(steps) + 1e-6


def test_infeasible_budget_warns():
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.warns(UserWarning, match="over budget"):
        _, plan = tensorslim.compress(model, 0.5)
    assert plan.achieved_keep == 0.75 and "over budget" in plan.meta["warning"]


def test_custom_layer_type_is_added_by_registering():
    """A layer type the library does not know becomes compressible with one handler."""
    from tensorslim.core import unregister_handler
    from tensorslim.layers.additive import Compressed

    class ScaledLinear(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.in_features, self.out_features = n_in, n_out
            self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
            self.bias = None

        def forward(self, x):
            return 2.0 * nn.functional.linear(x, self.weight)

    class Scaled(nn.Module, Compressed):
        def __init__(self, op):
            super().__init__()
            self.op = op

        def forward(self, x):
            return 2.0 * self.op(x)

        def dense_weight(self):
            return self.op.dense_weight()

    class ScaledLinearHandler(tensorslim.Handler):
        name = "scaled_linear"

        def matrices(self, module):
            return {"": module.weight.detach()}

        def positions(self, module, site):
            out = site.output_shape
            return {"": None if out is None else math.prod(out) // module.out_features}

        def assemble(self, module, ops):
            return module if ops[""] is None else Scaled(ops[""])

    model = nn.Sequential(ScaledLinear(64, 64), nn.ReLU(), ScaledLinear(64, 8))
    with pytest.raises(UnsupportedLayerError, match="no handler registered for ScaledLinear"):
        tensorslim.compress(model, 0.5)
    tensorslim.register(ScaledLinear, ScaledLinearHandler)
    try:
        x = torch.randn(3, 64)
        small, plan = tensorslim.compress(model, 1.0)
        assert plan.layer("0").compressible
        small, plan = tensorslim.compress(model, 0.6, allocator="uniform")
        assert plan.layer("0").factorized and abs(plan.achieved_keep - 0.6) <= 0.02
        assert small(x).shape == (3, 8)
        full, _ = tensorslim.compress(model, 0.999, example_input=x)
        with torch.no_grad():
            assert small(x).shape == full(x).shape
    finally:
        unregister_handler(ScaledLinear)


class _KeywordCalls(nn.Module):
    """Calls its layers with PyTorch's keyword (`input=`), as some model code does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.conv(input=x)).flatten(1)
        return self.out(input=torch.relu(self.fc(input=h)))


@pytest.mark.parametrize("method", ["svd", "whitened", "tucker2"])
def test_replacement_layers_take_the_keyword_input_like_the_dense_ones(method):
    torch.manual_seed(0)
    model = _KeywordCalls().eval()
    data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    kw = {"calibration": data} if method == "whitened" else {"example_input": data[0]}
    small, plan = tensorslim.compress(model, 0.5, method=method, **kw)
    assert any(lp.components for lp in plan.layers)
    with torch.no_grad():
        assert small(data[0]).shape == (8, 4)
