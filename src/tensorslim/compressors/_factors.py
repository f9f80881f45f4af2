"""Shared helpers of the low-rank compressors (lowrank, fwsvd, fvd, whitened).

- option validation (`OptionSpec`, `check_options`): typed, range-checked compressor options;
- objectives: which one applies (`objective_of`) and the calibration statistics it reads;
- statistics (`require_stats`): present and finite, else a TensorSlimError naming the layer;
- nested factors (`cached_nested`) and the error of every truncation under an objective
  (`objective_errors`);
- plan facts of the data-aware kinds (`risk_facts`, `output_facts`);
- the refusal of factors that overflow the layer's dtype (`refuse_overflow`).

Every factor here is float64 until decompose.svd.cast_factors casts it once to the weight's dtype.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorslim.core.objective import OBJECTIVES
from tensorslim.core.target import MatrixTarget
from tensorslim.decompose import (
    fwsvd_factors,
    output_error,
    row_importance,
    truncation_curves,
    weighted_error,
    whitened_factors,
)
from tensorslim.errors import TensorSlimError, UnsupportedLayerError

Factors = tuple[torch.Tensor, torch.Tensor]


# -- options --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptionSpec:
    """What one compressor option accepts: a number of `kind` (float or int) above `minimum`
    (`strict`: the minimum itself refused), or a str among `choices`; `optional`: None is a
    value of its own (no limit) rather than "the default"."""

    kind: type
    minimum: float | None = None
    strict: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False

    def accepted(self) -> str:
        """What the option accepts, in words."""
        if self.kind is str:
            return "one of " + ", ".join(map(repr, self.choices))
        what = "an integer" if self.kind is int else "a finite number"
        if self.minimum is not None:
            what = f"{what} {'>' if self.strict else '>='} {self.minimum:g}"
        return f"{what} or None" if self.optional else what

    def check(self, name: str, value: Any, default: Any) -> Any:
        """`value` as a plain float / int / str; ValueError naming the option and the value."""
        if value is None:
            return default
        out = self._convert(value)
        if out is None or not self._in_range(out):
            raise ValueError(
                f"option {name!r} must be {self.accepted()} (or None for the default "
                f"{default!r}); got {value!r} ({type(value).__name__})"
            )
        return out

    def _convert(self, value: Any) -> Any:
        if isinstance(value, bool):  # a bool is an int to Python, never a sensible option value
            return None
        if self.kind is str:
            return value if isinstance(value, str) else None
        if self.kind is int:
            return int(value) if isinstance(value, numbers.Integral) else None
        return float(value) if isinstance(value, numbers.Real) else None

    def _in_range(self, value: Any) -> bool:
        if self.kind is str:
            return value in self.choices
        if not math.isfinite(value):
            return False
        if self.minimum is None:
            return True
        return value > self.minimum if self.strict else value >= self.minimum


def check_options(options: Any, specs: dict[str, OptionSpec]) -> None:
    """Validate and normalise the fields of a frozen Options dataclass in place (call from
    __post_init__): None becomes the field's default, numbers become plain float / int."""
    for f in dataclasses.fields(options):
        spec = specs.get(f.name)
        if spec is not None:
            value = spec.check(f.name, getattr(options, f.name), f.default)
            object.__setattr__(options, f.name, value)


# FWSVD's eps (fwsvd, fvd): added to the max-normalised row importance; > 0 keeps every row
# weight positive (D invertible).
EPS = OptionSpec(float, 0.0, strict=True)


# -- objectives and statistics --------------------------------------------------------------------
def objective_of(target: MatrixTarget, objective: str | None, default: str) -> str:
    """`objective`, else the one in the target's settings, else `default`; checked."""
    if objective is None:
        objective = (target.settings or {}).get("objective") or default
    if objective not in OBJECTIVES:
        raise TensorSlimError(
            f"objective must be one of {', '.join(map(repr, OBJECTIVES))}; got {objective!r}"
        )
    return objective


