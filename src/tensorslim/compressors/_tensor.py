"""Shared code of the tensor-decomposition compressors of conv kernels ("cp", "tucker2", "tt",
"spatial"): rank forms, parameters and FLOPs of the factorized chains, the keep grid, and the cache
of decompositions keyed by kernel content.

Ranks from keep (Schuurmans et al., ICLR 2023, following tltorch's `rank=<float>`): CP takes the
largest R with R(out + in + sum k) <= keep * dense; Tucker-2 and TT take ranks proportional to their
full (exact) ranks, scaled by the largest factor that fits; spatial SVD the largest r with
r(in kh + out kw) <= keep * dense. A component's Cost excludes the bias (kept as it is, see
core.cost), but the keeps of the grid are keeps of the layer, bias included, as the allocators
count them: a grid rank lands just under its keep of the whole layer.

The error of an iterative or multi-rank decomposition is only known after computing it, so CP and
TT are evaluated on a coarse grid of keeps (`GRID`, 12 values from 0.02 to 0.9 that include 0.1,
0.25, 0.5 and 0.75; kernels above `BIG_KERNEL` elements that take the exact path use `BIG_GRID`, 6
values, to bound CP's time). Ranks from a keep land just under it (see
decompose.tensor._largest_rho). Decompositions are cached (by kernel content, kind, rank and
options; `CACHE_SIZE` entries) so that building the chosen proposal does not recompute it.

Large kernels (`is_large`: at least `LARGE_KERNEL` entries; for CP, see cp.py) take the fast paths
of decompose.large: the channel Gram matrices of a kernel are computed once (`kernel_grams`,
cached by content with the other per-kernel analyses, `ANALYSIS_SIZE` entries) and give the
Tucker-2 and TT error curves in closed form at every rank and the CP proxy curve, so every kind
proposes the full `GRID` there.

1x1 convolutions are matrices: every tensor method falls back to the matrix SVD ("lowrank") there,
and so does a tensor method on a layer that is not a Conv1d / Conv2d (a Linear, a Conv3d).

With calibration inputs (objective "feature": the conv's patch Gram G = X^T X is attached to the
layer, see calibrate.collect) every proposal's error is the relative output error on those inputs,
tr(E G E^T) / tr(W G W^T) with E = W - W_hat the kernel error unfolded (out, in prod(k)), computed
exactly from G (`output_errors`): Tucker-2 is then fitted to the data (decompose.tensor.DataTucker2)
and its errors come in closed form, spatial SVD's too (decompose.tensor.spatial_output_errors); CP
and TT keep their weight-fitted factors and each proposal costs one out x n^2 product (n = in
prod(k)), so on large kernels they propose the 6 keeps of `BIG_GRID`. The built layer's plan facts
then include `rel_output_error` (the square root of that relative error).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from tensorslim.compressors._factors import output_facts, refuse_overflow, require_stats
from tensorslim.core.compressor import Compressor, Cost, dtype_bits
from tensorslim.core.target import LayerTarget
from tensorslim.decompose import large
from tensorslim.decompose.tensor import Decomposition, _check_kernel, compute_dtype
from tensorslim.errors import is_int, short_repr
from tensorslim.layers.tensor_conv import ConvGeometry, FactorizedConv

Rank = int | tuple[int, ...]

GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9)
BIG_GRID = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9)
BIG_KERNEL = 1_000_000
CACHE_SIZE = 256
# Kernels with at least this many entries take decompose.large's fast paths (Tucker-2, TT, spatial;
# CP decides by entries x rank, see cp.CP_FAST_SIZE). Smaller kernels keep the exact TensorLy path.
LARGE_KERNEL = 1 << 18
ANALYSIS_SIZE = 8
# Decompositions and proposals of kernels off the fast path run on one thread (see `_computed`).
SMALL_ON_ONE_THREAD = True
# The largest keep below 1: the bound of "stores fewer parameters than dense".
BELOW_DENSE = 1.0 - 1e-9
# The matrix compressor a tensor method falls back to, and its user-facing method name.
FALLBACK_KIND, FALLBACK_METHOD = "lowrank", "svd"

_CACHE: OrderedDict[tuple, Decomposition] = OrderedDict()
_ANALYSIS: OrderedDict[tuple, Any] = OrderedDict()


# -- rank forms -----------------------------------------------------------------------------------
def normalize_rank(rank: Any) -> Rank:
    """A rank as the decompositions take it: an int, or a tuple of ints (from a JSON list)."""
    return tuple(int(r) for r in rank) if isinstance(rank, (list, tuple)) else int(rank)


def plain_rank(rank: Rank) -> int | list[int]:
    """A rank as a spec stores it (JSON): an int or a list of ints."""
    return [int(r) for r in rank] if isinstance(rank, (list, tuple)) else int(rank)


def ints_within(rank: Any, full: tuple[int, ...]) -> bool:
    """True if `rank` is a list or tuple of len(full) integers (not bools), r_j in [1, full[j]]."""
    return (
        isinstance(rank, (list, tuple))
        and len(rank) == len(full)
        and all(is_int(r) and 1 <= r <= f for r, f in zip(rank, full))
    )


def tt_order(bonds: int) -> str:
    """The axis order of the kernel's tensor train: (in, kh, kw, out) or (in, k, out)."""
    return "(in, kh, kw, out)" if bonds == 3 else "(in, k, out)"


