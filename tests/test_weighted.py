"""Weighted and whitened low-rank decompositions (decompose/weighted.py, whitened.py, curves.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorslim.decompose import (
    SOLVERS,
    fvd,
    fwsvd,
    output_error,
    row_importance,
    truncated_svd,
    truncation_curves,
    weighted_error,
    whitened_factors,
    whitened_svd,
    whitening,
)


def _matrix(m, n, seed=0, decay=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    if decay:
        w = w * torch.linspace(2.0, 0.05, n, dtype=torch.float64)
    return w


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(2, 20),
    n=st.integers(2, 20),
    rank=st.integers(1, 20),
    c=st.floats(1e-3, 1e3),
    seed=st.integers(0, 1000),
)
def test_uniform_weights_make_fwsvd_equal_svd(m, n, rank, c, seed):
    rank = min(rank, m, n)
    w = _matrix(m, n, seed)
    a, b = fwsvd(w, torch.full((m, n), c, dtype=torch.float64), rank)
    sa, sb = truncated_svd(w, rank, method="exact")
    assert torch.allclose(a @ b, sa @ sb, atol=1e-8 * float(w.norm()))


@pytest.mark.parametrize("solver", SOLVERS)
def test_uniform_weights_make_fvd_equal_svd(solver):
    w = _matrix(30, 20, 1)
    rank = 6
    res = fvd(w, torch.ones(30, 20, dtype=torch.float64), rank, solver=solver, iters=20)
    sa, sb = truncated_svd(w, rank, method="exact")
    assert torch.allclose(res.a @ res.b, sa @ sb, atol=1e-6 * float(w.norm()))
    assert res.history[0] == pytest.approx(res.objective, rel=1e-9)  # the FWSVD start is optimal


@pytest.mark.parametrize("solver", SOLVERS)
def test_row_constant_weights_solvers_reach_closed_form(solver):
    """With I_ij = d_i the closed form D^-1 (D W)_r is the optimum; each solver, started from plain
    SVD (not from that optimum), must reach its objective."""
    m, n, rank = 24, 16, 4
    w = _matrix(m, n, 2)
    d = torch.linspace(0.3, 1.0, m, dtype=torch.float64)[torch.randperm(m)]
    weights = d[:, None].expand(m, n).contiguous()
    a, b = fwsvd(w, weights, rank, eps=0.0)
    optimum = weighted_error(w, a @ b, weights)
    svd_a, svd_b = truncated_svd(w, rank, method="exact")
    assert weighted_error(w, svd_a @ svd_b, weights) > optimum * 1.001  # the start is not optimal
    iters = {"als": 200, "em": 2000, "adam": 3000}[solver]
    res = fvd(w, weights, rank, solver=solver, init="svd", iters=iters, tol=1e-14, lr=3e-3)
    got = weighted_error(w, res.a @ res.b, weights)
    assert got <= optimum * (1 + 1e-4)
    # never worse than optimum by more than float noise, history never increases for EM / ALS
    if solver != "adam":
        h = res.history
        assert all(h[i + 1] <= h[i] * (1 + 1e-10) for i in range(len(h) - 1))


@pytest.mark.parametrize("solver", SOLVERS)
def test_fvd_improves_on_fwsvd_with_elementwise_weights(solver):
    w = _matrix(40, 30, 3)
    g = torch.Generator().manual_seed(3)
    weights = torch.rand(40, 30, generator=g, dtype=torch.float64) ** 4
    res = fvd(w, weights, 5, solver=solver, iters=40)
    a, b = fwsvd(w, weights, 5)
    assert weighted_error(w, res.a @ res.b, weights) < weighted_error(w, a @ b, weights)
    assert res.objective < res.history[0]
    assert res.time_to(res.history[0]) == res.seconds[0]
    assert len(res.seconds) == len(res.history) == res.iterations + 1


def test_fvd_rejects_bad_input():
    w = _matrix(5, 4)
    with pytest.raises(ValueError, match="shape"):
        fvd(w, torch.ones(4, 5), 2)
    with pytest.raises(ValueError, match="non-negative"):
        fvd(w, -torch.ones(5, 4), 2)
    with pytest.raises(ValueError, match="rank"):
        fvd(w, torch.ones(5, 4), 5)
    with pytest.raises(ValueError, match="solver"):
        fvd(w, torch.ones(5, 4), 2, solver="newton")


def test_row_importance_is_normalised_row_sum():
    fisher = torch.tensor([[1.0, 1.0], [4.0, 0.0], [0.0, 0.0]])
    r = row_importance(fisher, eps=1e-3)
    assert torch.allclose(r, torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64) + 1e-3)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(2, 12), n=st.integers(2, 12), rows=st.integers(1, 40), seed=st.integers(0, 99))
def test_whitened_output_error_never_above_svd(m, n, rows, seed):
    """At every rank the whitened factorization's output error on the calibration inputs is at most
    plain SVD's (also for rank-deficient inputs, rows < n)."""
    w = _matrix(m, n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g) * 3
    gram = x.T @ x
    k = min(m, n)
    a, b, s, _ = whitened_factors(w, gram, k)
    scale = float(((w @ gram) * w).sum()) + 1e-12
    for r in range(1, k + 1):
        sa, sb = truncated_svd(w, r, method="exact")
        out_w = output_error(w, a[:, :r] @ b[:r], gram)
        out_s = output_error(w, sa @ sb, gram)
        assert out_w <= out_s + 1e-7 * scale
        # and equals ||(W - W_hat) X^T||^2 computed from the inputs themselves
        direct = float(((w - a[:, :r] @ b[:r]) @ x.T).pow(2).sum())
        assert out_w == pytest.approx(direct, rel=1e-6, abs=1e-9 * scale)


