"""Fisher-weighted low-rank approximation: the FWSVD closed form and element-wise FVD solvers.

Notation: W (m x n) is the layer's weight as a matrix with y = W x; I (m x n) >= 0 is the empirical
Fisher information of each weight, I_ij = mean over calibration batches of (dL/dW_ij)^2.

FWSVD (Hsu et al., ICLR 2022, "Language model compression with weighted low-rank factorization",
arXiv 2207.00112, Sec. 3): row importance I^_i = sum_j I_ij, then

    min_{rank(X) <= r} sum_i I^_i ||W_i - X_i||^2 = ||D (W - X)||_F^2,   D = diag(sqrt(I^)),

whose minimizer is X = D^-1 (D W)_r: with D W = U S V^T,

    A = D^-1 U_r S_r,   B = V_r^T,   W ~= A @ B.

As the public implementation does, I^ is normalised by its maximum and a small eps is added so that
rows without gradient keep a positive weight and D is invertible.

FVD (Hua et al., EMNLP 2022, "Numerical optimizations for weighted low-rank estimation on language
model", arXiv 2211.09718): the element-wise problem

    min_{A (m x r), B (r x n)} f(A, B) = sum_ij I~_ij (W - A B)_ij^2,   I~ = I / max(I),

is non-convex with no closed form. Three solvers are provided, each returning its convergence history:

- "em": expectation-maximisation / imputation of Srebro & Jaakkola (ICML 2003, "Weighted low-rank
  approximations", Sec. 3): X <- SVD_r(I~ * W + (1 - I~) * X). Each step is a majorise-minimise step
  for weights in [0, 1], so f never increases.
- "als": weighted alternating least squares: with B fixed each row a_i solves
  (B diag(I~_i) B^T) a_i = B diag(I~_i) W_i^T, then with A fixed each column b_j solves
  (A^T diag(I~_:j) A) b_j = A^T diag(I~_:j) W_:j (Srebro & Jaakkola 2003, Sec. 2; every half-step is an
  exact block minimisation, so f never increases).
- "adam": gradient descent with Adam on (A, B) started from the FWSVD solution, as Hua et al. do.

Pure tensor code: imports nothing from the rest of tensorslim.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field

import torch

SOLVERS = ("als", "em", "adam")
# Default element-wise solver. Chosen by measurement on the Linear layers of all-MiniLM-L6-v2 with
# their real Fisher (benchmarks/fvd_solvers.py, results in benchmarks/results/fvd_solvers.md): the
# solver reaching 1% of the best objective found by any solver in the least wall time.
DEFAULT_SOLVER = "als"


def _nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def _check(w: torch.Tensor, weights: torch.Tensor, rank: int) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(w.shape)}")
    if weights.shape != w.shape:
        raise ValueError(
            f"weights must have the matrix's shape {tuple(w.shape)}, got {tuple(weights.shape)}"
        )
    for what, t in (("the matrix", w), ("the weights (Fisher information)", weights)):
        bad = _nonfinite(t)
        if bad:
            raise ValueError(f"{what} holds {bad} NaN or Inf values (of {t.numel()})")
    if (weights < 0).any():
        raise ValueError(
            f"weights must be non-negative; {int((weights < 0).sum())} of {weights.numel()} are "
            "negative"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank must be an integer in [1, {min(w.shape)}], got {rank!r}")


def _check_solver_args(solver: str, iters: int, tol: float, lr: float, time_limit) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    for name, value, low in (("tol", tol, 0.0), ("lr", lr, None)):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0 or (low is None and value == 0):
            need = ">= 0" if low is not None else "> 0"
            raise ValueError(f"{name} must be a finite number {need}, got {value!r}")
    if time_limit is not None and not (
        isinstance(time_limit, numbers.Real) and not isinstance(time_limit, bool) and time_limit > 0
    ):
        raise ValueError(f"time_limit must be None or a number of seconds > 0, got {time_limit!r}")


def row_importance(fisher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """FWSVD row importance I^_i = sum_j I_ij, divided by its maximum, plus `eps` (float64, (m,))."""
    r = fisher.detach().to(torch.float64).sum(1)
    top = r.max()
    if top > 0:
        r = r / top
    return r + eps


def fwsvd_factors(
    w: torch.Tensor, row_weights: torch.Tensor, max_rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nested FWSVD factors: A (m x K), B (K x n) and the singular values of D W (K,), float64.

    `row_weights` are the (positive) row importances I^; A[:, :r] @ B[:r] is the row-weighted optimum
    at every rank r <= K = max_rank (default min(m, n)).
    """
    rw = row_weights.detach().to(torch.float64)
    if rw.shape != (w.shape[0],):
        raise ValueError(
            f"row_weights must be {w.shape[0]} numbers (one per row of the {tuple(w.shape)} "
            f"matrix), got shape {tuple(rw.shape)}"
        )
    bad = int((~(torch.isfinite(rw) & (rw > 0))).sum())
    if bad:
        raise ValueError(
            f"row_weights (the FWSVD row importance) must be {w.shape[0]} positive finite "
            f"numbers; {bad} are zero, negative, NaN or Inf (NaN or Inf in the Fisher estimate?)"
        )
    d = rw.sqrt()
    w64 = w.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(d[:, None] * w64, full_matrices=False)
    k = min(w.shape) if max_rank is None else max_rank
    a = (u[:, :k] * s[:k]) / d[:, None]
    return a, vh[:k], s


