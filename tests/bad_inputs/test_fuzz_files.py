"""Property-based fuzzing of everything tensorslim reads from disk.

Targets: `plan.json` (random JSON mutations of a valid plan, mutations of its layers' compression
specs, and raw byte damage), `model.safetensors`
(header and body damage) and `--input-shape` strings. The only outcomes allowed are a correct load
or a clean `TensorSlimError`, within bounded time (hypothesis deadline) and memory (the address
space is capped at its current size + 2 GiB while a target runs, so an unbounded allocation made
from a hand-edited file fails the test instead of passing by luck).

Examples per target: TENSORSLIM_FUZZ_EXAMPLES (default 150; `.ci/run` uses 5000).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import struct
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tensorslim
from tensorslim.errors import TensorSlimError

EXAMPLES = int(os.environ.get("TENSORSLIM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=5000,  # ms per example: a load of these tiny models takes a few ms
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # reproducible in CI; the examples differ per target and per strategy
    database=None,
)


@contextlib.contextmanager
def bounded_memory(extra_bytes: int = 2 << 30):
    """Cap the process's address space at its current size + extra_bytes (Linux)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    with open("/proc/self/status") as f:
        vm = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class Net(nn.Module):
    """Two convs and an MLP: with method "tucker2" (uniform) the plan holds Tucker-2 rank pairs on
    the convs and integer ranks (SVD, the fallback) on the Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.conv2 = nn.Conv2d(16, 16, 3)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv(x)))).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


EXAMPLE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
# fc1's spec is a sum of two low-rank components (the fixture sets it): specs of several
# components are fuzzed too
SUM_SPEC = [{"kind": "lowrank", "rank": 6}, {"kind": "lowrank", "rank": 2}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, expected output) of Net compressed with Tucker-2 on the convs, SVD on fc2 and a
    sum of two SVD components on fc1."""
    torch.manual_seed(0)
    net = Net().eval()
    _, plan = tensorslim.compress(
        net, 0.5, method="tucker2", allocator="uniform", example_input=EXAMPLE
    )
    kinds = {lp.name: lp.spec[0]["kind"] for lp in plan.factorized_layers}
    assert kinds == {"conv": "tucker2", "conv2": "tucker2", "fc1": "lowrank", "fc2": "lowrank"}
    plan.layer("fc1").spec = copy.deepcopy(SUM_SPEC)
    small = tensorslim.apply_plan(net, plan).eval()
    folder = tmp_path_factory.mktemp("fuzz") / "saved"
    tensorslim.save(small, plan, folder)
    with torch.no_grad():
        want = small(EXAMPLE)
    return folder, want


def _load_ok_or_clean_error(
    folder: Path,
    want: torch.Tensor | None,
    make=Net,
    example: torch.Tensor = EXAMPLE,
    names: set[str] | None = None,
) -> str:
    """Load `folder` into a fresh `make()`: either the saved model's output comes back, or a
    clean error (naming one of the layers `names`, if given)."""
    try:
        with bounded_memory():
            loaded = tensorslim.load(make(), folder)
    except TensorSlimError as exc:
        assert str(exc).strip(), "an error must say what is wrong"
        assert len(str(exc)) < 4000, "error messages stay one readable line"
        if names:
            msg = str(exc)
            assert any(f"'{n}'" in msg or f"'{n}." in msg for n in names), (
                f"the error names none of the edited layers {sorted(names)}: {msg}"
            )
        return "error"
    with torch.no_grad():
        got = loaded(example)
    if want is not None:  # the mutation did not change anything the structure depends on
        torch.testing.assert_close(got, want)
    return "loaded"


class Seq(nn.Module):
    """Attention + LSTM + Linear: dict ranks (RNN matrices) and pair ranks (attention)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.rnn = nn.LSTM(32, 48, batch_first=True)
        self.head = nn.Linear(48, 4)

    def forward(self, x):
        h = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.rnn(h)[0][:, -1])


SEQ_EXAMPLE = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved_seq(tmp_path_factory):
    torch.manual_seed(0)
    small, plan = tensorslim.compress(
        Seq().eval(), 0.3, allocator="uniform", example_input=SEQ_EXAMPLE
    )
    kinds = {type(lp.rank) for lp in plan.factorized_layers}
    assert {dict, list} <= kinds, f"the fuzzed plan must hold dict and pair ranks: {kinds}"
    folder = tmp_path_factory.mktemp("fuzz-seq") / "saved"
    tensorslim.save(small, plan, folder)
    with torch.no_grad():
        want = small.eval()(SEQ_EXAMPLE)
    return folder, want


def _copy_folder(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())


# -- plan.json: JSON mutations -----------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 3, 7, 1e12, 3e6, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["svd", "tucker2", "cp", "tt", "spatial_svd", "dense", "Linear", "Conv2d"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def _paths(obj, prefix=()):
    """Every path (tuple of keys / indices) into a JSON object, the root excluded."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


