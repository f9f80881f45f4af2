"""Hand-edited ranks of every factorizer whose rank is not a plain matrix rank: conv tensor methods
(cp, tucker2, tt, spatial_svd, auto), nn.LSTM / nn.GRU (per-matrix ranks) and
nn.MultiheadAttention (a rank pair).

Each model is compressed and saved once; each case edits one layer's rank in plan.json and
`tensorslim.load` must refuse it with an InvalidRankError naming the layer and the accepted range
(`Factorizer.check_rank`, before anything is built), leaving the folder and the fresh model as
they were. A rank JSON's plan schema cannot hold (a bool, a string, a nested list) is refused
earlier, by the plan's own validation, as a WeightFileError naming the field. The unedited folder
of each kind loads and computes what the compressed model computed.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tensorslim
from tensorslim.errors import InvalidRankError, WeightFileError
from tensorslim.model import find
from tests.bad_inputs.conftest import Snapshot, assert_same_state, expect_error, state_of


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


class RNNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True)
        self.gru = nn.GRU(16, 12, batch_first=True)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h, _ = self.rnn(x)
        h, _ = self.gru(h)
        return self.head(h)


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


_GEN = torch.Generator().manual_seed(0)
KINDS = {
    # kind: (model class, compress method, example input)
    "cp": (ConvNet, "cp", torch.randn(2, 8, 6, 6, generator=_GEN)),
    "tucker2": (ConvNet, "tucker2", torch.randn(2, 8, 6, 6, generator=_GEN)),
    "tt": (ConvNet, "tt", torch.randn(2, 8, 6, 6, generator=_GEN)),
    "spatial_svd": (ConvNet, "spatial_svd", torch.randn(2, 8, 6, 6, generator=_GEN)),
    "auto": (ConvNet, "auto", torch.randn(2, 8, 6, 6, generator=_GEN)),
    "rnn": (RNNNet, "svd", torch.randn(2, 5, 8, generator=_GEN)),
    "mha": (AttnNet, "svd", torch.randn(2, 5, 16, generator=_GEN)),
}


def _fresh(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return KINDS[kind][0]().eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (saved folder, output of the compressed model on the kind's input); built lazily."""
    cache: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in cache:
            _, method, x = KINDS[kind]
            small, plan = tensorslim.compress(
                _fresh(kind), 0.5, method=method, allocator="uniform", example_input=x
            )
            folder = tmp_path_factory.mktemp(kind) / "model"
            tensorslim.save(small, plan, folder)
            with torch.no_grad():
                cache[kind] = (folder, small.eval()(x))
        return cache[kind]

    return get


def _layer(d: dict, name: str) -> dict:
    return next(lp for lp in d["layers"] if lp["name"] == name)