# -- the decomposition cache ----------------------------------------------------------------------
def fingerprint(w: torch.Tensor) -> str:
    """Content hash of a kernel in the dtype it is decomposed in (float64 kernels are decomposed in
    float64, every other dtype in float32), with that dtype and the shape."""
    dtype = compute_dtype(w.dtype)
    data = w.detach().to("cpu", dtype).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest() + f"{tuple(w.shape)}{dtype}"


def clear_cache() -> None:
    """Forget cached decompositions and kernel analyses."""
    _CACHE.clear()
    _ANALYSIS.clear()


def cached(key: tuple, compute: Any) -> Decomposition:
    """The decomposition under `key`, computed by `compute()` on a miss (LRU, CACHE_SIZE)."""
    dec = _CACHE.get(key)
    if dec is None:
        dec = compute()
        _CACHE[key] = dec
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return dec


def is_large(shape: tuple[int, ...]) -> bool:
    """True for a kernel that takes decompose.large's fast paths (>= LARGE_KERNEL entries)."""
    return math.prod(shape) >= LARGE_KERNEL


def analysis(kernel: torch.Tensor, name: str, compute: Any) -> Any:
    """`compute(k)` of the prepared kernel k (float32 / float64 on the CPU, finite), cached under
    (name, kernel content) (LRU, ANALYSIS_SIZE entries)."""
    key = (name, fingerprint(kernel))
    value = _ANALYSIS.get(key)
    if value is None:
        value = compute(_check_kernel(kernel))
        _ANALYSIS[key] = value
        while len(_ANALYSIS) > ANALYSIS_SIZE:
            _ANALYSIS.popitem(last=False)
    else:
        _ANALYSIS.move_to_end(key)
    return value


def kernel_grams(kernel: torch.Tensor) -> dict[int, torch.Tensor]:
    """{mode: K_(mode) K_(mode)^T} (float64) of every mode of the kernel, cached."""
    return analysis(
        kernel, "grams", lambda k: {m: large.gram(large.unfold(k, m)) for m in range(k.ndim)}
    )


# -- calibration data -----------------------------------------------------------------------------
def layer_stats(target: LayerTarget) -> Any:
    """The layer's calibration statistics (LayerStats) when they hold a patch Gram matching its
    kernel ((in prod(k)) x (in prod(k)), finite), else None."""
    st = getattr(target.site, "stats", None)
    gram = getattr(st, "gram", None)
    if gram is None or not getattr(st, "rows", 0):
        return None
    kernel = target.handler.kernel(target.module)
    n = math.prod(kernel.shape[1:])
    if tuple(gram.shape) != (n, n):
        return None
    return require_stats(st, "feature", frozenset({"gram"}), target.label)


