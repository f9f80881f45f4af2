"""Kinds "quant", "binary" and "ternary": weights replaced by a few shared values (codes).

The C steps of quantization in the learning-compression framework (Carreira-Perpinan 2017,
"Model compression as constrained optimization, with application to neural nets. Part I", and
Idelbayev & Carreira-Perpinan 2021, "An empirical comparison of quantization, pruning and
low-rank neural network compression using the LC toolkit"), each the exact minimiser of
||W - W_hat||_F^2 over its set:

- quant {"bits": b}, b = 1..8: an adaptive codebook of K = 2^b values per layer (or per output
  row with option per_channel=True), each weight replaced by its nearest codebook value. The best
  codebook is the 1-D k-means of the weights, solved exactly by dynamic programming
  (decompose.kmeans1d; above its size limit by a summary DP refined by Lloyd, see there).
- binary {"bits": 1}: {-a, a}; for any a > 0 the nearest level is a * sign(w), and then
  a = mean |w| minimises sum (|w| - a)^2: the exact optimum (Rastegari et al. 2016, XNOR-Net).
- ternary {"bits": 2}: {-a, 0, a}; keeping the t largest |w| (the rest 0) at a = their mean
  leaves ||W||^2 - (sum of the t largest |w|)^2 / t, so the best t maximises (S_t)^2 / t over
  t = 1..n (exact; Li, Zhang & Liu 2016 approximate this threshold, here it is searched).

Storage (the "bits" cost model): n codes of b bits (binary 1, ternary 2: the codes are stored
packed at 2 bits, not log2(3)), plus the codebook at the weight's dtype (K values per group;
binary and ternary one scale per group). Parameters ("params" cost model) count the numbers
stored: one code per weight plus the codebook entries, so quantization never lowers a params
budget: it is a bits method. FLOPs are the dense product's (the modules dequantize and multiply).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorslim.compressors._factors import layer_errors, matrix_view
from tensorslim.core.compressor import (
    Compressor,
    Cost,
    dtype_bits,
    register_compressor,
    target_stats,
    target_weight,
)
from tensorslim.core.cost import dense_cost
from tensorslim.core.objective import objective_error
from tensorslim.core.target import MatrixTarget
from tensorslim.decompose.kmeans1d import DP_LIMIT, exact_feasible, kmeans_1d_all, nearest
from tensorslim.errors import NonFiniteWeightError, TensorSlimError, is_int, short_repr
from tensorslim.layers.quantized import SIGN_BITS, SIGN_LEVELS, QuantizedOp, ScaledSignOp

MAX_BITS = 8


# -- the math ---------------------------------------------------------------------------------
def _rows(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """`weight` as float64 rows: (m, rest) per channel, else one row; refuses NaN/Inf."""
    w = matrix_view(weight.detach())
    if w.numel() == 0:
        raise TensorSlimError("cannot quantize an empty weight")
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteWeightError("the weight contains NaN or infinite values; cannot quantize it")
    w = w.to(torch.float64)
    return w if per_channel else w.reshape(1, -1)


def _codes(rows: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook value (book (G, K) sorted, at the weight's dtype)."""
    return nearest(rows.contiguous(), book.to(torch.float64))


def quantize(
    weight: torch.Tensor, bits: int, per_channel: bool = False, *, dp_limit: int = DP_LIMIT
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook, codes) of `weight` ((m, n) or a kernel (m, ...)) at `bits` bits: the k-means
    codebook (G, 2^bits) at the weight's dtype, sorted (G = m per channel, else 1), and codes
    int64 (m, n') indexing it, each the nearest codebook value (n' = numel / m)."""
    return quantize_all(weight, [bits], per_channel, dp_limit=dp_limit)[bits]


def quantize_all(
    weight: torch.Tensor, bits: list[int], per_channel: bool = False, *, dp_limit: int = DP_LIMIT
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """`quantize` for several bit widths from one k-means run: {b: (codebook, codes)}."""
    for b in bits:
        why = bits_problem(b)
        if why:
            raise TensorSlimError(why)
    rows = _rows(weight, per_channel)
    m = matrix_view(weight).shape[0]
    centers = kmeans_1d_all(rows, [1 << b for b in bits], dp_limit=dp_limit)
    out = {}
    for b in bits:
        book = centers[1 << b].to(device=weight.device, dtype=weight.dtype)
        codes = _codes(rows, book)
        out[b] = (book, codes.reshape(m, -1))
    return out


def dequantize(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """W (m, n) from a codebook (G, K) (G = 1 or m) and codes (m, n)."""
    if codebook.shape[0] == 1:
        return codebook[0][codes]
    return torch.gather(codebook, 1, codes)


def binarize(weight: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale (G,), codes (m, n')) of the best {-a, a} approximation: a = mean |w| (per row with
    per_channel), code 1 for w >= 0 (+a) and 0 for w < 0 (-a)."""
    rows = _rows(weight, per_channel)
    m = matrix_view(weight).shape[0]
    scale = rows.abs().mean(dim=1).to(weight.dtype)
    return scale, (rows >= 0).to(torch.int64).reshape(m, -1)


