"""Defect 7: float16, bfloat16 and float64 models with every method, with an example input and with
cost="latency".

Every case asserts: the compressed model keeps the input model's dtype (every parameter) and
device, its output is finite and close to the dense output within a dtype-appropriate tolerance
(the tiny CNN's kernels have exact low rank in every format, so the decomposition error is at
rounding level and what remains is the dtype's precision), and the input model is unchanged
(weights, dtypes, training flag). Where a dtype truly cannot hold a layer's factors, compress
refuses with an UnsupportedLayerError naming the layer and the dtype.

Latency timings run on one thread with a short timer (`quick_timer`): the dtype handling (a real
forward of every timed structure in the model's dtype) is what is tested, not speed; one case uses
the real timer.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch import nn

from tensorslim import compress
from tensorslim.compressors import _tensor
from tensorslim.compressors._factors import refuse_overflow
from tensorslim.core import LayerSite, LayerTarget, MatrixTarget, get_compressor, handler_for
from tensorslim.decompose import tensor as T
from tensorslim.decompose import truncated_svd
from tensorslim.errors import UnsupportedLayerError
from tensorslim.layers import LowRankLinear
from tensorslim.layers import tensor_conv as tc
from tensorslim.search import latency as lc
from tests.bad_inputs.conftest import assert_same_state, expect_error, state_of

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
METHODS = ["svd", "cp", "tucker2", "tt", "spatial_svd", "auto"]
# relative L2 distance of compressed and dense outputs (same dtype, same input)
TOL = {torch.float64: 1e-5, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TinyCNN(nn.Module):
    """2 convs + linear on 3 x 8 x 8 inputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def tiny_cnn(dtype: torch.dtype, peak: float | None = None) -> TinyCNN:
    """Kernels of CP rank 1 (so also of Tucker-2, TT, spatial and matrix rank 1) and a rank-1
    linear layer: every option of every method is exact up to rounding, whichever the allocator
    picks (cost="latency" may pick the smallest)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = TinyCNN()
    with torch.no_grad():
        for conv in (m.conv1, m.conv2):
            factors = [torch.randn(n, 1, generator=g) for n in conv.weight.shape]
            k = T.cp_reconstruct(factors)
            conv.weight.copy_(k * (0.3 if peak is None else peak / k.abs().max()))
        w = torch.randn(10, 1, generator=g) @ torch.randn(1, 512, generator=g)
        m.fc.weight.copy_(w * (0.05 if peak is None else peak / w.abs().max()))
    return m.to(dtype)


def example(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)


def quick_time_call(fn, min_run_time: float = 0.0) -> float:
    """Milliseconds per call of `fn`, from 3 calls (a real forward in the timed dtype)."""
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def quick_timer(monkeypatch):
    monkeypatch.setattr(lc, "time_call", quick_time_call)
    lc.clear_cache()
    yield
    lc.clear_cache()


def check_compressed(model, small, x, dtype, state, training=True):
    """The contract of a successful compress on a model of `dtype` (made in training mode)."""
    assert_same_state(model, state)
    assert all(m.training == training for m in model.modules())
    assert all(p.dtype == dtype for p in small.parameters()), {
        n: p.dtype for n, p in small.named_parameters()
    }
    assert all(p.device == x.device for p in small.parameters())
    small.eval()
    model.eval()
    with torch.no_grad():
        y, y0 = small(x), model(x)
    assert y.dtype == dtype and y.shape == y0.shape
    assert torch.isfinite(y).all()
    rel = float((y.double() - y0.double()).norm() / y0.double().norm())
    assert rel <= TOL[dtype], f"relative output error {rel:.2e} > {TOL[dtype]:.0e} in {dtype}"


def _compress(model, keep, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # over-budget warnings of tiny layers
        return compress(model, keep, **kw)


# -- every method x dtype, with an example input ---------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("method", METHODS)
def test_method_keeps_the_dtype_with_an_example_input(method, dtype, quick_timer):
    model, x = tiny_cnn(dtype), example(dtype)
    state = state_of(model)
    include = None if method == "svd" else ["conv*"]
    small, plan = _compress(model, 0.6, method=method, example_input=x, include=include)
    check_compressed(model, small, x, dtype, state)
    factorized = [lp for lp in plan.layers if lp.factorized]
    assert factorized, [(lp.name, lp.reason) for lp in plan.layers]
    for lp in factorized:
        assert lp.rel_error is not None and lp.rel_error < 0.05, (lp.name, lp.rel_error)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("method", METHODS)
def test_latency_cost_times_in_the_model_dtype(method, dtype, quick_timer):
    model, x = tiny_cnn(dtype), example(dtype)
    state = state_of(model)
    small, plan = _compress(model, 0.6, method=method, example_input=x, cost="latency")
    # the input model's layers are timed in place: their training flags must be restored
    check_compressed(model, small, x, dtype, state)
    for lp in plan.layers:
        if lp.factorized:
            assert lp.extra["latency_dtype"] == _name(dtype), lp.extra
            assert "latency_dtype_note" not in lp.extra
            assert lp.extra["latency_ms"] > 0 and lp.extra["dense_latency_ms"] > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_name)
def test_latency_falls_back_to_float32_where_the_cpu_has_no_half_kernel(dtype, monkeypatch):
    real = lc._time_in

    def no_half(layer, input_shape, timed_dtype, min_run_time):
        """A CPU without `dtype` kernels; in float32 the real forward runs, and the latency is
        taken as the parameter count (so the factorizations are faster and get chosen)."""
        if timed_dtype == dtype:
            raise RuntimeError(f'"slow_conv2d_cpu" not implemented for {_name(dtype)!r}')
        real(layer, input_shape, timed_dtype, min_run_time)
        return sum(p.numel() for p in layer.parameters()) * 1e-3

    monkeypatch.setattr(lc, "_time_in", no_half)
    monkeypatch.setattr(lc, "time_call", quick_time_call)
    lc.clear_cache()
    try:
        model, x = tiny_cnn(dtype), example(dtype)
        state = state_of(model)
        small, plan = _compress(model, 0.6, method="tucker2", example_input=x, cost="latency")
    finally:
        lc.clear_cache()
    check_compressed(model, small, x, dtype, state)
    timed = [lp for lp in plan.layers if lp.factorized]
    assert timed
    for lp in timed:
        assert lp.extra["latency_dtype"] == "float32"
        assert _name(dtype) in lp.extra["latency_dtype_note"]


def test_auto_with_the_real_timer_in_float16():
    lc.clear_cache()
    model, x = tiny_cnn(torch.float16), example(torch.float16)
    state = state_of(model)
    small, plan = _compress(model, 0.6, method="auto", example_input=x, include=["conv*"])
    check_compressed(model, small, x, torch.float16, state)


# -- other layer types ---------------------------------------------------------------------------


class Mixed(nn.Module):
    """Embedding, attention, LSTM, GRU, Conv1d and Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.out = nn.Linear(16, 20)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h, _ = self.lstm(h)
        h, _ = self.gru(h)
        h = torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.out(h)