def data_kernel(kernel: torch.Tensor, st: Any) -> torch.Tensor:
    """The kernel whose outputs on the inputs of `st.gram` the compressed layer should match:
    the kernel itself, or with sequential statistics (the inputs X~ the partly compressed model
    gives the layer, and X^T X~) the least-squares map W* = W C G~^-1 of X~ to the original
    outputs (compressors._factors.sequential_target), as (out, in, *k)."""
    if getattr(st, "cross", None) is None:
        return kernel
    from tensorslim.compressors._factors import sequential_target

    w2 = kernel.detach().reshape(kernel.shape[0], -1)
    return sequential_target(w2, st).reshape(kernel.shape)


def output_total(kernel: torch.Tensor, st: Any) -> float:
    """tr(W G W^T) = ||W X^T||^2 of the unfolded kernel on the calibration inputs (cached in the
    statistics for this compress call)."""
    key = ("tensor_output_total", fingerprint(kernel))
    total = st.cache.get(key)
    if total is None:
        w2 = kernel.detach().to("cpu", torch.float64).reshape(kernel.shape[0], -1)
        total = float(((w2 @ st.gram.to(torch.float64)) * w2).sum().clamp_min(0.0))
        st.cache[key] = total
    return total


def relative_output_error(kernel: torch.Tensor, k_hat: torch.Tensor, st: Any) -> float:
    """tr(E G E^T) / tr(W G W^T) (E = K - K_hat unfolded to (out, in prod(k)), G = st.gram):
    the relative squared output error on the calibration inputs, exact, in float64."""
    total = output_total(kernel, st)
    if total <= 0:
        return 0.0
    m = kernel.shape[0]
    e = kernel.detach().to("cpu", torch.float64).reshape(m, -1) - k_hat.detach().to(
        "cpu", torch.float64
    ).reshape(m, -1)
    return float(((e @ st.gram.to(torch.float64)) * e).sum().clamp_min(0.0)) / total


def data_facts(kernel: torch.Tensor, k_hat: torch.Tensor, st: Any) -> dict[str, float]:
    """{"rel_output_error": ||(W - W_hat) X^T|| / ||W X^T||} on the calibration inputs (on the
    original outputs from the compressed model's inputs with sequential statistics)."""
    m = kernel.shape[0]
    return output_facts(kernel.reshape(m, -1), st, k_hat.reshape(m, -1).to(kernel.dtype))


