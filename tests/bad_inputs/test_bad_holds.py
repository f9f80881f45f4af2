"""Bad inputs that were probed and already behave well: this corpus keeps them closed.

keep values, unknown method / cost / allocator names, NaN / Inf weights, pickles (never unpickled
without --trust-pickle; a malicious __reduce__ never runs), corrupt / truncated / empty weight and
plan files, missing folder files, model specs that do not resolve, wrong --weights paths, atomic
replacement of an output folder when the write fails half-way, and the input model never modified
by compress.

Every case asserts the contract of tests/bad_inputs/conftest.py: API -> a TensorSlimError subclass
naming the field / layer / file and the value; CLI -> exit 2, one `error:` line, no traceback;
the input model, the input files and earlier outputs unchanged.
"""

from __future__ import annotations

import errno
import math
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file
from torch import nn

import tensorslim
from tensorslim.errors import (
    InvalidKeepError,
    ModelSpecError,
    NonFiniteWeightError,
    TensorSlimError,
    WeightFileError,
)
from tensorslim.io import load_pickled_model, load_weights, read_state_dict
from tensorslim.modelspec import model_from_factory
from tests.bad_inputs.conftest import (
    Snapshot,
    assert_cli_error,
    assert_same_state,
    cli,
    expect_error,
    no_stray_temp,
    state_of,
)

MODELS_PY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def boom():
    raise RuntimeError("factory exploded")


def not_a_module():
    return 42


NOT_CALLABLE = 3
"""


def make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


class SmallCNN(nn.Module):
    """Conv + BatchNorm + conv + linear on 3 x 8 x 8 inputs (BatchNorm: running stats to keep)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