@pytest.mark.parametrize("cost", ["params", "latency"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_attention_rnn_conv1d_and_linear_keep_the_dtype(dtype, cost, quick_timer):
    torch.manual_seed(0)
    model = Mixed().to(dtype).eval()
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    state = state_of(model)
    small, plan = _compress(
        model, 0.5, method="svd", example_input=ids, cost=cost, allocator="uniform"
    )
    assert_same_state(model, state)
    assert all(p.dtype == dtype for p in small.parameters())
    with torch.no_grad():
        y = small.eval()(ids)
    assert y.dtype == dtype and torch.isfinite(y).all()
    if cost == "params":  # the uniform allocator factorizes every supported layer type
        done = {lp.name for lp in plan.layers if lp.factorized}
        assert {"attn", "lstm", "gru", "conv", "out"} <= done, plan.layers


@pytest.mark.parametrize("method", ["cp", "tt", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=_name)
def test_conv1d_tensor_methods_keep_the_dtype(method, dtype, quick_timer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 16, 3)).to(dtype)
    x = torch.randn(2, 4, 20, generator=torch.Generator().manual_seed(0)).to(dtype)
    state = state_of(model)
    small, _ = _compress(model, 0.5, method=method, example_input=x)
    assert_same_state(model, state)
    assert all(p.dtype == dtype for p in small.parameters())
    assert torch.isfinite(small(x)).all()


# -- range: float16 holds at most 65504 ------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_large_float16_weights_are_rescaled_to_fit(method, quick_timer):
    """Folding the singular values (or a Tucker core, a CP scale) into one factor overflows float16
    for large weights; the factors are rescaled by scalars (same product) so they fit."""
    model, x = tiny_cnn(torch.float16, peak=30000.0), example(torch.float16)
    state = state_of(model)
    small, plan = _compress(model, 0.6, method=method, example_input=x)
    assert_same_state(model, state)
    for name, p in small.named_parameters():
        assert torch.isfinite(p).all(), name
    for lp in plan.layers:
        if lp.factorized:
            assert lp.rel_error < 0.05, (lp.name, lp.rel_error)


def test_svd_factors_of_a_large_float16_matrix_fit():
    w = torch.full((16, 64), 30000.0, dtype=torch.float16)
    a, b = truncated_svd(w, 1)
    assert a.dtype == b.dtype == torch.float16
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.allclose((a.float() @ b.float()), w.float(), rtol=1e-2)


def test_factors_that_cannot_fit_are_refused_with_the_layer_and_dtype(monkeypatch, quick_timer):
    """Without the rescaling, the Tucker-2 core of these float16 kernels overflows: compress refuses
    with the layer and dtype named and the input model is unchanged."""
    monkeypatch.setattr(tc, "fit_range", lambda layer, dtype: None)
    model, x = tiny_cnn(torch.float16, peak=30000.0), example(torch.float16)
    state = state_of(model)
    with expect_error("conv", "float16", "tucker2", "65504", error=UnsupportedLayerError):
        _compress(model, 0.6, method="tucker2", example_input=x, include=["conv*"])
    assert_same_state(model, state)


def test_refuse_overflow_names_the_layer_and_dtype():
    layer = LowRankLinear(4, 3, 2, bias=False, dtype=torch.float16)
    with torch.no_grad():
        layer.second.weight.fill_(float("inf"))
    target = MatrixTarget("blocks.0.fc", "", (3, 4), dtype=torch.float16)
    with expect_error(
        "'blocks.0.fc'",
        "float16",
        "'svd'",
        "rank 2",
        "second.weight",
        "float32 copy",
        error=UnsupportedLayerError,
    ):
        refuse_overflow(layer, target, "svd", 2)
    ok = LowRankLinear(4, 3, 2, bias=False, dtype=torch.float16)
    nn.init.zeros_(ok.first.weight)
    assert refuse_overflow(ok, MatrixTarget("x", "", (3, 4), dtype=torch.float16), "svd", 2) is ok


def test_refuse_overflow_names_the_matrix_of_a_layer_with_several():
    layer = LowRankLinear(16, 64, 2, bias=False, dtype=torch.float16)
    with torch.no_grad():
        layer.first.weight.fill_(float("inf"))
    target = MatrixTarget("rnn", "weight_hh_l0", (64, 16), dtype=torch.float16)
    with expect_error("'rnn'", "'weight_hh_l0'", "float16", error=UnsupportedLayerError):
        refuse_overflow(layer, target, "svd", 2)


def test_refuse_overflow_of_a_tensor_method_names_the_layer_type_and_dtype():
    conv = nn.Conv2d(3, 8, 3).half()
    new = tc.TENSOR_CONVS["tucker2"].empty_like(conv, (2, 2))
    with torch.no_grad():
        next(new.parameters()).fill_(float("inf"))
    target = LayerTarget("features.0", conv, LayerSite("features.0"), handler_for(conv))
    with expect_error(
        "'features.0'",
        "Conv2d",
        "float16",
        "'tucker2'",
        "float32 copy",
        error=UnsupportedLayerError,
    ):
        _tensor.refuse_overflow(new, target, "tucker2", (2, 2))


# -- decompositions run in float32 / float64 and come back in the kernel's compute dtype -----------


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("method", ["cp", "tucker2", "tt", "spatial_svd"])
def test_decompositions_compute_in_float32_or_float64(method, dtype):
    g = torch.Generator().manual_seed(0)
    k = T.cp_reconstruct([torch.randn(n, 2, generator=g) for n in (6, 5, 3, 3)]).to(dtype)
    rank = {"cp": 2, "tucker2": (2, 2), "tt": (2, 2, 2), "spatial_svd": 2}[method]
    dec = tc.TENSOR_CONVS[method].decompose(k, rank)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(f.dtype == want for f in dec.factors)
    # bfloat16 / float16 rounding of the kernel breaks its exact rank; CP-ALS stops at tol 1e-5
    tol = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}
    assert dec.rel_error < tol[dtype]


def test_decomposition_cache_keeps_float32_and_float64_apart(quick_timer):
    """The same values in float32 and float64 are decomposed separately (cache keyed by dtype)."""
    conv64 = nn.Conv2d(8, 8, 3).double()
    conv32 = nn.Conv2d(8, 8, 3)
    with torch.no_grad():
        conv32.weight.copy_(conv64.weight.float())
        conv64.weight.copy_(conv32.weight.double())
    _tensor.clear_cache()
    f = get_compressor("tt")
    d32, d64 = f.decompose(conv32.weight, (4, 8, 4)), f.decompose(conv64.weight, (4, 8, 4))
    assert d32.factors[0].dtype == torch.float32 and d64.factors[0].dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=_name)
@pytest.mark.parametrize("method", ["svd", "cp", "tucker2", "auto"])
def test_cuda_models_keep_device_and_dtype(method, dtype, quick_timer):
    model, x = tiny_cnn(dtype).cuda(), example(dtype).cuda()
    state = state_of(model)
    small, plan = _compress(model, 0.6, method=method, example_input=x, cost="latency")
    check_compressed(model, small, x, dtype, state)
