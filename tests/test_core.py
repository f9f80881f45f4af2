"""The core: specs, registries, per-matrix parameters, cost models, the materialize path and
apply_plan of data-aware plans."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim
from tensorslim.core import (
    COST_MODELS,
    Component,
    LayerSite,
    build_layer,
    compressor_kinds,
    get_compressor,
    handler_for,
    parse_spec,
    spec_cost,
    split_params,
)
from tensorslim.core.spec import SpecError, legacy_spec
from tensorslim.errors import TensorSlimError


def test_builtin_kinds_and_methods():
    assert set(compressor_kinds()) >= {
        "lowrank", "fwsvd", "fvd", "whitened", "cp", "tucker2", "tt", "spatial"
    }
    assert type(get_compressor("svd")) is type(get_compressor("lowrank"))
    with pytest.raises(TensorSlimError, match="known: .*cp"):
        get_compressor("nope")


def test_register_compressor_refuses_non_compressors():
    with pytest.raises(TensorSlimError, match="Compressor subclass"):
        tensorslim.register_compressor("x")(object)
    with pytest.raises(TensorSlimError, match="identifier"):
        tensorslim.register_compressor("not a name")


def test_spec_parsing_and_legacy_forms():
    spec = parse_spec([{"kind": "lowrank", "rank": 4}, {"kind": "lowrank", "rank": 2}])
    assert [c.kind for c in spec] == ["lowrank", "lowrank"] and spec[1]["rank"] == 2
    assert parse_spec(None) == [] and parse_spec([]) == []
    for bad in ([{"rank": 2}], [3], "lowrank", [{"kind": "x", "rank": float("nan")}]):
        with pytest.raises(SpecError):
            parse_spec(bad)
    assert legacy_spec("svd", 5) == [{"kind": "lowrank", "rank": 5}]
    assert legacy_spec("auto", ["spatial_svd", 3]) == [{"kind": "spatial", "rank": 3}]
    assert legacy_spec("dense", None) == []


def test_split_params_per_matrix():
    parts = ["weight_ih_l0", "weight_hh_l0"]
    assert split_params(parts, {"rank": 4}) == {p: {"rank": 4} for p in parts}
    assert split_params(parts, {"rank": [2, 3]}) == {
        "weight_ih_l0": {"rank": 2}, "weight_hh_l0": {"rank": 3}
    }
    assert split_params(parts, {"rank": {"weight_hh_l0": 3}}) == {
        "weight_ih_l0": None, "weight_hh_l0": {"rank": 3}
    }
    with pytest.raises(TensorSlimError, match="one value per matrix"):
        split_params(parts, {"rank": [1, 2, 3]})
    with pytest.raises(TensorSlimError, match="one matrix"):
        split_params([""], {"rank": {"weight": 2}})


def test_cost_models_params_bits_flops():
    assert set(COST_MODELS) == {"params", "bits", "flops", "latency"}
    lin = nn.Linear(64, 32)
    site = LayerSite("fc", (10, 64), (10, 32))
    cost = spec_cost(lin, handler_for(lin), parse_spec([{"kind": "lowrank", "rank": 4}]), site)
    assert cost.params == 4 * (64 + 32) + 32
    assert cost.bits == 32 * cost.params
    assert cost.flops == 2 * 10 * 4 * (64 + 32)
    half = nn.Linear(64, 32).half()
    cost16 = spec_cost(half, handler_for(half), parse_spec([{"kind": "lowrank", "rank": 4}]), site)
    assert cost16.bits == 16 * cost16.params


def test_compress_to_a_bits_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    _, plan = tensorslim.compress(model, 0.4, cost="bits")
    assert plan.cost == "bits" and abs(plan.achieved_keep - 0.4) <= 0.02
    base = [lp for lp in plan.layers if lp.compressible]
    after = sum(lp.bits_after for lp in base) / sum(lp.bits_before for lp in base)
    assert after == pytest.approx(plan.achieved_keep)


def test_sum_of_components_is_one_operator_per_matrix():
    lin = nn.Linear(16, 16)
    spec = parse_spec([{"kind": "lowrank", "rank": 2}, {"kind": "lowrank", "rank": 3}])
    new, _ = build_layer(lin, handler_for(lin), spec, LayerSite(""))
    # the second component fits the residual of the first: rank 2 + rank 3 = the best rank 5
    best = get_compressor("lowrank").project(lin.weight.detach(), {"rank": 5})
    torch.testing.assert_close(new.dense_weight(), best, rtol=1e-4, atol=1e-5)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(new(x), x @ best.T + lin.bias, rtol=1e-4, atol=1e-5)


def _whitened_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    calib = [torch.randn(16, 32) @ torch.randn(32, 32) for _ in range(3)]
    small, plan = tensorslim.compress(model, 0.5, method="whitened", calibration=calib)
    return model, calib, small, plan


def test_apply_plan_of_a_data_aware_plan_needs_calibration():
    model, calib, small, plan = _whitened_model()
    with pytest.raises(TensorSlimError, match="calibration=batches"):
        tensorslim.apply_plan(model, plan)
    again = tensorslim.apply_plan(model, plan, calibration=calib)
    x = calib[0]
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x), rtol=1e-5, atol=1e-5)
    # the structure alone (what load uses) needs no data
    tensorslim.apply_plan(model, plan, weights="empty")


def test_layer_plan_views_are_read_only():
    _, _, _, plan = _whitened_model()
    lp = next(lp for lp in plan.layers if lp.factorized)
    assert lp.method == "whitened" and isinstance(lp.rank, int)
    with pytest.raises(AttributeError):
        lp.rank = 3
    assert lp.components == [Component("whitened", {"rank": lp.rank})]


def _conv_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1),
    ).eval()
    mix = torch.randn(3, 3)  # correlated channels: the data-aware fit differs from the plain one
    calib = [torch.einsum("ij,bjhw->bihw", mix, torch.randn(4, 3, 8, 8)) for _ in range(3)]
    return model, calib


def test_apply_plan_rebuilds_a_data_aware_tucker2_from_calibration():
    model, calib = _conv_model()
    small, plan = tensorslim.compress(
        model, 0.4, method="tucker2", calibration=calib, objective="feature"
    )
    assert plan.meta["calibration"]["gram"] is True
    with pytest.raises(TensorSlimError, match=r"calibration=batches.*tensorslim\.load"):
        tensorslim.apply_plan(model, plan)
    x = calib[0]
    again = tensorslim.apply_plan(model, plan, calibration=calib)
    plain = tensorslim.apply_plan(
        model, tensorslim.Plan.from_json(_without_calibration(plan.to_json()))
    )
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x), rtol=1e-5, atol=1e-5)
        # the data-aware factors are not the plain HOSVD ones (the check above can fail)
        assert not torch.allclose(plain(x), small(x), rtol=1e-3, atol=1e-3)


def _without_calibration(text: str) -> str:
    import json

    data = json.loads(text)
    data["meta"].pop("calibration", None)
    return json.dumps(data)


def test_apply_plan_rebuilds_a_sequential_plan_sequentially():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 6)).eval()
    calib = [torch.randn(16, 24) for _ in range(3)]
    small, plan = tensorslim.compress(model, 0.4, method="svd", calibration=calib, sequential=True)
    assert plan.meta["sequential"]
    with pytest.raises(TensorSlimError, match="built sequentially.*calibration=batches"):
        tensorslim.apply_plan(model, plan)
    again = tensorslim.apply_plan(model, tensorslim.Plan.from_json(plan.to_json()),
                                  calibration=calib)
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x), rtol=1e-5, atol=1e-5)
    plain, _ = tensorslim.compress(model, 0.4, method="svd")
    with torch.no_grad():  # the refit changed the weights: the check above can fail
        assert not torch.allclose(plain(x), small(x), rtol=1e-3, atol=1e-3)
    # the structure alone (what load uses) needs no data
    tensorslim.apply_plan(model, plan, weights="empty")
