"""Truncation-aware whitening (SVD-LLM, Wang et al. 2024, arXiv 2403.07378).

For a layer y = W x with calibration inputs X (rows x_t^T) and Gram matrix G = X^T X (n x n), the
output error of a replacement W_hat is ||(W - W_hat) X^T||_F^2 = tr(E G E^T) = ||E S||_F^2 for any S
with S S^T = G. Taking the SVD  W S = U diag(s) V^T  and truncating it,

    W_hat_r = U_r diag(s_r) V_r^T S^-1,   A = U_r diag(s_r),   B = V_r^T S^-1,

makes the output error exactly sum_{k>r} s_k^2 (the SVD-LLM theorem on truncation loss): dropping a singular value costs
its square in output error, and by Eckart-Young no rank-r matrix does better on these inputs.

S is the Cholesky factor of the damped Gram G + lam I (lam = damp * mean(diag G)), computed in
float64. If the damped Gram is still not positive definite (rank-deficient inputs in finite precision),
S falls back to Q diag(sqrt(max(Lambda, lam))) from the eigendecomposition G = Q Lambda Q^T.

Pure tensor code: imports nothing from the rest of tensorslim.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


@dataclass
class Whitening:
    """S with S S^T = damped G, and how it was obtained ("cholesky" or "eigen")."""

    s: torch.Tensor  # (n, n) float64
    kind: str
    damping: float
    # for "eigen": S = Q diag(sqrt(lam)), S^-1 = diag(1 / sqrt(lam)) Q^T
    q: torch.Tensor | None = None
    sqrt_lam: torch.Tensor | None = None

    def right_solve(self, x: torch.Tensor) -> torch.Tensor:
        """x @ S^-1 for x (k x n), float64."""
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.s, x, upper=False, left=False)
        return (x / self.sqrt_lam) @ self.q.T


def whitening(gram: torch.Tensor, damp: float = 1e-6) -> Whitening:
    """Square root of the damped Gram matrix: Cholesky, or the eigen fallback (see module docstring)."""
    g = gram.detach().to(torch.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gram must be a square matrix, got shape {tuple(g.shape)}")
    bad = int((~torch.isfinite(g)).sum())
    if bad:
        raise ValueError(f"gram (the inputs' X^T X) holds {bad} NaN or Inf values (of {g.numel()})")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not 0 <= damp < math.inf:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    g = (g + g.T) / 2
    n = g.shape[0]
    scale = float(torch.diagonal(g).mean())
    lam = damp * scale if scale > 0 else damp
    eye = torch.eye(n, dtype=torch.float64, device=g.device)
    chol, info = torch.linalg.cholesky_ex(g + lam * eye)
    if int(info) == 0 and torch.isfinite(chol).all():
        return Whitening(chol, "cholesky", lam)
    evals, q = torch.linalg.eigh(g)
    floor = lam
    if floor <= 0:  # damp=0 on rank-deficient inputs: float64 resolution keeps S invertible
        floor = n * torch.finfo(torch.float64).eps * float(evals.abs().max()) or 1.0
    sqrt_lam = evals.clamp_min(floor).sqrt()
    return Whitening(q * sqrt_lam, "eigen", lam, q=q, sqrt_lam=sqrt_lam)


def whitened_factors(
    w: torch.Tensor, gram: torch.Tensor, max_rank: int | None = None, damp: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Whitening]:
    """Nested whitened factors A (m x K), B (K x n), the singular values of W S, and S (float64).

    A[:, :r] @ B[:r] minimizes the output error on the calibration inputs among rank-r matrices
    (up to the damping) for every r <= K = max_rank (default min(m, n)).
    """
    if w.ndim != 2 or gram.shape != (w.shape[1], w.shape[1]):
        raise ValueError(
            f"gram must be ({w.shape[-1]}, {w.shape[-1]}) for a matrix of shape {tuple(w.shape)}"
        )
    wh = whitening(gram, damp)
    w64 = w.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w64 @ wh.s, full_matrices=False)
    k = min(w.shape) if max_rank is None else max_rank
    a = u[:, :k] * s[:k]
    b = wh.right_solve(vh[:k])
    return a, b, s, wh


def whitened_svd(
    w: torch.Tensor, gram: torch.Tensor, rank: int, damp: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened truncated SVD at `rank`: (A, B) in W's dtype, W ~= A @ B."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank must be an integer in [1, {min(w.shape)}], got {rank!r}")
    a, b, _, _ = whitened_factors(w, gram, rank, damp)
    return a.to(w.dtype).contiguous(), b.to(w.dtype).contiguous()
