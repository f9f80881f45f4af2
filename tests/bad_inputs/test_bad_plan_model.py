"""Bad plans and unusual models: hand-edited plan.json fields, plans that do not fit the model,
shared modules and tied weights, a model that is one layer, nothing to compress, bad arguments.

Each refusal is a TensorSlimError naming the layer / field / value and what is accepted, raised
before anything is built; the input model and files are unchanged afterwards.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import tensorslim
from tensorslim.core.discover import count_params
from tensorslim.errors import (
    ExampleInputError,
    InvalidKeepError,
    InvalidRankError,
    PlanMismatchError,
    TensorSlimError,
    UnsupportedLayerError,
    WeightFileError,
)
from tensorslim.layers import LowRankLinear
from tensorslim.plan import Plan
from tests.bad_inputs.conftest import (
    Snapshot,
    assert_cli_error,
    assert_same_state,
    cli,
    expect_error,
    state_of,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class SharedNet(nn.Module):
    """`b` is `a`: one module used at two places."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(21, 21)
        self.c = nn.Linear(21, 21)
        self.b = self.a

    def forward(self, x):
        return self.b(torch.relu(self.c(torch.relu(self.a(x)))))


class TiedNet(nn.Module):
    """A decoder whose weight is the embedding's, as in every Hugging Face language model head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.mid = nn.Linear(16, 16)
        self.dec = nn.Linear(16, 40)
        self.dec.weight = self.emb.weight

    def forward(self, ids):
        return self.dec(torch.relu(self.mid(self.emb(ids))))


class Mixed(nn.Module):
    """A conv (tucker2), an LSTM (per-matrix ranks) and an attention (rank pair)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.rnn = nn.LSTM(8, 8)
        self.attn = nn.MultiheadAttention(8, 2)


X = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved folder of Net compressed at keep 0.5 (fc1 factorized)."""
    small, plan = tensorslim.compress(_net(), 0.5, example_input=X)
    assert plan.layer("fc1").factorized
    folder = tmp_path_factory.mktemp("saved") / "net"
    tensorslim.save(small, plan, folder)
    return folder


def _copy(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _fc1(d):
    return next(lp for lp in d["layers"] if lp["name"] == "fc1")


def _load_refused(saved, tmp_path, plan_bytes, error, *words):
    """Write `plan_bytes` as the folder's plan.json: load refuses it, nothing changes."""
    folder = _copy(saved, tmp_path / "case")
    (folder / "plan.json").write_bytes(plan_bytes)
    model = _net()
    state, snap = state_of(model), Snapshot(folder)
    with expect_error(*words, error=error):
        tensorslim.load(model, folder)
    assert_same_state(model, state)
    snap.check()


def _as_format_1(d):
    """The plan dict as tensorslim 0.1.0 wrote it: no "format", a "method" and "rank" per layer."""
    d.pop("format", None)
    for lp in d["layers"]:
        spec = lp.pop("spec")
        lp["rank"] = spec[0]["rank"] if spec else None
    return d


# -- hand-edited plan.json: every field is checked before anything is built -------------------

# A rank edited in the spec's component ({"kind": "lowrank", "rank": ...}): type errors of the spec
# structure are WeightFileError (Plan.validate), values the layer cannot take InvalidRankError.
RANK_EDITS = [
    (3_000_000, InvalidRankError, ["fc1", "3000000", "[1, 32]"]),
    (10**12, InvalidRankError, ["fc1", "1000000000000", "[1, 32]"]),
    (-1, InvalidRankError, ["fc1", "-1", "[1, 32]"]),
    (0, InvalidRankError, ["fc1", "got 0", "[1, 32]"]),
    (True, InvalidRankError, ["fc1", "rank", "true", "integer", "[1, 32]"]),
    (2.5, InvalidRankError, ["fc1", "rank", "2.5", "integer", "[1, 32]"]),
    ("8", InvalidRankError, ["fc1", "rank", "'8'", "integer", "[1, 32]"]),
    (None, InvalidRankError, ["fc1", "got None", "[1, 32]"]),
    (float("nan"), WeightFileError, ["fc1", "'rank'", "nan"]),
    ([4, 4], InvalidRankError, ["fc1", "[4, 4]", "[1, 32]"]),
    ({"weight": 4}, InvalidRankError, ["fc1", "'weight'", "one matrix", "integer rank"]),
    (33, InvalidRankError, ["fc1", "33", "[1, 32]"]),
]


