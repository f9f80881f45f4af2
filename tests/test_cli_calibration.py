"""`tensorslim compress --calibration FILE`: data-aware compression from the command line."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import tensorslim
from tensorslim.cli import app

runner = CliRunner()

MODELS = """
import torch
from torch import nn


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(16, 32, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def recurrent():
    torch.manual_seed(0)
    return Recurrent()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
"""


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "clinets.py"
    path.write_text(MODELS)
    return path


def _inputs(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.logspace(0.5, -1.5, shape[-1])


def _plan(out):
    return json.loads((out / "plan.json").read_text())


def _rnn_error(models, out, x):
    """Relative error of the saved model's LSTM outputs on x."""
    from tensorslim.modelspec import model_from_factory

    ref = model_from_factory(f"{models}:recurrent").eval()
    small = tensorslim.load(model_from_factory(f"{models}:recurrent"), out).eval()
    with torch.no_grad():
        a, b = ref.rnn(x)[0], small.rnn(x)[0]
    return float((a - b).pow(2).sum() / a.pow(2).sum())


def test_whitened_rnn_through_the_cli_beats_svd(models, tmp_path):
    x = _inputs((96, 12, 16))
    save_file({"inputs": x}, str(tmp_path / "calib.safetensors"))
    errs = {}
    for method in ("svd", "whitened"):
        out = tmp_path / method
        r = run(
            "compress",
            "--model",
            f"{models}:recurrent",
            "--method",
            method,
            "--allocator",
            "uniform",
            "--include",
            "rnn",
            "--keep",
            "0.5",
            "--input-shape",
            "1,12,16",
            "--calibration",
            tmp_path / "calib.safetensors",
            "--calibration-samples",
            "48",
            "--calibration-batch",
            "16",
            "--out",
            out,
        )
        assert r.exit_code == 0, r.output
        plan = _plan(out)
        (layer,) = [lp for lp in plan["layers"] if lp["spec"]]
        assert layer["name"] == "rnn"
        assert layer["spec"][0]["kind"] == ("lowrank" if method == "svd" else "whitened")
        errs[method] = _rnn_error(models, out, x[:48])
    assert plan["meta"]["objective"] == "feature"
    assert plan["meta"]["calibration"]["gram"]
    assert errs["whitened"] < 0.5 * errs["svd"], errs


def test_npy_and_a_named_safetensors_tensor(models, tmp_path):
    x = _inputs((40, 16))
    np.save(tmp_path / "calib.npy", x.numpy())
    save_file({"x": x, "labels": torch.arange(40)}, str(tmp_path / "both.safetensors"))
    for source, extra in (
        (tmp_path / "calib.npy", []),
        (tmp_path / "both.safetensors", ["--calibration-key", "x"]),
    ):
        out = tmp_path / f"out-{source.suffix[1:]}"
        r = run(
            "compress",
            "--model",
            f"{models}:mlp",
            "--objective",
            "feature",
            "--calibration",
            source,
            *extra,
            "--calibration-samples",
            "30",
            "--out",
            out,
        )
        assert r.exit_code == 0, r.output
        meta = _plan(out)["meta"]
        assert meta["objective"] == "feature"
        assert meta["calibration"]["input_rows_max"] == 30  # --calibration-samples
        assert meta["example_input_shape"][1:] == [16]


def test_calibration_errors_are_one_line_and_exit_2(models, tmp_path):
    x = _inputs((20, 16))
    nan = x.clone()
    nan[3, 2] = float("nan")
    save_file({"x": x, "y": x.clone()}, str(tmp_path / "two.safetensors"))
    save_file({"x": nan}, str(tmp_path / "nan.safetensors"))
    save_file({"x": torch.zeros(0, 16)}, str(tmp_path / "empty.safetensors"))
    save_file({"x": torch.tensor(1.0)}, str(tmp_path / "scalar.safetensors"))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "ok.npy", x.numpy())
    (tmp_path / "calib.pt").write_bytes(b"not read")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    base = ["compress", "--model", f"{models}:mlp", "--method", "whitened", "--out"]
    cases = [
        ([tmp_path / "o"], "--method whitened needs calibration inputs: pass --calibration"),
        (
            [tmp_path / "o", "--calibration", tmp_path / "none.npy"],
            "does not exist",
        ),
        ([tmp_path / "o", "--calibration", tmp_path / "calib.pt"], "give a .safetensors"),
        ([tmp_path / "o", "--calibration", tmp_path / "bad.safetensors"], "cannot read"),
        ([tmp_path / "o", "--calibration", tmp_path / "two.safetensors"], "--calibration-key"),
        (
            [
                tmp_path / "o",
                "--calibration",
                tmp_path / "two.safetensors",
                "--calibration-key",
                "z",
            ],
            "'z' is not a tensor",
        ),
        (
            [tmp_path / "o", "--calibration", tmp_path / "nan.safetensors"],
            "1 NaN and 0 Inf values (first in sample 3)",
        ),
        ([tmp_path / "o", "--calibration", tmp_path / "empty.safetensors"], "holds no samples"),
        ([tmp_path / "o", "--calibration", tmp_path / "scalar.safetensors"], "single number"),
        ([tmp_path / "o", "--calibration", tmp_path / "objects.npy"], "allow_pickle=False"),
        (
            [
                tmp_path / "o",
                "--calibration",
                tmp_path / "ok.npy",
                "--input-shape",
                "1,12",
            ],
            "samples of shape (16,)",
        ),
        (
            [tmp_path / "o", "--calibration", tmp_path / "ok.npy", "--objective", "bogus"],
            "objective must be one of",
        ),
    ]
    fisher = ["compress", "--model", f"{models}:mlp", "--calibration", tmp_path / "ok.npy"]
    cases += [
        (
            [*fisher, "--method", "fwsvd", "--out", tmp_path / "o"],
            "--method fwsvd needs the Fisher information of a loss",
        ),
        (
            [*fisher, "--objective", "fisher", "--out", tmp_path / "o"],
            "--objective fisher needs the Fisher information",
        ),
    ]
    for args, message in cases:
        full = args if args[0] == "compress" else [*base, *args]
        r = run(*full)
        assert r.exit_code == 2, (args, r.output)
        assert message in " ".join(r.output.split()), (args, r.output)
        assert "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_calibration_options_are_checked_by_the_cli(models, tmp_path):
    np.save(tmp_path / "ok.npy", _inputs((8, 16)).numpy())
    for opt in ("--calibration-samples", "--calibration-batch"):
        r = run(
            "compress",
            "--model",
            f"{models}:mlp",
            "--calibration",
            tmp_path / "ok.npy",
            opt,
            "0",
            "--out",
            tmp_path / "o",
        )
        assert r.exit_code == 2 and opt in r.output, r.output


def test_integer_inputs_are_passed_as_they_are(tmp_path):
    """Token ids (an embedding model) stay integers; only floating inputs are cast."""
    path = tmp_path / "tok.py"
    path.write_text(
        "import torch\nfrom torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Embedding(50, 16), nn.Flatten(), nn.Linear(16 * 6, 24),"
        " nn.ReLU(), nn.Linear(24, 4))\n"
    )
    ids = torch.randint(0, 50, (20, 6), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "ids.npy", ids.numpy())
    out = tmp_path / "o"
    r = run(
        "compress",
        "--model",
        f"{path}:make",
        "--method",
        "whitened",
        "--calibration",
        tmp_path / "ids.npy",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    assert _plan(out)["meta"]["calibration"]["input_rows_max"] == 20


def test_calibration_by_data_set_name(tmp_path):
    out = tmp_path / "o"
    r = run(
        "compress", "digits-mlp", "--method", "whitened", "--keep", "0.5",
        "--calibration", "digits", "--calibration-samples", "64", "--out", out,
    )
    assert r.exit_code == 0, r.output
    meta = _plan(out)["meta"]
    assert meta["calibration"]["gram"] and meta["calibration"]["input_rows_max"] == 64
