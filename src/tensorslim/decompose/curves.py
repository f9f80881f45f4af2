"""Errors of every truncation of nested factors W ~= A[:, :r] @ B[:r], for r = 0..K, in one pass.

Nested factors come from SVD-like methods (plain, row-weighted, whitened): the rank-r approximation
keeps the first r columns of A and rows of B. Three error measures are computed for all r at once:

- weight:  ||W - A_r B_r||_F^2
- feature: tr(E_r G E_r^T) = ||E_r X^T||_F^2 for G = X^T X, the squared output error of the layer on
  the inputs X that built the Gram matrix G (without the bias, which the factorization keeps).
- fisher:  sum_ij I_ij (E_r)_ij^2, the Fisher-weighted error; 1/2 of it is the second-order
  (diagonal empirical Fisher) estimate of the loss increase caused by replacing W by A_r B_r
  (Hsu et al., ICLR 2022, Sec. 3; Hua et al., EMNLP 2022, Eq. 1).

weight and feature use the expansion tr(EGE^T) = tr(WGW^T) - 2 tr(A_r B_r G W^T) + tr(A_r B_r G B_r^T A_r^T)
whose two last terms are cumulative sums over the rank index (O(K n^2 + K^2 (m + n))); fisher has no
such shortcut for a general I and is accumulated one rank-one update at a time (O(K m n)).
Pure tensor code: imports nothing from the rest of tensorslim.
"""

from __future__ import annotations

import torch


def _gram_curve(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor | None):
    """tr(E_r G E_r^T) for r = 0..K (G = identity when g is None), float64, clamped at 0."""
    if g is None:
        total = (w * w).sum()
        bg = b  # B G with G = I
        wg = w
    else:
        wg = w @ g
        total = (wg * w).sum()
        bg = b @ g
    # cross(r) = tr(A_r B_r G W^T) = sum_{k<r} a_k . (W G b_k)
    p = wg @ b.T  # (m, K): column k is W G b_k
    cross = torch.cumsum((a * p).sum(0), 0)
    # quad(r) = sum_{k,l<r} (A^T A)_{kl} (B G B^T)_{kl}
    q = (a.T @ a) * (bg @ b.T)
    per_k = 2.0 * torch.tril(q, -1).sum(1) + torch.diagonal(q)
    quad = torch.cumsum(per_k, 0)
    zero = torch.zeros(1, dtype=w.dtype, device=w.device)
    curve = total - 2.0 * torch.cat([zero, cross]) + torch.cat([zero, quad])
    return curve.clamp_min(0.0), total


def truncation_curves(
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gram: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
    fisher_stride: int = 1,
) -> dict[str, torch.Tensor]:
    """Errors of W ~= A[:, :r] B[:r] for r = 0..K (K = A.shape[1]) as float64 tensors of length K+1.

    Always returns "weight" (squared Frobenius error) and "weight_total" (||W||^2); with `gram`
    (n x n, the inputs' X^T X) also "feature" and "feature_total" (tr(W G W^T)); with `fisher`
    (m x n, non-negative) also "fisher" and "fisher_total" (sum I W^2). fisher_stride > 1 evaluates
    the Fisher error exactly at r = 0, s, 2s, ..., K only and interpolates linearly in between
    (the residual is still updated by blocks of rank-one terms, as one matrix product per block).
    """
    if w.ndim != 2 or a.ndim != 2 or b.ndim != 2:
        raise ValueError("w, a and b must be matrices")
    m, n = w.shape
    if a.shape[0] != m or b.shape[1] != n or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"factor shapes {tuple(a.shape)} @ {tuple(b.shape)} do not match W {tuple(w.shape)}"
        )
    w64, a64, b64 = (t.detach().to(torch.float64) for t in (w, a, b))
    out: dict[str, torch.Tensor] = {}
    out["weight"], out["weight_total"] = _gram_curve(w64, a64, b64, None)
    if gram is not None:
        g64 = gram.detach().to(torch.float64)
        if g64.shape != (n, n):
            raise ValueError(f"gram must be ({n}, {n}), got {tuple(g64.shape)}")
        out["feature"], out["feature_total"] = _gram_curve(w64, a64, b64, g64)
    if fisher is not None:
        i64 = fisher.detach().to(torch.float64)
        if i64.shape != (m, n):
            raise ValueError(f"fisher must be ({m}, {n}), got {tuple(i64.shape)}")
        k = a64.shape[1]
        step = max(1, int(fisher_stride))
        points = list(range(0, k + 1, step))
        if points[-1] != k:
            points.append(k)
        e = w64.clone()
        vals = [(i64 * e * e).sum()]
        for r0, r1 in zip(points[:-1], points[1:]):
            e.sub_(a64[:, r0:r1] @ b64[r0:r1])
            vals.append((i64 * e * e).sum())
        at = torch.tensor(points, dtype=torch.float64)
        exact = torch.stack(vals)
        if step == 1:
            out["fisher"] = exact
        else:
            r = torch.arange(k + 1, dtype=torch.float64)
            idx = torch.searchsorted(at, r, right=True).clamp(1, len(points) - 1)
            lo, hi = at[idx - 1], at[idx]
            t = (r - lo) / (hi - lo)
            out["fisher"] = exact[idx - 1] * (1 - t) + exact[idx] * t
        out["fisher_total"] = vals[0]
    return out


def weighted_error(
    w: torch.Tensor, w_hat: torch.Tensor, weights: torch.Tensor | None = None
) -> float:
    """sum_ij weights_ij (W - W_hat)_ij^2 in float64 (plain squared Frobenius error if no weights)."""
    e = w.detach().to(torch.float64) - w_hat.detach().to(torch.float64)
    if weights is None:
        return float((e * e).sum())
    return float((weights.detach().to(torch.float64) * e * e).sum())


def output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """tr((W - W_hat) G (W - W_hat)^T) = ||(W - W_hat) X^T||_F^2 for G = X^T X, in float64."""
    e = w.detach().to(torch.float64) - w_hat.detach().to(torch.float64)
    return float(((e @ gram.detach().to(torch.float64)) * e).sum().clamp_min(0.0))