@pytest.mark.parametrize("rank, error, words", RANK_EDITS, ids=[repr(r) for r, _, _ in RANK_EDITS])
def test_hand_edited_rank(saved, tmp_path, rank, error, words):
    d = json.loads((saved / "plan.json").read_text())
    _fc1(d)["spec"][0]["rank"] = rank
    _load_refused(saved, tmp_path, json.dumps(d).encode(), error, *words)


@pytest.mark.parametrize("rank, error, words", RANK_EDITS, ids=[repr(r) for r, _, _ in RANK_EDITS])
def test_hand_edited_rank_in_a_format_1_file(saved, tmp_path, rank, error, words):
    """Plan files of tensorslim 0.1.0 ("method" and "rank" per layer) are checked the same way."""
    d = _as_format_1(json.loads((saved / "plan.json").read_text()))
    _fc1(d)["rank"] = rank
    _load_refused(saved, tmp_path, json.dumps(d).encode(), error, *words)


def test_format_1_file_still_loads(saved, tmp_path):
    folder = _copy(saved, tmp_path / "case")
    d = _as_format_1(json.loads((saved / "plan.json").read_text()))
    (folder / "plan.json").write_text(json.dumps(d))
    back = tensorslim.load(_net(), folder)
    assert isinstance(back.fc1, LowRankLinear)


FIELD_EDITS = {
    "shape-negative": (lambda d: _fc1(d).update(shape=[32, -1]), ["fc1", "'shape'", "-1"]),
    "shape-str": (lambda d: _fc1(d).update(shape="32x32"), ["fc1", "'shape'", "list of integers"]),
    "type-int": (lambda d: _fc1(d).update(type=7), ["fc1", "'type'", "7", "string"]),
    "name-int": (lambda d: _fc1(d).update(name=5), ["layer 0", "'name'", "5", "string"]),
    "method-null": (lambda d: _fc1(d).update(method=None), ["fc1", "'method'", "none"]),
    "method-disagrees": (
        lambda d: _fc1(d).update(method="tucker2"),
        ["fc1", "'method'", "'tucker2'", "'svd'", "'spec'"],
    ),
    "rank-in-format-2": (
        lambda d: _fc1(d).update(rank=4),
        ["fc1", "'rank'", "format 1", "'spec'"],
    ),
    "spec-null": (lambda d: _fc1(d).update(spec=None), ["fc1", "'spec'", "none"]),
    "spec-str": (lambda d: _fc1(d).update(spec="lowrank"), ["fc1", "'spec'", "'lowrank'"]),
    "spec-object": (
        lambda d: _fc1(d).update(spec={"kind": "lowrank", "rank": 4}),
        ["fc1", "'spec'", "list", "{'kind': 'lowrank', 'rank': 4}"],
    ),
    "spec-item-int": (lambda d: _fc1(d)["spec"].append(3), ["fc1", "'spec'", "3]"]),
    "kind-missing": (lambda d: _fc1(d)["spec"][0].pop("kind"), ["fc1", "'spec'", "kind"]),
    "kind-int": (lambda d: _fc1(d)["spec"][0].update(kind=3), ["fc1", "'spec'", "'kind': 3"]),
    "kind-null": (lambda d: _fc1(d)["spec"][0].update(kind=None), ["fc1", "'kind': none"]),
    "params-negative": (lambda d: _fc1(d).update(params_before=-5), ["fc1", "params_before"]),
    "flops-str": (lambda d: _fc1(d).update(flops_before="x"), ["fc1", "flops_before", "'x'"]),
    "compressible-str": (lambda d: _fc1(d).update(compressible="yes"), ["fc1", "compressible"]),
    "rel-error-inf": (lambda d: _fc1(d).update(rel_error=math.inf), ["fc1", "rel_error", "inf"]),
    "aliases-str": (lambda d: _fc1(d)["extra"].update(aliases="b"), ["fc1", "aliases"]),
    "layer-not-object": (lambda d: d["layers"].__setitem__(0, 3), ["layer 0", "object", "3"]),
    "layers-not-list": (lambda d: d.update(layers={"a": 1}), ["'layers'", "list"]),
    "missing-shape": (lambda d: _fc1(d).pop("shape"), ["fc1", "missing", "'shape'"]),
    "missing-keep": (lambda d: d.pop("keep"), ["missing", "'keep'"]),
    "keep-2": (lambda d: d.update(keep=2), ["'keep'", "(0, 1]", "2"]),
    "keep-bool": (lambda d: d.update(keep=True), ["'keep'", "(0, 1]", "true"]),
    "keep-nan": (lambda d: d.update(keep=math.nan), ["'keep'", "(0, 1]", "nan"]),
    "model-params-negative": (
        lambda d: d.update(model_params_before=-1),
        ["model_params_before", "-1", ">= 0"],
    ),
    "meta-list": (lambda d: d.update(meta=[]), ["'meta'", "object"]),
    "format-str": (lambda d: d.update(format="1"), ["'format'", "'1'", "integer"]),
    "format-newer": (lambda d: d.update(format=99), ["format 99", "newer"]),
    "duplicate-layer": (lambda d: d["layers"].append(copy.deepcopy(_fc1(d))), ["fc1", "twice"]),
}


