"""Truncated and randomized SVD of a matrix, and the keep <-> rank arithmetic of a factorization.

A rank-r factorization of W (m x n) is W ~= A @ B with A (m x r), B (r x n); it stores r(m + n)
numbers instead of mn. By Eckart-Young the truncated SVD is the best rank-r approximation in the
Frobenius norm, and its error is the norm of the dropped singular values.

Pure math on tensors: this module imports nothing else from tensorslim (imports run downward).
"""

from __future__ import annotations

import math

import torch

from tensorslim.decompose.large import one_thread, thin_svd
from tensorslim.decompose.large import singular_values as _large_singular_values

# Rule for choosing the randomized SVD automatically (documented in README "Decompositions"):
# use it when the smaller side of W is at least RANDOMIZED_MIN_DIM and the requested rank is at most
# RANDOMIZED_MAX_FRACTION of that side. Below that size the exact LAPACK SVD is fast enough (a
# 1024x1024 float32 SVD takes well under a second on 2 cores) and exact; above it the randomized
# range finder costs O(mn(r + p)) instead of O(mn min(m, n)).
RANDOMIZED_MIN_DIM = 1024
RANDOMIZED_MAX_FRACTION = 0.25
# Matrices with at least this many entries get their exact SVD and singular values QR-first with
# the small factorization on one thread (decompose.large.thin_svd / singular_values): the same
# values; LAPACK's direct SVD of a 1024 x 16384 matrix took 45 s (float64) / 28 s (singular values,
# float32) on 2 threads of a CPU shared with other jobs, the QR route 1-2 s (on an idle machine
# both take a few seconds; benchmarks/compress_speed.py).
LARGE_MATRIX = 1 << 18


def full_rank(m: int, n: int) -> int:
    """Largest rank a factorization of an (m x n) matrix can have."""
    return min(m, n)


def matrix_params(m: int, n: int, rank: int) -> int:
    """Numbers stored by a rank-`rank` factorization of an (m x n) matrix: r(m + n)."""
    return rank * (m + n)


def max_useful_rank(m: int, n: int) -> int:
    """Largest rank r whose factorization is strictly smaller than the dense matrix: r(m+n) < mn.

    Returns 0 when no rank helps (e.g. a 2 x 2 matrix).
    """
    r = (m * n - 1) // (m + n)
    return max(0, min(r, full_rank(m, n)))


def rank_for_keep(m: int, n: int, keep: float) -> int:
    """Largest rank whose factorization stores at most `keep` * mn numbers (0 if none does)."""
    if not (0.0 < keep <= 1.0):
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    r = math.floor(keep * m * n / (m + n) + 1e-9)
    return max(0, min(r, full_rank(m, n)))


def _check_matrix(w: torch.Tensor) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("matrix contains NaN or Inf")


