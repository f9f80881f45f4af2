"""The sweep runner (tensorslim.study.sweep) and the error-proxy study (tensorslim.study.errors):
Kendall τ against scipy and by hand, the six errors on hand-computable tensors, resuming after a
real SIGKILL, local processes vs Ray, the CLI end to end, bad inputs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from scipy.stats import kendalltau
from torch import nn
from typer.testing import CliRunner

from tensorslim import zoo
from tensorslim.calibrate.features import feature_errors
from tensorslim.cli import app
from tensorslim.errors import TensorSlimError
from tensorslim.study.errors import (
    ErrorStudyConfig,
    analyse,
    error_trial,
    study_layers,
    weight_errors,
)
from tensorslim.study.sweep import (
    SweepError,
    grid,
    read_results,
    run_sweep,
    trial_key,
)
from tensorslim.study.tau import grouped_tau, kendall_tau, tau_a
from tensorslim.zoo.digits import load_digits_split

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


@pytest.fixture(autouse=True)
def _one_thread():
    """Torch on one thread here: these models are tiny, and two threads on a shared 2-core CPU
    spent 10x the CPU time in wall-clock waiting for each other."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# -- trial functions (module level: worker processes import them from here) ----------------------
def square_trial(params: dict) -> dict:
    time.sleep(params.get("sleep", 0.0))
    return {"x": params["x"], "square": params["x"] ** 2}


def failing_trial(params: dict) -> dict:
    if params["x"] == 2:
        raise ValueError("two is not allowed")
    return {"x": params["x"]}


# -- a tiny zoo model for in-process studies ------------------------------------------------------
class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


TINY = zoo.ZooModel("tiny-digits", TinyCNN, load_digits_split, 4, 1e-2, "test model")


@pytest.fixture
def tiny_zoo(monkeypatch):
    monkeypatch.setitem(zoo.ZOO, "tiny-digits", TINY)
    return TINY


# -- Kendall τ ------------------------------------------------------------------------------------
def test_tau_equals_scipy_and_hand_count():
    x = [1, 2, 3, 4, 5]
    assert kendall_tau(x, [10, 20, 30, 40, 50]) == pytest.approx(1.0)
    assert kendall_tau(x, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    y = [2, 1, 4, 3, 5]  # 10 pairs, 2 discordant: tau = (8 - 2) / 10
    assert tau_a(x, y) == pytest.approx(0.6)
    assert kendall_tau(x, y) == pytest.approx(0.6)
    assert kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic)
    # ties: tau-a counts a tied pair as neither (5 concordant of 6 pairs); scipy gives tau-b
    xt, yt = [1, 2, 2, 3], [1, 3, 2, 4]
    assert tau_a(xt, yt) == pytest.approx(2 * 5 / 12)
    assert kendall_tau(xt, yt) == pytest.approx(kendalltau(xt, yt).statistic)
    assert math.isnan(kendall_tau([1.0], [2.0])) and math.isnan(kendall_tau([1, 1], [1, 2]))
    with pytest.raises(ValueError, match="finite"):
        kendall_tau([1, float("nan")], [1, 2])


def _rows(proxy_of):
    rows = []
    for run in (0, 1):
        for li, layer in enumerate(["a", "b", "c"]):
            for mi, method in enumerate(["cp", "tt"]):
                for keep in (0.1, 0.5):
                    err = (3 - li) * 10 + mi * 3 + (1 - keep)
                    rows.append({
                        "run": run, "layer": layer, "method": method, "keep": keep,
                        "test_error_before": err, "test_error_after": err,
                        "p": proxy_of(err, run),
                    })
    return rows


def test_grouped_tau_groupings_and_runs():
    same = analyse(_rows(lambda e, r: e), ["p"])["p"]
    for grouping in ("all", "layers", "methods"):
        assert same[grouping]["before"]["mean"] == pytest.approx(1.0)
        assert same[grouping]["after"]["std"] == pytest.approx(0.0)
        assert same[grouping]["before"]["runs"] == 2
    assert same["layers"]["before"]["groups"] == 2 * 4  # (method, keep) groups per run
    assert same["methods"]["before"]["groups"] == 2 * 6  # (layer, keep) groups per run
    rows = _rows(lambda e, r: e if r == 0 else -e)  # run 1 reversed: tau +1 and -1
    g = grouped_tau(rows, "p", "test_error_before", "all")
    assert g["mean"] == pytest.approx(0.0) and g["std"] == pytest.approx(1.0)
    assert g["per_run"] == {"0": pytest.approx(1.0), "1": pytest.approx(-1.0)}