def ternarize(weight: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale (G,), codes (m, n')) of the best {-a, 0, a} approximation: the t largest |w| are
    kept at a = their mean, t maximising (sum of the t largest |w|)^2 / t; codes 0 (-a), 1 (0),
    2 (+a)."""
    rows = _rows(weight, per_channel)
    m = matrix_view(weight).shape[0]
    mag, order = torch.sort(rows.abs(), dim=1, descending=True)
    top = torch.cumsum(mag, dim=1)
    t = torch.arange(1, rows.shape[1] + 1, dtype=torch.float64, device=rows.device)
    best = torch.argmax(top * top / t, dim=1)  # first maximiser: the fewest nonzeros among ties
    scale = top.gather(1, best[:, None])[:, 0] / (best + 1).to(torch.float64)
    kept = torch.arange(rows.shape[1], device=rows.device)[None] <= best[:, None]  # sorted order
    keep = torch.zeros_like(kept).scatter(1, order, kept)
    codes = torch.where(keep, torch.where(rows >= 0, 2, 0), 1)
    return scale.to(weight.dtype), codes.reshape(m, -1)


def _sign_dense(kind: str, scale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    levels = torch.tensor(SIGN_LEVELS[kind], dtype=scale.dtype, device=scale.device)
    return scale.reshape(-1, 1) * levels[codes]


def bits_problem(bits: Any) -> str | None:
    """None if `bits` is an integer in [1, 8], else what is accepted."""
    if is_int(bits) and 1 <= bits <= MAX_BITS:
        return None
    return f"bits must be an integer in [1, {MAX_BITS}]; got {short_repr(bits)}"


# -- shared compressor parts ----------------------------------------------------------------------
@dataclass(frozen=True)
class QuantOptions:
    """per_channel: one codebook (or scale) per output row of the matrix (output channel of a
    conv) instead of one per matrix."""

    per_channel: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.per_channel, bool):
            raise ValueError(
                f"option 'per_channel' must be true or false; got {short_repr(self.per_channel)}"
            )


class _Codebook(Compressor):
    """What quant, binary and ternary share: checks, cost, grid, proposals."""

    Options = QuantOptions

    def _groups(self, target: MatrixTarget) -> int:
        return target.shape[0] if self.options.per_channel else 1

    def _bits(self, params: Mapping[str, Any]) -> int:
        raise NotImplementedError

    def _book_size(self, bits: int) -> int:
        """Stored floats per group."""
        raise NotImplementedError

    def _allowed_bits(self) -> list[int]:
        raise NotImplementedError

    def check(self, target: MatrixTarget, params: Mapping[str, Any]) -> str | None:
        return self._params_problem(params)

    def _params_problem(self, params: Mapping[str, Any]) -> str | None:
        unknown = [k for k in params if k != "bits"]
        if unknown:
            return f"unknown parameter {short_repr(unknown[0])} for {self.kind!r}; it takes: bits"
        return self._bits_problem(params.get("bits", self._default_bits()))

    def _checked(self, params: Mapping[str, Any]) -> int:
        """The bit width of valid `params` (TensorSlimError naming the kind otherwise)."""
        why = self._params_problem(params)
        if why:
            raise TensorSlimError(f"{self.kind!r}: {why}")
        return self._bits(params)

    def _default_bits(self) -> Any:
        return None

    def _bits_problem(self, bits: Any) -> str | None:
        raise NotImplementedError

    def cost(self, target: MatrixTarget, params: Mapping[str, Any]) -> Cost:
        m, n = target.shape
        b = self._bits(params)
        book = self._groups(target) * self._book_size(b)
        return Cost(m * n + book, m * n * b + book * dtype_bits(target.dtype), target.flops(m * n))

    def grid(self, target: MatrixTarget) -> list[dict[str, Any]]:
        """The bit widths whose storage is below the dense matrix's, rising."""
        dense = dense_cost(target).bits
        fits = [b for b in self._allowed_bits() if self.cost(target, {"bits": b}).bits < dense]
        return [{"bits": b} for b in fits]

    def too_small(self, target: MatrixTarget) -> str | None:
        if self.grid(target):
            return None
        return f"too small to gain: no {self.kind!r} form stores fewer bits than the dense matrix"

    def errors(
        self, target: MatrixTarget, grid: list[dict[str, Any]], objective: str
    ) -> list[float]:
        if not grid:
            return []
        w = target_weight(target)
        with layer_errors(self.method, target):
            projected = self._project_all(w, [self._bits(p) for p in grid])
        stats = target_stats(target)
        return [objective_error(objective, w, projected[self._bits(p)], stats) for p in grid]

    def _project_all(self, weight: torch.Tensor, bits: list[int]) -> dict[int, torch.Tensor]:
        return {b: self.project(weight, {"bits": b}) for b in bits}


@register_compressor("quant")
class Quant(_Codebook):
    """Adaptive (k-means) quantization: params {"bits": b}, b = 1..8; operator QuantizedOp
    (codebook (G, 2^b) + codes packed at b bits)."""

    def _bits(self, params: Mapping[str, Any]) -> int:
        return int(params["bits"])

    def _book_size(self, bits: int) -> int:
        return 1 << bits

    def _allowed_bits(self) -> list[int]:
        return list(range(1, MAX_BITS + 1))

    def _bits_problem(self, bits: Any) -> str | None:
        return bits_problem(bits)

    def project(self, weight: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """Each weight replaced by its nearest value of the optimal 2^bits-value codebook; same
        shape and dtype."""
        book, codes = quantize(weight, self._checked(params), self.options.per_channel)
        return dequantize(book, codes).reshape(weight.shape)

    def _project_all(self, weight: torch.Tensor, bits: list[int]) -> dict[int, torch.Tensor]:
        parts = quantize_all(weight, bits, self.options.per_channel)
        return {b: dequantize(*bc).reshape(weight.shape) for b, bc in parts.items()}

    def build(
        self, target: MatrixTarget, params: Mapping[str, Any]
    ) -> tuple[nn.Module, dict[str, Any]]:
        b = self._checked(params)
        w = target_weight(target)
        with layer_errors(self.method, target):
            book, codes = quantize(w, b, self.options.per_channel)
        exact = exact_feasible(_rows(w, self.options.per_channel), 1 << b)
        facts = {"codebook": "exact k-means" if exact else "k-means (summary DP + Lloyd)"}
        return QuantizedOp.from_codes(book, codes, b), facts

    def empty(self, target: MatrixTarget, params: Mapping[str, Any]) -> nn.Module:
        m, n = target.shape
        return QuantizedOp(
            n, m, self._checked(params), self._groups(target), device=target.device,
            dtype=target.dtype,
        )


class _ScaledSign(_Codebook):
    """binary / ternary: fixed levels times one optimal scale per group; params {"bits": 1}
    (binary) or {"bits": 2} (ternary), optional (there is one width)."""

    def _bits(self, params: Mapping[str, Any]) -> int:
        return SIGN_BITS[self.kind]

    def _book_size(self, bits: int) -> int:
        return 1

    def _allowed_bits(self) -> list[int]:
        return [SIGN_BITS[self.kind]]

    def _default_bits(self) -> Any:
        return SIGN_BITS[self.kind]

    def _bits_problem(self, bits: Any) -> str | None:
        want = SIGN_BITS[self.kind]
        if is_int(bits) and bits == want:
            return None
        return (
            f"{self.kind!r} stores {want}-bit codes: bits must be {want} (or left out); "
            f"got {short_repr(bits)}"
        )

    def _split(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fn = binarize if self.kind == "binary" else ternarize
        return fn(weight, self.options.per_channel)

    def project(self, weight: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """The best approximation by the scaled levels; same shape and dtype."""
        self._checked(params)
        scale, codes = self._split(weight)
        return _sign_dense(self.kind, scale, codes).reshape(weight.shape)

    def build(
        self, target: MatrixTarget, params: Mapping[str, Any]
    ) -> tuple[nn.Module, dict[str, Any]]:
        self._checked(params)
        with layer_errors(self.method, target):
            scale, codes = self._split(target_weight(target))
        return ScaledSignOp.from_scale(self.kind, scale, codes), {}

    def empty(self, target: MatrixTarget, params: Mapping[str, Any]) -> nn.Module:
        m, n = target.shape
        self._checked(params)
        return ScaledSignOp(
            n, m, self.kind, self._groups(target), device=target.device, dtype=target.dtype
        )


@register_compressor("binary")
class Binary(_ScaledSign):
    """{-a, a} with a = mean |w| (per group): 1 bit per weight plus one scale per group."""


@register_compressor("ternary")
class Ternary(_ScaledSign):
    """{-a, 0, a} with the optimal threshold and scale: 2 bits per weight plus one scale per
    group."""