def _missing(st: Any, need: frozenset[str]) -> list[str]:
    missing = []
    if "gram" in need and (st is None or st.gram is None or st.rows == 0):
        missing.append("calibration inputs (calibration=batches)")
    if "fisher" in need and (st is None or st.fisher is None):
        missing.append("a Fisher estimate (calibration=batches and loss=fn)")
    return missing


def _where(label: str | None) -> str:
    return f" of layer {label}" if label else ""


def _check_finite(st: Any, need: frozenset[str], label: str | None) -> None:
    """Refuse statistics holding NaN / Inf (calibration checks each batch; a sum may overflow)."""
    for key in ("gram", "fisher"):
        t = getattr(st, key) if key in need else None
        if t is not None and not bool(torch.isfinite(t).all()):
            what = "input Gram matrix" if key == "gram" else "Fisher estimate"
            raise TensorSlimError(
                f"the calibration {what}{_where(label)} holds NaN or Inf (its sum over "
                "the batches overflowed?); scale the calibration data or the loss down"
            )


def require_stats(st: Any, method: str, need: frozenset[str], label: str | None = None) -> Any:
    """`st` (LayerStats; None passes when `need` is empty), or TensorSlimError naming the method,
    the layer (`label`, MatrixTarget.label) and what to pass, where a statistic in `need`
    ("gram", "fisher") is missing or not finite."""
    missing = _missing(st, need)
    if missing:
        on = f" on layer {label}" if label else ""
        raise TensorSlimError(
            f"method {method!r}{on} needs "
            + " and ".join(missing)
            + "; pass them to tensorslim.compress or tensorslim.apply_plan "
            "(calibration=..., loss=...); tensorslim.load rebuilds a saved model without them"
        )
    _check_finite(st, need, label)
    return st


def fisher_of(st: Any, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The Fisher diagonal of the matrix, shaped (m, n)."""
    return st.fisher.reshape(shape)


@contextmanager
def layer_errors(method: str, target: MatrixTarget) -> Iterator[None]:
    """A solver's refusal (ValueError, LinAlgError) as a TensorSlimError naming the layer."""
    try:
        yield
    except TensorSlimError:
        raise
    except (ValueError, torch.linalg.LinAlgError) as exc:
        raise TensorSlimError(f"method {method!r} failed on layer {target.label}: {exc}") from exc


# -- nested factors and truncation curves ---------------------------------------------------------
def cached_nested(st: Any, key: tuple, k: int, compute: Callable[[int], Factors]) -> Factors:
    """Float64 nested factors A (m x k), B (k x n) (A[:, :r] @ B[:r] is the rank-r answer) from
    `compute(k)`; with statistics `st`, the factors of the largest k asked so far are kept in
    `st.cache[key]` (one compress call lists errors, then builds, from the same factors)."""
    if st is None:
        return compute(k)
    hit = st.cache.get(key)
    if hit is None or hit[0].shape[1] < k:
        hit = compute(k)
        st.cache[key] = hit
    return hit[0][:, :k], hit[1][:k]


def nested_svd(w: torch.Tensor, st: Any, k: int) -> Factors:
    """Plain SVD nested factors (Eckart-Young): A = U_k diag(S_k) (m x k), B = V_k^T (k x n)."""

    def compute(j: int) -> Factors:
        u, s, vh = torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)
        return u[:, :j] * s[:j], vh[:j]

    return cached_nested(st, ("svd", tuple(w.shape)), k, compute)


def nested_fwsvd(w: torch.Tensor, st: Any, k: int, eps: float) -> Factors:
    """FWSVD nested factors (Hsu et al. 2022, "Language model compression with weighted low-rank
    factorization", Sec. 3): the SVD of D W, D = diag(sqrt(row importance of the Fisher + eps)),
    A = D^-1 U_k S_k (m x k), B = V_k^T (k x n)."""

    def compute(j: int) -> Factors:
        rows = row_importance(fisher_of(st, w.shape), eps)
        a, b, _ = fwsvd_factors(w.detach().to(torch.float64), rows, j)
        return a, b

    return cached_nested(st, ("fwsvd", tuple(w.shape), eps), k, compute)


