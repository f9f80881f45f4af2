"""Bad folders, files and paths given to the CLI and to the file API (tensorslim.io / tensorslim.hf).

Regressions for: a saved folder running its own code (export's model_spec, a Hugging Face class
name), `--out` replacing folders tensorslim did not write or the command's own inputs, broken ONNX
files replacing good ones (and the low-rank GRU / LSTM export onnxruntime could not load), write
failures as tracebacks, weight mismatch messages cut short, integer weights cast silently, float16
export, unbounded example shapes, unchecked truncate options and files created 0600.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tensorslim
from tensorslim.errors import ExampleInputError, ModelSpecError, WeightFileError
from tensorslim.io import MARKER_FILE, load_weights
from tests.bad_inputs.conftest import (
    Snapshot,
    assert_cli_error,
    assert_same_state,
    cli,
    expect_error,
    no_stray_temp,
    state_of,
)

TINY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def make_half():
    return make().half()


class Recurrent(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.rnn = cls(16, 128, batch_first=True)  # hidden >= 128: "auto" picks "lowrank"
        self.head = nn.Linear(128, 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def make_gru():
    torch.manual_seed(0)
    return Recurrent(nn.GRU)


def make_lstm():
    torch.manual_seed(0)
    return Recurrent(nn.LSTM)
"""

# Code a folder could ship: running it leaves PWNED beside it.
EVIL = """
import pathlib
pathlib.Path(__file__).with_name("PWNED").write_text("ran")


def make():
    import torch
    return torch.nn.Linear(16, 4)
"""