@pytest.mark.parametrize("edit", FIELD_EDITS, ids=str)
def test_hand_edited_field(saved, tmp_path, edit):
    change, words = FIELD_EDITS[edit]
    d = json.loads((saved / "plan.json").read_text())
    change(d)
    _load_refused(saved, tmp_path, json.dumps(d).encode(), WeightFileError, *words)


def _kind(kind):
    """Set the component's kind (and drop the informational "method", which would disagree)."""

    def change(lp):
        lp["spec"][0]["kind"] = kind
        lp.pop("method")

    return change


MISMATCHES = {
    "unknown-layer": (lambda lp: lp.update(name="nope"), PlanMismatchError, ["'nope'"]),
    "other-type": (
        lambda lp: lp.update(type="Conv2d"),
        PlanMismatchError,
        ["fc1", "Conv2d", "Linear"],
    ),
    "other-shape": (
        lambda lp: lp.update(shape=[16, 32]),
        PlanMismatchError,
        ["fc1", "[16, 32]", "[32, 32]"],
    ),
    # an unknown kind is refused by Plan.validate; the message lists the kinds there are
    "unknown-kind": (_kind("bogus"), WeightFileError, ["fc1", "'bogus'", "'lowrank'", "'tucker2'"]),
    "kind-for-convs": (_kind("tucker2"), UnsupportedLayerError, ["fc1", "'tucker2'", "linear"]),
    "aliases-not-in-model": (
        lambda lp: lp["extra"].update(aliases=["zz"]),
        PlanMismatchError,
        ["fc1", "'zz'"],
    ),
}


@pytest.mark.parametrize("edit", MISMATCHES, ids=str)
def test_plan_that_does_not_fit_the_model(saved, tmp_path, edit):
    change, error, words = MISMATCHES[edit]
    d = json.loads((saved / "plan.json").read_text())
    change(_fc1(d))
    _load_refused(saved, tmp_path, json.dumps(d).encode(), error, *words)