class Evil:
    """Unpickling this creates the file `path`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """holds_models.py (the user's model code), its weights, and a saved compressed model."""
    d = tmp_path_factory.mktemp("holds")
    (d / "holds_models.py").write_text(MODELS_PY)
    save_file(make().state_dict(), str(d / "w.safetensors"))
    small, plan = tensorslim.compress(make().eval(), 0.5, example_input=torch.randn(2, 16))
    tensorslim.save(small, plan, d / "saved")
    return d


@pytest.fixture
def spec(work) -> str:
    return f"{work}/holds_models.py:make"


@pytest.fixture
def folder(work, tmp_path) -> Path:
    """A private byte copy of the saved model folder (marker included)."""
    import shutil

    return Path(shutil.copytree(work / "saved", tmp_path / "saved"))


def _input_snapshot(work: Path, *more) -> Snapshot:
    return Snapshot(work / "holds_models.py", work / "w.safetensors", work / "saved", *more)


# -- 1. keep -----------------------------------------------------------------------------------

BAD_KEEPS = [0, 0.0, -0.1, 1.5, 1.0000001, math.nan, math.inf, -math.inf, "abc", "", None, [0.5]]


@pytest.mark.parametrize("keep", BAD_KEEPS, ids=repr)
def test_api_keep_outside_0_1_is_refused(keep):
    model = make()
    state = state_of(model)
    with expect_error("keep", "(0, 1]", repr(keep) if keep != 0 else "0", error=InvalidKeepError):
        tensorslim.compress(model, keep)
    assert_same_state(model, state)
    assert model.training


@pytest.mark.parametrize("keep", ["0", "-0.1", "1.5", "nan", "inf", "-inf", "1e9"])
def test_cli_keep_outside_0_1_is_refused(work, spec, tmp_path, keep):
    snap = _input_snapshot(work)
    r = cli("compress", "--model", spec, "--keep", keep, "--out", tmp_path / "out")
    assert_cli_error(r, "keep", "(0, 1]")
    snap.check()
    assert not (tmp_path / "out").exists()
    no_stray_temp(tmp_path)


@pytest.mark.parametrize("keep", ["abc", "", "0.5.1"])
def test_cli_keep_that_is_not_a_number_is_refused(work, spec, tmp_path, keep):
    """Refused before anything is read or written: exit 2, one `error:` line naming --keep."""
    snap = _input_snapshot(work)
    r = cli("compress", "--model", spec, "--keep", keep, "--out", tmp_path / "out")
    assert_cli_error(r, "--keep", "(0, 1]", repr(keep))
    snap.check()
    assert not (tmp_path / "out").exists()


# -- 2. method / cost / allocator names ------------------------------------------------------------

BAD_CHOICES = [
    ("method", "xyz"),
    ("method", "SVD"),
    ("method", ""),
    ("cost", "time"),
    ("cost", "Params"),
    ("allocator", "greedy"),
    ("allocator", ""),
]


@pytest.mark.parametrize("field, value", BAD_CHOICES)
def test_api_unknown_choice_is_refused(field, value):
    model = make()
    state = state_of(model)
    accepted = {"method": "'svd'", "cost": "'params'", "allocator": "'global'"}[field]
    with expect_error(f"{field} must be one of", accepted, repr(value)):
        tensorslim.compress(model, 0.5, **{field: value})
    assert_same_state(model, state)


@pytest.mark.parametrize("field, value", [c for c in BAD_CHOICES if c[1]])
def test_cli_unknown_choice_is_refused(work, spec, tmp_path, field, value):
    snap = _input_snapshot(work)
    r = cli("compress", "--model", spec, f"--{field}", value, "--out", tmp_path / "out")
    assert_cli_error(r, f"{field} must be one of", repr(value))
    snap.check()
    assert not (tmp_path / "out").exists()


def test_api_analyze_refuses_an_unknown_method():
    with expect_error("method must be one of", "'nope'"):
        tensorslim.analyze(make(), method="nope")


# -- 3. NaN / Inf weights --------------------------------------------------------------------------

NON_FINITE = [
    ("conv1", "weight", math.nan),
    ("conv2", "weight", math.inf),
    ("fc", "weight", -math.inf),
    ("fc", "weight", math.nan),
]


@pytest.mark.parametrize("method", ["svd", "tucker2", "auto"])
@pytest.mark.parametrize("layer, attr, value", NON_FINITE)
def test_non_finite_weights_are_refused_with_the_layer_named(layer, attr, value, method):
    model = SmallCNN()
    with torch.no_grad():
        getattr(getattr(model, layer), attr).view(-1)[3] = value
    state = state_of(model)
    with expect_error(f"'{layer}'", "NaN/Inf", "exclude", error=NonFiniteWeightError):
        tensorslim.compress(model, 0.5, method=method, example_input=torch.randn(2, 3, 8, 8))
    assert_same_state(model, state)


def test_cli_non_finite_weights_file_is_refused(work, spec, tmp_path):
    state = make().state_dict()
    state["2.weight"][0, 0] = math.nan
    save_file(state, str(tmp_path / "nan.safetensors"))
    snap = _input_snapshot(work, tmp_path / "nan.safetensors")
    r = cli(
        "compress",
        "--model",
        spec,
        "--weights",
        tmp_path / "nan.safetensors",
        "--out",
        tmp_path / "out",
    )
    assert_cli_error(r, "'2'", "NaN/Inf")
    snap.check()
    assert not (tmp_path / "out").exists()


# -- 4. pickles: never unpickled without --trust-pickle -----------------------------------------


@pytest.fixture
def evil_pt(tmp_path) -> tuple[Path, Path]:
    """A .pt file whose unpickling creates `marker`."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": Evil(marker)}, f, protocol=2)
    return path, marker


@pytest.fixture
def whole_pt(tmp_path) -> Path:
    path = tmp_path / "whole.pt"
    torch.save(make(), path)
    return path


@pytest.mark.parametrize("command", ["compress", "inspect"])
def test_cli_pickled_model_needs_trust_pickle(whole_pt, tmp_path, command):
    snap = Snapshot(whole_pt)
    args = ["--out", tmp_path / "out"] if command == "compress" else []
    r = cli(command, whole_pt, *args)
    assert_cli_error(r, "--trust-pickle", str(whole_pt))
    snap.check()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["compress", "inspect"])
def test_cli_malicious_pickle_never_runs(evil_pt, tmp_path, command):
    path, marker = evil_pt
    snap = Snapshot(path)
    args = ["--out", tmp_path / "out"] if command == "compress" else []
    r = cli(command, path, *args)
    assert_cli_error(r, "--trust-pickle")
    assert not marker.exists()
    snap.check()


def test_cli_malicious_pickle_as_weights_never_runs(evil_pt, spec, work, tmp_path):
    path, marker = evil_pt
    snap = _input_snapshot(work, path)
    r = cli("compress", "--model", spec, "--weights", path, "--out", tmp_path / "out")
    assert_cli_error(r, str(path), "not a plain state_dict")
    assert not marker.exists()
    snap.check()
    assert not (tmp_path / "out").exists()


def test_api_load_pickled_model_needs_trust(whole_pt, evil_pt):
    with expect_error("--trust-pickle", "trust_pickle=True", str(whole_pt)):
        load_pickled_model(whole_pt)
    path, marker = evil_pt
    with expect_error("--trust-pickle", str(path)):
        load_pickled_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("what", ["evil", "whole-module"])
def test_read_state_dict_refuses_pickled_objects(evil_pt, whole_pt, what):
    path, marker = evil_pt if what == "evil" else (whole_pt, None)
    snap = Snapshot(path)
    with expect_error(str(path), "not a plain state_dict", error=WeightFileError):
        read_state_dict(path)
    model = make()
    state = state_of(model)
    with expect_error(str(path), error=WeightFileError):
        load_weights(model, path)
    assert_same_state(model, state)
    assert marker is None or not marker.exists()
    snap.check()


# -- 5. corrupt, truncated, empty or missing folder files -------------------------------------------


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "weights-empty": ("model.safetensors", lambda p: p.write_bytes(b"")),
    "weights-truncated": ("model.safetensors", _truncate),
    "weights-garbage": ("model.safetensors", lambda p: p.write_bytes(b"\x00garbage" * 10)),
    "weights-huge-header": (
        "model.safetensors",
        lambda p: p.write_bytes((1 << 62).to_bytes(8, "little") + b"{}"),
    ),
    "weights-header-not-json": (
        "model.safetensors",
        lambda p: p.write_bytes((8).to_bytes(8, "little") + b"notjson!"),
    ),
    "plan-empty": ("plan.json", lambda p: p.write_text("")),
    "plan-truncated": ("plan.json", _truncate),
    "plan-garbage": ("plan.json", lambda p: p.write_bytes(b"\xff\xfe{not json")),
    "weights-missing": ("model.safetensors", lambda p: p.unlink()),
    "plan-missing": ("plan.json", lambda p: p.unlink()),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_load_of_a_damaged_folder_is_a_weight_file_error(folder, case):
    name, damage = CORRUPTIONS[case]
    damage(folder / name)
    snap = Snapshot(folder)
    base = make()
    state = state_of(base)
    with expect_error(str(folder), error=WeightFileError):
        tensorslim.load(base, folder)
    assert_same_state(base, state)
    snap.check()


@pytest.mark.parametrize("case", ["weights-truncated", "plan-garbage", "plan-missing"])
def test_cli_export_of_a_damaged_folder_is_refused(folder, spec, tmp_path, case):
    name, damage = CORRUPTIONS[case]
    damage(folder / name)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"an earlier export")
    snap = Snapshot(folder, onnx)
    r = cli("export", folder, "--onnx", onnx, "--model", spec)
    assert_cli_error(r, str(folder))
    snap.check()
    no_stray_temp(tmp_path)


def test_load_of_a_missing_folder_is_a_weight_file_error(tmp_path):
    with expect_error(str(tmp_path / "nowhere"), error=WeightFileError):
        tensorslim.load(make(), tmp_path / "nowhere")


# -- 6. --model specs that do not resolve ------------------------------------------------------------

BAD_SPECS = {
    "no-module": ("no_such_module_xyz:make", ["no_such_module_xyz"]),
    "missing-attr": ("{work}/holds_models.py:nothere", ["nothere"]),
    "not-callable": ("{work}/holds_models.py:NOT_CALLABLE", ["NOT_CALLABLE"]),
    "factory-raises": ("{work}/holds_models.py:boom", ["boom", "factory exploded"]),
    "not-a-module": ("{work}/holds_models.py:not_a_module", ["not_a_module", "int"]),
    "no-factory": ("{work}/holds_models.py:", ["holds_models.py"]),
    "missing-file": ("{work}/absent.py:make", ["absent.py", "does not exist"]),
    "returns-str": ("os:getcwd", ["os:getcwd", "str"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_cli_unresolvable_model_spec(work, tmp_path, case):
    text, words = BAD_SPECS[case]
    snap = _input_snapshot(work)
    r = cli("compress", "--model", text.format(work=work), "--out", tmp_path / "out")
    assert_cli_error(r, *words)
    snap.check()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing-attr", "factory-raises", "not-a-module", "no-factory"])
def test_api_unresolvable_model_spec(work, case):
    text, words = BAD_SPECS[case]
    with expect_error(*words, error=ModelSpecError):
        model_from_factory(text.format(work=work))


def test_cli_unknown_model_name(tmp_path):
    r = cli("compress", "no-such-model", "--out", tmp_path / "out")
    assert_cli_error(r, "unknown model", "'no-such-model'")
    assert not (tmp_path / "out").exists()


# -- 7. wrong --weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing", "folder", "wrong-shape"])
def test_cli_wrong_weights_path(work, spec, tmp_path, case):
    if case == "missing":
        weights, words = tmp_path / "none.safetensors", ["does not exist"]
    elif case == "folder":
        weights, words = tmp_path / "weights", ["does not exist"]
        weights.mkdir()
    else:
        weights, words = tmp_path / "other.safetensors", ["do not fit", "shape"]
        save_file(nn.Sequential(nn.Linear(8, 32)).state_dict(), str(weights))
    snap = _input_snapshot(work)
    r = cli("compress", "--model", spec, "--weights", weights, "--out", tmp_path / "out")
    assert_cli_error(r, str(weights), *words)
    snap.check()
    assert not (tmp_path / "out").exists()


# -- 8. atomic replacement of an output folder ------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        KeyboardInterrupt(),
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        RuntimeError("safetensors crashed"),
    ],
    ids=["KeyboardInterrupt", "OSError-ENOSPC", "RuntimeError"],
)
def test_failed_save_leaves_the_old_folder_byte_identical(tmp_path, monkeypatch, failure):
    small, plan = tensorslim.compress(make().eval(), 0.5, example_input=torch.randn(2, 16))
    out = tmp_path / "out"
    tensorslim.io.save(small, plan, out)
    snap = Snapshot(out)
    small2, plan2 = tensorslim.compress(make().eval(), 0.3, example_input=torch.randn(2, 16))

    def half_written(model, filename, *a, **kw):
        Path(filename).write_bytes(b"half a file")
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_model", half_written)
    if isinstance(failure, OSError):
        with expect_error(str(out), os.strerror(errno.ENOSPC).lower(), error=WeightFileError):
            tensorslim.io.save(small2, plan2, out)
    else:
        with pytest.raises(type(failure)):
            tensorslim.io.save(small2, plan2, out)
    snap.check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    no_stray_temp(tmp_path)


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    small, plan = tensorslim.compress(make().eval(), 0.5, example_input=torch.randn(2, 16))

    def interrupted(model, filename, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tensorslim.io.save(small, plan, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# -- 9. the input model is never modified -----------------------------------------------------------


@pytest.mark.parametrize("method", ["svd", "cp", "tucker2", "tt", "spatial_svd", "auto"])
def test_compress_never_modifies_the_input_model(method):
    model = SmallCNN()  # training mode: BatchNorm would update its running stats if run so
    state = state_of(model)
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    small, plan = tensorslim.compress(
        model, 0.5, method=method, example_input=torch.randn(2, 3, 8, 8)
    )
    assert_same_state(model, state)
    assert all(m.training for m in model.modules())
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == hooks
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert any(lp.factorized for lp in plan.layers)
    assert small is not model


def test_failed_compress_leaves_the_model_unchanged():
    model = SmallCNN()
    state = state_of(model)
    with expect_error("example", error=TensorSlimError):
        tensorslim.compress(model, 0.5, example_input=torch.randn(2, 5, 8, 8))  # wrong channels
    assert_same_state(model, state)
    assert all(m.training for m in model.modules())
