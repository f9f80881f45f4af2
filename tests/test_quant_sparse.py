"""Quantization (quant, binary, ternary) and pruning (sparse): exact C steps, costs, the stored
modules (Linear and Conv), save/load, ONNX and refusals."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tensorslim
from tensorslim.compressors.quant import binarize, dequantize, quantize, ternarize
from tensorslim.compressors.sparse import l1_nonzeros, nonzeros_for_keep, prune, soft_threshold
from tensorslim.core import (
    LayerSite,
    MatrixTarget,
    build_layer,
    get_compressor,
    handler_for,
    parse_spec,
    spec_cost,
)
from tensorslim.core.cost import dense_cost
from tensorslim.decompose.kmeans1d import (
    kmeans_1d,
    kmeans_1d_all,
    kmeans_1d_dp,
    kmeans_1d_lloyd,
    optimal_sse_curve,
    sse,
    uniform_levels,
)
from tensorslim.errors import NonFiniteWeightError, TensorSlimError
from tensorslim.layers.quantized import QuantizedOp, ScaledSignOp, pack_bits, unpack_bits
from tensorslim.layers.sparse import DENSE_ABOVE, SparseOp, index_bits
from tensorslim.plan import Plan

KINDS = [
    ("quant", {"bits": 3}),
    ("binary", {}),
    ("ternary", {}),
    ("sparse", {"keep": 0.2}),
]
small_floats = st.floats(-4, 4, allow_nan=False, width=32)


# -- helpers --------------------------------------------------------------------------------------
def _w(m: int = 12, n: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def _target(w: torch.Tensor, positions: int | None = None) -> MatrixTarget:
    return MatrixTarget(
        "fc", "", (int(w.shape[0]), int(w.shape[1])), w.dtype, w.device, w, positions
    )


def _brute_kmeans(x: list[float], k: int) -> float:
    """The least SSE over every split of the sorted values into k non-empty intervals."""
    xs = sorted(x)
    n = len(xs)
    if len(set(xs)) <= k:
        return 0.0
    best = math.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = [0, *cuts, n]
        total = 0.0
        for a, b in zip(edges, edges[1:]):
            seg = xs[a:b]
            mean = sum(seg) / len(seg)
            total += sum((v - mean) ** 2 for v in seg)
        best = min(best, total)
    return best


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-7, atol: float = 1e-7) -> None:
    """torch.allclose with the largest difference in the message (torch.testing.assert_close
    would import torch.distributed, seconds on a busy machine)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    assert torch.allclose(a, b, rtol=rtol, atol=atol), float((a - b).abs().max())


def _sq(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).sum())


# -- 1-D k-means ----------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(st.lists(small_floats, min_size=1, max_size=8), st.integers(1, 8))
def test_dp_equals_brute_force(values, k):
    x = torch.tensor(values, dtype=torch.float64)
    k = min(k, len(values))
    want = _brute_kmeans(values, k)
    got = float(sse(x, kmeans_1d_dp(x, k)))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    curve = optimal_sse_curve(x, k)[0]
    assert float(curve[k - 1]) == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert bool((curve[1:] <= curve[:-1] + 1e-12).all())


def test_dp_rows_and_several_k_at_once_match_single_runs():
    x = _w(4, 30, seed=1).double()
    x[1, :24] = 0.5  # few distinct values
    x[2] = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(2)).double()
    every = kmeans_1d_all(x, [2, 3, 8])
    curves = optimal_sse_curve(x, 8)
    for r in range(4):
        for k in (2, 3, 8):
            single = kmeans_1d_dp(x[r], k)[0]
            _close(every[k][r], single)
            assert float(sse(x[r], single)) == pytest.approx(float(curves[r, k - 1]), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(small_floats, min_size=2, max_size=60), st.integers(1, 5))
