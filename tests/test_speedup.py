"""Speed targets: compress(model, speedup=...) searches the budget on whole-model measurements,
and the plan's whole_model section says what was measured. Timing is faked where the search
logic is checked exactly; where real timing runs, no test asserts anything about speed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tensorslim
import tensorslim.speed.target as target_mod
from tensorslim.cli import app
from tensorslim.errors import TensorSlimError, WeightFileError
from tensorslim.plan import Plan
from tensorslim.speed.measure import (
    ModelTiming,
    measure_speedup,
    module_times,
    profile_breakdown,
)
from tensorslim.speed.target import compress_for_speedup, search_speedup


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 48, 3, padding=1),
        nn.BatchNorm2d(48),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(192, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    ).eval()


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _fake_timing(dense, compressed, example_input, *, rounds=5, min_run_time=0.2,
                 reference=None, cap=math.inf):  # fmt: skip
    """Deterministic 'timing': the model runs in time proportional to its parameters."""
    d, c = float(_params(dense)), float(_params(compressed))
    c = max(c, d / cap)
    ref = None if reference is None else 0.9 * _params(reference)
    return ModelTiming(d, c, d / c, torch.get_num_threads(), [list(X.shape)], rounds,
                       [d] * rounds, [c] * rounds, ref)  # fmt: skip


@pytest.fixture
def fake_measure(monkeypatch):
    monkeypatch.setattr(target_mod, "measure_speedup", _fake_timing)


@pytest.fixture
def quick_measure(monkeypatch):
    """Real alternating timing, but one short round (fast; its numbers are not asserted)."""

    def quick(dense, compressed, example_input, *, rounds=5, min_run_time=0.2, reference=None):
        return measure_speedup(dense, compressed, example_input, rounds=1, min_run_time=0.005,
                               reference=reference)  # fmt: skip

    monkeypatch.setattr(target_mod, "measure_speedup", quick)


# -- argument checks ------------------------------------------------------------------------------
def test_keep_and_speedup_are_exclusive():
    with pytest.raises(TensorSlimError, match="not both"):
        tensorslim.compress(_net(), 0.5, speedup=2.0, example_input=X)
    with pytest.raises(TensorSlimError, match=r"keep must be .* or give speedup="):
        tensorslim.compress(_net(), example_input=X)
    small, plan = tensorslim.compress(_net(), 0.5)  # positional keep still works
    assert plan.keep == 0.5 and plan.whole_model is None


@pytest.mark.parametrize("bad", [1.0, 0.5, -2, float("nan"), float("inf"), True, "2", None])
def test_bad_speedup_rejected(bad):
    if bad is None:
        with pytest.raises(TensorSlimError, match="needs example_input"):
            tensorslim.compress(_net(), speedup=2.0)
        return
    with pytest.raises(TensorSlimError, match="speedup must be"):
        tensorslim.compress(_net(), speedup=bad, example_input=X)


def test_search_arguments_checked():
    with pytest.raises(TensorSlimError, match="max_steps"):
        search_speedup(_net(), 2.0, X, max_steps=0)
    with pytest.raises(TensorSlimError, match="do not pass keep"):
        search_speedup(_net(), 2.0, X, keep=0.5)
    with pytest.raises(TensorSlimError, match="rounds"):
        measure_speedup(_net(), _net(), X, rounds=0)
    with pytest.raises(TensorSlimError, match="min_run_time"):
        measure_speedup(_net(), _net(), X, min_run_time=float("nan"))


# -- the search, with deterministic timing --------------------------------------------------------
def test_search_finds_largest_keep_meeting_target(fake_measure):
    model = _net()
    res = search_speedup(model, 2.0, X, cost="params", levers=False, max_steps=20, close=0.0,
                         keep_tol=0.01, breakdown=False)  # fmt: skip
    wm = res.plan.whole_model
    measured = [s for s in wm["steps"] if not s.get("reused")]
    assert wm["n_steps"] == len(measured) <= 20
    assert wm["met"] is True and wm["target_speedup"] == 2.0
    chosen = res.plan.keep
    assert wm["speedup"] >= 2.0 and math.isclose(
        wm["speedup"], _params(model) / _params(res.model), rel_tol=1e-3
    )
    # no step with more keep met the target unless it selected the very same layers (a probe
    # between two keeps that allocate alike), and the bracket closed to keep_tol
    same = next(s["speedup"] for s in wm["steps"] if s["keep"] == pytest.approx(chosen, abs=1e-5))
    for s in wm["steps"]:
        if s["keep"] > chosen + 1e-5:
            assert s["speedup"] < 2.0 or (s.get("reused") and s["speedup"] == same)
    lo = max(s["keep"] for s in wm["steps"] if s["speedup"] >= 2.0)
    failing = [s["keep"] for s in wm["steps"] if s["speedup"] < 2.0] + [1.0]
    assert min(failing) - lo <= 0.01 + 1e-9
    # the first step is the fastest candidate: every layer at its cheapest factorization
    assert wm["steps"][0]["speedup"] == max(s["speedup"] for s in wm["steps"])
    # the returned model is the one the plan describes
    rebuilt = tensorslim.apply_plan(_net(), res.plan)
    torch.testing.assert_close(rebuilt(X), res.model(X), rtol=1e-5, atol=1e-6)


def test_search_stops_when_close_and_counts_steps(fake_measure):
    res = search_speedup(_net(), 1.5, X, cost="params", levers=False, max_steps=3,
                         breakdown=False)  # fmt: skip
    wm = res.plan.whole_model
    assert 1 <= wm["n_steps"] <= 3
    assert wm["met"] and wm["speedup"] >= 1.5


def test_unreachable_target_returns_fastest_with_reason(monkeypatch):
    monkeypatch.setattr(
        target_mod, "measure_speedup", lambda *a, **k: _fake_timing(*a, **k, cap=1.2)
    )
    small, plan = compress_for_speedup(_net(), 50.0, X, cost="params", levers=False,
                                       breakdown=False)  # fmt: skip
    wm = plan.whole_model
    assert wm["met"] is False and wm["n_steps"] == 1
    assert "out of reach" in wm["reason"] and "1.20x" in wm["reason"]
    assert wm["speedup"] == pytest.approx(1.2)
    assert plan.keep == pytest.approx(wm["steps"][0]["keep"], abs=1e-5)
    assert "NOT met" in str(plan)


def _noisy(first_caps):
    """Fake timing whose first calls are capped at the given speedups (a loaded machine), then
    exact: each call pops the next cap."""
    caps = list(first_caps)

    def measure(*a, **k):
        return _fake_timing(*a, **k, cap=caps.pop(0) if caps else math.inf)

    return measure


def test_a_search_miss_that_re_measures_above_the_target_is_met(monkeypatch):
    # the fastest candidate is measured at 1.1x in the search, its re-measurement is exact
    monkeypatch.setattr(target_mod, "measure_speedup", _noisy([1.1]))
    _, plan = compress_for_speedup(_net(), 1.5, X, cost="params", levers=False, max_steps=1,
                                   breakdown=False)  # fmt: skip
    wm = plan.whole_model
    assert wm["n_steps"] == 1 and wm["search_speedup"] == pytest.approx(1.1)
    assert wm["met"] is True and wm["speedup"] >= 1.5
    assert "met" in wm["reason"] and "out of reach" not in wm["reason"]
    assert len(wm["confirmations"]) == 1


def test_a_best_that_misses_on_re_measurement_falls_back_to_the_fastest(monkeypatch):
    calls = []

    def measure(dense, compressed, *a, **k):
        calls.append(_params(compressed))
        t = _fake_timing(dense, compressed, *a, **k)
        if len(calls) == 3:  # the best's re-measurement comes out low (load)
            t = _fake_timing(dense, compressed, *a, **k, cap=1.0)
        return t

    monkeypatch.setattr(target_mod, "measure_speedup", measure)
    _, plan = compress_for_speedup(_net(), 1.5, X, cost="params", levers=False, max_steps=2,
                                   close=0.0, breakdown=False)  # fmt: skip
    wm = plan.whole_model
    assert wm["n_steps"] == 2 and len(wm["confirmations"]) == 2
    first, second = wm["confirmations"]
    assert first["speedup"] == pytest.approx(1.0) and second["speedup"] >= 1.5
    assert wm["met"] is True and second["keep"] < first["keep"]
    assert plan.keep == pytest.approx(second["keep"], abs=1e-5)
    assert "re-measured" in wm["reason"]


def test_a_best_that_misses_falls_back_to_the_next_largest_keep_rebuilt(monkeypatch):
    calls = []

    def measure(dense, compressed, *a, **k):
        calls.append(1)
        t = _fake_timing(dense, compressed, *a, **k)
        if len(calls) == 5:  # the first re-measurement (after 4 search steps) comes out low
            t = _fake_timing(dense, compressed, *a, **k, cap=1.0)
        return t

    monkeypatch.setattr(target_mod, "measure_speedup", measure)
    _, plan = compress_for_speedup(_net(), 1.1, X, cost="params", levers=False, max_steps=4,
                                   keep_tol=1e-6, close=0.0, breakdown=False)  # fmt: skip
    wm = plan.whole_model
    meeting = sorted({s["keep"] for s in wm["steps"] if s["speedup"] >= 1.1
                      and not s.get("reused")}, reverse=True)  # fmt: skip
    assert wm["n_steps"] == 4 and len(meeting) >= 3
    first, second = wm["confirmations"]
    assert first["keep"] == meeting[0] and first["speedup"] == pytest.approx(1.0)
    assert second["keep"] == meeting[1] and second["speedup"] >= 1.1  # not the fastest: rebuilt
    assert wm["met"] is True and plan.keep == pytest.approx(second["keep"], abs=1e-5)


def test_levers_recorded_and_model_saved_before_them(fake_measure, monkeypatch, tmp_path):
    import tensorslim.speed.levers as levers_mod

    class Decision:
        def __init__(self, name, kept):
            self.name, self.kept = name, kept

        def to_dict(self):
            return {"name": self.name, "kept": self.kept, "reason": "fake", "touched": 1}

    def fake_levers(model, example_input, **kw):
        fast = nn.Sequential(model)  # a different module: the "inference model"
        return fast.eval(), [Decision("fold_bn", True), Decision("channels_last", False)]

    monkeypatch.setattr(levers_mod, "apply_levers", fake_levers)
    res = search_speedup(_net(), 1.3, X, cost="params", breakdown=False)
    wm = res.plan.whole_model
    assert [lv["name"] for lv in wm["levers"]] == ["fold_bn"]
    assert {lv["name"] for lv in wm["levers_tried"]} == {"fold_bn", "channels_last"}
    assert "apply_levers" in wm["levers_note"] and "fold_bn" in str(res.plan)
    # the same levers on the dense model are measured too: the compression's own part
    assert wm["dense_levers"] == ["fold_bn"]
    assert wm["speedup_vs_levered_dense"] == pytest.approx(
        wm["levered_dense_ms"] / wm["compressed_ms"], rel=1e-3
    )
    assert "given the same levers" in str(res.plan)
    assert res.model is not res.base and res.model[0] is res.base
    tensorslim.save(res.base, res.plan, tmp_path / "out")  # the plan matches the saved model
    loaded = tensorslim.load(_net(), tmp_path / "out")
    torch.testing.assert_close(loaded(X), res.base(X))


# -- real timing (numbers not asserted) ---------------------------------------------------------
def test_compress_speedup_plan_is_honest(quick_measure):
    model = _net()
    small, plan = tensorslim.compress(model, speedup=1.3, example_input=X, cost="flops")
    wm = plan.whole_model
    assert wm["target_speedup"] == 1.3 and wm["threads"] == torch.get_num_threads()
    assert wm["batch_shapes"] == [[4, 3, 8, 8]] and wm["dense_ms"] > 0 and wm["compressed_ms"] > 0
    assert wm["speedup"] == pytest.approx(wm["dense_ms"] / wm["compressed_ms"], rel=1e-3)
    assert wm["n_steps"] == len([s for s in wm["steps"] if not s.get("reused")]) >= 1
    assert isinstance(wm["met"], bool) and wm["reason"]
    assert 0 <= wm["compressible_share"] <= 1
    kinds = {r["kind"] for r in wm["breakdown"]}
    assert kinds == {"module", "op"}
    # the measured model (levers applied) computes what the plan, built afresh, computes
    rebuilt = tensorslim.apply_plan(_net(), plan).eval()
    torch.testing.assert_close(small(X), rebuilt(X), rtol=1e-4, atol=1e-4)
    # the input model is untouched
    torch.testing.assert_close(model(X), _net()(X))
    text = str(plan)
    assert "Whole model (measured" in text and "Target speedup 1.30×" in text


def test_unreachable_target_real_timing_does_not_crash(quick_measure):
    small, plan = compress_for_speedup(_net(), 50.0, X, cost="params", max_steps=2)
    wm = plan.whole_model
    assert wm["met"] is False and "out of reach" in wm["reason"]
    assert small(X).shape == (4, 10)


def test_measure_with_keep(fake_measure):
    _, plan = tensorslim.compress(_net(), 0.4, example_input=X, measure=True)
    wm = plan.whole_model
    assert wm["speedup"] == pytest.approx(wm["dense_ms"] / wm["compressed_ms"], rel=1e-3)
    assert "target_speedup" not in wm and wm["breakdown"]
    with pytest.raises(TensorSlimError, match="measure=True needs example_input"):
        tensorslim.compress(_net(), 0.4, measure=True)


def test_module_times_and_breakdown():
    model = _net()
    t = module_times(model, X, ["0", "3", "8"])
    assert set(t) == {"", "0", "3", "8"} and all(v >= 0 for v in t.values())
    assert all(t[n] <= t[""] for n in ("0", "3", "8"))  # nested ranges
    with pytest.raises(TensorSlimError, match="no module 'nope'"):
        module_times(model, X, ["nope"])
    rows = profile_breakdown(model, X, top=3)
    mods = [r for r in rows if r["kind"] == "module"]
    ops = [r for r in rows if r["kind"] == "op"]
    assert len(mods) == 3 and 1 <= len(ops) <= 3
    assert [r["ms"] for r in mods] == sorted((r["ms"] for r in mods), reverse=True)
    assert all(0 <= r["share"] <= 1 for r in mods)
    assert model.training is False and not model[0]._forward_hooks  # hooks removed
    timing = measure_speedup(model, model, X, rounds=1, min_run_time=0.005)
    assert timing.batch_shapes == [[4, 3, 8, 8]] and len(timing.dense_round_ms) == 1
    assert timing.reference_ms is None
    timing = measure_speedup(model, model, X, rounds=1, min_run_time=0.005, reference=model)
    assert timing.reference_ms > 0


# -- plan JSON ----------------------------------------------------------------------------------
def test_plan_json_round_trip_with_whole_model(fake_measure):
    _, plan = compress_for_speedup(_net(), 1.4, X, cost="params", levers=False)
    again = Plan.from_json(plan.to_json())
    assert again.whole_model == json.loads(json.dumps(plan.whole_model))
    assert again.to_dict() == plan.to_dict()
    old = plan.to_dict()
    del old["whole_model"]  # a plan written before whole-model accounting
    assert Plan.from_dict(old).whole_model is None


@pytest.mark.parametrize(
    "bad, field",
    [
        ([], "whole_model"),
        ({"speedup": "fast"}, "speedup"),
        ({"dense_ms": float("nan")}, "dense_ms"),
        ({"threads": 0}, "threads"),
        ({"steps": [{"keep": 2.0, "speedup": 1.0}]}, "steps"),
        ({"batch_shapes": [[1, -3]]}, "batch_shapes"),
        ({"target_speedup": 0.5}, "target_speedup"),
        ({"breakdown": [{"kind": "op", "name": "x", "ms": -1, "share": 0}]}, "breakdown"),
    ],
)
def test_bad_whole_model_rejected(bad, field):
    _, plan = tensorslim.compress(_net(), 0.5)
    d = plan.to_dict()
    d["whole_model"] = bad
    with pytest.raises(WeightFileError, match=field):
        Plan.from_dict(d)


# -- command line -------------------------------------------------------------------------------
runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_speedup_and_keep_exclusive(tmp_path):
    r = _cli("compress", "digits-mlp", "--keep", "0.5", "--speedup", "2", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "not both" in r.output
    r = _cli("compress", "digits-mlp", "--speedup", "0.9", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "speedup must be" in r.output
    r = _cli("compress", "digits-mlp", "--speedup", "fast", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--speedup must be a number" in r.output
    assert not (tmp_path / "o").exists()


def test_cli_speedup_saves_and_loads(fake_measure, tmp_path):
    out = tmp_path / "o"
    r = _cli("compress", "digits-mlp", "--speedup", "1.5", "--cost", "params", "--out", out)
    assert r.exit_code == 0, r.output
    assert "Target speedup 1.50×" in r.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["whole_model"]["target_speedup"] == 1.5 and plan["whole_model"]["n_steps"] >= 1
    from tensorslim import zoo

    tensorslim.load(zoo.get("digits-mlp").build(), out)  # the saved model matches its plan