SPEC_WEIGHT_MISMATCHES = {
    "other-rank": lambda d: _fc1(d)["spec"][0].update(rank=4),
    "extra-component": lambda d: (
        _fc1(d)["spec"].append({"kind": "lowrank", "rank": 2}),
        _fc1(d).pop("method"),
    ),
    "made-dense": lambda d: _fc1(d).update(spec=[], method="dense"),
    "dense-made-lowrank": lambda d: next(lp for lp in d["layers"] if lp["name"] == "fc2").update(
        spec=[{"kind": "lowrank", "rank": 2}], method="svd"
    ),
}


@pytest.mark.parametrize("edit", SPEC_WEIGHT_MISMATCHES, ids=str)
def test_spec_that_does_not_fit_the_saved_weights(saved, tmp_path, edit):
    """A valid spec the saved weights were not made with: the weight file does not fit."""
    d = json.loads((saved / "plan.json").read_text())
    SPEC_WEIGHT_MISMATCHES[edit](d)
    _load_refused(
        saved, tmp_path, json.dumps(d).encode(), WeightFileError, "model.safetensors", "do not fit"
    )


def _deep(n):
    return b"[" * n + b"]" * n


FILE_DAMAGE = {
    "not-utf8": (b'{"keep": 0.5, "layers": [], "meta": {"x": "\xff\xfe"}}', ["plan.json", "utf-8"]),
    "deeply-nested": (b'{"keep": 0.5, "layers": ' + _deep(200_000) + b"}", ["plan.json", "nested"]),
    "huge-integer": (b'{"keep": 0.5, "layers": [], "format": 1' + b"1" * 5000 + b"}", ["json"]),
    "not-an-object": (b"[1, 2]", ["plan", "object", "list"]),
}


@pytest.mark.parametrize("damage", FILE_DAMAGE, ids=str)
def test_damaged_plan_file(saved, tmp_path, damage):
    data, words = FILE_DAMAGE[damage]
    _load_refused(saved, tmp_path, data, WeightFileError, *words)


def test_huge_plan_file_is_refused_unread(saved, tmp_path):
    folder = _copy(saved, tmp_path / "case")
    with open(folder / "plan.json", "r+b") as f:
        f.truncate(65 << 20)  # sparse: no disk used
    snap = Snapshot(folder / "model.safetensors")
    with expect_error("plan.json", "64 mib", error=WeightFileError):
        tensorslim.load(_net(), folder)
    snap.check()


def test_plan_file_that_is_a_folder(saved, tmp_path):
    folder = _copy(saved, tmp_path / "case")
    (folder / "plan.json").unlink()
    (folder / "plan.json").mkdir()
    with expect_error("plan.json", "regular file", error=WeightFileError):
        tensorslim.load(_net(), folder)


def test_plan_with_bom_still_loads(saved, tmp_path):
    folder = _copy(saved, tmp_path / "case")
    (folder / "plan.json").write_bytes(b"\xef\xbb\xbf" + (saved / "plan.json").read_bytes())
    back = tensorslim.load(_net(), folder)
    assert isinstance(back.fc1, LowRankLinear)


# -- ranks of the other factorizers and layers a plan cannot factorize (apply_plan) ------------


def _mixed_plan(name, type_, shape, kind, rank):
    layer = {"name": name, "type": type_, "shape": shape, "spec": [{"kind": kind, "rank": rank}]}
    return Plan.from_dict({"format": 2, "keep": 0.5, "layers": [layer]})


