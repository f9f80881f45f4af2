import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorslim.decompose import (
    max_useful_rank,
    randomized_svd,
    rank_for_keep,
    relative_error,
    singular_values,
    tail_energy,
    truncated_svd,
)

dims = st.integers(min_value=1, max_value=24)


def _matrix(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(m=dims, n=dims, seed=st.integers(0, 10_000))
def test_full_rank_reconstructs_exactly(m, n, seed):
    w = _matrix(m, n, seed)
    a, b = truncated_svd(w, min(m, n), method="exact")
    assert a.shape == (m, min(m, n)) and b.shape == (min(m, n), n)
    torch.testing.assert_close(a @ b, w, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(m=dims, n=dims, seed=st.integers(0, 10_000), data=st.data())
def test_eckart_young_error_is_norm_of_dropped_singular_values(m, n, seed, data):
    w = _matrix(m, n, seed)
    r = data.draw(st.integers(1, min(m, n)))
    a, b = truncated_svd(w, r, method="exact")
    s = torch.linalg.svdvals(w)
    err = torch.linalg.norm(w - a @ b)
    assert math.isclose(
        float(err), float(torch.sqrt((s[r:] ** 2).sum())), rel_tol=1e-8, abs_tol=1e-9
    )
    # tail_energy gives the same number, relative and squared
    assert math.isclose(
        float(tail_energy(s)[r]), float(err**2 / (w**2).sum()), rel_tol=1e-8, abs_tol=1e-12
    )


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 16), n=st.integers(2, 16), seed=st.integers(0, 10_000), data=st.data())
def test_truncated_svd_beats_other_rank_r_matrices(m, n, seed, data):
    """Eckart-Young optimality: no other rank-r product is closer to W (random competitors and
    small perturbations of the optimum)."""
    w = _matrix(m, n, seed)
    r = data.draw(st.integers(1, min(m, n)))
    a, b = truncated_svd(w, r, method="exact")
    best = torch.linalg.norm(w - a @ b)
    g = torch.Generator().manual_seed(seed + 1)
    for scale in (1.0, 1e-2):
        pa = a + scale * torch.randn(a.shape, generator=g, dtype=w.dtype)
        pb = b + scale * torch.randn(b.shape, generator=g, dtype=w.dtype)
        assert torch.linalg.norm(w - pa @ pb) >= best - 1e-9


def test_randomized_matches_exact_on_decaying_spectrum():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 200, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(250, 200, generator=g, dtype=torch.float64))
    s = 0.8 ** torch.arange(200, dtype=torch.float64)
    w = (u * s) @ v.T
    ur, sr, vhr = randomized_svd(w, 20)
    torch.testing.assert_close(sr, s[:20], rtol=1e-6, atol=1e-9)
    a, b = truncated_svd(w, 20, method="randomized")
    a2, b2 = truncated_svd(w, 20, method="exact")
    assert math.isclose(relative_error(w, a @ b), relative_error(w, a2 @ b2), rel_tol=1e-4)


def test_auto_rule_uses_randomized_only_for_large_matrices():
    from tensorslim.decompose.svd import use_randomized

    assert not use_randomized(512, 512, 10)
    assert use_randomized(2048, 1024, 64)
    assert not use_randomized(2048, 1024, 900)  # high rank: exact


@given(m=st.integers(1, 500), n=st.integers(1, 500))
def test_max_useful_rank_is_the_break_even_point(m, n):
    r = max_useful_rank(m, n)
    assert r <= min(m, n)
    if r > 0:
        assert r * (m + n) < m * n
    assert (r + 1) * (m + n) >= m * n or r == min(m, n)


@given(m=st.integers(1, 300), n=st.integers(1, 300), keep=st.floats(0.01, 1.0))
def test_rank_for_keep_is_largest_fitting_rank(m, n, keep):
    r = rank_for_keep(m, n, keep)
    assert r * (m + n) <= keep * m * n + 1e-6
    assert r == min(m, n) or (r + 1) * (m + n) > keep * m * n


def test_tail_energy_endpoints_and_monotone():
    s = singular_values(_matrix(10, 7, 3))
    t = tail_energy(s)
    assert t[0] == pytest.approx(1.0) and t[-1] == 0.0
    assert torch.all(t[1:] <= t[:-1])


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.ones(3), "2-D"),
        (torch.tensor([[1.0, float("nan")]]), "NaN"),
    ],
)
def test_bad_matrices_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        truncated_svd(bad, 1)


@pytest.mark.parametrize("rank", [0, -1, 5, 2.5, True])
def test_bad_ranks_rejected(rank):
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(torch.ones(4, 3), rank)