def _copy(src, dst):
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# Bounds of the edited layers (see each factorizer's check_rank):
# c1 = Conv2d(8, 16, 3): kernel (16, 8, 3, 3), 1168 parameters with the bias.
#   cp: R(16 + 8 + 3 + 3) + 16 < 1168 -> R <= 38; tucker2: full ranks (16, 8);
#   tt: train (in, kh, kw, out) = (8, 3, 3, 16), full bond ranks (8, 24, 16);
#   spatial_svd: M is (8*3) x (16*3) = 24x48, full rank 24.
# rnn = LSTM(8, 16): weight_ih_l0 64x8, weight_hh_l0 64x16. gru = GRU(16, 12): 36x16, 36x12.
# attn = MultiheadAttention(16, 2): in_proj 48x16, out_proj 16x16.
BAD = {
    # -- CP: one integer in [1, 38] --
    "cp-zero": ("cp", "c1", None, 0, ["c1", "'cp'", "[1, 38]", "got 0"]),
    "cp-too-big": ("cp", "c1", None, 39, ["c1", "[1, 38]", "got 39", "1168"]),
    "cp-huge": ("cp", "c1", None, 10**12, ["c1", "[1, 38]", "1000000000000"]),
    "cp-list": ("cp", "c1", None, [4], ["c1", "[1, 38]", "(4,)"]),
    "cp-pair": ("cp", "c1", None, [4, 4], ["c1", "[1, 38]", "(4, 4)"]),
    "cp-dict": ("cp", "c1", None, {"c1": 4}, ["c1", "[1, 38]", "{'c1': 4}"]),
    "cp-null": ("cp", "c1", None, None, ["c1", "[1, 38]", "got none"]),
    "cp-negative": ("cp", "c1", None, -3, ["c1", "[1, 38]", "got -3"]),
    # -- Tucker-2: 2 integers (r_out, r_in) within the full ranks (16, 8) --
    "tucker2-zero": (
        "tucker2",
        "c1",
        None,
        [0, 5],
        ["c1", "'tucker2'", "2 integers", "r_out in [1, 16]", "r_in in [1, 8]", "(0, 5)"],
    ),
    "tucker2-r-in-too-big": ("tucker2", "c1", None, [16, 9], ["c1", "r_in in [1, 8]", "(16, 9)"]),
    "tucker2-r-out-too-big": ("tucker2", "c1", None, [17, 8], ["c1", "r_out in [1, 16]"]),
    "tucker2-one": ("tucker2", "c1", None, [4], ["c1", "2 integers", "(4,)"]),
    "tucker2-three": ("tucker2", "c1", None, [4, 4, 4], ["c1", "2 integers", "(4, 4, 4)"]),
    "tucker2-int": ("tucker2", "c1", None, 4, ["c1", "2 integers", "got 4"]),
    "tucker2-dict": ("tucker2", "c1", None, {"r_out": 4, "r_in": 4}, ["c1", "2 integers"]),
    # -- TT: 3 bond ranks within (8, 24, 16), reachable by TT-SVD --
    "tt-two": (
        "tt",
        "c1",
        None,
        [4, 4],
        ["c1", "'tt'", "3 ranks", "r1 in [1, 8]", "r2 in [1, 24]", "r3 in [1, 16]", "(4, 4)"],
    ),
    "tt-four": ("tt", "c1", None, [4, 4, 4, 4], ["c1", "3 ranks", "(4, 4, 4, 4)"]),
    "tt-zero": ("tt", "c1", None, [4, 0, 4], ["c1", "r2 in [1, 24]", "(4, 0, 4)"]),
    "tt-too-big": ("tt", "c1", None, [9, 4, 4], ["c1", "r1 in [1, 8]", "(9, 4, 4)"]),
    "tt-unreachable": (
        "tt",
        "c1",
        None,
        [1, 24, 1],
        ["c1", "not reachable", "(1, 24, 1)", "[1, 3, 1]"],
    ),
    "tt-int": ("tt", "c1", None, 4, ["c1", "3 ranks", "got 4"]),
    # -- spatial SVD: one integer in [1, 24] --
    "spatial-zero": ("spatial_svd", "c1", None, 0, ["c1", "'spatial_svd'", "[1, 24]", "got 0"]),
    "spatial-too-big": ("spatial_svd", "c1", None, 25, ["c1", "[1, 24]", "24x48", "got 25"]),
    "spatial-pair": ("spatial_svd", "c1", None, [3, 3], ["c1", "[1, 24]", "(3, 3)"]),
    "spatial-dict": ("spatial_svd", "c1", None, {"weight": 3}, ["c1", "[1, 24]"]),
    # -- auto: the saved plan records the method it picked, so [method, rank] needs method
    #    "auto"; a plan whose layer says "auto" must give [method, rank] --
    "auto-picked-huge": ("auto", "c1", None, 10**6, ["c1", "1000000", "[1, "]),
    "auto-int": (
        "auto",
        "c1",
        "auto",
        5,
        ["c1", "'auto'", "[method, rank]", "'cp'", "'tucker2'", "'spatial_svd'", "got 5"],
    ),
    "auto-ints": ("auto", "c1", "auto", [2, 3], ["c1", "[method, rank]", "got method 2"]),
    "auto-dict": ("auto", "c1", "auto", {"cp": 3}, ["c1", "[method, rank]", "{'cp': 3}"]),
    # -- LSTM / GRU: {matrix: integer rank or null}, at least one integer --
    "rnn-zero": (
        "rnn",
        "rnn",
        None,
        {"weight_ih_l0": 0, "weight_hh_l0": 4},
        ["rnn", "weight_ih_l0", "[1, 8]", "64x8", "got 0"],
    ),
    "rnn-too-big": ("rnn", "rnn", None, {"weight_hh_l0": 17}, ["rnn", "[1, 16]", "got 17"]),
    "rnn-unknown-key": (
        "rnn",
        "rnn",
        None,
        {"weight_ih_l0": 2, "nope": 2},
        ["rnn", "no weight matrix named ['nope']", "weight_ih_l0 in [1, 8]", "weight_hh_l0"],
    ),
    "rnn-projection-key": (
        "rnn",
        "rnn",
        None,
        {"weight_hr_l0": 2},
        ["rnn", "'weight_hr_l0'", "lstm", "weight_hh_l0 in [1, 16]"],
    ),
    "rnn-all-null": (
        "rnn",
        "rnn",
        None,
        {"weight_ih_l0": None, "weight_hh_l0": None},
        ["rnn", "at least one integer"],
    ),
    "rnn-empty": ("rnn", "rnn", None, {}, ["rnn", "at least one integer", "got {}"]),
    "rnn-int": ("rnn", "rnn", None, 4, ["rnn", "object mapping", "got 4"]),
    "rnn-list": ("rnn", "rnn", None, [4, 4], ["rnn", "object mapping", "(4, 4)"]),
    "gru-too-big": (
        "rnn",
        "gru",
        None,
        {"weight_hh_l0": 13},
        ["gru", "weight_hh_l0", "[1, 12]", "36x12", "got 13"],
    ),
    # -- MultiheadAttention: 2 integers (r_in, r_out), each in [1, 16] --
    "mha-three": (
        "mha",
        "attn",
        None,
        [2, 2, 2],
        ["attn", "2 integers", "r_in in [1, 16]", "r_out in [1, 16]", "(2, 2, 2)"],
    ),
    "mha-zero": ("mha", "attn", None, [0, 2], ["attn", "in_proj, 48x16", "(0, 2)"]),
    "mha-too-big": ("mha", "attn", None, [2, 17], ["attn", "r_out in [1, 16]", "(2, 17)"]),
    "mha-in-too-big": ("mha", "attn", None, [17, 2], ["attn", "r_in in [1, 16]", "(17, 2)"]),
    "mha-one": ("mha", "attn", None, [4], ["attn", "2 integers", "(4,)"]),
    "mha-int": ("mha", "attn", None, 4, ["attn", "2 integers", "got 4"]),
    "mha-dict": ("mha", "attn", None, {"in_proj": 2, "out_proj": 2}, ["attn", "2 integers"]),
}