APPLY_CASES = {
    "tucker2-three-ranks": (
        ("conv", "Conv2d", [8, 8, 3, 3], "tucker2", [2, 2, 2]),
        InvalidRankError,
        ["conv", "tucker2", "[2, 2, 2]", "r_out in [1, 8]"],
    ),
    "tucker2-huge": (
        ("conv", "Conv2d", [8, 8, 3, 3], "tucker2", [10**9, 10**9]),
        InvalidRankError,
        ["conv", "1000000000", "r_out in [1, 8]", "r_in in [1, 8]"],
    ),
    "tucker2-oversized": (
        ("conv", "Conv2d", [8, 8, 3, 3], "tucker2", [500, 500]),
        InvalidRankError,
        ["conv", "[500, 500]", "r_out in [1, 8]", "full rank"],
    ),
    "tt-wrong-length": (
        ("conv", "Conv2d", [8, 8, 3, 3], "tt", [2, 2]),
        InvalidRankError,
        ["conv", "'tt'", "3 ranks"],
    ),
    "cp-huge": (
        ("conv", "Conv2d", [8, 8, 3, 3], "cp", 10**12),
        InvalidRankError,
        ["conv", "'cp'", "1000000000000", "[1, 26]"],
    ),
    "cp-zero": (("conv", "Conv2d", [8, 8, 3, 3], "cp", 0), InvalidRankError, ["conv", "[1, 26]"]),
    "rnn-unknown-matrix": (
        ("rnn", "LSTM", [32, 8], "lowrank", {"nope": 2}),
        InvalidRankError,
        ["rnn", "'nope'", "weight_ih_l0", "weight_hh_l0"],
    ),
    "rnn-rank-too-big": (
        ("rnn", "LSTM", [32, 8], "lowrank", {"weight_hh_l0": 100}),
        InvalidRankError,
        ["rnn", "weight_hh_l0", "[1, 8]"],
    ),
    "rnn-all-dense": (
        ("rnn", "LSTM", [32, 8], "lowrank", {"weight_hh_l0": None}),
        InvalidRankError,
        ["rnn", "compresses no matrix", "null"],
    ),
    "rnn-rank-bool": (
        ("rnn", "LSTM", [32, 8], "lowrank", {"weight_hh_l0": True}),
        InvalidRankError,
        ["rnn", "weight_hh_l0", "true", "[1, 8]"],
    ),
    "rnn-rank-nested": (
        ("rnn", "LSTM", [32, 8], "lowrank", {"weight_hh_l0": {"x": 2}}),
        InvalidRankError,
        ["rnn", "weight_hh_l0", "{'x': 2}", "[1, 8]"],
    ),
    "rnn-list-too-long": (
        ("rnn", "LSTM", [32, 8], "lowrank", [2, 2, 2]),
        InvalidRankError,
        ["rnn", "[2, 2, 2]", "one value per matrix", "'weight_ih_l0'", "'weight_hh_l0'"],
    ),
    "tucker2-one-rank": (
        ("conv", "Conv2d", [8, 8, 3, 3], "tucker2", 3),
        InvalidRankError,
        ["conv", "2 integers", "got 3"],
    ),
    "spatial-zero": (
        ("conv", "Conv2d", [8, 8, 3, 3], "spatial", 0),
        InvalidRankError,
        ["conv", "[1, 24]", "got 0"],
    ),
    "attention-unknown-matrix": (
        ("attn", "MultiheadAttention", [24, 8], "lowrank", {"bogus": 2}),
        InvalidRankError,
        ["attn", "'bogus'", "'in_proj'", "'out_proj'"],
    ),
    "attention-huge": (
        ("attn", "MultiheadAttention", [24, 8], "lowrank", [10**6, 2]),
        InvalidRankError,
        ["attn", "1000000"],
    ),
    "attention-one-rank": (
        ("attn", "MultiheadAttention", [24, 8], "lowrank", [2]),
        InvalidRankError,
        ["attn", "in_proj", "[2]", "one value per matrix", "'out_proj'"],
    ),
    "depthwise-svd": (
        ("dw", "Conv2d", [8, 1, 3, 3], "lowrank", 2),
        UnsupportedLayerError,
        ["dw", "depthwise", "groups=8"],
    ),
    "inside-attention": (
        ("attn.out_proj", "NonDynamicallyQuantizableLinear", [8, 8], "lowrank", 2),
        PlanMismatchError,
        ["attn.out_proj", "part of another layer"],
    ),
}