def _check_rank(w: torch.Tensor, rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an integer, got {rank!r}")
    if not (1 <= rank <= full_rank(*w.shape)):
        raise ValueError(
            f"rank must be in [1, {full_rank(*w.shape)}] for a {tuple(w.shape)} matrix, got {rank}"
        )


def svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD W = U diag(S) Vh in float64 for accuracy; returns tensors in W's dtype.

    Shapes: U (m, k), S (k,), Vh (k, n) with k = min(m, n); S is non-increasing.
    """
    _check_matrix(w)
    u, s, vh = _svd64(w)
    return u.to(w.dtype), s.to(w.dtype), vh.to(w.dtype)


def _svd64(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if w.device.type != "cpu":
        return torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)
    if w.numel() >= LARGE_MATRIX:
        return thin_svd(w.detach())
    with one_thread():  # small LAPACK calls: see decompose.large.one_thread
        return torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """All singular values of W, non-increasing, as float64 (k,), k = min(m, n).

    Computed in float64 below RANDOMIZED_MIN_DIM and in float32 above it, where float64 would take
    several times longer for no difference that matters to rank selection; matrices of at least
    LARGE_MATRIX entries in float64 through a QR (decompose.large.singular_values), faster still.
    On the CPU the factorization runs on one thread (decompose.large.one_thread).
    """
    _check_matrix(w)
    if w.numel() >= LARGE_MATRIX and w.device.type == "cpu":
        return _large_singular_values(w.detach())
    dtype = torch.float64 if min(w.shape) < RANDOMIZED_MIN_DIM else torch.float32
    if w.device.type != "cpu":
        return torch.linalg.svdvals(w.detach().to(dtype)).to(torch.float64)
    with one_thread():  # small LAPACK calls: see decompose.large.one_thread
        return torch.linalg.svdvals(w.detach().to(dtype)).to(torch.float64)


def randomized_svd(
    w: torch.Tensor,
    rank: int,
    oversample: int = 10,
    n_iter: int = 4,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate rank-`rank` SVD by the randomized range finder with power iterations.

    Follows Halko, Martinsson & Tropp (2011), Algorithms 4.4 (subspace iteration, re-orthonormalized
    each step) and 5.1. Shapes: U (m, rank), S (rank,), Vh (rank, n).
    """
    _check_matrix(w)
    _check_rank(w, rank)
    u, s, vh = _randomized64(w, rank, oversample, n_iter, seed)
    return u.to(w.dtype), s.to(w.dtype), vh.to(w.dtype)


def _randomized64(
    w: torch.Tensor, rank: int, oversample: int, n_iter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, n = w.shape
    a = w.detach().to(torch.float64)
    k = min(rank + oversample, min(m, n))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, dtype=torch.float64).to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(n_iter):
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    b = q.T @ a  # (k, n)
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ ub
    return u[:, :rank], s[:rank], vh[:rank]


def use_randomized(m: int, n: int, rank: int) -> bool:
    """The documented rule for `method="auto"` in truncated_svd."""
    side = min(m, n)
    return side >= RANDOMIZED_MIN_DIM and rank <= RANDOMIZED_MAX_FRACTION * side


def truncated_svd(
    w: torch.Tensor,
    rank: int,
    method: str = "auto",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of W: returns (A, B) with A = U_r diag(S_r) (m, r), B = V_r^T (r, n).

    method: "exact" (LAPACK), "randomized" (Halko et al.), or "auto" (see `use_randomized`).
    At rank = min(m, n) with method "exact", A @ B reconstructs W to float tolerance.
    """
    _check_matrix(w)
    _check_rank(w, rank)
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    if method == "randomized" or (method == "auto" and use_randomized(*w.shape, rank)):
        u, s, vh = _randomized64(w, rank, 10, 4, seed)
    else:
        u, s, vh = _svd64(w)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    # Split sqrt(S) between the factors? Folding S into A keeps B orthonormal, which keeps the first
    # (input-side) layer well scaled; either choice gives the same product. The factors are formed
    # in float64 and cast to W's dtype once (float16 / bfloat16 weights lose no more precision).
    a, b = cast_factors(u * s, vh, w.dtype)
    return a.contiguous(), b.contiguous()


def cast_factors(
    a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B cast to `dtype`; where A would overflow it (float16 holds at most 65504), A is divided
    and B multiplied by one scalar so both have the same largest magnitude (A @ B is unchanged).
    A product too large even then stays non-finite: callers refuse it."""
    if not dtype.is_floating_point or torch.finfo(dtype).bits >= 32:
        return a.to(dtype), b.to(dtype)
    limit = torch.finfo(dtype).max
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    ma, mb = (float(t.abs().amax()) if t.numel() else 0.0 for t in (a64, b64))
    if ma > limit and mb > 0:
        c = math.sqrt(ma / mb)
        a64, b64 = a64 / c, b64 * c
    return a64.to(dtype), b64.to(dtype)


def tail_energy(singular_values: torch.Tensor) -> torch.Tensor:
    """Relative squared error of every truncation: out[r] = sum_{i>=r} s_i^2 / sum s_i^2, r = 0..k.

    out[0] = 1 (everything dropped), out[k] = 0 (full rank). By Eckart-Young this is
    ||W - W_r||_F^2 / ||W||_F^2 for the truncated SVD W_r.
    """
    s2 = singular_values.detach().to(torch.float64) ** 2
    total = s2.sum()
    if total == 0:
        return torch.zeros(s2.numel() + 1, dtype=torch.float64, device=s2.device)
    tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])
    return torch.cat([tail, s2.new_zeros(1)]) / total


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Relative Frobenius error ||W - W_hat|| / ||W|| (0 for W = 0 and W_hat = 0)."""
    w64, h64 = w.detach().to(torch.float64), w_hat.detach().to(torch.float64)
    norm = torch.linalg.norm(w64)
    diff = torch.linalg.norm(w64 - h64)
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return float(diff / norm)
