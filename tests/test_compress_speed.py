"""compress on a long-kernel 1-D CNN (a scaled-down benchmarks/compress_speed.py model): large
kernels take decompose.large's paths. Proposals run no CP-ALS (the CP curve is the sliced CP's,
in closed form), each chosen layer is decomposed once by the real algorithm, and the errors the
plan reports are those of the built modules."""

import math

import pytest
import torch
from torch import nn

import tensorslim.decompose.large as large
import tensorslim.decompose.tensor as dt
import tensorslim.search.latency as lat
from tensorslim import compress
from tensorslim.compressors import _tensor
from tensorslim.compressors import cp as cp_mod
from tensorslim.compressors.tucker2 import hosvd_energy
from tensorslim.core import LayerSite, LayerTarget, get_compressor, handler_for
from tensorslim.core.surgery import get_submodule
from tensorslim.decompose import singular_values
from tensorslim.search import auto


class LongKernel(nn.Module):
    """Conv1d 1 -> 8 -> 64 -> 128, 32 taps: the last kernel (128 x 64 x 32 = 2^18 entries) is
    large for every tensor method, the others are not."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(a, b, 32, padding=16) for a, b in ((1, 8), (8, 64), (64, 128))
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        for conv in self.convs:
            x = nn.functional.max_pool1d(torch.relu(conv(x)), 4)
        return self.head(x.mean(-1))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return LongKernel().eval()


@pytest.fixture
def calls(monkeypatch):
    """The kernel sizes (entries) each full decomposition ran on: TensorLy CP-ALS (the exact
    path), the fast path's CP-ALS, TensorLy HOOI and TT-SVD."""
    sizes = {"cp_exact": [], "cp_als": [], "partial_tucker": [], "tensor_train": []}

    def recording(name, fn):
        def wrapped(tensor, *args, **kwargs):
            sizes[name].append(tensor.numel())
            return fn(tensor, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(cp_mod, "cp", recording("cp_exact", cp_mod.cp))
    monkeypatch.setattr(large, "cp_als", recording("cp_als", large.cp_als))
    monkeypatch.setattr(dt, "partial_tucker", recording("partial_tucker", dt.partial_tucker))
    monkeypatch.setattr(dt, "tensor_train", recording("tensor_train", dt.tensor_train))
    _tensor.clear_cache()
    yield sizes
    _tensor.clear_cache()


def _target(conv):
    return LayerTarget("c", conv, LayerSite("c", None, None), handler_for(conv))


def test_the_last_kernel_takes_the_fast_paths(net):
    shapes = [tuple(c.weight.shape) for c in net.convs]
    for kind in ("cp", "tucker2", "tt"):
        comp = get_compressor(kind)
        assert [comp.fast(s) for s in shapes] == [False, False, True], kind


def test_auto_proposals_run_no_decomposition_on_a_large_kernel(net, calls):
    """K = 0 full CP-ALS runs (and no HOOI or TT-SVD) for the proposals of a large kernel; a small
    kernel keeps the exact path: one CP-ALS per CP grid rank, as before."""
    big, small = net.convs[2], net.convs[1]
    props = auto.auto_proposals(big, handler_for(big), LayerSite("c", None, None))
    assert props and {p.component.kind for p in props} <= set(auto.AUTO_KINDS)
    assert calls == {"cp_exact": [], "cp_als": [], "partial_tucker": [], "tensor_train": []}
    auto.auto_proposals(small, handler_for(small), LayerSite("c", None, None))
    n_cp = len(get_compressor("cp").grid(_target(small)))
    assert len(calls["cp_exact"]) == n_cp and calls["cp_als"] == []


@pytest.mark.parametrize("method", ["cp", "auto"])
def test_compress_decomposes_each_chosen_large_layer_once_and_reports_real_errors(
    net, calls, method, monkeypatch
):
    # latency is not the subject here: a fixed fake keeps the test fast
    monkeypatch.setattr(lat, "spec_latency", lambda *a, **k: 0.5)
    monkeypatch.setattr(lat, "dense_latency", lambda *a, **k: 1.0)
    x = torch.randn(2, 1, 512, generator=torch.Generator().manual_seed(0))
    small, plan = compress(net, 0.5, method=method, example_input=x)
    chosen = {lp.name: lp for lp in plan.factorized_layers}
    assert chosen and 0.4 <= plan.achieved_keep <= 0.5 + 1e-9
    big = chosen.get("convs.2")
    # on the large kernel: CP-ALS once, at the chosen rank, in the build; no TensorLy run
    n = net.convs[2].weight.numel()
    assert calls["cp_als"] == ([n] if big is not None and big.method == "cp" else [])
    for name in ("cp_exact", "partial_tucker", "tensor_train"):
        assert n not in calls[name], name
    for name, lp in chosen.items():
        w = get_submodule(net, name).weight.detach().double()
        built = get_submodule(small, name)
        w_hat = (built.dense_weight() if hasattr(built, "dense_weight") else None)
        if w_hat is None:  # a LowRank conv: the product of its factors
            w_hat = built.dense_matrices()[""] if hasattr(built, "dense_matrices") else None
        if w_hat is None:
            continue
        direct = float((w - w_hat.detach().double().reshape(w.shape)).norm() / w.norm())
        assert lp.rel_error == pytest.approx(direct, abs=1e-5), name
        if "kernel_rel_error" in lp.extra:
            assert lp.extra["kernel_rel_error"] == pytest.approx(lp.rel_error, abs=1e-5)
    if big is not None and big.method == "cp":
        # the proposal (sliced CP, no ALS) bounds the built CP-ALS error from above
        comp = get_compressor("cp")
        proxy = comp.weight_error(net.convs[2].weight, big.rank)
        assert big.rel_error**2 <= proxy + 1e-6
        assert big.extra["init"] == "sliced"
        assert 1 <= big.extra["iterations"] <= big.extra["max_sweeps"]
        assert big.rel_error <= big.extra["start_rel_error"] + 1e-6


def test_large_paths_give_the_exact_paths_errors(net):
    conv = net.convs[2]
    k = conv.weight.detach()
    target = _target(conv)
    # Tucker-2: HOSVD energies from the Grams = from the SVDs
    tucker = get_compressor("tucker2")
    grid = tucker.grid(target)
    cum = hosvd_energy(k)
    exact = [max(0.0, 1 - float(cum[r[0] - 1, r[1] - 1])) for r in (p["rank"] for p in grid)]
    assert tucker.errors(target, grid, "weight") == pytest.approx(exact, abs=1e-6)
    # TT: nested errors = TensorLy's TT-SVD at every rank, and the built layer's error
    tt = get_compressor("tt")
    props = tt.proposals(target)
    for p in props[::4]:
        ref = dt.tt(k, tuple(p.component["rank"]))
        assert p.error == pytest.approx(ref.rel_error**2, abs=1e-5)
        _, facts = tt.build(target, p.component.params)
        assert facts["kernel_rel_error"] ** 2 == pytest.approx(p.error, abs=1e-5)
    # CP: the sliced CP's closed-form error is the error of its factors
    sliced = get_compressor("cp").sliced(k)
    for r in (5, 60, 400):
        factors = sliced.factors(r)
        assert large.cp_rel_error(k, factors) ** 2 == pytest.approx(sliced.errors(r), abs=1e-5)
    # singular values of a large matrix, QR-first
    m = torch.randn(256, 2048, generator=torch.Generator().manual_seed(1))
    ref = torch.linalg.svdvals(m.double())
    assert torch.allclose(singular_values(m), ref, rtol=1e-9, atol=1e-9)


def test_auto_times_only_the_pareto_front(net, monkeypatch):
    conv = net.convs[2]
    h = handler_for(conv)
    timed = []

    def fake(module, handler, spec, site, min_run_time=0.0):
        timed.append(spec[0])
        return 0.5

    monkeypatch.setattr(lat, "spec_latency", fake)
    monkeypatch.setattr(lat, "dense_latency", lambda module, shape, min_run_time=0.0: 1.0)
    site = LayerSite("c", (2, 64, 33), (2, 128, 34))
    free = auto.auto_proposals(conv, h, LayerSite("c", None, None), latency_guard=False)
    guarded = auto.auto_proposals(conv, h, site)
    # every timed proposal is faster than dense here: the same front (with FLOPs now known)
    assert [(p.component, p.error) for p in guarded] == [(p.component, p.error) for p in free]
    front = [p.component for p in free]
    assert timed and all(c in front for c in timed)
    # binary search per kind: a few timings, not one per proposal
    kinds = {c.kind for c in front}
    assert len(timed) <= sum(math.ceil(math.log2(len(front) + 1)) + 1 for _ in kinds)