def test_whitened_error_is_tail_of_singular_values():
    w = _matrix(12, 10, 5)
    x = torch.randn(200, 10, dtype=torch.float64)
    gram = x.T @ x
    a, b, s, wh = whitened_factors(w, gram, 10, damp=0.0)
    assert wh.kind == "cholesky"
    for r in (1, 4, 9):
        assert output_error(w, a[:, :r] @ b[:r], gram) == pytest.approx(
            float((s[r:] ** 2).sum()), rel=1e-8
        )


def test_whitening_falls_back_to_eigen_when_not_positive_definite():
    gram = torch.zeros(4, 4, dtype=torch.float64)
    gram[0, 0] = -1.0  # indefinite: no Cholesky even with damping
    wh = whitening(gram, damp=1e-8)
    assert wh.kind == "eigen"
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(wh.right_solve(x) @ wh.s, x, atol=1e-9)
    w = _matrix(5, 4)
    a, b = whitened_svd(w, torch.zeros(4, 4), 2)  # all-zero inputs: finite factors
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_whitening_square_root():
    x = torch.randn(50, 6, dtype=torch.float64)
    g = x.T @ x
    wh = whitening(g, damp=0.0)
    assert torch.allclose(wh.s @ wh.s.T, g, atol=1e-9)
    y = torch.randn(3, 6, dtype=torch.float64)
    assert torch.allclose(wh.right_solve(y) @ wh.s, y, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 10), n=st.integers(1, 10), seed=st.integers(0, 99))
def test_truncation_curves_match_direct_errors(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    k = min(m, n)
    a = torch.randn(m, k, generator=g, dtype=torch.float64)
    b = torch.randn(k, n, generator=g, dtype=torch.float64)
    x = torch.randn(7, n, generator=g, dtype=torch.float64)
    fisher = torch.rand(m, n, generator=g, dtype=torch.float64)
    c = truncation_curves(w, a, b, gram=x.T @ x, fisher=fisher)
    for r in range(k + 1):
        w_hat = a[:, :r] @ b[:r]
        scale = 1e-9 * (1 + float(w.norm() + (a.norm() * b.norm())) ** 2)
        assert float(c["weight"][r]) == pytest.approx(weighted_error(w, w_hat), abs=scale)
        assert float(c["fisher"][r]) == pytest.approx(weighted_error(w, w_hat, fisher), abs=scale)
        direct = float(((w - w_hat) @ x.T).pow(2).sum())
        assert float(c["feature"][r]) == pytest.approx(direct, abs=scale * 50)