def fwsvd(
    w: torch.Tensor, fisher: torch.Tensor, rank: int, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """FWSVD at `rank`: (A, B) in W's dtype with W ~= A @ B; `fisher` is the element-wise I (m x n)."""
    _check(w, fisher, rank)
    a, b, _ = fwsvd_factors(w, row_importance(fisher, eps), rank)
    return a.to(w.dtype).contiguous(), b.to(w.dtype).contiguous()


@dataclass
class WeightedResult:
    """Outcome of an element-wise solver: factors (W's dtype) and the convergence history.

    history[t] is the relative objective f / sum(I~ W^2) after t iterations (t = 0: the start),
    seconds[t] the wall time spent until then. The returned factors are the best iterate.
    """

    a: torch.Tensor
    b: torch.Tensor
    solver: str
    history: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    converged: bool = False

    @property
    def objective(self) -> float:
        return min(self.history) if self.history else math.nan

    @property
    def iterations(self) -> int:
        return max(0, len(self.history) - 1)

    def time_to(self, target: float) -> float | None:
        """Seconds until the history first reached `target` (None if it never did)."""
        for h, s in zip(self.history, self.seconds):
            if h <= target:
                return s
        return None


def _objective(w: torch.Tensor, wt: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    e = w - a @ b
    return float((wt * e * e).sum())


def _svd_r(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def _init(w, wt, rank, init):
    if isinstance(init, tuple):
        a, b = init
        return a.detach().to(torch.float64).clone(), b.detach().to(torch.float64).clone()
    if init == "svd":
        return _svd_r(w, rank)
    if init == "fwsvd":
        a, b, _ = fwsvd_factors(w, row_importance(wt), rank)
        return a, b
    raise ValueError(f"init must be 'fwsvd', 'svd' or a tuple (A, B), got {init!r}")


def _solve_rows(w: torch.Tensor, wt: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_A sum_ij wt_ij (W - A B)_ij^2, one r x r weighted least-squares solve per row of A."""
    m, _ = w.shape
    r = b.shape[0]
    out = torch.empty(m, r, dtype=w.dtype)
    eye = torch.eye(r, dtype=w.dtype)
    chunk = max(1, (1 << 22) // max(1, r * r))  # bound the (chunk, r, r) systems to ~32 MB
    rhs_all = (wt * w) @ b.T  # (m, r)
    scale = float((b * b).sum(1).mean()) if b.numel() else 1.0
    for i0 in range(0, m, chunk):
        sl = slice(i0, min(m, i0 + chunk))
        lhs = torch.einsum("ij,kj,lj->ikl", wt[sl], b, b) + (ridge * scale) * eye
        out[sl] = torch.linalg.solve(lhs, rhs_all[sl])
    return out


def _rel_change(prev: float, cur: float) -> float:
    return abs(prev - cur) / max(abs(prev), 1e-300)


def fvd(
    w: torch.Tensor,
    weights: torch.Tensor,
    rank: int,
    *,
    solver: str = DEFAULT_SOLVER,
    iters: int = 50,
    tol: float = 1e-6,
    init: str | tuple[torch.Tensor, torch.Tensor] = "fwsvd",
    lr: float = 1e-2,
    ridge: float = 1e-10,
    time_limit: float | None = None,
) -> WeightedResult:
    """Element-wise weighted rank-`rank` approximation min sum I~ (W - AB)^2 (see module docstring).

    weights: I (m x n, non-negative; only ratios matter). solver: "als", "em" or "adam".
    iters: maximum iterations (Adam: steps). tol: stop when the relative objective changes by less
    than `tol` in one iteration (EM / ALS; Adam runs all steps and returns its best iterate).
    init: "fwsvd" (default, the closed-form row-weighted start), "svd", or factors (A, B).
    lr: Adam's step relative to the factors' RMS. time_limit: stop after this many seconds.
    """
    _check(w, weights, rank)
    _check_solver_args(solver, iters, tol, lr, time_limit)
    w64 = w.detach().to(torch.float64)
    wt = weights.detach().to(torch.float64)
    top = wt.max()
    wt = wt / top if top > 0 else torch.ones_like(wt)
    norm = float((wt * w64 * w64).sum()) or 1.0
    t0 = time.perf_counter()
    a, b = _init(w64, wt, rank, init)
    if solver == "adam":
        # balance the scales of A and B so one relative step size suits both
        na, nb = a.norm(dim=0).clamp_min(1e-300), b.norm(dim=1).clamp_min(1e-300)
        g = (nb / na).sqrt()
        a, b = a * g, b / g[:, None]
    history = [_objective(w64, wt, a, b) / norm]
    seconds = [time.perf_counter() - t0]
    best = (history[0], a.clone(), b.clone())
    converged = False

    if solver == "adam":
        pa = torch.nn.Parameter(a.clone())
        pb = torch.nn.Parameter(b.clone())
        rms_a = float(a.pow(2).mean().sqrt()) or 1.0
        rms_b = float(b.pow(2).mean().sqrt()) or 1.0
        opt = torch.optim.Adam(
            [{"params": [pa], "lr": lr * rms_a}, {"params": [pb], "lr": lr * rms_b}]
        )
        for _ in range(iters):
            opt.zero_grad(set_to_none=True)
            e = w64 - pa @ pb
            loss = (wt * e * e).sum() / norm
            loss.backward()
            opt.step()
            with torch.no_grad():
                val = _objective(w64, wt, pa, pb) / norm
            history.append(val)
            seconds.append(time.perf_counter() - t0)
            if val < best[0]:
                best = (val, pa.detach().clone(), pb.detach().clone())
            if time_limit is not None and seconds[-1] > time_limit:
                break
    else:
        for _ in range(iters):
            if solver == "em":
                x = a @ b
                a, b = _svd_r(wt * w64 + (1.0 - wt) * x, rank)
            else:  # als
                a = _solve_rows(w64, wt, b, ridge)
                b = _solve_rows(w64.T.contiguous(), wt.T.contiguous(), a.T.contiguous(), ridge).T
            val = _objective(w64, wt, a, b) / norm
            history.append(val)
            seconds.append(time.perf_counter() - t0)
            if val < best[0]:
                best = (val, a.clone(), b.clone())
            if _rel_change(history[-2], val) < tol:
                converged = True
                break
            if time_limit is not None and seconds[-1] > time_limit:
                break
    _, a, b = best
    return WeightedResult(
        a=a.to(w.dtype).contiguous(),
        b=b.to(w.dtype).contiguous(),
        solver=solver,
        history=history,
        seconds=seconds,
        converged=converged,
    )