# Ranks the plan's schema refuses before any factorizer sees them (WeightFileError).
MALFORMED = {
    "cp-bool": ("cp", "c1", None, True, ["c1", "'rank'", "true"]),
    "cp-str": ("cp", "c1", None, "4", ["c1", "'rank'", "'4'"]),
    "tucker2-bool": ("tucker2", "c1", None, [True, 4], ["c1", "'rank'", "true"]),
    "tucker2-nested": ("tucker2", "c1", None, [[4], 4], ["c1", "'rank'", "[[4], 4]"]),
    "tt-float": ("tt", "c1", None, [4, 4.5, 4], ["c1", "'rank'", "4.5"]),
    "auto-method-rank": ("auto", "c1", "auto", ["cp", 3], ["c1", "'rank'", "'cp'"]),
    "rnn-bool": ("rnn", "rnn", None, {"weight_ih_l0": True}, ["rnn", "'rank'", "true"]),
    "rnn-nested": ("rnn", "rnn", None, {"weight_ih_l0": [2]}, ["rnn", "'rank'"]),
    "mha-bool": ("mha", "attn", None, [True, 2], ["attn", "'rank'", "true"]),
}


def _refused(saved, tmp_path, case, error):
    kind, layer, method, rank, words = case
    src, _ = saved(kind)
    folder = _copy(src, tmp_path / "case")
    d = json.loads((folder / "plan.json").read_text())
    lp = _layer(d, layer)
    assert lp["method"] != "dense", f"{layer} was not factorized"
    lp["rank"] = rank
    if method is not None:
        lp["method"] = method
    (folder / "plan.json").write_text(json.dumps(d))
    model = _fresh(kind)
    state, snap = state_of(model), Snapshot(folder)
    with expect_error(*words, error=error):
        tensorslim.load(model, folder)
    assert_same_state(model, state)
    snap.check()


