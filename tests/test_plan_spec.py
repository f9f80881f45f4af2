"""Plans store a spec per layer; plan files and saved folders of tensorslim 0.1.0 still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tensorslim
from tensorslim.errors import WeightFileError
from tensorslim.layers import LowRankConv, LowRankRNN, Tucker2Conv

DATA = Path(__file__).parent / "data"


class Mixed(nn.Module):
    """The model the 0.1.0 files in tests/data were written for (tensorslim 0.1.0, seed 0)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.rnn = nn.LSTM(16, 24, batch_first=True)
        self.attn = nn.MultiheadAttention(24, 4, batch_first=True)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv(x)))
        seq = h.flatten(2).transpose(1, 2)
        seq, _ = self.rnn(seq)
        seq, _ = self.attn(seq, seq, seq)
        return self.fc(seq.mean(1))


def _model() -> Mixed:
    torch.manual_seed(0)
    return Mixed().eval()


def test_0_1_0_plan_loads_as_specs():
    plan = tensorslim.Plan.from_json(DATA / "plan_0.1.0_svd.json")
    by = {lp.name: lp for lp in plan.layers}
    assert by["conv2"].spec == [{"kind": "lowrank", "rank": 5}]
    assert (by["conv2"].method, by["conv2"].rank) == ("svd", 5)
    assert by["rnn"].spec == [{"kind": "lowrank", "rank": {"weight_ih_l0": None, "weight_hh_l0": 6}}]
    assert by["attn"].rank == [5, 3]
    assert by["fc"].spec == [] and by["fc"].method == "dense" and by["fc"].rank is None
    assert plan.format == 2  # read as the current format


def test_0_1_0_plan_applies():
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    plan = tensorslim.Plan.from_json(DATA / "plan_0.1.0_svd.json")
    small = tensorslim.apply_plan(model, plan)
    assert isinstance(small.conv2, LowRankConv) and small.conv2.rank == 5
    assert isinstance(small.rnn, LowRankRNN)
    assert isinstance(small.conv, nn.Conv2d) and isinstance(small.fc, nn.Linear)
    with torch.no_grad():
        assert small(x).shape == model(x).shape
    # the same plan through JSON in the new format builds the same model
    again = tensorslim.apply_plan(model, tensorslim.Plan.from_json(plan.to_json()))
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x))


def test_0_1_0_tucker2_plan_applies():
    model = _model()
    plan = tensorslim.Plan.from_json(DATA / "plan_0.1.0_tucker2.json")
    assert plan.layer("conv2").spec == [{"kind": "tucker2", "rank": [10, 9]}]
    small = tensorslim.apply_plan(model, plan)
    assert isinstance(small.conv2, Tucker2Conv)


def test_0_1_0_saved_folder_loads_exactly(tmp_path):
    folder = tmp_path / "saved"
    shutil.copytree(DATA / "saved_0.1.0", folder)
    io = load_file(DATA / "saved_0.1.0_io.safetensors")
    loaded = tensorslim.load(_model(), folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(io["x"]), io["y"], rtol=0, atol=1e-6)


def test_plan_json_stores_spec_and_bits():
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    small, plan = tensorslim.compress(model, 0.5, example_input=x)
    d = json.loads(plan.to_json())
    assert d["format"] == 2
    for ld, lp in zip(d["layers"], plan.layers):
        assert "rank" not in ld and ld["spec"] == lp.spec and ld["method"] == lp.method
        assert ld["bits_before"] == 32 * ld["params_before"]
        if lp.factorized:
            assert ld["bits_after"] == 32 * ld["params_after"]
    assert d["model_bits_before"] == 32 * plan.model_params_before
    assert d["model_bits_after"] == 32 * plan.model_params_after
    assert "storage" in str(plan)


def _plan_dict() -> dict:
    _, plan = tensorslim.compress(_model(), 0.5, example_input=torch.randn(2, 3, 8, 8))
    return json.loads(plan.to_json())


def test_editing_the_rank_view_is_refused():
    d = _plan_dict()
    lp = next(ld for ld in d["layers"] if ld["spec"])
    lp["rank"] = 3
    with pytest.raises(WeightFileError, match="edit the component"):
        tensorslim.Plan.from_dict(d)


def test_method_view_must_agree_with_spec():
    d = _plan_dict()
    lp = next(ld for ld in d["layers"] if ld["spec"])
    lp["method"] = "cp"
    with pytest.raises(WeightFileError, match="edit 'spec'"):
        tensorslim.Plan.from_dict(d)


def test_unknown_kind_in_spec_is_refused():
    d = _plan_dict()
    lp = next(ld for ld in d["layers"] if ld["spec"])
    lp["spec"] = [{"kind": "nope", "rank": 2}]
    del lp["method"]
    with pytest.raises(WeightFileError, match="unknown compressor kind 'nope'"):
        tensorslim.Plan.from_dict(d)


@pytest.mark.parametrize("bad", [{"rank": 2}, ["lowrank"], [{"kind": 3}], "lowrank"])
def test_malformed_spec_is_refused(bad):
    d = _plan_dict()
    lp = next(ld for ld in d["layers"] if ld["spec"])
    lp["spec"] = bad
    del lp["method"]
    with pytest.raises(WeightFileError, match="'spec'"):
        tensorslim.Plan.from_dict(d)


def test_hand_written_additive_spec_applies():
    """Two components summed: low-rank plus low-rank equals one low-rank of the summed rank
    only in structure; the layer computes with the sum of both operators."""
    model = nn.Sequential(nn.Linear(32, 32))
    d = {
        "format": 2,
        "keep": 0.5,
        "layers": [
            {
                "name": "0",
                "type": "Linear",
                "shape": [32, 32],
                "spec": [{"kind": "lowrank", "rank": 4}, {"kind": "lowrank", "rank": 2}],
            }
        ],
    }
    plan = tensorslim.Plan.from_dict(d)
    assert plan.layers[0].method == "svd+svd" and plan.layers[0].rank is None
    small = tensorslim.apply_plan(model, plan)
    x = torch.randn(5, 32)
    w = small[0].dense_weight()
    with torch.no_grad():
        torch.testing.assert_close(small(x), x @ w.T + model[0].bias)