# -- the six errors -------------------------------------------------------------------------------
def test_weight_errors_by_hand():
    w = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    w_hat = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    e = weight_errors(w, w_hat)
    assert e["absolute"] == pytest.approx(3.0)
    assert e["relative"] == pytest.approx(3.0 / 5.0)
    assert e["scaled"] == pytest.approx(3.0 / 4.0)
    with pytest.raises(TensorSlimError, match="differ"):
        weight_errors(w, w_hat[:1])


def test_feature_errors_by_hand():
    # original layer: f = 2x; replacement: identity, so F - G = x per sample
    xs = [torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]])]
    fs = [2 * x for x in xs]
    e = feature_errors(nn.Identity(), xs, fs)
    assert e["absolute"] == pytest.approx((5.0 + 1.0) / 2)
    assert e["relative"] == pytest.approx(0.5)
    assert e["scaled"] == pytest.approx((5.0 / 2 + 1.0 / 2) / 2)
    assert e["samples"] == 2


def test_study_layers_default_to_every_conv_but_the_first():
    assert study_layers(TinyCNN(), None) == ["features.2", "features.5"]
    assert study_layers(TinyCNN(), ["features.5", "features.0"]) == ["features.0", "features.5"]
    with pytest.raises(TensorSlimError, match="at least 2"):
        study_layers(nn.Sequential(nn.Conv2d(1, 2, 3)), None)


# -- the sweep runner -----------------------------------------------------------------------------
def test_trial_key_and_grid():
    assert trial_key({"a": 1, "b": [1, 2]}) == trial_key({"b": [1, 2], "a": 1})
    assert trial_key({"a": 1}) != trial_key({"a": 1.5})
    assert len(trial_key({"a": 1})) == 20
    g = grid({"x": [1, 2], "y": ["u", "v"]}, {"c": 0})
    assert g == [
        {"c": 0, "x": 1, "y": "u"}, {"c": 0, "x": 1, "y": "v"},
        {"c": 0, "x": 2, "y": "u"}, {"c": 0, "x": 2, "y": "v"},
    ]


def test_serial_sweep_resumes_and_cuts_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    trials = grid({"x": list(range(6))})
    first = run_sweep(square_trial, trials[:4], path, executor="serial")
    assert first.ran == 4 and [r["square"] for r in first.rows] == [0, 1, 4, 9]
    assert all(r.seconds >= 0 and r.cpu_seconds >= 0 for r in first.records)
    with open(path, "ab") as f:  # a write cut short by a kill
        f.write(b'{"key": "abc", "params": {"x"')
    assert read_results(path).torn
    again = run_sweep(square_trial, trials, path, executor="serial")
    assert (again.ran, again.reused) == (2, 4)
    assert [r["square"] for r in again.rows] == [x * x for x in range(6)]
    lines = path.read_bytes().splitlines()
    assert len(lines) == 6 and all(json.loads(line) for line in lines)
    assert not read_results(path).torn


def ordered_trial(params: dict) -> dict:
    return {"z": params["x"], "a": {"y": 1, "b": [2]}, "m": None}


def test_rows_read_back_keep_their_key_order(tmp_path):
    path = tmp_path / "r.jsonl"
    trials = [{"x": 1, "w": {"q": 0, "c": 1}}]
    first = run_sweep(ordered_trial, trials, path, executor="serial")
    again = run_sweep(ordered_trial, trials, path, executor="serial")
    assert (again.ran, again.reused) == (0, 1)
    assert again.rows == first.rows
    assert list(again.rows[0]) == ["z", "a", "m"] and list(again.rows[0]["a"]) == ["y", "b"]
    assert list(again.records[0].params["w"]) == ["c", "q"]  # params stay canonical
    assert again.records[0].key == trial_key(trials[0])


