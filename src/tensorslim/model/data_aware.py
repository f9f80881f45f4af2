"""Data-aware factorizers: "fwsvd", "fvd" and "whitened" for nn.Linear, convolutions and GPT-2's
Conv1D, plus plain "svd" for Conv1D, and option errors under a data-aware objective.

They read calibration statistics from `LayerSite.stats` (tensorslim.calibrate.LayerStats: the inputs'
X^T X and/or the Fisher diagonal of the weight) and settings from `LayerSite.settings`
({"objective": ..., "solver": ..., ...}), both filled by `tensorslim.compress(..., calibration=...)`.

Objectives (the `error` of each Option, which the global allocator sums):
- "weight":  relative squared weight error ||W - W_r||^2 / ||W||^2 (the default for "svd");
- "fisher":  1/2 sum_ij I_ij (W - W_r)_ij^2, the diagonal-Fisher second-order estimate of the loss
             increase (absolute, so that layers are comparable; default for "fwsvd" and "fvd");
- "feature": relative squared output error ||(W - W_r) X^T||^2 / ||W X^T||^2 on the calibration
             inputs (default for "whitened").
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorslim.decompose import (
    DEFAULT_SOLVER,
    SOLVERS,
    fvd,
    fwsvd_factors,
    max_useful_rank,
    row_importance,
    truncation_curves,
    weighted_error,
    whitened_factors,
)
from tensorslim.decompose.svd import cast_factors
from tensorslim.errors import TensorSlimError
from tensorslim.layers import LowRankConv, LowRankLinear
from tensorslim.model.factorizers import (
    ConvSVD,
    LinearSVD,
    MatrixSVDFactorizer,
    refuse_overflow,
)
from tensorslim.model.registry import LayerSite, Option, register

OBJECTIVES = ("weight", "fisher", "feature")
DEFAULT_OBJECTIVE = {"svd": "weight", "fwsvd": "fisher", "fvd": "fisher", "whitened": "feature"}
NEEDS = {"svd": frozenset(), "fwsvd": frozenset({"fisher"}), "fvd": frozenset({"fisher"})}
NEEDS["whitened"] = frozenset({"gram"})
OBJECTIVE_NEEDS = {"weight": frozenset(), "fisher": frozenset({"fisher"})}
OBJECTIVE_NEEDS["feature"] = frozenset({"gram"})

# Settings and their defaults (LayerSite.settings overrides them).
DEFAULTS: dict[str, Any] = {
    "objective": None,  # None: DEFAULT_OBJECTIVE[method]
    "eps": 1e-6,  # FWSVD: added to the max-normalised row importance
    "damp": 1e-6,  # whitened: Gram damping, relative to its mean diagonal
    "solver": DEFAULT_SOLVER,  # fvd: "als", "em" or "adam"
    "iters": 30,  # fvd: maximum iterations (Adam: steps)
    "tol": 1e-4,  # fvd: stop when the objective improves by less than this (relative)
    "lr": 1e-2,  # fvd Adam: step relative to the factors' RMS
    "time_limit": None,  # fvd: seconds per layer
}


@dataclass(frozen=True)
class OptionSpec:
    """What one method option accepts: a number of `kind` (float or int) above `minimum`, or a
    str among `choices`. None always means the default."""

    kind: type
    minimum: float | None = None
    strict: bool = False  # True: the minimum itself is refused
    choices: tuple[str, ...] = ()

    def accepted(self) -> str:
        """What the option accepts, in words."""
        if self.kind is str:
            return "one of " + ", ".join(map(repr, self.choices))
        what = "an integer" if self.kind is int else "a finite number"
        if self.minimum is None:
            return what
        return f"{what} {'>' if self.strict else '>='} {self.minimum:g}"

    def check(self, name: str, value: Any) -> Any:
        """`value` as a plain float / int / str, or TensorSlimError naming the option and value."""
        if value is None:
            return None
        out = self._convert(value)
        if out is None or not self._in_range(out):
            raise TensorSlimError(
                f"method_options[{name!r}] must be {self.accepted()} (or None for the default "
                f"{DEFAULTS[name]!r}); got {value!r} ({type(value).__name__})"
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


# The type and range of every method option (DEFAULTS but "objective", which is its own argument).
OPTIONS: dict[str, OptionSpec] = {
    "eps": OptionSpec(float, 0.0, strict=True),  # keeps every FWSVD row weight positive
    "damp": OptionSpec(float, 0.0),
    "solver": OptionSpec(str, choices=SOLVERS),
    "iters": OptionSpec(int, 1),
    "tol": OptionSpec(float, 0.0),
    "lr": OptionSpec(float, 0.0, strict=True),
    "time_limit": OptionSpec(float, 0.0, strict=True),
}


def check_method_options(options: Any) -> dict[str, Any]:
    """The method options with checked, normalised values (see OPTIONS); {} for None.

    Raises TensorSlimError naming the option, its value and what it accepts, or listing the known
    options for an unknown name."""
    if options is None:
        return {}
    known = ", ".join(map(repr, OPTIONS))
    if not isinstance(options, Mapping):
        raise TensorSlimError(
            "method_options must be a dict of option name -> value (known options: "
            f"{known}); got {type(options).__name__} {options!r:.80}"
        )
    checked: dict[str, Any] = {}
    for name, value in options.items():
        spec = OPTIONS.get(name) if isinstance(name, str) else None
        if spec is None:
            hint = "; pass objective=... as its own argument" if name == "objective" else ""
            raise TensorSlimError(f"unknown method_options key {name!r}; known: {known}{hint}")
        checked[name] = spec.check(name, value)
    return checked


def setting(site: LayerSite, key: str) -> Any:
    """The site's value for `key`, or its default."""
    value = (site.settings or {}).get(key)
    return DEFAULTS[key] if value is None else value