@st.composite
def mutated_plans(draw, plan: dict):
    """A valid plan with 1-3 random edits: replace a value, delete a key or item, add a key,
    duplicate or drop a layer."""
    d = copy.deepcopy(plan)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(d))
        kind = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "dup"]))
        if kind == "dup" and isinstance(d.get("layers"), list) and d["layers"]:
            i = draw(st.integers(0, len(d["layers"]) - 1))
            d["layers"].insert(i, copy.deepcopy(d["layers"][i]))
            continue
        if not paths:
            d = draw(JSON_VALUES)
            break
        path = draw(st.sampled_from(paths))
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        if kind == "replace":
            parent[key] = draw(JSON_VALUES)
        elif kind == "delete":
            del parent[key]
        elif kind == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    return d


def test_fuzz_plan_json_mutations(saved, tmp_path_factory):
    folder, want = saved
    plan = json.loads((folder / "plan.json").read_text())
    outcomes = []

    @FUZZ
    @given(data=st.data())
    def run(data):
        mutated = data.draw(mutated_plans(plan))
        case = tmp_path_factory.mktemp("plan")
        _copy_folder(folder, case)
        (case / "plan.json").write_text(json.dumps(mutated, allow_nan=True))
        outcomes.append(_load_ok_or_clean_error(case, None))

    run()
    print(f"plan mutations: {sorted(Counter(outcomes).items())}")  # shown with pytest -s
    assert "error" in outcomes, "mutations that break the plan must be refused"


def test_fuzz_plan_json_mutations_of_rnn_and_attention_ranks(saved_seq, tmp_path_factory):
    saved_seq, _ = saved_seq
    plan = json.loads((saved_seq / "plan.json").read_text())
    outcomes = []

    @FUZZ
    @given(data=st.data())
    def run(data):
        mutated = data.draw(mutated_plans(plan))
        case = tmp_path_factory.mktemp("plan-seq")
        _copy_folder(saved_seq, case)
        (case / "plan.json").write_text(json.dumps(mutated, allow_nan=True))
        outcomes.append(_load_ok_or_clean_error(case, None, Seq, SEQ_EXAMPLE))

    run()
    print(f"plan mutations: {sorted(Counter(outcomes).items())}")  # shown with pytest -s
    assert "error" in outcomes, "mutations that break the plan must be refused"


HAND_RANKS = {
    "3e6": 3_000_000,
    "1e12": 10**12,
    "neg": -1,
    "zero": 0,
    "bool": True,
    "float": 2.5,
    "str": "8",
    "null": None,
    "nan": float("nan"),
    "huge-tuple": [10**9, 10**9],
    "huge-triple": [10**9, 10**9, 10**9],
    "huge-dict": {"": 10**12},
}


@pytest.mark.parametrize("layer", ["conv", "fc2"])  # Tucker-2 (rank pair), SVD (integer)
@pytest.mark.parametrize("rank", HAND_RANKS.values(), ids=HAND_RANKS.keys())
def test_hand_edited_rank_is_refused_before_building(saved, tmp_path, layer, rank):
    """Regression for the 4 KB folder that allocated 1.2 GB (rank 3e6) or tried 128 TB (10^12)."""
    folder, _ = saved
    _copy_folder(folder, tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    lp = next(lp for lp in plan["layers"] if lp["name"] == layer)
    lp["spec"][0]["rank"] = rank
    (tmp_path / "plan.json").write_text(json.dumps(plan, allow_nan=True))
    with bounded_memory(256 << 20), pytest.raises(TensorSlimError) as info:
        tensorslim.load(Net(), tmp_path)
    assert repr(layer) in str(info.value), info.value


# -- plan.json: mutations of the compression specs ---------------------------------------------

SPEC_KINDS = [
    "lowrank", "svd", "fwsvd", "fvd", "whitened", "cp", "tucker2", "tt", "spatial", "spatial_svd",
    "dense", "auto", "bogus", "", "LOWRANK",
]  # fmt: skip
RANK_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 10**6, 10**12, 2**63, 3e6, 2.5, 4.0, -0.0, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["8", "", "auto", "full"]),
)
MATRIX_NAMES = [
    "", "weight", "in_proj", "out_proj", "weight_ih_l0", "weight_hh_l0", "weight_hr_l0", "nope",
]  # fmt: skip


