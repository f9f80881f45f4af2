"""The low-rank family of matrix compressors: lowrank (method "svd"), fwsvd, fvd, whitened."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tensorslim.compressors  # noqa: F401  (registers the built-in compressors)
from tensorslim.calibrate import LayerStats
from tensorslim.compressors._factors import refuse_overflow
from tensorslim.compressors.fvd import FVD
from tensorslim.compressors.fwsvd import FWSVD
from tensorslim.compressors.lowrank import LowRank
from tensorslim.compressors.whitened import Whitened
from tensorslim.core import Handler, MatrixTarget, compressor_class, get_compressor
from tensorslim.core.cost import dense_cost
from tensorslim.core.objective import objective_error
from tensorslim.decompose import max_useful_rank, rank_for_keep
from tensorslim.errors import TensorSlimError, UnsupportedLayerError
from tensorslim.layers import LowRankLinear

DATA_AWARE = ["fwsvd", "fvd", "whitened"]
OWN_OBJECTIVE = {"fwsvd": "fisher", "fvd": "fisher", "whitened": "feature"}


# -- helpers --------------------------------------------------------------------------------------
def _w(m: int = 12, n: int = 9, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g).to(dtype)


def _target(w, stats=None, settings=None, positions=None, layer="fc", part=""):
    return MatrixTarget(
        layer=layer,
        part=part,
        shape=(int(w.shape[0]), int(w.shape[1])),
        dtype=w.dtype,
        device=w.device,
        weight=w,
        positions=positions,
        stats=stats,
        settings=settings,
    )


def _stats(m: int, n: int, seed: int = 0, *, gram=True, fisher=True, row_fisher=False):
    """Synthetic LayerStats: anisotropic inputs (so that whitening matters) and a Fisher
    diagonal that varies a lot across rows (row_fisher: constant within each row)."""
    g = torch.Generator().manual_seed(seed)
    rows = 4 * n
    x = torch.randn(rows, n, generator=g, dtype=torch.float64)
    x = x * torch.logspace(0, -2, n, dtype=torch.float64)
    f = torch.logspace(0, -3, m, dtype=torch.float64)[:, None].expand(m, n).clone()
    if not row_fisher:
        f = f * torch.rand(m, n, generator=g, dtype=torch.float64) ** 2
    return LayerStats(
        gram=x.T @ x if gram else None,
        rows=rows if gram else 0,
        fisher=f if fisher else None,
    )


def _err(objective, w, w_hat, stats=None) -> float:
    return objective_error(objective, w.double(), w_hat.double(), stats)


class _StubHandler(Handler):
    """A handler that only exposes given matrices (and an optional kernel)."""

    def __init__(self, mats, kernel=None, calibration_reason=None):
        self.mats, self.kern, self.why = mats, kernel, calibration_reason

    def matrices(self, module):
        return self.mats

    def kernel(self, module):
        return self.kern

    def calibration_reason(self, module):
        return self.why


# -- registration and options ---------------------------------------------------------------------
def test_registration():
    assert compressor_class("svd") is LowRank
    assert compressor_class("lowrank") is LowRank
    assert isinstance(get_compressor("svd"), LowRank)
    assert isinstance(get_compressor("lowrank"), LowRank)
    assert LowRank.kind == "lowrank" and LowRank.method == "svd"
    for kind, cls in (("fwsvd", FWSVD), ("fvd", FVD), ("whitened", Whitened)):
        assert compressor_class(kind) is cls and cls.kind == kind == cls.method
    assert (FWSVD.needs, FVD.needs, Whitened.needs) == (
        frozenset({"fisher"}),
        frozenset({"fisher"}),
        frozenset({"gram"}),
    )
    assert LowRank.objective == "weight"
    assert {k: compressor_class(k).objective for k in DATA_AWARE} == OWN_OBJECTIVE


def test_option_defaults():
    assert get_compressor("svd").options.svd == "auto"
    assert get_compressor("fwsvd").options.eps == 1e-6
    assert get_compressor("whitened").options.damp == 1e-6
    o = get_compressor("fvd").options
    expected = (1e-6, "als", 30, 1e-4, 1e-2, None)
    assert (o.eps, o.solver, o.iters, o.tol, o.lr, o.time_limit) == expected


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("lowrank", "svd"),
        ("fwsvd", "eps"),
        ("fvd", "eps, solver, iters, tol, lr, time_limit"),
        ("whitened", "damp"),
    ],
)
def test_unknown_option_lists_the_options(kind, names):
    with pytest.raises(TensorSlimError, match=f"'bogus'.*{kind!r}.*options are: {names}$"):
        get_compressor(kind, {"bogus": 1})


@pytest.mark.parametrize(
    ("kind", "name", "value", "accepted"),
    [
        ("lowrank", "svd", "qr", "one of 'auto', 'full', 'randomized'"),
        ("lowrank", "svd", 1, "one of"),
        ("fwsvd", "eps", 0, "a finite number > 0"),
        ("fwsvd", "eps", -1e-3, "> 0"),
        ("fwsvd", "eps", True, "a finite number"),
        ("fwsvd", "eps", float("nan"), "a finite number"),
        ("fwsvd", "eps", "1e-6", "a finite number"),
        ("whitened", "damp", -1.0, "a finite number >= 0"),
        ("whitened", "damp", float("inf"), "a finite number"),
        ("fvd", "solver", "sgd", "one of 'als', 'em', 'adam'"),
        ("fvd", "iters", 0, "an integer >= 1"),
        ("fvd", "iters", 2.5, "an integer"),
        ("fvd", "iters", True, "an integer"),
        ("fvd", "tol", -1, ">= 0"),
        ("fvd", "lr", 0.0, "> 0"),
        ("fvd", "time_limit", 0, "> 0 or None"),
        ("fvd", "time_limit", float("nan"), "> 0 or None"),
    ],
)
def test_bad_option_values_are_refused(kind, name, value, accepted):
    with pytest.raises(TensorSlimError) as info:
        get_compressor(kind, {name: value})
    msg = str(info.value)
    assert f"compressor {kind!r}" in msg and f"option {name!r} must be" in msg
    assert accepted in msg and repr(value) in msg


def test_option_values_are_normalised():
    assert get_compressor("fwsvd", {"eps": 1}).options.eps == 1.0
    assert isinstance(get_compressor("fwsvd", {"eps": 1}).options.eps, float)
    o = get_compressor("fvd", {"iters": torch.tensor(3).item(), "time_limit": 2}).options
    assert o.iters == 3 and o.time_limit == 2.0
    assert get_compressor("svd", {"svd": "exact"}).options.svd == "full"
    assert get_compressor("svd", {"svd": None}).options.svd == "auto"
    # an Options instance is taken as it is; None fields are the defaults
    assert FWSVD.Options(eps=None).eps == 1e-6
    assert get_compressor("fwsvd", FWSVD.Options(eps=0.5)).options.eps == 0.5


# -- check, cost, grid ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lowrank", *DATA_AWARE])
def test_check_ranks(kind):
    comp = get_compressor(kind)
    t = _target(_w(12, 9))
    for r in (1, 5, 9):
        assert comp.check(t, {"rank": r}) is None
    for bad in (True, False, 0, -1, 10, 2.0, "3", None, [2]):
        why = comp.check(t, {"rank": bad})
        assert why is not None
        assert why.startswith("rank must be an integer in [1, 9] (the full rank); got ")
    assert "unknown parameter 'shape'" in comp.check(t, {"rank": 2, "shape": 1})


def test_cost_numbers():
    comp = get_compressor("svd")
    m, n, r = 6, 10, 2
    t = _target(_w(m, n), positions=5)
    c = comp.cost(t, {"rank": r})
    assert (c.params, c.bits, c.flops) == (r * (m + n), r * (m + n) * 32, 2 * 5 * r * (m + n))
    assert comp.cost(_target(_w(m, n)), {"rank": r}).flops is None
    half = comp.cost(_target(_w(m, n, dtype=torch.float16)), {"rank": r})
    assert half.bits == r * (m + n) * 16
    assert get_compressor("whitened").cost(t, {"rank": r}) == c


@pytest.mark.parametrize(("m", "n"), [(12, 9), (1, 7), (2, 2), (3, 3), (40, 5)])
def test_grid_is_every_useful_rank(m, n):
    t = _target(_w(m, n))
    comp = get_compressor("svd")
    grid = comp.grid(t)
    assert grid == [{"rank": r} for r in range(1, max_useful_rank(m, n) + 1)]
    dense = dense_cost(t).params
    assert all(comp.cost(t, p).params < dense for p in grid)
    r = min(rank_for_keep(m, n, 0.5), max_useful_rank(m, n))
    assert comp.for_keep(t, 0.5) == ({"rank": r} if r >= 1 else None)


# -- project and errors ---------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 10),
    n=st.integers(1, 10),
    data=st.data(),
)
def test_project_is_eckart_young(m, n, data):
    r = data.draw(st.integers(1, min(m, n)))
    seed = data.draw(st.integers(0, 10_000))
    w = _w(m, n, seed).double()
    comp = get_compressor("svd", {"svd": "full"})
    p = comp.project(w, {"rank": r})
    assert p.shape == w.shape and p.dtype == w.dtype
    assert torch.linalg.matrix_rank(p) <= r
    # idempotent
    assert torch.allclose(comp.project(p, {"rank": r}), p, atol=1e-9)
    # the error is the tail of the singular values
    s = torch.linalg.svdvals(w)
    assert math.isclose(float(((w - p) ** 2).sum()), float((s[r:] ** 2).sum()), abs_tol=1e-9)
    # and no random rank-r matrix does better
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(*size, generator=g, dtype=w.dtype) for size in ((m, r), (r, n)))
    rand = a @ b
    assert float(((w - p) ** 2).sum()) <= float(((w - rand) ** 2).sum()) + 1e-9


def test_project_keeps_dtype_and_kernel_shape():
    comp = get_compressor("svd")
    k = torch.randn(8, 3, 3, 3)
    p = comp.project(k, {"rank": 4})
    assert p.shape == k.shape and p.dtype == k.dtype
    flat = comp.project(k.reshape(8, -1), {"rank": 4})
    assert torch.allclose(p.reshape(8, -1), flat, atol=1e-5)
    h = _w(10, 8, dtype=torch.float16)
    assert comp.project(h, {"rank": 3}).dtype == torch.float16
    assert get_compressor("svd", {"svd": "randomized"}).project(h, {"rank": 3}).shape == h.shape


@pytest.mark.parametrize("kind", ["lowrank", *DATA_AWARE])
def test_weight_errors_match_the_projection(kind):
    w = _w(12, 9)
    stats = _stats(12, 9)
    comp = get_compressor(kind)
    t = _target(w, stats=stats)
    props = comp.proposals(t, "weight")
    assert [p.component.params for p in props] == comp.grid(t)
    assert [p.component.kind for p in props] == [comp.kind] * len(props)
    for p in props:
        if kind == "lowrank":
            w_hat = comp.project(w, p.component.params)
        elif kind == "fvd":  # the allocator's errors are those of the FWSVD start
            w_hat = get_compressor("fwsvd").project_with(w, p.component.params, stats)
        else:
            w_hat = comp.project_with(w, p.component.params, stats)
        assert math.isclose(p.error, _err("weight", w, w_hat), rel_tol=1e-5, abs_tol=1e-7)
    errs = [p.error for p in props]
    if kind == "lowrank":
        assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("objective", ["fisher", "feature"])
def test_lowrank_data_aware_objective_errors(objective):
    w = _w(12, 9)
    stats = _stats(12, 9)
    comp = get_compressor("svd")
    t = _target(w, stats=stats)
    grid = [{"rank": 1}, {"rank": 4}, {"rank": 2}]
    errs = comp.errors(t, grid, objective)
    for p, e in zip(grid, errs):
        expect = _err(objective, w, comp.project(w, p), stats)
        assert math.isclose(e, expect, rel_tol=1e-4, abs_tol=1e-9)
    assert ("svd", (12, 9)) in stats.cache  # nested factors kept for the build
    # the objective named by the settings, when none is passed
    by_settings = comp.proposals(_target(w, stats=stats, settings={"objective": objective}))
    assert [p.error for p in by_settings] == comp.errors(t, comp.grid(t), objective)
    with pytest.raises(TensorSlimError, match="objective must be one of"):
        comp.proposals(_target(w, settings={"objective": "bogus"}))


@pytest.mark.parametrize("kind", DATA_AWARE)
def test_data_aware_proposals_beat_svd_under_their_objective(kind):
    w = _w(12, 9)
    stats = _stats(12, 9, row_fisher=True)
    t = _target(w, stats=stats)
    objective = OWN_OBJECTIVE[kind]
    own = [p.error for p in get_compressor(kind).proposals(t)]
    svd = [p.error for p in get_compressor("svd").proposals(t, objective)]
    assert all(a <= b * (1 + 1e-6) + 1e-12 for a, b in zip(own, svd))
    assert sum(own) < sum(svd)


# -- build and empty ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lowrank", *DATA_AWARE])
def test_build_at_full_rank_reproduces_w(kind):
    w = _w(12, 9)
    comp = get_compressor(kind)
    op, facts = comp.build(_target(w, stats=_stats(12, 9)), {"rank": 9})
    assert isinstance(op, LowRankLinear) and op.second.bias is None
    assert torch.allclose(op.dense_weight(), w, atol=1e-5)
    x = torch.randn(5, 9)
    assert torch.allclose(op(x), x @ w.T, atol=1e-4)
    assert isinstance(facts, dict)


@pytest.mark.parametrize("kind", ["lowrank", *DATA_AWARE])
def test_empty_has_the_structure(kind):
    w = _w(12, 9, dtype=torch.float64)
    op = get_compressor(kind).empty(_target(w), {"rank": 4})
    assert isinstance(op, LowRankLinear)
    assert op.first.weight.shape == (4, 9) and op.second.weight.shape == (12, 4)
    assert op.second.bias is None and op.first.weight.dtype == torch.float64
    built, _ = get_compressor("svd").build(_target(w), {"rank": 4})
    op.load_state_dict(built.state_dict())
    assert torch.equal(op.dense_weight(), built.dense_weight())


@pytest.mark.parametrize("kind", DATA_AWARE)
def test_data_aware_build_beats_svd_under_its_objective(kind):
    w = _w(16, 10, seed=3)
    stats = _stats(16, 10, seed=3, row_fisher=True)
    t = _target(w, stats=stats)
    objective = OWN_OBJECTIVE[kind]
    for r in (1, 3, 6):
        op, _ = get_compressor(kind).build(t, {"rank": r})
        svd, _ = get_compressor("svd").build(t, {"rank": r})
        own = _err(objective, w, op.dense_weight(), stats)
        base = _err(objective, w, svd.dense_weight(), stats)
        assert own <= base * (1 + 1e-5) + 1e-12


def test_fvd_never_ends_above_fwsvd():
    w = _w(16, 10, seed=1)
    stats = _stats(16, 10, seed=1)  # element-wise Fisher: FWSVD is not optimal
    t = _target(w, stats=stats)
    for solver in ("als", "em"):
        fvd_op, facts = get_compressor("fvd", {"solver": solver, "iters": 5}).build(t, {"rank": 3})
        fw_op, _ = get_compressor("fwsvd").build(t, {"rank": 3})
        own = _err("fisher", w, fvd_op.dense_weight(), stats)
        assert own <= _err("fisher", w, fw_op.dense_weight(), stats) * (1 + 1e-5)
        f = facts["fvd"]
        assert f["solver"] == solver and 1 <= f["iterations"] <= 5
        assert f["objective"] <= f["start"]
        assert set(f) == {"solver", "iterations", "converged", "start", "objective", "seconds"}


def test_data_aware_facts():
    w = _w(12, 9)
    both = _stats(12, 9)
    _, facts = get_compressor("fwsvd").build(_target(w, stats=both), {"rank": 3})
    risk = {"svd_fisher_error", "weighted_fisher_error", "svd_risk"}
    assert set(facts) == risk | {"rel_output_error"}
    assert facts["svd_fisher_error"] >= facts["weighted_fisher_error"] > 0
    assert facts["svd_risk"] == pytest.approx(
        facts["svd_fisher_error"] / facts["weighted_fisher_error"] - 1
    )
    assert 0 < facts["rel_output_error"] < 1
    gram_only = _stats(12, 9, fisher=False)
    _, facts = get_compressor("whitened").build(_target(w, stats=gram_only), {"rank": 3})
    assert set(facts) == {"rel_output_error"}
    fisher_only = _stats(12, 9, gram=False)
    _, facts = get_compressor("fvd", {"iters": 2}).build(_target(w, stats=fisher_only), {"rank": 3})
    assert set(facts) == risk | {"fvd"}
    # plain SVD reports nothing, with or without statistics
    assert get_compressor("svd").build(_target(w, stats=both), {"rank": 3})[1] == {}


def test_build_reuses_the_nested_factors_of_the_errors():
    w = _w(12, 9)
    stats = _stats(12, 9)
    t = _target(w, stats=stats)
    comp = get_compressor("whitened")
    comp.proposals(t)
    key = ("whitened", (12, 9), 1e-6)
    cached = stats.cache[key]
    assert cached[0].shape[1] == max_useful_rank(12, 9)
    comp.build(t, {"rank": 2})
    assert stats.cache[key] is cached


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "stats", "what"),
    [
        ("fwsvd", None, r"a Fisher estimate \(calibration=batches and loss=fn\)"),
        ("fvd", "gram_only", "a Fisher estimate"),
        ("whitened", None, r"calibration inputs \(calibration=batches\)"),
        ("whitened", "fisher_only", "calibration inputs"),
    ],
)
def test_missing_statistics_are_named(kind, stats, what):
    w = _w(12, 9)
    st_ = {
        None: None,
        "gram_only": _stats(12, 9, fisher=False),
        "fisher_only": _stats(12, 9, gram=False),
    }[stats]
    t = _target(w, stats=st_, layer="enc.attn", part="q")
    comp = get_compressor(kind)
    for call in (lambda: comp.build(t, {"rank": 2}), lambda: comp.proposals(t)):
        with pytest.raises(TensorSlimError) as info:
            call()
        msg = str(info.value)
        assert f"method {kind!r} on layer 'enc.attn' matrix 'q' needs " in msg
        assert "tensorslim.apply_plan" in msg and "calibration=" in msg
        assert re.search(what, msg)
    with pytest.raises(TensorSlimError, match=f"method {kind!r} needs"):
        comp.project_with(w, {"rank": 2}, st_)


def test_lowrank_under_a_data_aware_objective_needs_statistics():
    t = _target(_w(12, 9))
    comp = get_compressor("svd")
    with pytest.raises(TensorSlimError, match="method 'svd' on layer 'fc' needs a Fisher estimate"):
        comp.proposals(t, "fisher")
    with pytest.raises(TensorSlimError, match="needs calibration inputs"):
        comp.errors(t, [{"rank": 1}], "feature")
    # building needs none
    assert comp.build(t, {"rank": 2})[0].rank == 2


@pytest.mark.parametrize(("kind", "key"), [("whitened", "gram"), ("fwsvd", "fisher")])
def test_non_finite_statistics_are_refused(kind, key):
    stats = _stats(12, 9)
    getattr(stats, key)[0, 0] = float("nan")
    t = _target(_w(12, 9), stats=stats)
    what = "input Gram matrix" if key == "gram" else "Fisher estimate"
    with pytest.raises(TensorSlimError, match=f"calibration {what} of layer 'fc' holds NaN or Inf"):
        get_compressor(kind).build(t, {"rank": 2})


def test_solver_failures_name_the_layer():
    stats = _stats(12, 9)
    stats.fisher[0, 0] = -1.0  # a negative Fisher entry: the FVD solver refuses it
    t = _target(_w(12, 9), stats=stats)
    with pytest.raises(TensorSlimError, match="method 'fvd' failed on layer 'fc': .*non-negative"):
        get_compressor("fvd").build(t, {"rank": 2})
    bad = _w(12, 9)
    bad[0, 0] = float("inf")
    with pytest.raises(TensorSlimError, match="method 'svd' failed on layer 'fc'.*NaN or Inf"):
        get_compressor("svd").build(_target(bad), {"rank": 2})


# -- dtypes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lowrank", *DATA_AWARE])
def test_float16_targets_get_float16_factors(kind):
    w = _w(12, 9, dtype=torch.float16)
    stats = _stats(12, 9)
    op, _ = get_compressor(kind).build(_target(w, stats=stats), {"rank": 9})
    assert op.first.weight.dtype == op.second.weight.dtype == torch.float16
    assert torch.allclose(op.dense_weight().float(), w.float(), atol=5e-2)


def test_float16_factors_are_rescaled_when_they_would_overflow():
    # a large rank-1 matrix: A = U S would exceed 65504; cast_factors balances A and B
    u = torch.ones(64, 1)
    v = torch.ones(1, 64) / 8
    w = (u @ v * 6e4).to(torch.float16)
    op, _ = get_compressor("svd").build(_target(w), {"rank": 1})
    assert torch.isfinite(op.first.weight).all() and torch.isfinite(op.second.weight).all()
    assert torch.allclose(op.dense_weight().float(), w.float(), rtol=1e-2)


def test_overflowing_factors_are_refused():
    # inputs spread over 20 orders of magnitude: B = V^T S^-1 overflows float16 at full rank
    w = torch.eye(4, dtype=torch.float16)
    stats = LayerStats(
        gram=torch.diag(torch.tensor([1e10, 1e-10, 1e-10, 1e-10], dtype=torch.float64)), rows=8
    )
    t = _target(w, stats=stats, layer="head")
    with pytest.raises(UnsupportedLayerError) as info:
        get_compressor("whitened", {"damp": 0.0}).build(t, {"rank": 4})
    msg = str(info.value)
    assert "layer 'head' (float16)" in msg and "'whitened' factors at rank 4" in msg
    assert "float32 copy" in msg
    op = LowRankLinear(3, 3, 1, bias=False)
    with torch.no_grad():
        op.first.weight.fill_(float("inf"))
    with pytest.raises(UnsupportedLayerError, match="first.weight overflow"):
        refuse_overflow(op, t, "svd", 1)


# -- supports -------------------------------------------------------------------------------------
def test_supports_refuses_layers_too_small_to_gain():
    comp = get_compressor("svd")
    layer = nn.Identity()
    assert comp.supports(_StubHandler({"": torch.zeros(8, 8)}), layer) is None
    mixed = _StubHandler({"a": torch.zeros(2, 2), "b": torch.zeros(8, 8)})
    assert comp.supports(mixed, layer) is None
    why = comp.supports(_StubHandler({"": torch.zeros(2, 2)}), layer)
    assert why == "too small to gain: no rank r gives r(m+n) < mn for a 2x2 matrix"
    conv = _StubHandler({"": torch.zeros(2, 2)}, kernel=torch.zeros(2, 2, 1, 1))
    assert comp.supports(conv, layer).endswith("for a 2x2 kernel matrix")
    two = _StubHandler({"a": torch.zeros(2, 2), "b": torch.zeros(3, 1)})
    assert comp.supports(two, layer).endswith("for its 2x2, 3x1 matrices")


def test_whitened_needs_a_calibration_view():
    layer = nn.Identity()
    blind = _StubHandler({"": torch.zeros(8, 8)}, calibration_reason="no calibration view")
    why = get_compressor("whitened").supports(blind, layer)
    assert why == "'whitened' cannot collect inputs of this Identity: no calibration view"
    assert get_compressor("fwsvd").supports(blind, layer) is None
    assert get_compressor("svd").supports(blind, layer) is None