_CHILD = """
import sys
sys.path[:0] = [{tests!r}, {src!r}]
from test_study import square_trial
from tensorslim.study.sweep import grid, run_sweep
run_sweep(square_trial, grid({{"x": list(range({n})), "sleep": [0.05]}}), {path!r},
          executor="process", workers=2)
"""


def test_killed_sweep_resumes_with_nothing_lost_or_repeated(tmp_path):
    path = tmp_path / "r.jsonl"
    n = 40
    code = _CHILD.format(tests=str(TESTS), src=str(SRC), n=n, path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= 5:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    before = read_results(path)
    assert 5 <= len(before.records) < n and before.duplicates == 0
    trials = grid({"x": list(range(n)), "sleep": [0.05]})
    res = run_sweep(square_trial, trials, path, executor="serial")
    assert res.reused == len(before.records) and res.ran == n - res.reused
    keys = [json.loads(line)["key"] for line in path.read_bytes().splitlines()]
    assert sorted(keys) == sorted(trial_key(t) for t in trials)  # 0 lost, 0 duplicated
    assert [r["square"] for r in res.rows] == [x * x for x in range(n)]


def pid_trial(params: dict) -> dict:
    """Record the worker's pid, then take long (the test kills the driver meanwhile)."""
    (Path(params["dir"]) / str(os.getpid())).touch()
    time.sleep(params["sleep"])
    return {"x": params["x"]}


_ORPHAN = """
import sys
sys.path[:0] = [{tests!r}, {src!r}]
from test_study import pid_trial
from tensorslim.study.sweep import grid, run_sweep
run_sweep(pid_trial, grid({{"x": [0, 1, 2, 3], "dir": [{dir!r}], "sleep": [60]}}), {path!r},
          executor="process", workers=2)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_workers_end_when_the_driver_is_killed(tmp_path):
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    code = _ORPHAN.format(tests=str(TESTS), src=str(SRC), dir=str(pids_dir),
                          path=str(tmp_path / "r.jsonl"))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and len(list(pids_dir.iterdir())) < 2:
        time.sleep(0.05)
    workers = [int(p.name) for p in pids_dir.iterdir()]
    try:
        assert len(workers) == 2, proc.stderr.read().decode()[-2000:] if proc.poll() else workers
        proc.kill()  # the driver only: no cleanup runs in it
        proc.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)
    finally:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def tiny_error_trial(params: dict) -> dict:
    """error_trial on the tiny zoo entry, registered here too: Ray workers import this module."""
    zoo.ZOO.setdefault("tiny-digits", TINY)
    return error_trial(params)


@pytest.mark.slow
def test_local_processes_and_ray_give_identical_study_rows(tiny_zoo, tmp_path):
    ray = pytest.importorskip("ray")
    cfg = ErrorStudyConfig(
        "tiny-digits", methods=("cp", "tt"), keeps=(0.25,), runs=2, finetune_epochs=1,
        finetune_samples=128, finetune_lr=1e-3, feature_samples=8, calibration_samples=32,
        test_samples=200,
    )
    tiny_zoo.pretrained()  # cached (TENSORSLIM_CACHE) before any worker starts
    trials = cfg.trials(["features.5"])
    local = run_sweep(tiny_error_trial, trials, tmp_path / "local.jsonl", workers=2)
    path = os.pathsep.join([str(TESTS), str(SRC), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        on_ray = run_sweep(tiny_error_trial, trials, tmp_path / "ray.jsonl", executor="ray")
    finally:
        ray.shutdown()
    assert local.ran == on_ray.ran == 4
    assert on_ray.rows == local.rows


# -- the command line -----------------------------------------------------------------------------
def test_cli_study_errors_end_to_end(tiny_zoo, tmp_path):
    out = tmp_path / "study"
    args = [
        "study", "errors", "tiny-digits", "--methods", "cp,tt", "--keep", "0.25,0.5",
        "--runs", "2", "--finetune-epochs", "1", "--finetune-samples", "128",
        "--finetune-lr", "1e-3", "--layers", "features.5", "--test-samples", "200",
        "--feature-samples", "8", "--calibration-samples", "32", "--workers", "0",
        "--out", str(out),
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "8 trials (8 run now, 0 from" in " ".join(r.output.split())
    for name in ("trials.jsonl", "rows.json", "tau.json", "tau.md", "scatter.png"):
        assert (out / name).is_file()
    rows = json.loads((out / "rows.json").read_text())
    assert len(rows) == 8 and {r["method"] for r in rows} == {"cp", "tt"}
    taus = json.loads((out / "tau.json").read_text())
    assert set(taus) >= {"weights_relative", "features_absolute", "fisher_weighted", "svd_risk"}
    assert "relative weights" in (out / "tau.md").read_text()
    for row in rows:  # the weight errors as defined, from the built layer's own facts
        assert row["weights_relative"] == pytest.approx(row["kernel_rel_error"], rel=1e-4)
        assert row["weights_scaled"] == pytest.approx(row["weights_absolute"] / (16 * 16 * 9))
        assert row["achieved_keep"] <= row["keep"]
        assert row["test_error_after"] == pytest.approx(1 - row["accuracy_after"])
        assert row["test_samples"] == 200 and row["layer"] == "features.5"
    r2 = CliRunner().invoke(app, args)  # resume: nothing left to run
    assert r2.exit_code == 0, r2.output
    assert "8 trials (0 run now, 8 from" in " ".join(r2.output.split())


# -- bad inputs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "cp,svd"], "methods must be some of"),
        (["--keep", "0.5,1.5"], "--keep must be"),
        (["--keep", "1"], "keeps must be distinct fractions in (0, 1)"),
        (["--runs", "0"], "runs must be an integer >= 1"),
        (["--layers", "features.0.weight"], "is not a 2-D conv"),
        (["--workers", "0", "--ray"], "cannot be combined with --ray"),
    ],
)
def test_cli_rejects_bad_inputs(tiny_zoo, tmp_path, extra, message):
    args = ["study", "errors", "tiny-digits", "--out", str(tmp_path / "o"), *extra]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2
    assert message in " ".join(r.output.split())


def test_cli_rejects_unknown_model(tmp_path):
    r = CliRunner().invoke(app, ["study", "errors", "nope", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "model must be a zoo name" in " ".join(r.output.split())


def test_sweep_rejects_bad_inputs(tmp_path):
    path = tmp_path / "r.jsonl"
    with pytest.raises(SweepError, match="same parameters"):
        run_sweep(square_trial, [{"x": 1}, {"x": 1}], path, executor="serial")
    with pytest.raises(SweepError, match="plain JSON data"):
        run_sweep(square_trial, [{"x": object()}], path, executor="serial")
    with pytest.raises(SweepError, match="module level"):
        run_sweep(lambda p: {}, [{"x": 1}], path, executor="process")
    with pytest.raises(SweepError, match="executor must be one of"):
        run_sweep(square_trial, [{"x": 1}], path, executor="threads")
    with pytest.raises(SweepError, match="workers must be"):
        run_sweep(square_trial, [{"x": 1}], path, workers=0)
    with pytest.raises(SweepError, match="not a regular file"):
        run_sweep(square_trial, [{"x": 1}], tmp_path, executor="serial")
    with pytest.raises(SweepError, match="cannot import trial function"):
        run_sweep("tensorslim.nothing:here", [{"x": 1}], path, executor="serial")
    with pytest.raises(SweepError, match=r"trial \w+ .*failed: ValueError: two is not allowed"):
        run_sweep(failing_trial, grid({"x": [1, 2, 3]}), path, executor="serial")
    assert [r.row["x"] for r in read_results(path).records.values()] == [1]  # kept
    path.write_bytes(b'{"not": "a record"}\n' + path.read_bytes())
    with pytest.raises(SweepError, match="line 1 is not a sweep record"):
        read_results(path)


def test_results_file_is_locked_while_a_sweep_writes(tmp_path):
    import fcntl

    path = tmp_path / "r.jsonl"
    path.touch()
    with open(path, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(SweepError, match="being written by another sweep"):
            run_sweep(square_trial, [{"x": 1}], path, executor="serial")