def _rank_values(depth: int = 3):
    """Ranks as a spec holds them: a value, a list (positional per matrix, or a tensor method's
    ranks), an object mapping matrix names to values; nested."""
    return st.recursive(
        RANK_SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.sampled_from(MATRIX_NAMES) | st.text(max_size=6), inner, max_size=3),
        ),
        max_leaves=6,
    )


RANK_VALUES = _rank_values()


@st.composite
def mutated_specs(draw, plan: dict):
    """The plan with 1-3 edits of its layers' specs (the informational "method" dropped most of
    the time, so that the spec itself is checked): a component's rank (whole, or one matrix's /
    one list entry), its kind, another parameter, a component added, duplicated or removed, the
    spec emptied or replaced by any JSON value, a dense layer given a spec. Returns the plan and
    the names of the layers edited."""
    d = copy.deepcopy(plan)
    touched: set[str] = set()
    for _ in range(draw(st.integers(1, 3))):
        lp = draw(st.sampled_from(d["layers"]))
        touched.add(lp["name"])
        if draw(st.integers(0, 4)):
            lp.pop("method", None)
        spec = lp["spec"] if isinstance(lp.get("spec"), list) else None
        comps = [c for c in spec or [] if isinstance(c, dict)]
        edit = draw(
            st.sampled_from(
                ["rank", "rank", "rank-part", "rank-part", "kind", "param", "drop-rank",
                 "drop-kind", "add", "dup", "remove", "clear", "spec-value", "rank-key"]
            )
        )  # fmt: skip
        if edit == "rank-key":  # a format-1 "rank" in a format-2 plan
            lp["rank"] = draw(RANK_VALUES)
        elif edit == "spec-value":
            lp["spec"] = draw(JSON_VALUES)
        elif edit == "clear":
            lp["spec"] = []
        elif edit == "add" or spec is None or not comps:
            if spec is None:
                lp["spec"] = spec = []
            spec.append({"kind": draw(st.sampled_from(SPEC_KINDS)), "rank": draw(RANK_VALUES)})
        elif edit == "dup":
            spec.append(copy.deepcopy(draw(st.sampled_from(comps))))
        elif edit == "remove":
            spec.remove(draw(st.sampled_from(comps)))
        else:
            c = draw(st.sampled_from(comps))
            if edit == "rank":
                c["rank"] = draw(RANK_VALUES)
            elif edit == "rank-part":
                r = c.get("rank")
                if isinstance(r, dict) and r:
                    r[draw(st.sampled_from(sorted(r)))] = draw(RANK_SCALARS)
                elif isinstance(r, list) and r:
                    r[draw(st.integers(0, len(r) - 1))] = draw(RANK_SCALARS)
                else:
                    c["rank"] = draw(RANK_SCALARS)
            elif edit == "kind":
                c["kind"] = draw(st.sampled_from(SPEC_KINDS) | JSON_SCALARS)
            elif edit == "param":
                name = draw(st.sampled_from(["eps", "damp", "svd", "solver", "ranks", "x"]))
                c[name] = draw(JSON_VALUES)
            elif edit == "drop-rank":
                c.pop("rank", None)
            else:
                c.pop("kind", None)
    return d, touched


def _fuzz_specs(folder: Path, want, make, example, tmp_path_factory) -> Counter:
    plan = json.loads((folder / "plan.json").read_text())
    outcomes: list[str] = []

    @FUZZ
    @given(data=st.data())
    def run(data):
        mutated, touched = data.draw(mutated_specs(plan))
        case = tmp_path_factory.mktemp("spec")
        _copy_folder(folder, case)
        (case / "plan.json").write_text(json.dumps(mutated, allow_nan=True))
        # a spec the saved weights load into must compute what the saved model computed: the
        # weights were loaded strictly (every name and shape), nothing may be left unset
        outcomes.append(_load_ok_or_clean_error(case, want, make, example, touched))

    run()
    counts = Counter(outcomes)
    print(f"spec mutations: {sorted(counts.items())}")  # shown with pytest -s
    assert counts["error"] > 0, "mutations that break a spec must be refused"
    return counts