def test_kmeans_never_worse_than_uniform_levels(values, bits):
    x = torch.tensor(values, dtype=torch.float64)
    k = 1 << bits
    uniform = float(sse(x, uniform_levels(x, k)))
    assert float(sse(x, kmeans_1d(x, k))) <= uniform * (1 + 1e-12) + 1e-12
    # the approximate path (summary DP + Lloyd), forced by a tiny DP limit
    assert float(sse(x, kmeans_1d(x, k, dp_limit=1))) <= uniform * (1 + 1e-12) + 1e-12


def test_approximate_path_is_close_to_exact_and_lloyd_only_improves():
    x = torch.distributions.Laplace(0.0, 1.0).sample((3000,)).double()
    for k in (4, 16):
        exact = float(sse(x, kmeans_1d_dp(x, k)))
        approx = float(sse(x, kmeans_1d(x, k, dp_limit=1000)))
        assert exact <= approx <= exact * 1.01
        start = uniform_levels(x, k)
        assert float(sse(x, kmeans_1d_lloyd(x, start))) <= float(sse(x, start))


def test_kmeans_refuses_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        kmeans_1d(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="positive integer"):
        kmeans_1d(torch.ones(3), 0)


# -- quant ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_quant_projection_is_nearest_codebook_value_and_idempotent(bits, per_channel):
    w = _w(8, 20)
    comp = get_compressor("quant", {"per_channel": per_channel})
    p = comp.project(w, {"bits": bits})
    assert p.shape == w.shape and p.dtype == w.dtype
    book, codes = quantize(w, bits, per_channel)
    assert book.shape == (8 if per_channel else 1, 1 << bits)
    _close(dequantize(book, codes), p, rtol=0, atol=0)
    rows = p if per_channel else p.reshape(1, -1)
    wr = w if per_channel else w.reshape(1, -1)
    for r in range(rows.shape[0]):
        assert torch.unique(rows[r]).numel() <= 1 << bits
        # every weight sits at its nearest codebook value
        dist = (wr[r, :, None] - book[r][None, :]).abs()
        assert torch.allclose((wr[r] - rows[r]).abs(), dist.min(dim=1).values)
    assert torch.equal(comp.project(p, {"bits": bits}), p)


def test_quant_is_the_optimal_codebook():
    w = _w(3, 4)  # 12 values: the brute force over all splits is small
    for bits in (1, 2):
        p = get_compressor("quant").project(w, {"bits": bits})
        assert _sq(w, p) == pytest.approx(_brute_kmeans(w.reshape(-1).tolist(), 1 << bits))


def test_quant_on_kernel_and_half_precision():
    kernel = torch.randn(4, 3, 3, 3)
    p = get_compressor("quant", {"per_channel": True}).project(kernel, {"bits": 2})
    assert p.shape == kernel.shape
    assert all(torch.unique(p[i]).numel() <= 4 for i in range(4))
    half = _w().half()
    ph = get_compressor("quant").project(half, {"bits": 2})
    assert ph.dtype == torch.float16 and torch.unique(ph).numel() <= 4


# -- binary and ternary ---------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(small_floats, min_size=1, max_size=7))
def test_binary_scale_is_mean_abs_and_optimal(values):
    w = torch.tensor(values, dtype=torch.float32).reshape(1, -1)
    scale, codes = binarize(w)
    assert float(scale[0]) == pytest.approx(float(w.abs().mean()), rel=1e-6, abs=1e-7)
    got = _sq(w, get_compressor("binary").project(w, {}))
    wd = w.double().reshape(-1)
    for signs in itertools.product((-1.0, 1.0), repeat=wd.numel()):
        s = torch.tensor(signs, dtype=torch.float64)
        a = max(0.0, float(s @ wd) / wd.numel())
        assert got <= float(((wd - a * s) ** 2).sum()) + 1e-5


