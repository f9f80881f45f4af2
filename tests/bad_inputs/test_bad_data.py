"""Hostile calibration data, losses, method options and Rank-Tuning metrics.

Each refusal is a TensorSlimError naming the batch / layer / option / step and the offending value,
and the input model is unchanged afterwards (weights, buffers and train/eval modes).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tensorslim
from tensorslim.calibrate import LayerStats
from tensorslim.core import MatrixTarget, get_compressor
from tensorslim.errors import ExampleInputError, TensorSlimError
from tests.bad_inputs.conftest import assert_same_state, expect_error, state_of
from tests.models import MODELS

NAN, INF = float("nan"), float("inf")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MODELS["mlp"][0]().eval()


def _small() -> nn.Module:
    """A smaller MLP for the calls that run to completion (a full compress is the slow part)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 10)).eval()


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 1, 8, 8, generator=g) for _ in range(n)]


def _with(value: float, at: int = 1) -> list[torch.Tensor]:
    """Three batches, one entry of batch `at` replaced by `value`."""
    xs = _batches()
    xs[at][3, 0, 2, 5] = value
    return xs


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).logsumexp(-1).mean()


def _refused(model: nn.Module, words: tuple[str, ...], error=TensorSlimError, **kwargs) -> None:
    """compress(model, 0.5, **kwargs) raises `error` naming `words`; the model is unchanged."""
    state, mode = state_of(model), [m.training for m in model.modules()]
    with expect_error(*words, error=error):
        tensorslim.compress(model, 0.5, **kwargs)
    assert_same_state(model, state)
    assert [m.training for m in model.modules()] == mode


class _Log(nn.Module):
    """log(x): finite batches of random normals give NaN *inside* the model."""

    def forward(self, x):
        return torch.log(x)


def _nan_inside() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), _Log(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))


def _gen(batches, fail_at: int | None = None):
    for i, b in enumerate(batches):
        if i == fail_at:
            raise OSError("disk on fire")
        yield b


# --- defect 3 / 9: NaN and Inf in calibration inputs, layer inputs, loss and gradients ----------

NONFINITE_CASES = {
    "nan-input-whitened": (
        dict(method="whitened", calibration=_with(NAN)),
        ("batch 1", "layer '1'", "NaN"),
    ),
    "inf-input-whitened": (
        dict(method="whitened", calibration=_with(INF)),
        ("batch 1", "layer '1'", "Inf"),
    ),
    "nan-input-first-batch": (
        dict(method="whitened", calibration=_with(NAN, at=0)),
        ("batch 0", "layer '1'", "NaN"),
    ),
    "nan-input-svd-feature": (
        dict(method="svd", objective="feature", calibration=_with(NAN)),
        ("batch 1", "layer '1'", "NaN"),
    ),
    "nan-input-fwsvd": (
        dict(method="fwsvd", calibration=_with(NAN), loss=_loss),
        ("batch 1", "loss", "nan"),
    ),
    "inf-input-fvd": (
        dict(method="fvd", calibration=_with(INF, at=2), loss=_loss),
        ("batch 2", "loss", "Inf"),
    ),
    "nan-loss-fwsvd": (
        dict(method="fwsvd", calibration=_batches(), loss=lambda m, b: _loss(m, b) * NAN),
        ("batch 0", "loss", "returned nan"),
    ),
    "inf-loss-svd-fisher": (
        dict(
            method="svd",
            objective="fisher",
            calibration=_batches(),
            loss=lambda m, b: _loss(m, b) * INF,
        ),
        ("batch 0", "returned inf"),
    ),
    "nan-gradient-fvd": (  # loss 0, but d sqrt(x)/dx at 0 is Inf and Inf * 0 = NaN
        dict(method="fvd", calibration=_batches(), loss=lambda m, b: (m(b) * 0).abs().sum().sqrt()),
        ("batch 0", "gradient", "layer '", "NaN"),
    ),
}


@pytest.mark.parametrize("case", list(NONFINITE_CASES))
def test_nonfinite_calibration_is_refused_naming_batch_and_layer(case):
    kwargs, words = NONFINITE_CASES[case]
    _refused(_mlp(), words, **kwargs)


def test_nan_made_inside_the_model_names_the_layer_and_clears_the_batch():
    _refused(
        _nan_inside(),
        ("batch 0", "layer '2'", "NaN", "batch is finite"),
        method="whitened",
        calibration=_batches(),
    )