# -- costs ----------------------------------------------------------------------------------------
def chain_flops(layer: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (2 per multiply-add) of a chain of convs (a conv, or a module whose children are
    convs applied in order) on `input_shape` (N, C, *spatial), traced on the meta device."""
    if any(p.device.type != "meta" for p in layer.parameters()):
        layer = copy.deepcopy(layer).to("meta")
    dtype = next((p.dtype for p in layer.parameters()), torch.float32)
    flops = 0
    x = torch.empty(input_shape, device="meta", dtype=dtype)
    for conv in list(layer.children()) or [layer]:
        x = conv(x)
        flops += 2 * x.numel() * conv.weight[0].numel()
    return flops


# -- the shared compressor ------------------------------------------------------------------------
class TensorConvCompressor(Compressor):
    """Shared logic of the tensor methods on nn.Conv1d / nn.Conv2d (groups == 1), seen through the
    "conv" handler. Component parameters: {"rank": ...} in the method's rank form. Subclasses set
    `layer_cls` and implement the shape-based hooks (`_params`, `_rank_for_keep`, `check_rank`,
    `_decompose`, `_reconstruct`)."""

    form: ClassVar[str] = "layer"
    layer_cls: ClassVar[type[FactorizedConv]] = FactorizedConv
    keeps: ClassVar[tuple[float, ...]] = GRID
    # True where the output errors of every rank come in closed form (`output_errors` overridden);
    # otherwise each rank's output error costs one out x n^2 product and large kernels propose
    # only BIG_GRID's keeps under objective "feature".
    closed_output: ClassVar[bool] = False

    # -- shape-based hooks (kernel shape (out, in, *k)) ---------------------------------------
    def _params(self, shape: tuple[int, ...], rank: Rank) -> int:
        """Parameters of the factors at `rank` (bias excluded)."""
        raise NotImplementedError

    def _rank_for_keep(self, shape: tuple[int, ...], keep: float, extra: int) -> Rank | None:
        """The largest rank whose factors plus `extra` kept parameters (the bias) are at most
        keep * (the kernel's plus `extra`) (None if none)."""
        raise NotImplementedError

    def check_rank(self, shape: tuple[int, ...], rank: Any) -> str | None:
        """None if `rank` is valid for a kernel of `shape`, else what is accepted."""
        raise NotImplementedError

    def _decompose(self, kernel: torch.Tensor, rank: Rank) -> Decomposition:
        raise NotImplementedError

    def _reconstruct(self, factors: list[torch.Tensor]) -> torch.Tensor:
        """The kernel (out, in, *k) of a decomposition's factors."""
        raise NotImplementedError

    def fast(self, shape: tuple[int, ...]) -> bool:
        """True where this kind takes decompose.large's fast path on a kernel of `shape`."""
        return is_large(shape)

    # -- ranks ----------------------------------------------------------------------------------
    def rank_for_keep(self, shape: tuple[int, ...], keep: float, extra: int = 0) -> Rank | None:
        """The largest rank within keep of the layer's parameters (kernel plus `extra`, the bias:
        the layer's keep, as the allocators count it), None if none is below dense."""
        r = self._rank_for_keep(shape, keep, extra)
        if not r or self._params(shape, r) >= math.prod(shape):
            return None
        return r

    def ranks(self, shape: tuple[int, ...], extra: int = 0, data: bool = False) -> list[Rank]:
        """Distinct ranks of the keep grid (keeps of the layer: kernel plus `extra`, the bias), by
        rising cost, all strictly below the dense cost. `data`: proposals will be measured in
        output error (see `closed_output`)."""
        big = math.prod(shape) > BIG_KERNEL and not self.fast(shape)
        big = big or (data and not self.closed_output and self.fast(shape))
        keeps = BIG_GRID if big else self.keeps
        dense = math.prod(shape)
        out: list[Rank] = []
        for keep in keeps:
            r = self.rank_for_keep(shape, keep, extra)
            if r is not None and r not in out and self._params(shape, r) < dense:
                out.append(r)
        return sorted(out, key=lambda r: self._params(shape, r))

    # -- what it accepts ------------------------------------------------------------------------
    def fallback(self, handler: Any, module: nn.Module) -> tuple[str, str] | None:
        """("lowrank", note) on a layer that is a matrix: a 1x1 convolution, a Linear, or a layer
        type this method has no factorization for (Conv3d, HF Conv1D, ...)."""
        if is_conv(handler, module):
            if math.prod(module.kernel_size) == 1:
                note = (
                    f"1x1 convolution is a matrix: {self.method!r} falls back to the matrix SVD"
                )
                return FALLBACK_KIND, note
            return None
        kind = type(module).__name__
        if isinstance(module, nn.Linear):
            why = f"{kind} is a matrix: {self.method!r} reduces to a matrix factorization"
        else:
            why = f"no {self.method!r} factorizer for {kind}"
        return FALLBACK_KIND, f"{why}; falls back to {FALLBACK_METHOD!r}"

    def supports(self, handler: Any, module: nn.Module) -> str | None:
        """None for a Conv1d / Conv2d (groups 1, kernel larger than 1x1) with a rank below dense;
        on a layer where `fallback` applies, its note."""
        fb = self.fallback(handler, module)
        if fb is not None:
            return fb[1]
        if not is_conv(handler, module):
            return f"{self.method!r} does not support {type(module).__name__}"
        if module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            return (
                f"{kind} convolution (groups={module.groups}) is not supported by {self.method!r}"
            )
        shape, extra = _shape(handler, module), _extra(handler, module)
        if self.rank_for_keep(shape, BELOW_DENSE, extra) is None or not self.ranks(shape, extra):
            return f"too small to gain: no {self.method!r} rank stores fewer parameters than dense"
        return None

    def check(self, target: LayerTarget, params: Mapping[str, Any]) -> str | None:
        unknown = [k for k in params if k != "rank"]
        if unknown:
            return (
                f"unknown parameter {short_repr(unknown[0])} for {self.kind!r}; "
                "its only parameter is 'rank'"
            )
        if "rank" not in params:
            return f"{self.kind!r} needs a 'rank'"
        return self.check_rank(_shape(target.handler, target.module), params["rank"])

    # -- cost and error -------------------------------------------------------------------------
    def cost(self, target: LayerTarget, params: Mapping[str, Any]) -> Cost:
        kernel = target.handler.kernel(target.module)
        rank = normalize_rank(params["rank"])
        n = self._params(tuple(kernel.shape), rank)
        return Cost(n, n * dtype_bits(kernel.dtype), self.flops(target, rank))

    def flops(self, target: LayerTarget, rank: Rank) -> int | None:
        """FLOPs of the chain at `rank` on the site's input (None if its shape is unknown)."""
        if target.site.input_shape is None:
            return None
        g = replace(ConvGeometry.of(target.module), device="meta")
        return chain_flops(self.layer_cls(g, rank), target.site.input_shape)

    def grid(self, target: LayerTarget) -> list[dict[str, Any]]:
        shape, extra = _shape(target.handler, target.module), _extra(target.handler, target.module)
        data = layer_stats(target) is not None and _objective(target) == "feature"
        return [{"rank": plain_rank(r)} for r in self.ranks(shape, extra, data)]

    def errors(
        self, target: LayerTarget, grid: list[dict[str, Any]], objective: str
    ) -> list[float]:
        """Relative squared kernel error of each decomposition (objective "weight"); the relative
        output error on the calibration inputs (objective "feature", see `output_errors`);
        other objectives measure the reconstructed kernel (Compressor.errors)."""
        if objective == "feature":
            st = layer_stats(target)
            if st is not None:
                return self.output_errors(target, grid, st) if grid else []
        if objective != "weight":
            return super().errors(target, grid, objective)
        kernel = target.handler.kernel(target.module)
        return [self.weight_error(kernel, normalize_rank(p["rank"])) for p in grid]

    def weight_error(self, kernel: torch.Tensor, rank: Rank) -> float:
        """||K - K_hat||^2 / ||K||^2 of the decomposition at `rank`."""
        return self.decompose(kernel, rank).rel_error ** 2

    def output_errors(
        self, target: LayerTarget, grid: list[dict[str, Any]], st: Any
    ) -> list[float]:
        """tr(E G E^T) / tr(W G W^T) of each grid entry's factorization (the one `build` makes
        from the kernel, or `proposal_kernel`'s) on the calibration inputs of `st`."""
        kernel = target.handler.kernel(target.module)
        ranks = [normalize_rank(p["rank"]) for p in grid]
        return [relative_output_error(kernel, self.proposal_kernel(kernel, r), st) for r in ranks]

    def proposal_kernel(self, kernel: torch.Tensor, rank: Rank) -> torch.Tensor:
        """The reconstructed kernel whose output error a proposal reports: the decomposition's
        (float64 where the kernel is)."""
        return self._reconstruct(self.decompose(kernel, rank).factors)

    # -- decomposition and building -------------------------------------------------------------
    def decompose(self, kernel: torch.Tensor, rank: Rank) -> Decomposition:
        """The decomposition of `kernel` at `rank`, from the cache when possible."""
        rank = normalize_rank(rank)
        key = (self.kind, fingerprint(kernel), rank, _options_key(self.options))
        return cached(key, lambda: self._computed(kernel.detach(), rank))

    def _computed(self, kernel: torch.Tensor, rank: Rank) -> Decomposition:
        """`_decompose`; on a kernel off the fast path on one thread (its many small LAPACK
        calls ran 15x slower on 2 threads of a shared CPU, with the same results)."""
        if self.fast(tuple(kernel.shape)) or not SMALL_ON_ONE_THREAD:
            return self._decompose(kernel, rank)
        with large.one_thread():
            return self._decompose(kernel, rank)

    def proposals(self, target: Any, objective: str | None = None) -> list:
        """Compressor.proposals; off the fast path on one thread (see `_computed`)."""
        if self.fast(_shape(target.handler, target.module)) or not SMALL_ON_ONE_THREAD:
            return super().proposals(target, objective)
        with large.one_thread():
            return super().proposals(target, objective)

    def project(self, weight: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """The kernel reconstructed from the decomposition at params["rank"] (same shape, dtype
        and device as `weight`)."""
        dec = self.decompose(weight, normalize_rank(params["rank"]))
        k_hat = self._reconstruct(dec.factors)
        return k_hat.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype)

    def build(
        self, target: LayerTarget, params: Mapping[str, Any]
    ) -> tuple[nn.Module, dict[str, Any]]:
        """The chain holding the decomposition's factors and the conv's bias; facts for the plan
        (decomposition, kernel_rel_error, iterations, ...). UnsupportedLayerError where a factor
        overflows the layer's dtype."""
        rank = normalize_rank(params["rank"])
        kernel = target.handler.kernel(target.module)
        st = layer_stats(target)
        dec = self.decompose(kernel, rank) if st is None else self.decompose_data(kernel, rank, st)
        layer = self.layer_cls.from_decomposition(target.module, dec)
        layer = refuse_overflow(layer, target, self.method, plain_rank(rank))
        facts = dict(layer.decomposition_info)
        if st is not None:
            facts.update(data_facts(kernel, self._reconstruct(dec.factors), st))
        return layer, facts

    def decompose_data(self, kernel: torch.Tensor, rank: Rank, st: Any) -> Decomposition:
        """The decomposition `build` uses with calibration statistics `st`: the kernel's (a
        kind without a data-aware solver); Tucker-2 fits the data."""
        return self.decompose(kernel, rank)

    def empty(self, target: LayerTarget, params: Mapping[str, Any]) -> nn.Module:
        """The chain with the conv's geometry and unset weights."""
        return self.layer_cls.empty_like(target.module, normalize_rank(params["rank"]))


def is_conv(handler: Any, module: nn.Module) -> bool:
    """True for a Conv1d / Conv2d seen through the "conv" handler."""
    return getattr(handler, "name", None) == "conv" and isinstance(
        module, (nn.Conv1d, nn.Conv2d)
    )


def _shape(handler: Any, module: nn.Module) -> tuple[int, ...]:
    return tuple(handler.kernel(module).shape)


def _extra(handler: Any, module: nn.Module) -> int:
    """Parameters the layer keeps besides the kernel (the bias)."""
    return sum(t.numel() for t in handler.extra_params(module).values() if t is not None)


def _objective(target: LayerTarget) -> str | None:
    """The objective of this compress call, from the layer's data-aware settings."""
    settings = getattr(target.site, "settings", None)
    return settings.get("objective") if isinstance(settings, Mapping) else None


def _options_key(options: Any) -> tuple:
    if dataclasses.is_dataclass(options):
        return tuple(sorted(dataclasses.asdict(options).items()))
    return ()