@pytest.mark.parametrize("case", BAD, ids=str)
def test_hand_edited_rank_is_refused(saved, tmp_path, case):
    _refused(saved, tmp_path, BAD[case], InvalidRankError)


@pytest.mark.parametrize("case", MALFORMED, ids=str)
def test_malformed_rank_is_refused_by_the_plan_schema(saved, tmp_path, case):
    _refused(saved, tmp_path, MALFORMED[case], WeightFileError)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_unedited_folder_loads(saved, kind):
    folder, expected = saved(kind)
    snap = Snapshot(folder)
    back = tensorslim.load(_fresh(kind), folder).eval()
    with torch.no_grad():
        got = back(KINDS[kind][2])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    snap.check()


# -- check_rank on ranks a Plan object holds but JSON does not: tuples, bools, (method, rank) --

CONV = nn.Conv2d(8, 16, 3, padding=1)
DIRECT = {
    "cp-bool": ("cp", CONV, True, "[1, 38]"),
    "cp-ok": ("cp", CONV, 38, None),
    "tucker2-bool": ("tucker2", CONV, (True, 4), "r_out in [1, 16]"),
    "tucker2-ok": ("tucker2", CONV, (16, 8), None),
    "tt-ok-list": ("tt", CONV, [8, 24, 16], None),
    "spatial-ok": ("spatial_svd", CONV, 24, None),
    "auto-ok": ("auto", CONV, ("tucker2", [4, 2]), None),
    "auto-ok-svd": ("auto", CONV, ["svd", 8], None),
    "auto-bad-inner": ("auto", CONV, ("tucker2", (0, 2)), "method 'tucker2': rank must be"),
    "auto-svd-too-big": ("auto", CONV, ("svd", 17), "method 'svd': rank must be"),
    "auto-unknown": ("auto", CONV, ("bogus", 3), "got method 'bogus'"),
    "auto-three": ("auto", CONV, ("cp", 3, 3), "[method, rank]"),
    "auto-conv1d-spatial": ("auto", nn.Conv1d(8, 16, 3), ("spatial_svd", 3), "'spatial_svd'"),
    "rnn-bool": ("svd", nn.LSTM(8, 16), {"weight_ih_l0": True}, "[1, 8]"),
    "rnn-ok-partial": ("svd", nn.LSTM(8, 16), {"weight_hh_l0": 16}, None),
    "mha-bool": ("svd", nn.MultiheadAttention(16, 2), (True, 2), "r_in in [1, 16]"),
    "mha-ok": ("whitened", nn.MultiheadAttention(16, 2), (16, 16), None),
}


@pytest.mark.parametrize("case", DIRECT, ids=str)
def test_check_rank_directly(case):
    method, module, rank, word = DIRECT[case]
    why = find(module, method).check_rank(module, rank)
    if word is None:
        assert why is None, why
    else:
        assert why is not None and word in why, why


def test_spatial_svd_on_conv1d_is_unsupported_not_a_crash():
    conv = nn.Conv1d(8, 16, 3)
    why = find(conv, "spatial_svd").unsupported_reason(conv)
    assert why is not None and "'svd'" in why