def _tiny_module():
    namespace: dict = {}
    exec(compile(TINY, "tiny.py", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder holding tiny.py (the user's model code) and a compressed tiny model, `saved`."""
    d = tmp_path_factory.mktemp("cli-files")
    (d / "tiny.py").write_text(TINY)
    r = cli(
        "compress", "--model", f"{d}/tiny.py:make", "--input-shape", "2,16", "--out", d / "saved"
    )
    assert r.exit_code == 0, r.output
    return d


@pytest.fixture
def spec(work) -> str:
    return f"{work}/tiny.py:make"


@pytest.fixture
def folder(work, tmp_path) -> Path:
    """A private copy of the saved tiny model (marker included)."""
    return Path(shutil.copytree(work / "saved", tmp_path / "run1"))


def _edit_plan(folder: Path, **meta) -> None:
    plan = json.loads((folder / "plan.json").read_text())
    plan["meta"].update(meta)
    (folder / "plan.json").write_text(json.dumps(plan))


def test_compress_records_only_zoo_names_and_writes_a_marker(work):
    meta = json.loads((work / "saved" / "plan.json").read_text())["meta"]
    assert meta["model_spec"] is None  # a file spec is never recorded: export would run it
    marker = json.loads((work / "saved" / MARKER_FILE).read_text())
    assert set(marker["files"]) == {"plan.json", "model.safetensors"} and marker["tensorslim"]


# -- 1. a saved folder never names code to run --------------------------------------------------
FOLDER_SPECS = {
    "py-in-folder": "evil.py:make",
    "py-abs-path": "{folder}/evil.py:make",
    "module-on-path": "evilmod:make",
    "builtin-function": "builtins:exec",
    "pickle-in-folder": "{folder}/whole.pt",
    "not-a-string": 5,
    "a-list": ["digits-mlp"],
    "empty": "",
    "missing": None,
}


@pytest.mark.parametrize("name", sorted(FOLDER_SPECS))
def test_export_never_imports_code_named_by_the_folder(folder, tmp_path, monkeypatch, name):
    value = FOLDER_SPECS[name]
    if isinstance(value, str):
        value = value.format(folder=folder)
    (folder / "evil.py").write_text(EVIL)
    (folder / "evilmod.py").write_text(EVIL)
    torch.save(nn.Linear(16, 4), folder / "whole.pt")
    _edit_plan(folder, model_spec=value)
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    snap = Snapshot(folder)
    r = cli("export", folder, "--onnx", tmp_path / "m.onnx")
    words = ["--model", "zoo"] + (["does not record"] if value is None else [str(value)])
    assert_cli_error(r, *words)
    assert not (folder / "PWNED").exists(), "the folder's code ran"
    assert "evilmod" not in sys.modules
    assert not (tmp_path / "m.onnx").exists()
    snap.check()


def test_zoo_name_from_plan_refuses_factory_specs():
    from tensorslim.modelspec import zoo_name_from_plan

    assert zoo_name_from_plan({"model_spec": "digits-mlp"}, "p.json") == "digits-mlp"
    with expect_error("os:system", "--model", error=ModelSpecError):
        zoo_name_from_plan({"model_spec": "os:system"}, "p.json")


# -- 1 / 19. Hugging Face folders: class allow-list, tampered config.json -----------------------
@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    from tensorslim.hf import save_pretrained

    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    small, plan = tensorslim.compress(model, 0.5, method="svd")
    return save_pretrained(small, plan, tmp_path_factory.mktemp("hf") / "bert")


@pytest.fixture
def hf_folder(hf_saved, tmp_path) -> Path:
    return Path(shutil.copytree(hf_saved, tmp_path / "bert"))


@pytest.mark.parametrize(
    "name",
    [
        "pipeline",
        "AutoModel",
        "__class__",
        "os",
        "PreTrainedModel",
        "BertConfig",
        "NoSuchModel",
        5,
        ["BertModel"],
        "[/]",
    ],
)
def test_hf_class_outside_the_allow_list_is_refused(hf_folder, name):
    from tensorslim.hf import load_pretrained

    _edit_plan(hf_folder, transformers_class=name)
    snap = Snapshot(hf_folder)
    with expect_error(repr(name), "transformers_class", "PreTrainedModel", error=WeightFileError):
        load_pretrained(hf_folder)
    snap.check()


HF_CONFIGS = {
    "not-json": (b"{not json", "valid json"),
    "a-list": (b"[1, 2]", "mapping"),
    "not-utf8": (b"\xff\xfe\x00\x81garbage", "valid json"),
    "hidden-size-text": ({"hidden_size": "big"}, "hidden_size"),
    "heads-not-a-divisor": ({"num_attention_heads": 5}, "attention heads"),
    "negative-vocab": ({"vocab_size": -1}, "negative"),
    "unknown-activation": ({"hidden_act": "os.system"}, "os.system"),
    "more-layers": ({"num_hidden_layers": 2}, "does not belong"),
    # sizes that would allocate terabytes are refused from a meta-device build, before any memory
    "huge-hidden": ({"hidden_size": 10**9, "num_attention_heads": 1}, "does not belong"),
    "huge-vocab": ({"vocab_size": 10**12}, "does not belong"),
    "huge-layers": ({"num_hidden_layers": 10**6}, "does not belong"),
}


@pytest.mark.parametrize("case", sorted(HF_CONFIGS))
def test_tampered_hf_config_is_a_weight_file_error(hf_folder, case):
    from tensorslim.hf import load_pretrained

    content, word = HF_CONFIGS[case]
    if isinstance(content, dict):
        good = json.loads((hf_folder / "config.json").read_text())
        content = json.dumps({**good, **content}).encode()
    (hf_folder / "config.json").write_bytes(content)
    snap = Snapshot(hf_folder)
    with expect_error("config.json", word, error=WeightFileError):
        load_pretrained(hf_folder)
    snap.check()


def test_hf_config_auto_map_never_runs_remote_code(hf_folder):
    from tensorslim.hf import load_pretrained

    (hf_folder / "evil.py").write_text(EVIL)
    good = json.loads((hf_folder / "config.json").read_text())
    good["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (hf_folder / "config.json").write_text(json.dumps(good))
    assert type(load_pretrained(hf_folder)).__name__ == "BertModel"
    assert not (hf_folder / "PWNED").exists()


# -- 2. --out / --onnx never replace what tensorslim did not write, nor an input ----------------
def _hf_like(tmp_path: Path) -> Path:
    d = tmp_path / "hf-model"
    d.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        (d / name).write_text(f"the user's {name}")
    return d


def _out_case(case: str, folder: Path, tmp_path: Path, spec: str) -> tuple[list, list, Path]:
    """(compress arguments after the model, words of the error, path that must not change)."""
    if case == "hf-model-folder":
        d = _hf_like(tmp_path)
        return ["--out", d], ["not written by tensorslim"], d
    if case == "forged-marker":
        d = _hf_like(tmp_path)
        (d / MARKER_FILE).write_text("{}")
        return ["--out", d], ["not written by tensorslim"], d
    if case == "copied-marker":
        d = _hf_like(tmp_path)
        shutil.copy(folder / MARKER_FILE, d / MARKER_FILE)
        return ["--out", d], ["did not write", "tokenizer.json"], d
    if case == "file-added":
        (folder / "notes.txt").write_text("mine")
        return ["--out", folder], ["did not write", "notes.txt"], folder
    if case == "weights-changed":
        with open(folder / "model.safetensors", "ab") as f:
            f.write(b" ")
        return ["--out", folder], ["changed", "model.safetensors"], folder
    if case == "symlink-inside":
        (tmp_path / "elsewhere").mkdir()
        (folder / "link").symlink_to(tmp_path / "elsewhere")
        return ["--out", folder], ["did not write", "link"], folder
    if case == "out-is-a-symlink":
        (tmp_path / "alias").symlink_to(folder)
        return ["--out", tmp_path / "alias"], ["not a folder"], folder
    if case == "out-is-a-file":
        (tmp_path / "f.txt").write_text("mine")
        return ["--out", tmp_path / "f.txt"], ["not a folder"], tmp_path / "f.txt"
    if case == "out-holds-weights":
        w = folder / "model.safetensors"
        return ["--weights", w, "--out", folder], ["input", str(w)], folder
    if case == "out-is-weights":
        w = folder / "model.safetensors"
        return ["--weights", w, "--out", w], ["input"], folder
    if case == "out-under-weights":
        w = folder / "model.safetensors"
        return ["--weights", w, "--out", w / "sub"], ["regular file"], folder
    if case == "out-holds-model-code":
        return ["--out", Path(spec.partition(":")[0]).parent], ["input", "tiny.py"], folder
    if case == "out-dot":
        return ["--out", "."], ["current directory"], tmp_path
    if case == "out-parent-of-cwd":
        return ["--out", ".."], ["current directory"], tmp_path
    raise AssertionError(case)


OUT_CASES = [
    "hf-model-folder",
    "forged-marker",
    "copied-marker",
    "file-added",
    "weights-changed",
    "symlink-inside",
    "out-is-a-symlink",
    "out-is-a-file",
    "out-holds-weights",
    "out-is-weights",
    "out-under-weights",
    "out-holds-model-code",
    "out-dot",
    "out-parent-of-cwd",
]


@pytest.mark.parametrize("case", OUT_CASES)
def test_compress_out_refuses_foreign_folders_and_inputs(folder, tmp_path, spec, monkeypatch, case):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args, words, keep = _out_case(case, folder, tmp_path, spec)
    snap = Snapshot(keep, folder, Path(spec.partition(":")[0]))
    r = cli("compress", "--model", spec, "--input-shape", "2,16", *args)
    assert_cli_error(r, *words)
    snap.check()
    no_stray_temp(keep.parent)
    assert os.listdir(cwd) == []


ONNX_CASES = {
    "plan-json": (lambda f, t: f / "plan.json", ["input", "plan.json"]),
    "weights": (lambda f, t: f / "model.safetensors", ["input", "model.safetensors"]),
    "marker": (lambda f, t: f / MARKER_FILE, ["input"]),
    "the-folder": (lambda f, t: f, ["input"]),
    "under-a-file": (lambda f, t: f / "plan.json" / "m.onnx", ["regular file"]),
    "dot": (lambda f, t: Path("."), ["current directory"]),
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_export_onnx_never_replaces_its_input_folder(folder, tmp_path, spec, monkeypatch, case):
    monkeypatch.chdir(folder if case == "dot" else tmp_path)
    target, words = ONNX_CASES[case]
    snap = Snapshot(folder)
    r = cli("export", folder, "--onnx", target(folder, tmp_path), "--model", spec)
    assert_cli_error(r, *words)
    snap.check()


def test_empty_folder_and_own_output_may_be_replaced(folder, tmp_path, spec):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", folder):
        r = cli("compress", "--model", spec, "--input-shape", "2,16", "--keep", "0.3", "--out", out)
        assert r.exit_code == 0, r.output
        assert json.loads((out / "plan.json").read_text())["keep"] == 0.3
    # an ONNX file exported into a tensorslim folder joins its marker: the folder stays replaceable
    r = cli("export", folder, "--onnx", folder / "model.onnx", "--model", spec)
    assert r.exit_code == 0, r.output
    assert "model.onnx" in json.loads((folder / MARKER_FILE).read_text())["files"]
    r = cli("compress", "--model", spec, "--input-shape", "2,16", "--out", folder)
    assert r.exit_code == 0, r.output
    assert not (folder / "model.onnx").exists()
    no_stray_temp(tmp_path)


# -- 8. write failures: one error line naming the path and the OS's reason ----------------------
@contextlib.contextmanager
def _failing_writes(kind: str, monkeypatch, root: Path):
    """Writes below `root` fail: no space (ENOSPC), file too large (EFBIG) or no permission."""
    if kind == "no-space":
        real = os.replace

        def replace(src, dst, *a, **kw):
            if ".tmp-" in str(src) and str(dst).startswith(str(root)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
            return real(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", replace)
        yield "no space left on device"
    elif kind == "too-large":  # a real EFBIG: Python ignores SIGXFSZ
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, hard))
        try:
            yield "file too large"
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    elif os.geteuid() != 0:  # read-only folder
        os.chmod(root, 0o500)
        try:
            yield "permission denied"
        finally:
            os.chmod(root, 0o700)
    else:  # root ignores permissions: refuse the temporary file or folder instead
        import tempfile

        def refuse(*a, **kw):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(root))

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
        yield "permission denied"


@pytest.fixture(scope="module")
def tiny_small():
    model = _tiny_module()["make"]().eval()
    return tensorslim.compress(model, 0.5, example_input=torch.randn(2, 16))


@pytest.mark.parametrize("kind", ["no-space", "too-large", "read-only"])
@pytest.mark.parametrize("how", ["api-save", "cli-compress", "cli-export"])
def test_write_failures_are_one_clean_error(
    folder, tmp_path, spec, monkeypatch, tiny_small, kind, how
):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"an earlier export")
    snap = Snapshot(folder, onnx)
    target = onnx if how == "cli-export" else folder
    with _failing_writes(kind, monkeypatch, tmp_path) as reason:
        if how == "api-save":
            with expect_error(str(folder), reason, error=WeightFileError):
                tensorslim.save(*tiny_small, folder)
            r = None
        elif how == "cli-compress":
            r = cli("compress", "--model", spec, "--input-shape", "2,16", "--out", folder)
        else:
            r = cli("export", folder, "--onnx", onnx, "--model", spec)
    if r is not None:
        assert_cli_error(r, str(target), reason)
    snap.check()
    no_stray_temp(tmp_path)
    no_stray_temp(folder)


# -- 5. ONNX: verified before the rename; the low-rank GRU / LSTM export ------------------------
@pytest.mark.parametrize("factory", ["make_gru", "make_lstm"])
def test_lowrank_rnn_exports_and_matches_pytorch(work, tmp_path, factory):
    spec = f"{work}/tiny.py:{factory}"
    out = tmp_path / "rnn"
    r = cli("compress", "--model", spec, "--input-shape", "2,5,16", "--keep", "0.3", "--out", out)
    assert r.exit_code == 0, r.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["layers"][0]["spec"][0]["kind"] == "lowrank"
    back = tensorslim.load(_tiny_module()[factory](), out)
    assert back.rnn.impl == "lowrank"  # "auto" picked the factored recurrence: export that one
    r = cli("export", out, "--onnx", tmp_path / "rnn.onnx", "--model", spec)
    assert r.exit_code == 0, r.output
    assert float(r.output.split("max abs difference")[1].split()[0]) < 1e-4


@pytest.mark.parametrize("check", ["--check", "--no-check"])
def test_unloadable_onnx_never_replaces_a_good_file(folder, tmp_path, spec, monkeypatch, check):
    def broken_export(model, args, f, **kwargs):
        Path(f).write_bytes(b"not an onnx model")

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"a good earlier export")
    snap = Snapshot(onnx, folder)
    monkeypatch.setattr(torch.onnx, "export", broken_export)
    r = cli("export", folder, "--onnx", onnx, "--model", spec, check)
    assert_cli_error(r, "onnxruntime", "not written")
    snap.check()
    no_stray_temp(tmp_path)


def test_onnx_output_differing_from_pytorch_is_refused(tmp_path):
    class Drift(nn.Module):
        """Scales its output by the number of calls: the traced graph is stale on the next call."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.lin(x) * self.calls

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"a good earlier export")
    snap = Snapshot(onnx)
    with expect_error("differs", "float32", "not written", error=ExampleInputError):
        tensorslim.export_onnx(Drift(), torch.randn(3, 4), onnx)
    snap.check()
    no_stray_temp(tmp_path)


# -- 16. a float16 folder exports without --input-shape -----------------------------------------
def test_float16_folder_exports_from_the_plans_shape(work, tmp_path):
    model = _tiny_module()["make_half"]().eval()
    small, plan = tensorslim.compress(model, 0.5, example_input=torch.randn(2, 16).half())
    tensorslim.save(small, plan, tmp_path / "half")
    r = cli(
        "export",
        tmp_path / "half",
        "--onnx",
        tmp_path / "h.onnx",
        "--model",
        f"{work}/tiny.py:make_half",
    )
    assert r.exit_code == 0, r.output
    assert float(r.output.split("max abs difference")[1].split()[0]) < 1e-2
    # the same folder rebuilt in float32 is refused, with the dtype to use
    r = cli(
        "export",
        tmp_path / "half",
        "--onnx",
        tmp_path / "h.onnx",
        "--model",
        f"{work}/tiny.py:make",
    )
    assert_cli_error(r, "float16", "float32", "model.to(torch.float16)")


# -- 12 / 13. weights that do not fit: every key named, no silent casts ------------------------
def _state(**edits) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    state = {k: v.clone() for k, v in _tiny_module()["make"]().state_dict().items()}
    for k, v in edits.items():
        k = k.replace("_", ".")
        if v is None:
            del state[k]
        else:
            state[k] = v
    return state


WEIGHT_FILES = {
    "missing-key": (lambda: _state(**{"2_bias": None}), ["missing keys", "'2.bias'"]),
    "unexpected-key": (
        lambda: {**_state(), "extra.weight": torch.zeros(2)},
        ["unexpected keys", "'extra.weight'"],
    ),
    "wrong-shape": (
        lambda: _state(**{"0_weight": torch.zeros(32, 15)}),
        ["'0.weight'", "[32, 15]", "[32, 16]"],
    ),
    "int8": (
        lambda: {k: v.to(torch.int8) for k, v in _state().items()},
        ["int8", "float32", "'0.weight'", "integer"],
    ),
    "bool": (
        lambda: _state(**{"2_bias": torch.ones(4, dtype=torch.bool)}),
        ["'2.bias'", "bool", "float32"],
    ),
    "several": (
        lambda: {
            "a": torch.zeros(1),
            "b": torch.zeros(1),
            "c": torch.zeros(1),
            "d": torch.zeros(1),
        },
        ["'0.weight'", "'a'", "and 1 more"],
    ),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("case", sorted(WEIGHT_FILES))
def test_load_weights_names_what_does_not_fit(tmp_path, case, suffix):
    make, words = WEIGHT_FILES[case]
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(make(), path)
    else:
        save_file(make(), str(path))
    model = _tiny_module()["make"]()
    before = state_of(model)
    with expect_error(str(path), *words, error=WeightFileError):
        load_weights(model, path)
    assert_same_state(model, before)


def test_load_weights_casts_float_precision_only(tmp_path):
    save_file({k: v.half() for k, v in _state().items()}, str(tmp_path / "w.safetensors"))
    model = load_weights(_tiny_module()["make"](), tmp_path / "w.safetensors")
    assert model[0].weight.dtype == torch.float32
    assert torch.equal(model[0].weight, _state()["0.weight"].half().float())


def test_cli_refuses_integer_weights(tmp_path, spec):
    save_file({k: v.to(torch.int8) for k, v in _state().items()}, str(tmp_path / "w.safetensors"))
    r = cli(
        "compress",
        "--model",
        spec,
        "--weights",
        tmp_path / "w.safetensors",
        "--input-shape",
        "2,16",
        "--out",
        tmp_path / "o",
    )
    assert_cli_error(r, "int8", "float32", "'0.weight'")
    assert not (tmp_path / "o").exists()


SAVED_EDITS = {
    "int8": (lambda s: {k: v.to(torch.int8) for k, v in s.items()}, ["int8", "float32"]),
    "float16": (lambda s: {k: v.half() for k, v in s.items()}, ["float16", "same dtype"]),
    "float64": (lambda s: {k: v.double() for k, v in s.items()}, ["float64", "same dtype"]),
    "missing": (lambda s: dict(list(s.items())[1:]), ["missing keys"]),
    "unexpected": (lambda s: {**s, "extra": torch.zeros(3)}, ["unexpected keys", "'extra'"]),
    "shape": (
        lambda s: {
            k: (torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if i == 0 else v)
            for i, (k, v) in enumerate(s.items())
        },
        ["has shape"],
    ),
}


@pytest.mark.parametrize("case", sorted(SAVED_EDITS))
def test_saved_folder_weights_must_match_exactly(folder, case):
    edit, words = SAVED_EDITS[case]
    state = load_file(str(folder / "model.safetensors"))
    first = next(iter(state))
    save_file(edit(state), str(folder / "model.safetensors"))
    words = [*words, first] if case in ("missing", "shape") else words
    snap = Snapshot(folder)
    base = _tiny_module()["make"]()
    before = state_of(base)
    with expect_error("model.safetensors", *words, error=WeightFileError):
        tensorslim.load(base, folder)
    assert_same_state(base, before)
    snap.check()


# -- 17. example shapes are bounded ---------------------------------------------------------------
BAD_SHAPE_TEXT = [
    "1000000,1000000",
    "99999999999999999999,32",
    "-1,32",
    "0,16",
    "1.5,16",
    "2,,16",
    "1,1,1,1,1,1,1,1,16",
    "abc",
    "\u0663,16",
    "1_0,16",
    "2,16,",
    "2147483648,1",
]


@pytest.mark.parametrize("text", BAD_SHAPE_TEXT)
def test_input_shape_is_bounded(tmp_path, spec, text):
    r = cli("compress", "--model", spec, "--input-shape", text, "--out", tmp_path / "o")
    assert_cli_error(r, "--input-shape", text, "positive integers")
    assert not (tmp_path / "o").exists()


BAD_PLAN_SHAPES = [
    [-1, 16],
    [0, 16],
    [True, 16],
    [2.0, 16],
    "2,16",
    [],
    [1] * 9,
    [2**31, 1],
    [2**20, 2**20],
    [[2], 16],
    {"0": 2},
]


@pytest.mark.parametrize("shape", BAD_PLAN_SHAPES, ids=[json.dumps(s) for s in BAD_PLAN_SHAPES])
def test_plan_example_shape_is_bounded(folder, tmp_path, spec, shape):
    _edit_plan(folder, example_input_shape=shape)
    snap = Snapshot(folder)
    r = cli("export", folder, "--onnx", tmp_path / "m.onnx", "--model", spec)
    assert_cli_error(r, "example_input_shape", repr(shape), "positive integers")
    assert not (tmp_path / "m.onnx").exists()
    snap.check()


# -- 20. truncate options are range-checked -------------------------------------------------------
@pytest.mark.parametrize(
    "option, value",
    [
        ("--mps", "-1"),
        ("--mps", "5"),
        ("--mps", "nan"),
        ("--mps", "0.5,x"),
        ("--chi", "0"),
        ("--chi", "-3"),
        ("--chi", "1.5"),
        ("--retain", "0"),
    ],
)
def test_truncate_options_are_checked_before_training(tmp_path, option, value):
    r = cli("truncate", "digits-cnn", f"{option}={value}", "--out", tmp_path / "t")
    assert_cli_error(r, option, value)
    assert not (tmp_path / "t").exists()


# -- saved files follow the umask ----------------------------------------------------------------
@pytest.mark.parametrize(
    "mask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)]
)
def test_outputs_follow_the_umask(tmp_path, tiny_small, mask, folder_mode, file_mode):
    old = os.umask(mask)
    try:
        out = tensorslim.save(*tiny_small, tmp_path / "out")
        onnx = tensorslim.export_onnx(tiny_small[0], torch.randn(2, 16), tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == folder_mode
    for p in [*out.iterdir(), onnx]:
        assert stat.S_IMODE(p.stat().st_mode) == file_mode, p