@pytest.mark.parametrize("case", APPLY_CASES, ids=str)
def test_apply_plan_refuses_before_building(case):
    layer, error, words = APPLY_CASES[case]
    torch.manual_seed(0)
    model = Mixed()
    state = state_of(model)
    with expect_error(*words, error=error):
        tensorslim.apply_plan(model, _mixed_plan(*layer), weights="empty")
    assert_same_state(model, state)


CODE_EDITS = {
    "rank-bool": (
        lambda lp: lp.spec[0].update(rank=True),
        InvalidRankError,
        ["fc1", "rank", "true"],
    ),
    "spec-str": (lambda lp: setattr(lp, "spec", "lowrank"), WeightFileError, ["fc1", "'spec'"]),
    "spec-dict": (
        lambda lp: setattr(lp, "spec", {"kind": "lowrank", "rank": 3}),
        WeightFileError,
        ["fc1", "'spec'", "list"],
    ),
    "param-object": (
        lambda lp: lp.spec[0].update(rank=object()),
        WeightFileError,
        ["fc1", "'rank'", "object"],
    ),
}


@pytest.mark.parametrize("edit", CODE_EDITS, ids=str)
def test_plan_object_edited_in_code_is_checked_too(edit):
    change, error, words = CODE_EDITS[edit]
    model = _net()
    _, plan = tensorslim.compress(model, 0.5)
    change(plan.layer("fc1"))
    with expect_error(*words, error=error):
        tensorslim.apply_plan(model, plan)


def test_plan_object_with_component_objects_in_its_spec():
    """core.spec.Component objects where the spec holds dicts: built as the dicts would be, or
    refused with a TensorSlimError naming the layer; never a bare KeyError / TypeError."""
    from tensorslim.core.spec import Component

    model = _net()
    _, plan = tensorslim.compress(model, 0.5)
    plan.layer("fc1").spec = [Component("lowrank", {"rank": 3})]
    try:
        small = tensorslim.apply_plan(model, plan)
    except TensorSlimError as exc:
        assert "fc1" in str(exc), exc
    else:
        assert isinstance(small.fc1, LowRankLinear) and small.fc1.rank == 3


def test_plan_naming_one_shared_module_twice():
    model = SharedNet()
    layers = [
        {"name": n, "type": "Linear", "shape": [21, 21], "spec": [{"kind": "lowrank", "rank": 2}]}
        for n in ("a", "b")
    ]
    plan = Plan.from_dict({"format": 2, "keep": 0.5, "layers": layers})
    with expect_error("'a'", "'b'", "same module", error=PlanMismatchError):
        tensorslim.apply_plan(model, plan)


def test_plan_factorizing_a_tied_layer():
    model = TiedNet()
    state = state_of(model)
    plan = _mixed_plan("dec", "Linear", [40, 16], "lowrank", 4)
    with expect_error("dec", "tied to emb.weight", error=UnsupportedLayerError):
        tensorslim.apply_plan(model, plan)
    assert_same_state(model, state)


# -- shared modules and tied weights --------------------------------------------------------------


def test_shared_module_is_compressed_once_and_stays_shared(tmp_path):
    torch.manual_seed(0)
    model = SharedNet().eval()
    x = torch.randn(4, 21)
    assert count_params(model) == 2 * (21 * 21 + 21)
    small, plan = tensorslim.compress(model, 0.4, example_input=x)
    assert small.a is small.b and isinstance(small.a, LowRankLinear)
    # the plan lists the module once, with its other name, and its counts are the real ones
    assert [lp.name for lp in plan.layers] == ["a", "c"]
    assert plan.layer("a").extra["aliases"] == ["b"]
    assert plan.model_params_after == count_params(small) < plan.model_params_before == 924
    real = sum(count_params(small.get_submodule(n)) for n in ("a", "c")) / 924
    assert plan.achieved_keep == pytest.approx(real) and 0.35 < real <= 0.4
    # both places compute with the one factorization of `a`
    ref = copy.deepcopy(model)
    ref.a = ref.b = LowRankLinear.from_dense(model.a, plan.layer("a").rank)
    ref.c = LowRankLinear.from_dense(model.c, plan.layer("c").rank)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x))
        torch.testing.assert_close(tensorslim.apply_plan(model, plan)(x), ref(x))
    # save -> load round trip (safetensors stores the shared tensors once)
    tensorslim.save(small, plan, tmp_path / "out")
    back = tensorslim.load(SharedNet(), tmp_path / "out")
    assert back.a is back.b
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


