import json

import torch
from torch import nn
from typer.testing import CliRunner

from tensorslim.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_on_every_command():
    for cmd in ([], ["compress"], ["inspect"], ["export"], ["demo"]):
        r = run(*cmd, "--help")
        assert r.exit_code == 0, r.output
        assert "Usage" in r.output


def test_compress_zoo_model_then_export_onnx(tmp_path):
    out = tmp_path / "out"
    r = run("compress", "digits-mlp", "--keep", "0.3", "--allocator", "uniform", "--out", out)
    assert r.exit_code == 0, r.output
    assert "achieved=0.29" in r.output and "net.1" in r.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["meta"]["model_spec"] == "digits-mlp" and abs(plan["achieved_keep"] - 0.3) <= 0.02
    onnx = tmp_path / "m.onnx"
    r = run("export", out, "--onnx", onnx)
    assert r.exit_code == 0, r.output
    assert onnx.is_file() and "max abs difference" in r.output
    diff = float(r.output.split("max abs difference")[1].split()[0])
    assert diff < 1e-4


def test_compress_factory_spec_with_weights_and_flops(tmp_path):
    src = tmp_path / "mymodels.py"
    src.write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32*6*6, 64))\n"
    )
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 6 * 6, 64))
    from safetensors.torch import save_file

    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "out"
    r = run(
        "compress",
        "--model",
        f"{src}:make",
        "--weights",
        tmp_path / "w.safetensors",
        "--keep",
        "0.5",
        "--cost",
        "flops",
        "--input-shape",
        "1,3,8,8",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    assert "cost=flops" in r.output
    r = run("export", out, "--onnx", tmp_path / "m.onnx", "--model", f"{src}:make")
    assert r.exit_code == 0, r.output


def test_inspect_prints_spectrum_summary_and_plots(tmp_path):
    png = tmp_path / "s.png"
    r = run("inspect", "digits-cnn", "--plot", png)
    assert r.exit_code == 0, r.output
    assert "rank 90%" in r.output and "features.0" in r.output and "classifier.1" in r.output
    assert png.stat().st_size > 1000


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "whole.pt")
    cases = [
        (
            ["compress", "digits-mlp", "--keep", "1.5", "--out", tmp_path / "o"],
            "keep must be in (0, 1]",
        ),
        (["compress", "no-such-model", "--out", tmp_path / "o"], "unknown model"),
        (["compress", "nomod.x:y", "--out", tmp_path / "o"], "cannot import"),
        (["compress", tmp_path / "whole.pt", "--out", tmp_path / "o"], "--trust-pickle"),
        (["compress", "digits-mlp", "--method", "xyz", "--out", tmp_path / "o"], "method must be"),
        (
            [
                "compress",
                "digits-mlp",
                "--weights",
                tmp_path / "none.safetensors",
                "--out",
                tmp_path / "o",
            ],
            "does not exist",
        ),
        (["export", tmp_path, "--onnx", tmp_path / "x.onnx"], "cannot read plan file"),
        (["demo", "--keeps", "0.5,7"], "keep"),
    ]
    for args, message in cases:
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (args, r.output)
        assert "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_trusted_pickle_compresses(tmp_path):
    torch.save(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)), tmp_path / "whole.pt")
    r = run(
        "compress",
        tmp_path / "whole.pt",
        "--trust-pickle",
        "--keep",
        "0.5",
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_demo_end_to_end(tmp_path):
    r = run("demo", "--out", tmp_path / "demo", "--keeps", "0.3", "--finetune-epochs", "1")
    assert r.exit_code == 0, r.output
    for word in ("dense", "uniform", "global", "accuracy", "latency"):
        assert word in r.output
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    rows = {row["allocator"]: row for row in res["rows"]}
    assert rows["dense"]["accuracy"] > 0.9
    assert abs(rows["global"]["achieved_keep"] - 0.3) <= 0.02
    assert (tmp_path / "demo" / "accuracy_vs_keep.png").stat().st_size > 1000