@settings(max_examples=40, deadline=None)
@given(st.lists(small_floats, min_size=1, max_size=5))
def test_ternary_is_optimal_against_every_code(values):
    w = torch.tensor(values, dtype=torch.float32).reshape(1, -1)
    got = _sq(w, get_compressor("ternary").project(w, {}))
    wd = w.double().reshape(-1)
    best = float((wd**2).sum())  # all zero
    for code in itertools.product((-1.0, 0.0, 1.0), repeat=wd.numel()):
        c = torch.tensor(code, dtype=torch.float64)
        if (c != 0).any():
            a = max(0.0, float(c @ wd) / float(c @ c))
            best = min(best, float(((wd - a * c) ** 2).sum()))
    assert got == pytest.approx(best, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("kind", ["binary", "ternary"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_scaled_sign_levels_and_idempotence(kind, per_channel):
    w = _w(6, 10)
    comp = get_compressor(kind, {"per_channel": per_channel})
    p = comp.project(w, {})
    rows = p if per_channel else p.reshape(1, -1)
    for r in rows:
        a = float(r.abs().max())
        allowed = {-a, a} if kind == "binary" else {-a, 0.0, a}
        assert set(r.tolist()) <= allowed
    assert torch.equal(comp.project(p, {}), p)
    scale, codes = (binarize if kind == "binary" else ternarize)(w, per_channel)
    assert scale.shape == ((6,) if per_channel else (1,)) and codes.shape == (6, 10)


# -- sparse ---------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(small_floats, min_size=1, max_size=8), st.integers(1, 8))
def test_top_k_is_the_l0_projection(values, kappa):
    w = torch.tensor(values, dtype=torch.float32)
    kappa = min(kappa, w.numel())
    p = prune(w, kappa)
    assert int((p != 0).sum()) <= kappa
    assert torch.equal(p[p != 0], w[p != 0])
    got = _sq(w, p)
    for support in itertools.combinations(range(w.numel()), kappa):
        other = torch.zeros_like(w)
        other[list(support)] = w[list(support)]
        assert got <= _sq(w, other) + 1e-9
    assert torch.equal(prune(p, kappa), p)


def test_sparse_keep_nonzeros_and_l1():
    w = _w(10, 10)
    comp = get_compressor("sparse")
    p = comp.project(w, {"keep": 0.13})
    assert int((p != 0).sum()) == nonzeros_for_keep(0.13, 100) == 13
    assert torch.equal(comp.project(w, {"nonzeros": 13}), p)
    assert torch.equal(comp.project(p, {"nonzeros": 13}), p)
    l1 = get_compressor("sparse", {"penalty": "l1"})
    s = l1.project(w, {"alpha": 0.5})
    _close(s, torch.sign(w) * (w.abs() - 0.5).clamp_min(0))
    assert torch.equal(soft_threshold(w, 0.5), s)
    assert l1_nonzeros(w, 0.5) == int((s != 0).sum())
    # soft thresholding is the prox: it beats nearby points on a|x|_1 + 1/2 |w - x|^2
    def objective(x):
        return 0.5 * float(x.abs().sum()) + 0.5 * _sq(w, x)

    for _ in range(20):
        assert objective(s) <= objective(s + 0.01 * torch.randn_like(s)) + 1e-9


# -- costs ----------------------------------------------------------------------------------------
def test_costs_count_what_is_stored():
    w = _w(30, 40)
    t = _target(w, positions=5)
    n = 30 * 40
    assert get_compressor("quant").cost(t, {"bits": 3}) == tensorslim.Cost(
        n + 8, n * 3 + 8 * 32, 2 * 5 * n
    )
    per = get_compressor("quant", {"per_channel": True}).cost(t, {"bits": 2})
    assert per.bits == n * 2 + 30 * 4 * 32 and per.params == n + 30 * 4
    assert get_compressor("binary").cost(t, {}).bits == n + 32
    assert get_compressor("ternary").cost(t, {}).bits == 2 * n + 32
    sp = get_compressor("sparse").cost(t, {"nonzeros": 100})
    assert sp == tensorslim.Cost(100, 100 * (32 + index_bits(n)), 2 * 5 * 100)
    assert index_bits(n) == math.ceil(math.log2(n))
    # grids: rising, every entry cheaper than dense in bits (quant) or parameters (sparse)
    dense = dense_cost(t)
    for kind in ("quant", "binary", "ternary"):
        costs = [get_compressor(kind).cost(t, p).bits for p in get_compressor(kind).grid(t)]
        assert costs == sorted(costs) and all(c < dense.bits for c in costs)
    grid = get_compressor("sparse").grid(t)
    costs = [get_compressor("sparse").cost(t, p).params for p in grid]
    assert costs == sorted(set(costs)) and costs[-1] < dense.params


def test_proposals_errors_match_projections():
    w = _w(10, 12)
    t = _target(w)
    for kind in ("quant", "binary", "ternary", "sparse"):
        comp = get_compressor(kind)
        props = comp.proposals(t)
        assert props
        for prop in props[:4]:
            p = comp.project(w, prop.component.params)
            assert prop.error == pytest.approx(_sq(w, p) / _sq(w, torch.zeros_like(w)), rel=1e-6)
    errors = [p.error for p in get_compressor("quant").proposals(t)]
    assert errors == sorted(errors, reverse=True)  # more bits, less error


def test_stored_buffers_match_plan_bits():
    lin = nn.Linear(37, 29)
    site = LayerSite("fc")
    for spec in ([{"kind": "quant", "bits": 3}], [{"kind": "ternary"}],
                 [{"kind": "sparse", "nonzeros": 101}]):
        sp = parse_spec(spec)
        new, _ = build_layer(lin, handler_for(lin), sp, site)
        stored = sum(t.numel() * t.element_size() * 8 for t in new.state_dict().values())
        want = spec_cost(lin, handler_for(lin), sp, site).bits
        assert want <= stored < want + 8  # the packed stream rounds up to a whole byte


# -- modules --------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 32), st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=50))
def test_pack_unpack_round_trip(width, raw):
    codes = torch.tensor([v % (1 << width) for v in raw], dtype=torch.int64)
    packed = pack_bits(codes, width)
    assert packed.dtype == torch.uint8 and packed.numel() == (codes.numel() * width + 7) // 8
    assert torch.equal(unpack_bits(packed, width, codes.numel()), codes)


def test_pack_refuses_out_of_range_codes():
    with pytest.raises(ValueError, match="codes must be in"):
        pack_bits(torch.tensor([4]), 2)


@pytest.mark.parametrize("kind,params", KINDS)
@pytest.mark.parametrize("layer", ["linear", "conv2d", "conv1d"])
def test_built_layer_equals_dense_layer_with_projected_weight(kind, params, layer):
    if layer == "linear":
        mod, x = nn.Linear(20, 12), torch.randn(3, 5, 20)
        fn = nn.functional.linear
    elif layer == "conv2d":
        mod, x = nn.Conv2d(3, 8, 3, padding=1, stride=2), torch.randn(2, 3, 9, 9)
        fn = None
    else:
        mod, x = nn.Conv1d(4, 6, 5, dilation=2), torch.randn(2, 4, 20)
        fn = None
    spec = parse_spec([{"kind": kind, **params}])
    new, _ = build_layer(mod, handler_for(mod), spec, LayerSite("l"))
    projected = get_compressor(kind).project(mod.weight.detach(), params)
    ref = type(mod)(*_ctor(mod)) if fn is None else None
    with torch.no_grad():
        if fn is not None:
            want = fn(x, projected, mod.bias)
        else:
            ref.load_state_dict({"weight": projected, "bias": mod.bias.detach()})
            want = ref(x)
        _close(new(x), want, rtol=1e-5, atol=1e-5)
    _close(
        new.dense_weight().reshape(projected.shape), projected, rtol=0, atol=0
    )


def _ctor(conv: nn.Module) -> tuple:
    return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation)


def test_sparse_forward_paths_agree():
    w = _w(16, 24)
    for kappa in (10, int(DENSE_ABOVE * 16 * 24) + 20):  # gather/index_add, then dense
        pos, _ = torch.sort(torch.randperm(16 * 24)[:kappa])
        op = SparseOp.from_entries((16, 24), pos, w.reshape(-1)[pos])
        x = torch.randn(7, 24)
        with torch.no_grad():
            _close(op(x), x @ op.dense_weight().T, rtol=1e-5, atol=1e-5)
        assert int((op.dense_weight() != 0).sum()) <= kappa


def test_empty_modules_have_the_loaded_shapes():
    w = _w(9, 13)
    t = _target(w)
    for kind, params in KINDS + [("quant", {"bits": 8})]:
        comp = get_compressor(kind, {"per_channel": True} if kind != "sparse" else None)
        built, _ = comp.build(t, params)
        empty = comp.empty(MatrixTarget("fc", "", (9, 13)), params)
        got = {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()}
        assert got == {k: (v.shape, v.dtype) for k, v in built.state_dict().items()}
        empty.load_state_dict(built.state_dict())
        assert torch.equal(empty.dense_weight(), built.dense_weight())
    assert isinstance(get_compressor("quant").empty(t, {"bits": 2}), QuantizedOp)
    assert isinstance(get_compressor("ternary").empty(t, {}), ScaledSignOp)


def test_parts_already_in_the_set_are_built_exactly():
    """What the LC algorithm needs: a weight already of the form builds to itself."""
    w = _w(12, 15)
    for kind, params in KINDS:
        comp = get_compressor(kind)
        part = comp.project(w, params)
        op, _ = comp.build(_target(part), params)
        assert torch.equal(op.dense_weight(), part)


# -- whole models: compress, save/load, ONNX ------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.out(torch.relu(self.mid(torch.relu(self.fc(h)))))


# every kind in one model, and a sum of three components
SPECS = {
    "conv": [{"kind": "quant", "bits": 3}],
    "fc": [{"kind": "lowrank", "rank": 2}, {"kind": "sparse", "nonzeros": 7},
           {"kind": "quant", "bits": 2}],
    "mid": [{"kind": "binary"}],
    "out": [{"kind": "ternary"}, {"kind": "sparse", "keep": 0.1}],
}


def test_save_load_round_trip_and_onnx(tmp_path):
    import onnxruntime as ort

    model, x = _Net().eval(), torch.randn(2, 3, 6, 6)
    _, plan = tensorslim.compress(model, 0.5, method="sparse")
    d = plan.to_dict()
    for lp in d["layers"]:
        lp["spec"] = SPECS[lp["name"]]
        lp.pop("method", None)
        lp.pop("rank", None)
    plan = Plan.from_dict(d)
    small = tensorslim.apply_plan(model, plan).eval()
    tensorslim.save(small, plan, tmp_path / "out")
    torch.manual_seed(7)
    restored = tensorslim.load(_Net(), tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(restored(x), small(x))
    path = tensorslim.export_onnx(small, x, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(5, 3, 6, 6)
    got = sess.run(None, {sess.get_inputs()[0].name: x2.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, small(x2).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,cost", [("quant", "bits"), ("ternary", "bits"),
                                         ("sparse", "bits"), ("sparse", "params")])
def test_compress_to_a_budget(method, cost):
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 8))
    keep = 0.3 if method != "ternary" else 0.2
    small, plan = tensorslim.compress(model, keep, method=method, cost=cost)
    assert plan.achieved_keep <= keep + 1e-9
    for lp in plan.layers:
        assert lp.spec and lp.spec[0]["kind"] == method
        module = small.get_submodule(lp.name)
        spec = parse_spec(lp.spec)
        w = get_compressor(method).project(model.get_submodule(lp.name).weight.detach(),
                                           spec[0].params)
        assert torch.equal(module.dense_weight(), w)
    assert "bits/w" in str(plan) and "vs f32" in str(plan)


def test_quant_on_recurrent_and_attention_matrices(tmp_path):
    class R(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(6, 8, batch_first=True)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            y, _ = self.gru(x)
            return self.att(y, y, y)[0]

    model, x = R().eval(), torch.randn(2, 4, 6)
    small, plan = tensorslim.compress(model, 0.3, method="quant", cost="bits", example_input=x)
    assert all(lp.spec for lp in plan.layers)
    tensorslim.save(small, plan, tmp_path / "out")
    restored = tensorslim.load(R(), tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(restored(x), small(x))


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,params,options,match",
    [
        ("quant", {"bits": 0}, None, r"bits must be an integer in \[1, 8\]"),
        ("quant", {"bits": 9}, None, r"bits must be an integer in \[1, 8\]"),
        ("quant", {"bits": 2.5}, None, r"bits must be an integer"),
        ("quant", {"bits": True}, None, r"bits must be an integer"),
        ("quant", {"rank": 2}, None, "unknown parameter 'rank'"),
        ("binary", {"bits": 2}, None, "bits must be 1"),
        ("ternary", {"bits": 1}, None, "bits must be 2"),
        ("sparse", {"keep": 0}, None, r"keep must be a number in \(0, 1\]"),
        ("sparse", {"keep": 1.5}, None, r"keep must be a number in \(0, 1\]"),
        ("sparse", {"keep": float("nan")}, None, r"keep must be a number in \(0, 1\]"),
        ("sparse", {"nonzeros": 0}, None, r"nonzeros must be an integer in \[1, 20\]"),
        ("sparse", {"keep": 0.5, "nonzeros": 3}, None, "give one of keep"),
        ("sparse", {}, None, "give one of keep"),
        ("sparse", {"alpha": 0.1}, None, "penalty='l1'"),
        ("sparse", {"alpha": -1.0}, {"penalty": "l1"}, "alpha must be a finite number >= 0"),
    ],
)
def test_bad_params_are_refused(kind, params, options, match):
    comp = get_compressor(kind, options)
    t = _target(_w(4, 5))
    assert comp.check(t, params) is not None
    assert re.search(match, comp.check(t, params))
    with pytest.raises(TensorSlimError, match=match):
        comp.project(t.weight, params)


def test_bad_options_and_l1_build_are_refused():
    with pytest.raises(TensorSlimError, match="per_channel"):
        get_compressor("quant", {"per_channel": "yes"})
    with pytest.raises(TensorSlimError, match="penalty"):
        get_compressor("sparse", {"penalty": "l2"})
    l1 = get_compressor("sparse", {"penalty": "l1"})
    with pytest.raises(TensorSlimError, match="projection only"):
        l1.build(_target(_w()), {"alpha": 0.1})
    assert l1.grid(_target(_w())) == [] and "penalty 'l1'" in l1.too_small(_target(_w()))


@pytest.mark.parametrize("kind,params", KINDS)
def test_nan_weights_are_refused(kind, params):
    w = _w()
    w[1, 2] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="NaN"):
        get_compressor(kind).project(w, params)
    with pytest.raises(TensorSlimError, match="NaN"):
        get_compressor(kind).build(_target(w), params)


def test_quant_cannot_meet_a_params_budget():
    """Quantization keeps every weight (as a code): it lowers bits, never parameters."""
    model = nn.Sequential(nn.Linear(8, 12))
    with pytest.warns(UserWarning, match="over budget"):
        _, plan = tensorslim.compress(model, 0.5, method="quant", cost="params")
    assert not plan.layers[0].spec


def test_model_params_count_stored_numbers_not_module_parameters():
    """The plan's model totals count a quantized layer as the plan does (codes + codebook), not
    by its modules' nn.Parameters (only the codebook is one)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    small, plan = tensorslim.compress(model, 0.5, method="quant", cost="bits")
    compressed = [lp for lp in plan.layers if lp.components]
    assert compressed
    rest = sum(p.numel() for lp in plan.layers if not lp.components for p in model.get_submodule(lp.name).parameters())
    assert plan.model_params_after == rest + sum(lp.params_after for lp in compressed)
    assert plan.model_params_after > sum(p.numel() for p in small.parameters())