def test_nan_loss_in_training_mode_leaves_batchnorm_statistics_and_modes_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.BatchNorm1d(48), nn.Linear(48, 10))
    model.eval()

    def loss(m, b):
        m.train()  # updates the BatchNorm running statistics of the input model
        return _loss(m, b) * NAN

    _refused(model, ("batch 0", "nan"), method="fwsvd", calibration=_batches(), loss=loss)
    assert not model.training


# --- hostile batches and losses ------------------------------------------------------------------

BATCH_CASES = {
    "wrong-shape": (
        [_batches()[0], torch.randn(3, 5)],
        "whitened",
        ("batch 1", "RuntimeError", "model inputs"),
    ),
    "string-batch": ([_batches()[0], "abc"], "whitened", ("batch 1", "str", "model inputs")),
    "none-batch": ([_batches()[0], None], "whitened", ("batch 1", "model inputs")),
    "empty-tensor": ([_batches()[0], torch.empty(0, 1, 8, 8)], "whitened", ("batch 1", "empty")),
    "empty-in-tuple": (
        [(_batches()[0],), (torch.empty(0, 1, 8, 8),)],
        "fwsvd",
        ("batch 1", "empty", "(0, 1, 8, 8)"),
    ),
    "wrong-shape-fisher-only": (
        [_batches()[0], torch.randn(3, 5)],
        "fwsvd",
        ("batch 1", "RuntimeError", "loss"),
    ),
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_bad_batches_are_refused_naming_the_batch(case):
    batches, method, words = BATCH_CASES[case]
    loss = (
        (lambda m, b: _loss(m, b[0] if isinstance(b, tuple) else b)) if method == "fwsvd" else None
    )
    _refused(_mlp(), words, error=ExampleInputError, method=method, calibration=batches, loss=loss)


LOSS_CASES = {
    "non-scalar": (lambda m, b: m(b), ("scalar", "shape (8, 10)", "batch 0")),
    "python-float": (lambda m, b: 1.0, ("scalar", "float", "batch 0")),
    "none": (lambda m, b: None, ("scalar", "NoneType")),
    "no-grad": (lambda m, b: torch.tensor(1.0), ("no gradient", "batch 0")),
    "raises": (lambda m, b: 1 / 0, ("ZeroDivisionError", "batch 0", "division by zero")),
    "not-callable": (3, ("loss must be a function", "int")),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_bad_losses_are_refused(case):
    loss, words = LOSS_CASES[case]
    _refused(_mlp(), words, method="fwsvd", calibration=_batches(), loss=loss)


CALIBRATION_CASES = {  # factories: a generator is consumed by its one use
    "string": (lambda: "abc", ("iterable", "str")),
    "int": (lambda: 5, ("iterable", "int")),
    "tensor": (lambda: torch.randn(8, 1, 8, 8), ("iterable", "Tensor", "wrap it in a list")),
    "empty-list": (lambda: [], ("empty",)),
    "dict": (lambda: {"x": torch.randn(8, 1, 8, 8)}, ("iterable", "dict", "wrap it in a list")),
    "generator-fails-midway": (
        lambda: _gen(_batches(), fail_at=1),
        ("batch 1", "OSError", "disk on fire"),
    ),
}


@pytest.mark.parametrize("case", list(CALIBRATION_CASES))
def test_bad_calibration_iterables_are_refused(case):
    make, words = CALIBRATION_CASES[case]
    _refused(_mlp(), words, method="whitened", calibration=make())


def test_generator_calibration_is_consumed_once_and_works():
    model = _small()
    state = state_of(model)
    small, plan = tensorslim.compress(
        model, 0.5, method="fwsvd", calibration=(x for x in _batches()), loss=_loss
    )
    assert plan.meta["calibration"]["loss_batches"] == 3
    assert abs(plan.achieved_keep - 0.5) < 0.05
    assert_same_state(model, state)


# --- defect 11: method_options and objective ------------------------------------------------------

# method_options are the options of the method's compressor: whitened has `damp`; fvd has eps,
# solver, iters, tol, lr and time_limit; fwsvd `eps`; svd `svd`.
OPTION_CASES = {
    "damp-str": ("whitened", {"damp": "x"}, ("damp", "'x'", "finite number >= 0")),
    "damp-negative": ("whitened", {"damp": -1}, ("damp", "-1", ">= 0")),
    "damp-nan": ("whitened", {"damp": NAN}, ("damp", "nan", "finite")),
    "solver-unknown": ("fvd", {"solver": "zz"}, ("solver", "'zz'", "'als'", "'em'", "'adam'")),
    "iters-negative": ("fvd", {"iters": -5}, ("iters", "-5", "integer >= 1")),
    "iters-bool": ("fvd", {"iters": True}, ("iters", "True", "integer")),
    "iters-float": ("fvd", {"iters": 2.5}, ("iters", "2.5", "integer")),
    "tol-inf": ("fvd", {"tol": INF}, ("tol", "inf", "finite")),
    "lr-zero": ("fvd", {"lr": 0}, ("lr", "0", "> 0")),
    "eps-zero": ("fvd", {"eps": 0.0}, ("eps", "> 0")),
    "eps-zero-fwsvd": ("fwsvd", {"eps": 0.0}, ("eps", "'fwsvd'", "> 0")),
    "time-limit-negative": ("fvd", {"time_limit": -1}, ("time_limit", "-1", "> 0")),
    "unknown-name": (
        "fvd",
        {"dampening": 1},
        ("'dampening'", "'fvd'", "options are", "solver", "iters", "time_limit"),
    ),
    "other-methods-option": ("whitened", {"iters": 3}, ("'iters'", "'whitened'", "damp")),
    "damp-for-svd": ("svd", {"damp": 0.1}, ("'damp'", "method 'svd'", "options are: svd")),
    "objective-inside": ("fvd", {"objective": "fisher"}, ("objective", "own argument")),
    "not-a-dict": ("fvd", "damp=1", ("must be a mapping", "'damp=1'")),
    "list-of-pairs": ("fvd", [("damp", 1.0)], ("must be a mapping", "[('damp', 1.0)]")),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_method_options_are_refused_before_calibration(case):
    method, options, words = OPTION_CASES[case]
    seen = []

    def calibration():  # refused before any batch is read
        for x in _batches():
            seen.append(x)
            yield x

    loss = _loss if method in ("fvd", "fwsvd") else None
    _refused(
        _mlp(), words, method=method, calibration=calibration(), loss=loss, method_options=options
    )
    assert seen == []


@pytest.mark.parametrize("objective", [3, "Fisher", ["fisher"], b"weight"])
def test_bad_objective_is_refused(objective):
    _refused(
        _mlp(),
        ("objective", "'weight'", "'fisher'", "'feature'", repr(objective)),
        method="whitened",
        calibration=_batches(),
        objective=objective,
    )


def test_good_method_options_are_normalised_and_damp_zero_stays_finite():
    model = _small()
    small, plan = tensorslim.compress(
        model,
        0.5,
        method="whitened",
        calibration=[torch.randn(2, 1, 8, 8)],  # 2 rows: rank-deficient Gram, no damping
        method_options={"damp": np.float32(0.0)},
    )
    assert plan.meta["method_options"] == {"damp": 0.0}
    assert type(plan.meta["method_options"]["damp"]) is float
    with torch.no_grad():
        assert torch.isfinite(small(torch.randn(4, 1, 8, 8))).all()


SOLVER_CASES = {  # statistics and options that bypass compress()'s own checks
    "nan-fisher": (torch.full((16, 12), NAN), None, ("NaN or Inf", "Fisher")),
    "zero-row-weights": (torch.zeros(16, 12), 0.0, ("row_weights", "positive")),
}


@pytest.mark.parametrize("step", ["build", "errors"])
@pytest.mark.parametrize("case", list(SOLVER_CASES))
def test_solver_refusals_name_the_layer(case, step):
    fisher, eps, words = SOLVER_CASES[case]
    comp = get_compressor("fwsvd")
    if eps is not None:  # Options refuses eps <= 0: set it behind their back
        object.__setattr__(comp.options, "eps", eps)
    stats = LayerStats(fisher=fisher.double(), fisher_batches=1)
    weight = nn.Linear(12, 16).weight.detach()
    target = MatrixTarget("blocks.3.fc", "", (16, 12), weight=weight, stats=stats)
    with expect_error("layer 'blocks.3.fc'", *words):
        if step == "build":
            comp.build(target, {"rank": 3})
        else:
            comp.errors(target, [{"rank": 2}, {"rank": 3}], "fisher")


# --- defect 14: rank_tuning ------------------------------------------------------------------------


def _tuning_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6)).eval()
    return model, torch.randn(32, 12)


def _fidelity(x: torch.Tensor, reference: torch.Tensor):
    def metric(m: nn.Module) -> float:
        with torch.no_grad():
            return 1.0 - float((m(x) - reference).norm() / reference.norm())

    return metric


def _tuning_refused(metric_of, words, **kwargs) -> None:
    """rank_tuning(model, metric_of(fidelity), **kwargs) raises naming `words`; model unchanged."""
    model, x = _tuning_model()
    with torch.no_grad():
        reference = model(x)
    state = state_of(model)
    with expect_error(*words):
        tensorslim.rank_tuning(model, metric_of(_fidelity(x, reference)), **kwargs)
    assert_same_state(model, state)
    assert not model.training


def _changed(fidelity, when_changed):
    """A metric equal to `fidelity` on the original weights and `when_changed` otherwise."""
    return lambda m: fidelity(m) if fidelity(m) == 1.0 else when_changed


def _final_only(fidelity, value):
    """`fidelity` during the search, `value` on the tuned model. The search (baseline, each matrix
    at a rank, joint checks) evaluates one working copy, which it swaps compressed layers
    (LowRankLinear too) in and out of; the final evaluation gets the tuned model, another object."""
    seen: list[nn.Module] = []

    def metric(m):
        if not seen:
            seen.append(m)  # the baseline: the working copy
        return fidelity(m) if m is seen[0] else value

    return metric


METRIC_CASES = {
    "none": (lambda f: lambda m: None, ("NoneType", "baseline")),
    "string": (lambda f: lambda m: "0.9", ("'0.9'", "baseline")),
    "bool": (lambda f: lambda m: True, ("bool", "baseline")),
    "two-element-tensor": (lambda f: lambda m: torch.tensor([1.0, 2.0]), ("Tensor", "baseline")),
    "nan-baseline": (lambda f: lambda m: NAN, ("nan", "baseline")),
    "inf-baseline": (lambda f: lambda m: INF, ("inf", "baseline")),
    "nan-at-a-rank": (lambda f: _changed(f, NAN), ("nan", "matrix '", "rank")),
    "infinitely-good-at-a-rank": (lambda f: _changed(f, INF), ("inf", "matrix '", "rank")),
    "nan-final-evaluation": (
        lambda f: _final_only(f, NAN),
        ("nan", "final evaluation", "target 1"),
    ),
    "none-final-evaluation": (lambda f: _final_only(f, None), ("NoneType", "final evaluation")),
}


@pytest.mark.parametrize("case", list(METRIC_CASES))
def test_bad_metric_results_are_refused_naming_the_step(case):
    metric_of, words = METRIC_CASES[case]
    _tuning_refused(metric_of, words, targets=[1.0])


TUNING_ARG_CASES = {
    "targets-nan": (dict(targets=[NAN]), ("targets", "nan", "finite")),
    "targets-inf": (dict(targets=INF), ("targets", "inf")),
    "targets-string": (dict(targets="0.01"), ("targets", "'0.01'")),
    "targets-negative": (dict(targets=[0.0, -0.1]), ("targets", "-0.1", ">= 0")),
    "targets-empty": (dict(targets=[]), ("targets", "empty")),
    "targets-bool": (dict(targets=[True]), ("targets", "True")),
    "targets-none-item": (dict(targets=[0.1, None]), ("targets", "None")),
    "targets-object": (dict(targets=object()), ("targets", "object")),
    "search-unknown": (dict(search="linear"), ("search", "'bisect'", "'scan'", "'linear'")),
    "search-not-str": (dict(search=["bisect"]), ("search", "['bisect']")),
    "higher-is-better-str": (dict(higher_is_better="yes"), ("higher_is_better", "'yes'")),
}


@pytest.mark.parametrize("case", list(TUNING_ARG_CASES))
def test_bad_rank_tuning_arguments_are_refused(case):
    kwargs, words = TUNING_ARG_CASES[case]
    _tuning_refused(lambda f: f, words, **kwargs)


def test_metric_not_callable_is_refused():
    _tuning_refused(lambda f: 0.9, ("metric", "function", "float"), targets=[0.1])


def test_numpy_and_torch_metric_values_and_infinitely_bad_ranks_are_accepted():
    model, x = _tuning_model()
    with torch.no_grad():
        reference = model(x)
    fidelity = _fidelity(x, reference)

    def metric(m):  # numpy / torch scalars; -inf (infinitely bad) at the smallest ranks
        v = fidelity(m)
        return torch.tensor(v) if v > 0.5 else np.float64(-math.inf)

    res = tensorslim.rank_tuning(model, metric, np.array([0.2, 0.6]))
    assert res.targets == [0.2, 0.6]
    assert all(type(v) is float and not math.isnan(v) for v in res.metrics.values())
    assert any(r is not None for r in res.ranks[0.6].values())
