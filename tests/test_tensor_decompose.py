"""CP, Tucker-2, TT and spatial SVD of conv kernels: exactness, error facts, rank <-> keep."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorslim.decompose import tensor as T

SHAPES = [(12, 7, 3, 3), (5, 9, 3, 2), (8, 6, 5)]


def kernel(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES)
def test_tucker2_exact_at_full_rank(shape):
    k = kernel(shape)
    for algorithm in ("hosvd", "hooi"):
        dec = T.tucker2(k, T.tucker2_full_ranks(shape), algorithm=algorithm)
        assert dec.rel_error < 1e-5
        assert torch.allclose(T.tucker2_reconstruct(*dec.factors), k, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_tt_exact_at_full_rank(shape):
    k = kernel(shape)
    dec = T.tt(k, T.tt_full_ranks(shape))
    assert dec.rel_error < 1e-5
    assert [tuple(c.shape) for c in dec.factors][0] == (1, shape[1], dec.rank[0])
    assert dec.factors[-1].shape == (dec.rank[-1], shape[0], 1)


def test_spatial_svd_exact_at_full_rank_and_errors_match_eckart_young():
    shape = (6, 4, 3, 5)
    k = kernel(shape)
    full = min(4 * 3, 6 * 5)
    assert T.spatial_svd(k, full).rel_error < 1e-5
    errors = T.spatial_svd_errors(k)
    for r in (1, 3, 7):
        assert T.spatial_svd(k, r).rel_error ** 2 == pytest.approx(float(errors[r]), rel=1e-4)


@pytest.mark.parametrize("shape", [(10, 8, 3, 3), (9, 4, 5)])
def test_cp_recovers_a_tensor_of_exact_cp_rank(shape):
    g = torch.Generator().manual_seed(1)
    factors = [torch.randn(n, 4, generator=g) for n in shape]
    k = T.cp_reconstruct(factors)
    # ALS finds a local minimum: from the SVD start, and for the best of three random starts, the
    # exact rank is recovered to float32 ALS tolerance.
    dec = T.cp(k, 4, n_iter_max=500, tol=1e-10, init="svd")
    assert dec.rel_error < 5e-3
    best = min(
        (T.cp(k, 4, n_iter_max=500, tol=1e-10, seed=s) for s in range(3)), key=lambda d: d.rel_error
    )
    assert best.rel_error < 5e-3
    assert best.iterations <= 500
    assert [f.shape for f in best.factors] == [(n, 4) for n in shape]


def test_cp_is_seeded_and_records_convergence():
    k = kernel((8, 6, 3, 3))
    a = T.cp(k, 5, n_iter_max=30, seed=3)
    b = T.cp(k, 5, n_iter_max=30, seed=3)
    assert a.rel_error == b.rel_error
    assert a.summary()["iterations"] == a.iterations <= 30
    assert isinstance(a.summary()["converged"], bool)


def test_cp_stays_finite_at_the_largest_useful_rank():
    shape = (16, 8, 3, 3)
    r = T.cp_rank_for_keep(shape, 0.99)
    dec = T.cp(kernel(shape), r)
    assert math.isfinite(dec.rel_error) and dec.rel_error < 0.5


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from([(6, 5, 3, 3), (4, 7, 2), (9, 3, 1, 5)]),
    rank=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    log_scales=st.lists(st.floats(-6, 6), min_size=4, max_size=4),
)
def test_balance_cp_keeps_the_tensor_and_equalises_entry_rms(shape, rank, seed, log_scales):
    g = torch.Generator().manual_seed(seed)
    factors = [
        torch.randn(n, rank, generator=g, dtype=torch.float64) * 10.0**s
        for n, s in zip(shape, log_scales)
    ]
    balanced = T.balance_cp(factors)
    ref = T.cp_reconstruct(factors)
    assert torch.allclose(T.cp_reconstruct(balanced), ref, rtol=1e-9, atol=1e-12 * ref.abs().max())
    rms = torch.stack([f.pow(2).mean(dim=0).sqrt() for f in balanced])
    assert torch.allclose(rms, rms[:1].expand_as(rms), rtol=1e-9)


def test_cp_factors_come_out_balanced():
    dec = T.cp(kernel((16, 8, 3, 3)) * 0.01, 6, n_iter_max=20)
    rms = torch.stack([f.pow(2).mean(dim=0).sqrt() for f in dec.factors])
    assert torch.allclose(rms, rms[:1].expand_as(rms), rtol=1e-4)


def test_hooi_is_no_worse_than_hosvd():
    k = kernel((16, 12, 3, 3))
    hosvd = T.tucker2(k, (5, 4), algorithm="hosvd")
    hooi = T.tucker2(k, (5, 4), algorithm="hooi")
    assert hooi.rel_error <= hosvd.rel_error + 1e-6


def test_bad_ranks_are_refused():
    k = kernel((4, 3, 3, 3))
    with pytest.raises(ValueError):
        T.tucker2(k, (5, 1))
    with pytest.raises(ValueError):
        T.tt(k, (1, 2))
    with pytest.raises(ValueError):
        T.spatial_svd(kernel((4, 3, 3)), 1)
    with pytest.raises(ValueError):
        T.cp(k, 0)


dims = st.integers(1, 40)
ks = st.integers(1, 5)
keeps = st.floats(0.02, 0.95)


@settings(max_examples=60, deadline=None)
@given(out=dims, inp=dims, kh=ks, kw=ks, keep=keeps)
def test_ranks_for_keep_fit_the_budget(out, inp, kh, kw, keep):
    shape = (out, inp, kh, kw)
    numel = math.prod(shape)
    r = T.cp_rank_for_keep(shape, keep)
    assert T.cp_params(shape, r) <= keep * numel + 1e-6
    assert T.cp_params(shape, r + 1) > keep * numel
    for ranks, params, full in (
        (T.tucker2_ranks_for_keep(shape, keep), T.tucker2_params, T.tucker2_full_ranks(shape)),
        (T.tt_ranks_for_keep(shape, keep), T.tt_params, T.tt_full_ranks(shape)),
    ):
        if ranks is None:  # even rank 1 does not fit
            assert params(shape, (1,) * len(full)) > keep * numel
            continue
        assert params(shape, ranks) <= keep * numel + 1e-6
        assert all(1 <= r <= f for r, f in zip(ranks, full))
    tt_ranks = T.tt_ranks_for_keep(shape, keep)
    if tt_ranks is not None:
        assert T.tt_feasible(shape, tt_ranks) == tt_ranks
    r = T.spatial_svd_rank_for_keep(shape, keep)
    assert T.spatial_svd_params(shape, r) <= keep * numel + 1e-6


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 6), inp=st.integers(1, 6), kh=ks, kw=ks, seed=st.integers(0, 99))
def test_tt_svd_error_bound(out, inp, kh, kw, seed):
    """Oseledets (2011), Thm 2.2: ||K - TT||^2 <= sum over bonds of the discarded squared singular
    values of each unfolding; rank 1 everywhere is the worst case and still obeys it."""
    shape = (out, inp, kh, kw)
    k = kernel(shape, seed).double()
    ordered = k.permute(1, 2, 3, 0)
    bound = 0.0
    dims = ordered.shape
    for j in range(3):
        s = torch.linalg.svdvals(ordered.reshape(math.prod(dims[: j + 1]), -1))
        bound += float((s[1:] ** 2).sum())
    dec = T.tt(k.float(), (1, 1, 1))
    assert (dec.rel_error**2) * float((k**2).sum()) <= bound * (1 + 1e-4) + 1e-6


@pytest.mark.slow
def test_cp_on_a_512x512x3x3_kernel_is_bounded_in_memory():
    """Half the parameters (rank 1145), 5 ALS sweeps, in a fresh process: peak RSS < 3 GB."""
    code = textwrap.dedent(
        """
        import resource, torch
        from tensorslim.decompose.tensor import cp, cp_rank_for_keep
        k = torch.randn(512, 512, 3, 3)
        r = cp_rank_for_keep(tuple(k.shape), 0.5)
        dec = cp(k, r, n_iter_max=5)
        print(r, dec.iterations, dec.rel_error, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rank, iters, err, rss_kb = out.stdout.split()
    assert int(rank) == 1145 and int(iters) == 5 and float(err) < 1.0
    assert int(rss_kb) < 3 * 1024 * 1024