@contextmanager
def layer_errors(method: str, site: LayerSite) -> Iterator[None]:
    """A solver's refusal (ValueError, LinAlgError) as a TensorSlimError naming the layer."""
    try:
        yield
    except TensorSlimError:
        raise
    except (ValueError, torch.linalg.LinAlgError) as exc:
        raise TensorSlimError(f"method {method!r} failed on layer {site.name!r}: {exc}") from exc


def _check_finite_stats(site: LayerSite, st: Any, need: frozenset[str]) -> None:
    """Refuse statistics holding NaN / Inf (calibration checks each batch; a sum may overflow)."""
    for key in ("gram", "fisher"):
        t = getattr(st, key) if key in need else None
        if t is not None and not bool(torch.isfinite(t).all()):
            what = "input Gram matrix" if key == "gram" else "Fisher estimate"
            raise TensorSlimError(
                f"the calibration {what} of layer {site.name!r} holds NaN or Inf (its sum over "
                "the batches overflowed?); scale the calibration data or the loss down"
            )


def _stats(site: LayerSite, method: str, need: frozenset[str], part: str = ""):
    st = site.stats
    if st is not None and part:
        st = st.parts.get(part)
    missing = []
    if "gram" in need and (st is None or st.gram is None or st.rows == 0):
        missing.append("calibration inputs (calibration=batches)")
    if "fisher" in need and (st is None or st.fisher is None):
        missing.append("a Fisher estimate (calibration=batches and loss=fn)")
    if missing:
        raise TensorSlimError(
            f"method {method!r} on layer {site.name!r} needs "
            + " and ".join(missing)
            + "; pass them to tensorslim.compress"
        )
    _check_finite_stats(site, st, need)
    return st