class SharedBlocks(nn.Module):
    """A shared container (block2 is block1) and a module shared across parents."""

    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(24, 24), nn.ReLU())
        self.block2 = self.block1
        self.enc = nn.Sequential(nn.Linear(24, 24))
        self.dec = nn.Sequential(self.enc[0])

    def forward(self, x):
        return self.dec(self.enc(self.block2(self.block1(x))))


def test_shared_containers_and_modules_across_parents(tmp_path):
    torch.manual_seed(0)
    model = SharedBlocks().eval()
    x = torch.randn(2, 24)
    small, plan = tensorslim.compress(model, 0.3, example_input=x)
    assert {lp.name: lp.extra.get("aliases") for lp in plan.layers} == {
        "block1.0": ["block2.0"],
        "enc.0": ["dec.0"],
    }
    assert small.block1 is small.block2 and small.enc[0] is small.dec[0]
    assert plan.model_params_after == count_params(small)
    tensorslim.save(small, plan, tmp_path / "out")
    back = tensorslim.load(SharedBlocks(), tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


def test_weight_tied_to_an_embedding_stays_dense_and_tied():
    torch.manual_seed(0)
    model = TiedNet()
    small, plan = tensorslim.compress(model, 0.5)
    assert plan.layer("dec").reason == "weight tied to emb.weight, which stays dense"
    assert not plan.layer("dec").compressible and plan.layer("mid").factorized
    assert small.dec.weight is small.emb.weight
    assert plan.model_params_after == count_params(small)


def test_hugging_face_lm_head_keeps_its_tie(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=60, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 60, (2, 8))
    small, plan = tensorslim.compress(model, 0.5)
    assert "tied to transformer.wte.weight" in plan.layer("lm_head").reason
    assert small.lm_head.weight is small.transformer.wte.weight
    assert plan.model_params_after == count_params(small)
    tensorslim.save(small, plan, tmp_path / "out")
    back = tensorslim.load(transformers.GPT2LMHeadModel(cfg), tmp_path / "out").eval()
    assert back.lm_head.weight is back.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(back(ids).logits, small(ids).logits)


# -- a model that is one layer --------------------------------------------------------------------


def test_model_that_is_one_layer(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    x = torch.randn(3, 64)
    small, plan = tensorslim.compress(model, 0.5, example_input=x)
    assert isinstance(small, LowRankLinear) and isinstance(model, nn.Linear)
    assert [lp.name for lp in plan.layers] == [""] and "(model)" in str(plan)
    assert plan.model_params_after == count_params(small) < count_params(model)
    tensorslim.save(small, plan, tmp_path / "out")
    back = tensorslim.load(nn.Linear(64, 64), tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
        torch.testing.assert_close(tensorslim.apply_plan(model, plan)(x), small(x))


# -- nothing to compress ----------------------------------------------------------------------------

NOTHING = {
    "exclude-all": (lambda: _net(), dict(exclude=["*"]), ["nothing to compress", "exclude=['*']"]),
    "include-none": (lambda: _net(), dict(include="zz"), ["nothing to compress", "include='zz'"]),
    "empty-model": (nn.Sequential, {}, ["nothing to compress", "no layer with a weight matrix"]),
    "only-embedding": (
        lambda: nn.Sequential(nn.Embedding(10, 10)),
        {},
        ["'0' (embedding)", "no handler registered"],
    ),
    "already-factorized": (
        lambda: nn.Sequential(LowRankLinear.from_dense(nn.Linear(16, 16), 2)),
        {},
        ["'0' (lowranklinear): already compressed"],
    ),
    "keep-one-exclude-all": (
        lambda: _net(),
        dict(keep=1.0, exclude="fc*"),
        ["nothing to compress", "excluded by pattern 'fc*'"],
    ),
    "too-small": (
        lambda: nn.Sequential(nn.Linear(2, 2)),
        {},
        ["'0' (linear)", "too small to gain"],
    ),
}


@pytest.mark.parametrize("case", NOTHING, ids=str)
def test_nothing_to_compress(case):
    build, kwargs, words = NOTHING[case]
    model = build()
    state = state_of(model)
    keep = kwargs.pop("keep", 0.5)
    with expect_error(*words, error=UnsupportedLayerError):
        tensorslim.compress(model, keep, **kwargs)
    assert_same_state(model, state)


EMPTY_INPUTS = {
    "zero-batch": (torch.randn(0, 32), "(0, 32)"),
    "tuple": ((torch.randn(0, 32),), "(0, 32)"),
    "dict": ({"x": torch.randn(2, 0)}, "(2, 0)"),
}


@pytest.mark.parametrize("case", EMPTY_INPUTS, ids=str)
def test_example_input_with_no_elements(case):
    example, shape = EMPTY_INPUTS[case]
    model = _net()
    state = state_of(model)
    with expect_error(shape, "no elements", error=ExampleInputError):
        tensorslim.compress(model, 0.5, example_input=example)
    assert_same_state(model, state)


# -- bad arguments --------------------------------------------------------------------------------

ARGUMENTS = {
    "keep-true": (dict(keep=True), InvalidKeepError, ["keep", "true", "(0, 1]"]),
    "keep-false": (dict(keep=False), InvalidKeepError, ["keep", "false", "(0, 1]"]),
    "keep-str": (dict(keep="0.5"), InvalidKeepError, ["keep", "'0.5'", "number"]),
    "include-int": (dict(include=[1]), TensorSlimError, ["include", "item 0", "int 1", "str"]),
    "exclude-none-item": (dict(exclude=["fc1", None]), TensorSlimError, ["exclude", "item 1"]),
    "include-number": (dict(include=5), TensorSlimError, ["include", "sequence of str", "5"]),
    "exclude-bytes": (dict(exclude=b"fc1"), TensorSlimError, ["exclude", "bytes"]),
    "cost-int": (dict(cost=1), TensorSlimError, ["cost", "'params'", "got 1"]),
    "method-none": (dict(method=None), TensorSlimError, ["method", "'svd'", "none"]),
    "allocator-list": (dict(allocator=["global"]), TensorSlimError, ["allocator", "['global']"]),
}


@pytest.mark.parametrize("case", ARGUMENTS, ids=str)
def test_bad_arguments(case):
    kwargs, error, words = ARGUMENTS[case]
    model = _net()
    state = state_of(model)
    keep = kwargs.pop("keep", 0.5)
    with expect_error(*words, error=error):
        tensorslim.compress(model, keep, **kwargs)
    assert_same_state(model, state)


# -- the CLI prints one error line ----------------------------------------------------------------


def test_cli_compress_with_nothing_to_compress(tmp_path):
    out = tmp_path / "out"
    result = cli(
        "compress", "tests.models:mlp", "--input-shape", "2,1,8,8", "--exclude", "*", "-o", out
    )
    assert_cli_error(result, "nothing to compress", "'*'")
    assert not out.exists()


def test_cli_export_with_non_utf8_plan(saved, tmp_path):
    folder = _copy(saved, tmp_path / "case")
    (folder / "plan.json").write_bytes(b"\xff\xfe{}")
    snap = Snapshot(folder)
    result = cli("export", folder, "--model", "tests.models:mlp", "--onnx", tmp_path / "m.onnx")
    assert_cli_error(result, "utf-8")
    snap.check()
    assert not (tmp_path / "m.onnx").exists()