def nested_whitened(w: torch.Tensor, st: Any, k: int, damp: float) -> Factors:
    """Whitened nested factors (SVD-LLM, Wang et al. 2024, arXiv 2403.07378): the SVD of W S with
    S S^T = G + damping, A = U_k S_k (m x k), B = V_k^T S^-1 (k x n)."""

    def compute(j: int) -> Factors:
        a, b, _, _ = whitened_factors(w.detach().to(torch.float64), st.gram, j, damp)
        return a, b

    return cached_nested(st, ("whitened", tuple(w.shape), damp), k, compute)


def objective_curve(
    objective: str, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, st: Any
) -> tuple[torch.Tensor, float | None]:
    """(absolute error of every truncation r = 0..K, normaliser) under `objective`: the
    normaliser is ||W||^2 or tr(W G W^T) for the relative objectives, None for "fisher"."""
    if objective == "weight":
        c = truncation_curves(w, a, b)
        return c["weight"], float(c["weight_total"])
    if objective == "feature":
        c = truncation_curves(w, a, b, gram=st.gram)
        return c["feature"], float(c["feature_total"])
    if objective == "fisher":
        # exact every K/48 ranks, interpolated between (the O(K m n) residual loop dominates)
        fisher = fisher_of(st, w.shape)
        c = truncation_curves(w, a, b, fisher=fisher, fisher_stride=max(1, a.shape[1] // 48))
        return 0.5 * c["fisher"], None
    raise TensorSlimError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def objective_errors(
    objective: str, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, st: Any
) -> list[float]:
    """Error of every truncation r = 0..K of nested (a, b) under `objective` (core.objective)."""
    curve, total = objective_curve(objective, w, a, b, st)
    if total is not None:
        curve = curve / (total or 1.0)
    return curve.tolist()


# -- plan facts -----------------------------------------------------------------------------------
def risk_facts(
    w: torch.Tensor, st: Any, rank: int, w_hat: torch.Tensor, eps: float = 1e-6
) -> dict[str, float]:
    """Per-layer "SVD risk" (Hua et al., EMNLP 2022, "Numerical optimizations for weighted
    low-rank estimation on language model", Sec. 5 motivates a metric predicting when plain SVD
    hurts; the paper does not give its exact form, so this is our reading); {} without a Fisher.

    svd_fisher_error = 1/2 sum I (W - SVD_r(W))^2, the loss-increase estimate of plain SVD at this
    rank; weighted_fisher_error = the smaller of that estimate for `w_hat` (the weighted solution
    used) and for FWSVD at the same rank; svd_risk = their ratio minus 1: how much plain SVD loses
    to the weighted optimum."""
    if st is None or st.fisher is None:
        return {}
    fisher = fisher_of(st, w.shape)
    a, b = nested_svd(w, st, rank)
    svd_err = 0.5 * weighted_error(w, a @ b, fisher)
    af, bf = nested_fwsvd(w, st, rank, eps)
    best = min(0.5 * weighted_error(w, w_hat, fisher), 0.5 * weighted_error(w, af @ bf, fisher))
    return {
        "svd_fisher_error": svd_err,
        "weighted_fisher_error": best,
        "svd_risk": (svd_err / best - 1.0) if best > 0 else 0.0,
    }


def output_facts(w: torch.Tensor, st: Any, w_hat: torch.Tensor) -> dict[str, float]:
    """rel_output_error = ||(W - W_hat) X^T|| / ||W X^T|| on the calibration inputs; {} without
    a Gram matrix."""
    if is_sequential(st):
        return sequential_facts(w, st, w_hat)
    if st is None or st.gram is None or not st.rows:
        return {}
    zero = torch.zeros_like(w, dtype=torch.float64)
    total = output_error(w, zero, st.gram) or 1.0
    return {"rel_output_error": (output_error(w, w_hat, st.gram) / total) ** 0.5}


# -- sequential calibration -----------------------------------------------------------------------
# With X the inputs the original model gives a matrix W and X~ those the partly compressed model
# gives it on the same rows (calibrate/sequential.py), the compressed matrix should reproduce
# W X^T from X~: minimise ||W_hat X~^T - W X^T||_F. With G~ = X~^T X~ and C = X^T X~, the least
# squares solution is W* = W C G~^-1, and for any W_hat
#     ||W_hat X~^T - W X^T||^2 = ||(W_hat - W*) X~^T||^2 + ||W* X~^T - W X^T||^2,
# so the best rank-r W_hat would be the whitened truncated SVD of W* under G~. But W* is an
# n x n least-squares fit: with fewer calibration rows than inputs it overfits them (measured on
# all-MiniLM-L6-v2: mean cosine 0.24 on held-out sentences vs 0.69 without). So the input-side
# factor B (r x n) comes from the compressor (whitened under G~), and only the output-side factor
# is fit, an r x r system: A = W C B^T (B G~ B^T)^-1 (cf. the closed-form weight updates of
# SVD-LLM, Wang et al. 2024, Sec. 3.2, and Dobi-SVD, Wang et al. 2025).
#
# Anchoring. That fit is ill-posed wherever the compressed model's inputs X~ barely vary along a
# direction that B reads: measured on all-MiniLM-L6-v2 with 256 calibration sentences, the refit
# of layer 0's attention output matrix reached a Frobenius norm of 3.4e5 (the matrix's own is ~11),
# cancelling on the calibration rows and nowhere else, and one Adam step of recover (lr 1e-4)
# then dropped the embeddings' mean cosine from 0.76 to 0.10. So both fits also ask the matrix to
# map the original inputs X to the original outputs (Tikhonov regularisation towards W, weighted
# by SEQ_ANCHOR = lambda): minimise ||W_hat X~^T - W X^T||^2 + lambda ||(W_hat - W) X^T||^2, i.e.
#     W* = W (C + lambda G) (G~ + lambda G)^-1,   A = W (C + lambda G) B^T (B (G~ + lambda G) B^T)^-1
# (G = X^T X). Every direction the original inputs excite is pinned, and lambda = 0 is the plain
# refit.
SEQ_DAMP = 1e-9  # least damping of those solves, relative to the mean diagonal (lstsq if singular)
SEQ_ANCHOR = 0.1  # lambda above: the weight of the original inputs in the refits


def is_sequential(st: Any) -> bool:
    """True when `st` holds sequential statistics (cross and source Grams)."""
    return st is not None and getattr(st, "cross", None) is not None


def _damped(g: torch.Tensor, damp: float) -> torch.Tensor:
    mean = float(torch.diagonal(g).mean()) if g.numel() else 0.0
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return g + max(damp, SEQ_DAMP) * (mean if mean > 0 else 1.0) * eye


def _spd_solve(g: torch.Tensor, rhs: torch.Tensor, damp: float) -> torch.Tensor:
    """(G + damping)^-1 rhs for a symmetric positive semidefinite G (float64)."""
    chol, info = torch.linalg.cholesky_ex(_damped(g, damp))
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.lstsq(_damped(g, damp), rhs).solution


def anchored_stats(st: Any) -> Any:
    """Sequential statistics `st` with the original inputs added, weighted SEQ_ANCHOR (the
    anchoring above): gram G~ + lambda G, cross C + lambda G, source_gram (1 + lambda) G, the
    statistics of the calibration rows [X~; sqrt(lambda) X] mapped to [X; sqrt(lambda) X]. The
    solvers fit on these; the plan's errors are measured on `st` itself. Made once per `st`;
    statistics that are not sequential (no source Gram) are returned as they are."""
    if getattr(st, "source_gram", None) is None or SEQ_ANCHOR == 0:
        return st
    hit = st.cache.get("anchored")
    if hit is None:
        lam, g = SEQ_ANCHOR, st.source_gram
        hit = dataclasses.replace(
            st, gram=st.gram + lam * g, cross=st.cross + lam * g, source_gram=(1 + lam) * g,
            cache={},
        )  # fmt: skip
        st.cache["anchored"] = hit
    return hit


def sequential_target(w: torch.Tensor, st: Any, damp: float = 0.0) -> torch.Tensor:
    """W* = W C G~^-1 (m x n, float64): the matrix that maps X~ closest to the original W X^T.
    An n x n least-squares fit: trust it only with many more calibration rows than inputs (the
    low-rank kinds refit only their output-side factor, refit_outer). Pass anchored_stats."""
    w64 = w.detach().to(torch.float64)
    # W* = (G~^-1 C^T W^T)^T, G~ symmetric
    return _spd_solve(st.gram, st.cross.T @ w64.T, damp).T


def refit_outer(w: torch.Tensor, st: Any, b: torch.Tensor, damp: float = 0.0) -> torch.Tensor:
    """A = W C B^T (B G~ B^T)^-1 (m x r, float64): the output-side factor of least sequential
    output error given the input-side factor `b` (r x n). Pass anchored_stats."""
    w64, b64 = w.detach().to(torch.float64), b.detach().to(torch.float64)
    small = b64 @ st.gram @ b64.T  # r x r
    rhs = b64 @ st.cross.T @ w64.T  # r x m = (W C B^T)^T
    return _spd_solve(small, rhs, damp).T


def sequential_output_error(w: torch.Tensor, st: Any, w_hat: torch.Tensor) -> float:
    """||W_hat X~^T - W X^T||^2 / ||W X^T||^2 from the three Grams (no rows kept)."""
    w64, h64 = w.detach().to(torch.float64), w_hat.detach().to(torch.float64)
    total = float(torch.sum((w64 @ st.source_gram) * w64))
    err = (
        float(torch.sum((h64 @ st.gram) * h64))
        - 2.0 * float(torch.sum((h64 @ st.cross.T) * w64))
        + total
    )
    return max(err, 0.0) / total if total > 0 else 0.0


def sequential_facts(w: torch.Tensor, st: Any, w_hat: torch.Tensor) -> dict[str, float]:
    """rel_output_error on the original outputs from the compressed model's inputs; {} without
    sequential statistics."""
    if not is_sequential(st):
        return {}
    return {"rel_output_error": sequential_output_error(w, st, w_hat) ** 0.5}


# -- shapes, dtypes and overflow ------------------------------------------------------------------
def matrix_view(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as a matrix (m x n): a kernel (m, c, *k) is flattened to (m, c * prod(k))."""
    return weight if weight.ndim == 2 else weight.reshape(weight.shape[0], -1)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def refuse_overflow(op: nn.Module, target: Any, method: str, rank: Any) -> nn.Module:
    """`op` (the compressed matrix operator or layer), or UnsupportedLayerError naming the layer
    and dtype where a factor does not fit the target's dtype (a float16 layer whose factors exceed
    65504 even after the rescaling of decompose.svd.cast_factors / layers.tensor_conv.fit_range).
    `target`: a MatrixTarget or a LayerTarget."""
    bad = [
        n
        for n, p in op.named_parameters()
        if p.is_floating_point() and not bool(torch.isfinite(p).all())
    ]
    if not bad:
        return op
    fallback = getattr(target, "dtype", torch.float32)
    dtype = next((p.dtype for p in op.parameters() if p.is_floating_point()), fallback)
    name = dtype_name(dtype)
    module = getattr(target, "module", None)
    if module is not None:  # a whole layer: name its type too
        where = f"{(target.layer or type(module).__name__)!r} ({type(module).__name__}, {name})"
    else:
        where = f"{target.label} ({name})"
    raise UnsupportedLayerError(
        f"layer {where}: the {method!r} factors at rank {rank} do not fit in "
        f"{name} (largest finite value {torch.finfo(dtype).max:g}; {', '.join(bad)} overflow); "
        "compress a float32 copy of the model, or exclude this layer"
    )