def nested_factors(
    method: str, w: torch.Tensor, st: Any, k: int, settings: LayerSite
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 nested factors (A[:, :r] @ B[:r] is the method's rank-r answer) for r <= k.

    fvd has no nested solution: its options use the FWSVD start (its solvers never end above it).
    With statistics `st`, the factors of the largest k asked so far are cached in `st.cache`."""
    if st is not None:
        if method == "fvd":
            method = "fwsvd"
        key = (method, tuple(w.shape), setting(settings, "eps"), setting(settings, "damp"))
        hit = st.cache.get(key)
        if hit is None or hit[0].shape[1] < k:
            hit = _nested(method, w, st, k, settings)
            st.cache[key] = hit
        return hit[0][:, :k], hit[1][:k]
    return _nested(method, w, st, k, settings)


def _nested(method: str, w: torch.Tensor, st: Any, k: int, settings: LayerSite):
    w64 = w.detach().to(torch.float64)
    if method == "svd":
        u, s, vh = torch.linalg.svd(w64, full_matrices=False)
        return u[:, :k] * s[:k], vh[:k]
    if method in ("fwsvd", "fvd"):
        a, b, _ = fwsvd_factors(w64, row_importance(st.fisher, setting(settings, "eps")), k)
        return a, b
    if method == "whitened":
        a, b, _, _ = whitened_factors(w64, st.gram, k, setting(settings, "damp"))
        return a, b
    raise ValueError(f"no nested factors for method {method!r}")


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
        c = truncation_curves(w, a, b, fisher=st.fisher, fisher_stride=max(1, a.shape[1] // 48))
        return 0.5 * c["fisher"], None
    raise TensorSlimError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def objective_errors(
    objective: str, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, st: Any
) -> list[float]:
    """Error of every truncation r = 0..K of (a, b) under `objective` (see module docstring)."""
    curve, total = objective_curve(objective, w, a, b, st)
    if total is not None:
        curve = curve / (total or 1.0)
    return curve.tolist()


def matrix_options(
    f: MatrixSVDFactorizer, module: nn.Module, site: LayerSite, method: str
) -> list[Option]:
    """The options of a matrix factorizer with errors under the site's objective."""
    objective = setting(site, "objective") or DEFAULT_OBJECTIVE[method]
    st = _stats(site, method, NEEDS[method] | OBJECTIVE_NEEDS[objective])
    w = f.matrix(module)
    m, n = w.shape
    r_max = max_useful_rank(m, n)
    if r_max == 0:
        return []
    a, b = nested_factors(method, w, st, r_max, site)
    errs = objective_errors(objective, w, a, b, st)
    p = f._positions(module, site)
    bias = f._bias(module)
    return [
        Option(
            rank=r,
            params=r * (m + n) + bias,
            flops=None if p is None else 2 * p * r * (m + n),
            error=errs[r],
        )
        for r in range(1, r_max + 1)
    ]


def solve(
    method: str, w: torch.Tensor, st: Any, rank: int, site: LayerSite
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The method's rank-`rank` factors (float64) and facts for the plan."""
    extra: dict[str, Any] = {}
    if method == "fvd":
        res = fvd(
            w,
            st.fisher,
            rank,
            solver=setting(site, "solver"),
            iters=setting(site, "iters"),
            tol=setting(site, "tol"),
            lr=setting(site, "lr"),
            time_limit=setting(site, "time_limit"),
            init=nested_factors("fwsvd", w, st, rank, site),
        )
        extra["fvd"] = {
            "solver": res.solver,
            "iterations": res.iterations,
            "converged": res.converged,
            "start": res.history[0],
            "objective": res.objective,
            "seconds": round(res.seconds[-1], 4),
        }
        return res.a.to(torch.float64), res.b.to(torch.float64), extra
    a, b = nested_factors(method, w, st, rank, site)
    return a, b, extra


def risk_facts(w: torch.Tensor, st: Any, rank: int, w_hat: torch.Tensor, site: LayerSite):
    """Per-layer "SVD risk" (Hua et al., EMNLP 2022, Sec. 5 motivates a metric predicting when plain
    SVD hurts; the paper does not give its exact form, so this is our reading). Here:

    svd_fisher_error = 1/2 sum I (W - SVD_r(W))^2, the loss-increase estimate of plain SVD at this
    rank, and svd_risk = that error / the Fisher-weighted error of the weighted solution actually used
    (FWSVD or FVD at the same rank), minus 1: how much plain SVD loses to the weighted optimum.
    """
    if st is None or st.fisher is None:
        return {}
    a, b = nested_factors("svd", w, st, rank, site)
    svd_err = 0.5 * weighted_error(w, a @ b, st.fisher)
    wf, bf = nested_factors("fwsvd", w, st, rank, site)
    best = min(
        0.5 * weighted_error(w, w_hat, st.fisher), 0.5 * weighted_error(w, wf @ bf, st.fisher)
    )
    return {
        "svd_fisher_error": svd_err,
        "weighted_fisher_error": best,
        "svd_risk": (svd_err / best - 1.0) if best > 0 else 0.0,
    }


class DataAwareMixin:
    """Options and factors from calibration statistics, for a MatrixSVDFactorizer subclass that
    implements `build(module, a, b)` (the factorized module from float factors)."""

    def options(self, module: nn.Module, site: LayerSite) -> list[Option]:
        with layer_errors(self.method, site):
            return matrix_options(self, module, site, self.method)

    def apply(self, module: nn.Module, rank: int) -> nn.Module:
        raise TensorSlimError(
            f"method {self.method!r} needs calibration statistics: use tensorslim.compress(..., "
            "calibration=batches, loss=fn); to rebuild a saved model use tensorslim.load"
        )

    def apply_site(self, module: nn.Module, rank: int, site: LayerSite):
        with layer_errors(self.method, site):
            return self._apply_site(module, rank, site)

    def _apply_site(self, module: nn.Module, rank: int, site: LayerSite):
        st = _stats(site, self.method, self.needs)
        w = self.matrix(module)
        a, b, extra = solve(self.method, w, st, rank, site)
        w_hat = a @ b
        extra.update(risk_facts(w, st, rank, w_hat, site))
        if st is not None and st.gram is not None and st.rows:
            from tensorslim.decompose import output_error

            total = output_error(w, torch.zeros_like(w, dtype=torch.float64), st.gram) or 1.0
            extra["rel_output_error"] = (output_error(w, w_hat, st.gram) / total) ** 0.5
        new = self.build(module, *cast_factors(a, b, w.dtype))
        return refuse_overflow(new, module, site, self.method, rank), extra


class LinearData(DataAwareMixin, LinearSVD):
    def build(self, module, a, b):
        return LowRankLinear.from_factors(a, b, module.bias)


class ConvData(DataAwareMixin, ConvSVD):
    def unsupported_reason(self, module):
        reason = super().unsupported_reason(module)
        if reason is None and "gram" in self.needs:
            from tensorslim.calibrate import adapter_for

            why = adapter_for(module).unsupported_reason(module)
            if why is not None:
                return f"{self.method!r} cannot collect inputs of this conv: {why}"
        return reason

    def build(self, module, a, b):
        rank = a.shape[1]
        layer = LowRankConv.empty_like(module, rank)
        k = module.kernel_size
        with torch.no_grad():
            layer.first.weight.copy_(b.reshape(rank, *module.weight.shape[1:]))
            layer.second.weight.copy_(a.reshape(a.shape[0], rank, *([1] * len(k))))
            if module.bias is not None:
                layer.second.bias.copy_(module.bias.detach())
        return layer


class Conv1DSVD(MatrixSVDFactorizer):
    """Hugging Face GPT-2 `Conv1D` (y = x @ weight + bias, weight (in, out)) by the truncated SVD of
    W = weight^T; the replacement is a LowRankLinear computing the same function."""

    def matrix(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().T

    def unsupported_reason(self, module):
        m, n = self.matrix(module).shape
        if max_useful_rank(m, n) == 0:
            return f"too small to gain: no rank r gives r(m+n) < mn for a {m}x{n} matrix"
        return None

    def build(self, module, a, b):
        return LowRankLinear.from_factors(a, b, module.bias)

    def apply(self, module, rank):
        a, b = nested_factors("svd", self.matrix(module), None, rank, LayerSite(""))
        w = module.weight
        return self.build(module, *cast_factors(a, b, w.dtype))

    def empty(self, module, rank):
        nx, nf = module.weight.shape
        return LowRankLinear(
            nx,
            nf,
            rank,
            bias=module.bias is not None,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )

    def weight(self, module):
        return self.matrix(module)


class Conv1DData(DataAwareMixin, Conv1DSVD):
    pass


def with_objective(
    factorizer: Any, module: nn.Module, site: LayerSite, opts: list[Option]
) -> list[Option]:
    """Options of a plain factorizer with their errors replaced by the site's data-aware objective
    (e.g. "svd" allocated by Fisher or output error). Factorizers without a matrix view, or a
    "weight" objective, keep their options."""
    objective = setting(site, "objective")
    if objective in (None, "weight") or not isinstance(factorizer, MatrixSVDFactorizer):
        return opts
    if isinstance(factorizer, DataAwareMixin) or not opts:
        return opts
    st = _stats(site, factorizer.method, OBJECTIVE_NEEDS[objective])
    w = factorizer.matrix(module)
    k = max(o.rank for o in opts)
    with layer_errors(factorizer.method, site):
        a, b = nested_factors("svd", w, st, k, site)
        errs = objective_errors(objective, w, a, b, st)
    return [Option(o.rank, o.params, o.flops, errs[o.rank]) for o in opts]


def register_data_aware() -> None:
    """Register "fwsvd", "fvd", "whitened" (Linear, Conv1d/2d/3d, Conv1D) and "svd" for Conv1D."""
    conv1d_hf = "transformers.pytorch_utils.Conv1D"
    register(conv1d_hf, "svd", Conv1DSVD())
    for method in ("fwsvd", "fvd", "whitened"):
        for klass, types in (
            (LinearData, [nn.Linear]),
            (ConvData, [nn.Conv1d, nn.Conv2d, nn.Conv3d]),
        ):
            for t in types:
                f = klass()
                f.needs = NEEDS[method]
                register(t, method, f)
        f = Conv1DData()
        f.needs = NEEDS[method]
        register(conv1d_hf, method, f)
