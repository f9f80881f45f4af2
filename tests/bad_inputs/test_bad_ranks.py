"""Hand-edited ranks of every compressor whose rank is not a plain matrix rank: conv tensor methods
(cp, tucker2, tt, spatial_svd, auto), nn.LSTM / nn.GRU (per-matrix ranks) and
nn.MultiheadAttention (one rank per projection).

Each model is compressed and saved once; each case edits the "rank" of one layer's spec component
in plan.json and `tensorslim.load` must refuse it with an InvalidRankError naming the layer (and
the matrix) and the accepted range (the compressor's `check`, before anything is built), leaving
the folder and the fresh model as they were. The same edits in a plan file of format 1
(tensorslim 0.1.0: "method" and "rank" per layer) are refused the same way. A value JSON cannot
hold in a spec (NaN, infinity, nesting too deep) is refused earlier, by the plan's own
validation, as a WeightFileError naming the field. The unedited folder of each kind loads and
computes what the compressed model computed.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tensorslim
from tensorslim.core import LayerSite, check_spec, get_compressor, handler_for, parse_spec
from tensorslim.errors import InvalidRankError, WeightFileError
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


# Bounds of the edited layers (see each compressor's `check`):
# c1 = Conv2d(8, 16, 3): kernel (16, 8, 3, 3), 1152 weights (1168 parameters with the bias).
#   cp: R(16 + 8 + 3 + 3) < 1152 -> R <= 38; tucker2: full ranks (16, 8);
#   tt: train (in, kh, kw, out) = (8, 3, 3, 16), full bond ranks (8, 24, 16);
#   spatial_svd: M is (8*3) x (16*3) = 24x48, full rank 24.
# rnn = LSTM(8, 16): weight_ih_l0 64x8, weight_hh_l0 64x16. gru = GRU(16, 12): 36x16, 36x12.
# attn = MultiheadAttention(16, 2): in_proj 48x16, out_proj 16x16.
# A plain value applies to every matrix of a layer, a list with one entry per matrix is
# positional, an object maps matrix names to values (null: that matrix stays dense).
BAD = {
    # -- CP: one integer in [1, 38] --
    "cp-zero": ("cp", "c1", 0, ["c1", "'cp'", "[1, 38]", "got 0"]),
    "cp-too-big": ("cp", "c1", 39, ["c1", "[1, 38]", "got 39", "1152"]),
    "cp-huge": ("cp", "c1", 10**12, ["c1", "[1, 38]", "1000000000000"]),
    "cp-list": ("cp", "c1", [4], ["c1", "[1, 38]", "[4]"]),
    "cp-pair": ("cp", "c1", [4, 4], ["c1", "[1, 38]", "[4, 4]"]),
    "cp-dict": ("cp", "c1", {"c1": 4}, ["c1", "[1, 38]", "{'c1': 4}"]),
    "cp-null": ("cp", "c1", None, ["c1", "[1, 38]", "got none"]),
    "cp-negative": ("cp", "c1", -3, ["c1", "[1, 38]", "got -3"]),
    "cp-bool": ("cp", "c1", True, ["c1", "rank", "[1, 38]", "got true"]),
    "cp-str": ("cp", "c1", "4", ["c1", "rank", "[1, 38]", "got '4'"]),
    "cp-float": ("cp", "c1", 4.0, ["c1", "rank", "[1, 38]", "got 4.0"]),
    # -- Tucker-2: 2 integers (r_out, r_in) within the full ranks (16, 8) --
    "tucker2-zero": (
        "tucker2",
        "c1",
        [0, 5],
        ["c1", "'tucker2'", "2 integers", "r_out in [1, 16]", "r_in in [1, 8]", "[0, 5]"],
    ),
    "tucker2-r-in-too-big": ("tucker2", "c1", [16, 9], ["c1", "r_in in [1, 8]", "[16, 9]"]),
    "tucker2-r-out-too-big": ("tucker2", "c1", [17, 8], ["c1", "r_out in [1, 16]", "[17, 8]"]),
    "tucker2-one": ("tucker2", "c1", [4], ["c1", "2 integers", "[4]"]),
    "tucker2-three": ("tucker2", "c1", [4, 4, 4], ["c1", "2 integers", "[4, 4, 4]"]),
    "tucker2-int": ("tucker2", "c1", 4, ["c1", "2 integers", "got 4"]),
    "tucker2-dict": ("tucker2", "c1", {"r_out": 4, "r_in": 4}, ["c1", "2 integers"]),
    "tucker2-bool": ("tucker2", "c1", [True, 4], ["c1", "2 integers", "[true, 4]"]),
    "tucker2-nested": ("tucker2", "c1", [[4], 4], ["c1", "2 integers", "[[4], 4]"]),
    # -- TT: 3 bond ranks within (8, 24, 16), reachable by TT-SVD --
    "tt-two": (
        "tt",
        "c1",
        [4, 4],
        ["c1", "'tt'", "3 ranks", "r1 in [1, 8]", "r2 in [1, 24]", "r3 in [1, 16]", "[4, 4]"],
    ),
    "tt-four": ("tt", "c1", [4, 4, 4, 4], ["c1", "3 ranks", "[4, 4, 4, 4]"]),
    "tt-zero": ("tt", "c1", [4, 0, 4], ["c1", "r2 in [1, 24]", "[4, 0, 4]"]),
    "tt-too-big": ("tt", "c1", [9, 4, 4], ["c1", "r1 in [1, 8]", "[9, 4, 4]"]),
    "tt-unreachable": ("tt", "c1", [1, 24, 1], ["c1", "not reachable", "[1, 24, 1]", "[1, 3, 1]"]),
    "tt-int": ("tt", "c1", 4, ["c1", "3 ranks", "got 4"]),
    "tt-float": ("tt", "c1", [4, 4.5, 4], ["c1", "3 ranks", "[4, 4.5, 4]"]),
    # -- spatial SVD: one integer in [1, 24] --
    "spatial-zero": ("spatial_svd", "c1", 0, ["c1", "'spatial_svd'", "[1, 24]", "got 0"]),
    "spatial-too-big": ("spatial_svd", "c1", 25, ["c1", "[1, 24]", "24x48", "got 25"]),
    "spatial-pair": ("spatial_svd", "c1", [3, 3], ["c1", "[1, 24]", "[3, 3]"]),
    "spatial-dict": ("spatial_svd", "c1", {"weight": 3}, ["c1", "[1, 24]"]),
    # -- auto: the saved plan records the compressor it picked (here cp) --
    "auto-picked-huge": ("auto", "c1", 10**6, ["c1", "'cp'", "1000000", "[1, 38]"]),
    # -- LSTM / GRU: each gate matrix an integer rank or null; at least one integer --
    "rnn-zero": (
        "rnn",
        "rnn",
        {"weight_ih_l0": 0, "weight_hh_l0": 4},
        ["rnn", "'weight_ih_l0'", "[1, 8]", "got 0"],
    ),
    "rnn-too-big": ("rnn", "rnn", {"weight_hh_l0": 17}, ["rnn", "[1, 16]", "got 17"]),
    "rnn-unknown-key": (
        "rnn",
        "rnn",
        {"weight_ih_l0": 2, "nope": 2},
        ["rnn", "unknown matrix 'nope'", "'weight_ih_l0'", "'weight_hh_l0'"],
    ),
    "rnn-projection-key": (
        "rnn",
        "rnn",
        {"weight_hr_l0": 2},
        ["rnn", "'weight_hr_l0'", "lstm", "'weight_hh_l0'"],
    ),
    "rnn-all-null": (
        "rnn",
        "rnn",
        {"weight_ih_l0": None, "weight_hh_l0": None},
        ["rnn", "no matrix", "null"],
    ),
    "rnn-empty": ("rnn", "rnn", {}, ["rnn", "no matrix", "{}"]),
    "rnn-int-too-big": ("rnn", "rnn", 9, ["rnn", "'weight_ih_l0'", "[1, 8]", "got 9"]),
    "rnn-list-too-big": ("rnn", "rnn", [4, 17], ["rnn", "'weight_hh_l0'", "[1, 16]", "got 17"]),
    # a list of the wrong length: say that a list gives one value per matrix, and which
    "rnn-list-three": ("rnn", "rnn", [4, 4, 4], ["rnn", "[4, 4, 4]", "'weight_hh_l0'"]),
    "rnn-bool": ("rnn", "rnn", {"weight_ih_l0": True}, ["rnn", "'weight_ih_l0'", "got true"]),
    "rnn-nested": ("rnn", "rnn", {"weight_ih_l0": [2]}, ["rnn", "'weight_ih_l0'", "got [2]"]),
    "rnn-deeper": (
        "rnn",
        "rnn",
        {"weight_ih_l0": {"weight_ih_l0": 2}},
        ["rnn", "'weight_ih_l0'", "[1, 8]"],
    ),
    "gru-too-big": (
        "rnn",
        "gru",
        {"weight_hh_l0": 13},
        ["gru", "'weight_hh_l0'", "[1, 12]", "got 13"],
    ),
    # -- MultiheadAttention: in_proj (48x16) and out_proj (16x16), each in [1, 16] --
    "mha-three": ("mha", "attn", [2, 2, 2], ["attn", "[2, 2, 2]", "'in_proj'", "'out_proj'"]),
    "mha-zero": ("mha", "attn", [0, 2], ["attn", "'in_proj'", "[1, 16]", "got 0"]),
    "mha-too-big": ("mha", "attn", [2, 17], ["attn", "'out_proj'", "[1, 16]", "got 17"]),
    "mha-in-too-big": ("mha", "attn", [17, 2], ["attn", "'in_proj'", "[1, 16]", "got 17"]),
    "mha-one": ("mha", "attn", [4], ["attn", "[4]", "'in_proj'", "'out_proj'"]),
    "mha-int-too-big": ("mha", "attn", 17, ["attn", "'in_proj'", "[1, 16]", "got 17"]),
    "mha-unknown-key": (
        "mha",
        "attn",
        {"q_proj": 2},
        ["attn", "unknown matrix 'q_proj'", "'in_proj'", "'out_proj'"],
    ),
    "mha-bool": ("mha", "attn", [True, 2], ["attn", "'in_proj'", "[1, 16]", "got true"]),
}

# Values a spec cannot hold, refused by the plan's own validation (WeightFileError).
MALFORMED = {
    "cp-nan": ("cp", "c1", float("nan"), ["c1", "'spec'", "nan"]),
    "tt-inf": ("tt", "c1", [4, float("inf"), 4], ["c1", "'spec'", "inf"]),
    "rnn-too-deep": ("rnn", "rnn", {"weight_ih_l0": [[[[[2]]]]]}, ["rnn", "'spec'"]),
}

# Valid spec forms the saved weights were not made with: the weight file does not fit.
OTHER_FORM = {
    "rnn-int": ("rnn", "rnn", 4),
    "rnn-list": ("rnn", "rnn", [4, 4]),
    "mha-int": ("mha", "attn", 4),
    "mha-dict": ("mha", "attn", {"in_proj": 2, "out_proj": 2}),
    "mha-only-out": ("mha", "attn", {"out_proj": 2}),
}


def _edit_and_load(saved, tmp_path, kind, layer, rank, error, words, *, format_1=False):
    src, _ = saved(kind)
    folder = _copy(src, tmp_path / "case")
    d = json.loads((folder / "plan.json").read_text())
    if format_1:
        d.pop("format")
        for lp in d["layers"]:
            spec = lp.pop("spec")
            lp["rank"] = spec[0]["rank"] if spec else None
    lp = _layer(d, layer)
    assert lp["method"] != "dense", f"{layer} was not compressed"
    if format_1:
        lp["rank"] = rank
    else:
        assert len(lp["spec"]) == 1, lp["spec"]
        lp["spec"][0]["rank"] = rank
    (folder / "plan.json").write_text(json.dumps(d))
    model = _fresh(kind)
    state, snap = state_of(model), Snapshot(folder)
    with expect_error(*words, error=error):
        tensorslim.load(model, folder)
    assert_same_state(model, state)
    snap.check()


@pytest.mark.parametrize("case", BAD, ids=str)
def test_hand_edited_rank_is_refused(saved, tmp_path, case):
    kind, layer, rank, words = BAD[case]
    _edit_and_load(saved, tmp_path, kind, layer, rank, InvalidRankError, words)


@pytest.mark.parametrize("case", BAD, ids=str)
def test_hand_edited_rank_in_a_format_1_file_is_refused(saved, tmp_path, case):
    kind, layer, rank, words = BAD[case]
    _edit_and_load(saved, tmp_path, kind, layer, rank, InvalidRankError, words, format_1=True)


@pytest.mark.parametrize("case", MALFORMED, ids=str)
def test_malformed_rank_is_refused_by_the_plan_schema(saved, tmp_path, case):
    kind, layer, rank, words = MALFORMED[case]
    _edit_and_load(saved, tmp_path, kind, layer, rank, WeightFileError, words)


@pytest.mark.parametrize("case", OTHER_FORM, ids=str)
def test_valid_rank_the_weights_were_not_made_with(saved, tmp_path, case):
    kind, layer, rank = OTHER_FORM[case]
    words = ["model.safetensors", "do not fit", f"{layer}."]
    _edit_and_load(saved, tmp_path, kind, layer, rank, WeightFileError, words)


# -- format 1 (tensorslim 0.1.0): a layer whose method is "auto" gives [method, rank] -------------

AUTO_FORMAT_1 = {
    "auto-int": (
        5,
        ["c1", "'auto'", "[method, rank]", "cp", "got 5"],
    ),
    "auto-ints": ([2, 3], ["c1", "'auto'", "[method, rank]", "got [2, 3]"]),
    "auto-dict": ({"cp": 3}, ["c1", "'auto'", "[method, rank]", "{'cp': 3}"]),
    "auto-unknown": (["bogus", 3], ["c1", "'bogus'", "'cp'", "'tucker2'"]),
    "auto-three": (["cp", 3, 3], ["c1", "'auto'", "[method, rank]"]),
    "auto-bad-inner": (["tucker2", [0, 2]], ["c1", "'tucker2'", "r_out in [1, 16]", "[0, 2]"]),
    "auto-cp-huge": (["cp", 10**6], ["c1", "'cp'", "[1, 38]", "1000000"]),
    "auto-method-bool": ([True, 3], ["c1", "'auto'", "[method, rank]", "true"]),
}


def _auto_format_1(saved, tmp_path, rank):
    src, _ = saved("auto")
    folder = _copy(src, tmp_path / "case")
    d = json.loads((folder / "plan.json").read_text())
    d.pop("format")
    for lp in d["layers"]:
        spec = lp.pop("spec")
        lp["rank"] = [lp["method"], spec[0]["rank"]] if spec else None
        lp["method"] = "auto" if spec else "dense"
    _layer(d, "c1")["rank"] = rank if rank is not None else _layer(d, "c1")["rank"]
    (folder / "plan.json").write_text(json.dumps(d))
    return folder


def test_format_1_auto_plan_loads(saved, tmp_path):
    """[picked method, rank] under method "auto" was a valid 0.1.0 plan layer: it still loads."""
    folder = _auto_format_1(saved, tmp_path, None)
    _, expected = saved("auto")
    back = tensorslim.load(_fresh("auto"), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(KINDS["auto"][2]), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", AUTO_FORMAT_1, ids=str)
def test_format_1_auto_rank_is_refused(saved, tmp_path, case):
    rank, words = AUTO_FORMAT_1[case]
    folder = _auto_format_1(saved, tmp_path, rank)
    model = _fresh("auto")
    state, snap = state_of(model), Snapshot(folder)
    with pytest.raises((InvalidRankError, WeightFileError)) as info:
        tensorslim.load(model, folder)
    msg = str(info.value).lower()
    for w in words:
        assert w.lower() in msg, f"{w!r} not in error message: {info.value}"
    assert_same_state(model, state)
    snap.check()


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_unedited_folder_loads(saved, kind):
    folder, expected = saved(kind)
    snap = Snapshot(folder)
    back = tensorslim.load(_fresh(kind), folder).eval()
    with torch.no_grad():
        got = back(KINDS[kind][2])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    snap.check()


# -- the compressors' checks on parameters a Plan object holds but JSON does not: tuples ---------

CONV = nn.Conv2d(8, 16, 3, padding=1)
DIRECT = {
    "cp-bool": ("cp", CONV, True, "[1, 38]"),
    "cp-ok": ("cp", CONV, 38, None),
    "tucker2-bool": ("tucker2", CONV, (True, 4), "r_out in [1, 16]"),
    "tucker2-ok": ("tucker2", CONV, (16, 8), None),
    "tucker2-ok-list": ("tucker2", CONV, [4, 2], None),
    "tucker2-zero": ("tucker2", CONV, (0, 2), "r_out in [1, 16]"),
    "tt-ok-list": ("tt", CONV, [8, 24, 16], None),
    "tt-ok-tuple": ("tt", CONV, (8, 24, 16), None),
    "spatial-ok": ("spatial_svd", CONV, 24, None),
    "svd-ok-on-conv": ("svd", CONV, 16, None),
    "svd-too-big-on-conv": ("svd", CONV, 17, "rank must be an integer in [1, 16]"),
    "unknown-kind": ("bogus", CONV, 3, "'bogus'"),
    "conv1d-spatial": ("spatial_svd", nn.Conv1d(8, 16, 3), 3, "'svd'"),
    "rnn-bool": ("svd", nn.LSTM(8, 16), {"weight_ih_l0": True}, "[1, 8]"),
    "rnn-ok-partial": ("svd", nn.LSTM(8, 16), {"weight_hh_l0": 16}, None),
    "rnn-ok-tuple": ("svd", nn.LSTM(8, 16), (8, 16), None),
    "mha-bool": ("svd", nn.MultiheadAttention(16, 2), (True, 2), "[1, 16]"),
    "mha-ok": ("whitened", nn.MultiheadAttention(16, 2), (16, 16), None),
}


@pytest.mark.parametrize("case", DIRECT, ids=str)
def test_check_spec_directly(case):
    kind, module, rank, word = DIRECT[case]
    spec = parse_spec([{"kind": kind, "rank": rank}])
    why = check_spec(module, handler_for(module), spec, LayerSite("layer"))
    if word is None:
        assert why is None, why
    else:
        assert why is not None and word in why, why


def test_spatial_svd_on_conv1d_is_unsupported_not_a_crash():
    conv = nn.Conv1d(8, 16, 3)
    comp = get_compressor("spatial_svd")
    why = comp.supports(handler_for(conv), conv)
    assert why is not None and "'svd'" in why
    assert comp.fallback(handler_for(conv), conv)[0] == "lowrank"