def test_fuzz_spec_mutations(saved, tmp_path_factory):
    folder, want = saved
    _fuzz_specs(folder, want, Net, EXAMPLE, tmp_path_factory)


def test_fuzz_spec_mutations_of_rnn_and_attention(saved_seq, tmp_path_factory):
    folder, want = saved_seq
    _fuzz_specs(folder, want, Seq, SEQ_EXAMPLE, tmp_path_factory)


def test_unmutated_folder_loads_exactly(saved, tmp_path):
    folder, want = saved
    _copy_folder(folder, tmp_path)
    assert _load_ok_or_clean_error(tmp_path, want) == "loaded"


# -- plan.json and model.safetensors: byte damage ----------------------------------------------


@st.composite
def damaged_bytes(draw, data: bytes):
    """`data` truncated, with bytes overwritten, inserted or deleted."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
        if not b:
            break
        i = draw(st.integers(0, len(b) - 1))
        if kind == "truncate":
            b = b[:i]
        elif kind == "flip":
            b[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del b[i : i + draw(st.integers(1, 8))]
    return bytes(b)


@pytest.mark.parametrize("target", ["plan.json", "model.safetensors"])
def test_fuzz_byte_damage(saved, tmp_path_factory, target):
    folder, want = saved
    original = (folder / target).read_bytes()

    @FUZZ
    @given(data=st.data())
    def run(data):
        damaged = data.draw(damaged_bytes(original))
        case = tmp_path_factory.mktemp("bytes")
        _copy_folder(folder, case)
        (case / target).write_bytes(damaged)
        # a flip inside a float of the body is a valid file with other weights: compare only when
        # the bytes are unchanged
        _load_ok_or_clean_error(case, want if damaged == original else None)

    run()


def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_fuzz_safetensors_header(saved, tmp_path_factory):
    """Mutations of the header's dtypes, shapes and offsets (and of the length field)."""
    folder, want = saved
    header, body = _split_safetensors((folder / "model.safetensors").read_bytes())
    names = [k for k in header if k != "__metadata__"]
    field_values = {
        "dtype": st.sampled_from(
            ["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "X"]
        ),
        "shape": st.lists(st.integers(-2, 2**40), max_size=5) | JSON_VALUES,
        "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3) | JSON_VALUES,
    }

    @FUZZ
    @given(data=st.data())
    def run(data):
        h = copy.deepcopy(header)
        name = data.draw(st.sampled_from(names))
        field = data.draw(st.sampled_from(sorted(field_values)))
        h[name][field] = data.draw(field_values[field])
        blob = _join_safetensors(h, body)
        if data.draw(st.booleans()):  # also lie about the header length
            blob = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + blob[8:]
        case = tmp_path_factory.mktemp("header")
        _copy_folder(folder, case)
        (case / "model.safetensors").write_bytes(blob)
        _load_ok_or_clean_error(case, None)
        # the same file given as --weights to a fresh model
        try:
            with bounded_memory():
                tensorslim.io.read_state_dict(case / "model.safetensors")
        except TensorSlimError:
            pass

    run()


# -- --input-shape strings ---------------------------------------------------------------------

SHAPE_TEXT = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.one_of(
            st.integers(-(2**70), 2**70).map(str),
            st.sampled_from(["", " ", "x", "1e3", "0x10", "nan", "inf", "-0", "+3", "٣", "1_0"]),
        ),
        max_size=10,
    ).map(lambda parts: ",".join(parts)),
)
# Elements an example input may have (tensorslim.cli documents the cap).
MAX_ELEMENTS = 2**28


@FUZZ
@given(text=SHAPE_TEXT)
def test_fuzz_input_shape_strings(text):
    from tensorslim.cli import _parse_shape

    try:
        shape = _parse_shape(text)
    except TensorSlimError as exc:
        assert str(exc).strip()
        return
    assert isinstance(shape, tuple) and shape
    assert all(type(d) is int and d >= 1 for d in shape)
    n = 1
    for d in shape:
        n *= d
    assert n <= MAX_ELEMENTS, f"{text!r} parsed to {shape}: {n} elements is unbounded"
