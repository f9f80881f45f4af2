"""Tensor-decomposition factorizers for nn.Conv1d / nn.Conv2d: "cp", "tucker2", "tt", "spatial_svd",
and "auto" (per layer, the option with the lowest relative weight error at each cost).

Ranks from keep (Schuurmans et al., ICLR 2023, following tltorch's `rank=<float>`): CP takes the
largest R with R(out + in + sum k) <= keep * dense; Tucker-2 and TT take ranks proportional to their
full (exact) ranks, scaled by the largest factor that fits; spatial SVD the largest r with
r(in kh + out kw) <= keep * dense. Parameters include the bias, as for the dense layer.

Options for the allocators. The error of an iterative or multi-rank decomposition is only known
after computing it, so CP and TT are evaluated on a coarse grid of keeps (`GRID`, 12 values from
0.02 to 0.9 that include 0.1, 0.25, 0.5 and 0.75; kernels above `BIG_KERNEL` elements use `BIG_GRID`,
6 values, to bound CP's time). Tucker-2 lists the same grid with the HOSVD error of each rank pair,
computed from one SVD per channel unfolding (an upper bound of the HOOI error the applied layer
gets; the plan records the applied error). Ranks from a keep land just under it (see
decompose.tensor._largest_rho). Spatial SVD is exact for every rank from its singular
values, so it lists every useful rank. Decompositions are cached (by kernel content, method, rank
and settings; `CACHE_SIZE` entries) so applying the chosen option does not recompute it.

1x1 convolutions are matrices; every tensor method falls back to the matrix SVD there, and on a
Conv1d "spatial_svd" (one spatial axis) is the matrix SVD too. The plan records the fallback.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import math
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from tensorslim.decompose.tensor import (
    Decomposition,
    compute_dtype,
    cp_params,
    cp_rank_for_keep,
    spatial_svd_errors,
    spatial_svd_params,
    spatial_svd_rank_for_keep,
    tt_feasible,
    tt_full_ranks,
    tt_params,
    tt_ranks_for_keep,
    tucker2_full_ranks,
    tucker2_params,
    tucker2_ranks_for_keep,
)
from tensorslim.errors import is_int, short_repr
from tensorslim.layers.tensor_conv import (
    ConvGeometry,
    CPConv,
    FactorizedConv,
    SpatialSVDConv,
    TTConv,
    Tucker2Conv,
)
from tensorslim.model.factorizers import (
    bias_params,
    refuse_overflow,
    weight_dense_flops,
    weight_dense_params,
)
from tensorslim.model.latency_cost import pareto_front
from tensorslim.model.registry import (
    Factorizer,
    LayerSite,
    Option,
    find,
)


def _ints_within(rank: Any, full: tuple[int, ...]) -> bool:
    """True if `rank` is a list or tuple of len(full) integers (not bools), r_j in [1, full[j]]."""
    return (
        isinstance(rank, (list, tuple))
        and len(rank) == len(full)
        and all(is_int(r) and 1 <= r <= f for r, f in zip(rank, full))
    )


def _tt_order(bonds: int) -> str:
    """The axis order of the kernel's tensor train: (in, kh, kw, out) or (in, k, out)."""
    return "(in, kh, kw, out)" if bonds == 3 else "(in, k, out)"


GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9)
BIG_GRID = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9)
BIG_KERNEL = 1_000_000
CACHE_SIZE = 256

_CACHE: OrderedDict[tuple, Decomposition] = OrderedDict()


def _fingerprint(w: torch.Tensor) -> str:
    """Content hash of a kernel in the dtype it is decomposed in (float64 kernels are decomposed in
    float64, every other dtype in float32), with that dtype and the shape."""
    dtype = compute_dtype(w.dtype)
    data = w.detach().to("cpu", dtype).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest() + f"{tuple(w.shape)}{dtype}"


def clear_cache() -> None:
    """Forget cached decompositions."""
    _CACHE.clear()


def chain_flops(layer: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (2 per multiply-add) of a chain of convs (a conv, or a module whose children are
    convs applied in order) on `input_shape`, traced on the meta device."""
    if any(p.device.type != "meta" for p in layer.parameters()):
        layer = copy.deepcopy(layer).to("meta")
    dtype = next((p.dtype for p in layer.parameters()), torch.float32)
    flops = 0
    x = torch.empty(input_shape, device="meta", dtype=dtype)
    for conv in list(layer.children()) or [layer]:
        x = conv(x)
        flops += 2 * x.numel() * conv.weight[0].numel()
    return flops


class TensorConvFactorizer(Factorizer):
    """Shared logic of the tensor methods on nn.Conv1d / nn.Conv2d (groups == 1)."""

    layer_cls: type[FactorizedConv] = FactorizedConv
    grid: tuple[float, ...] = GRID

    def __init__(self, **options: Any) -> None:
        self.decompose_options = options

    # -- what is supported ----------------------------------------------------------------
    def delegate(self, module: nn.Module) -> tuple[Factorizer, str] | None:
        """(the matrix-SVD factorizer, note) where this method reduces to a matrix SVD."""
        if math.prod(module.kernel_size) == 1:
            svd = find(module, "svd")
            if svd is not None:
                note = f"1x1 convolution is a matrix: {self.method!r} falls back to the matrix SVD"
                return svd, note
        return None

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            return (
                f"{kind} convolution (groups={module.groups}) is not supported by {self.method!r}"
            )
        if self.rank_for_keep(module, 1.0 - 1e-9) is None or not self._ranks(module):
            return f"too small to gain: no {self.method!r} rank stores fewer parameters than dense"
        return None

    # -- costs ------------------------------------------------------------------------------
    _bias = staticmethod(bias_params)

    def dense_params(self, module: nn.Module) -> int:
        return weight_dense_params(module)

    def dense_flops(self, module: nn.Module, site: LayerSite) -> int | None:
        return weight_dense_flops(module, site, module.out_channels)

    def params(self, module: nn.Module, rank: Any) -> int:
        """Parameters of the factorized layer at `rank`, bias included."""
        return self._params(tuple(module.weight.shape), rank) + self._bias(module)

    def flops(self, module: nn.Module, rank: Any, site: LayerSite) -> int | None:
        if site.input_shape is None:
            return None
        g = replace(ConvGeometry.of(module), device="meta")
        return chain_flops(self.layer_cls(g, rank), site.input_shape)

    # -- ranks ------------------------------------------------------------------------------
    def _params(self, shape: tuple[int, ...], rank: Any) -> int:
        raise NotImplementedError

    def _rank_for_keep_shape(self, shape: tuple[int, ...], keep: float, extra: int) -> Any:
        raise NotImplementedError

    def rank_for_keep(self, module: nn.Module, keep: float) -> Any:
        r = self._rank_for_keep_shape(tuple(module.weight.shape), keep, self._bias(module))
        if not r:
            return None
        if self.params(module, r) >= self.dense_params(module):
            return None
        return r

    def _ranks(self, module: nn.Module) -> list[Any]:
        """Distinct ranks of the keep grid, by rising cost, all strictly below the dense cost."""
        grid = BIG_GRID if module.weight.numel() > BIG_KERNEL else self.grid
        ranks: list[Any] = []
        dense = self.dense_params(module)
        for keep in grid:
            r = self.rank_for_keep(module, keep)
            if r is not None and r not in ranks and self.params(module, r) < dense:
                ranks.append(r)
        return sorted(ranks, key=lambda r: self.params(module, r))

    # -- decomposition ----------------------------------------------------------------------
    def decompose(self, module: nn.Module, rank: Any) -> Decomposition:
        """The decomposition of `module.weight` at `rank`, from the cache when possible."""
        w = module.weight.detach()
        key = (
            self.method,
            _fingerprint(w),
            rank,
            tuple(sorted(self.decompose_options.items())),
        )
        dec = _CACHE.get(key)
        if dec is None:
            dec = self.layer_cls.decompose(w, rank, **self.decompose_options)
            _CACHE[key] = dec
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(key)
        return dec

    def options(self, module: nn.Module, site: LayerSite) -> list[Option]:
        out = []
        for r in self._ranks(module):
            out.append(
                Option(
                    rank=r,
                    params=self.params(module, r),
                    flops=self.flops(module, r, site),
                    error=self.decompose(module, r).rel_error ** 2,
                )
            )
        return out

    def apply(self, module: nn.Module, rank: Any) -> nn.Module:
        dec = self.decompose(module, self._normalize(rank))
        layer = self.layer_cls.from_decomposition(module, dec)
        return layer.to(device=module.weight.device, dtype=module.weight.dtype)

    def apply_site(
        self, module: nn.Module, rank: Any, site: LayerSite
    ) -> tuple[nn.Module, dict[str, Any]]:
        layer = refuse_overflow(self.apply(module, rank), module, site, self.method, rank)
        return layer, dict(layer.decomposition_info)

    def empty(self, module: nn.Module, rank: Any) -> nn.Module:
        return self.layer_cls.empty_like(module, self._normalize(rank))

    def _normalize(self, rank: Any) -> Any:
        return tuple(int(r) for r in rank) if isinstance(rank, (list, tuple)) else int(rank)

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach()

    def reconstructed_weight(self, factorized: nn.Module) -> torch.Tensor:
        return factorized.dense_weight().detach()


class ConvCP(TensorConvFactorizer):
    """CP-ALS (seeded random init, TensorLy parafac); rank R, params R(out + in + sum k)."""

    layer_cls = CPConv

    def _params(self, shape, rank):
        return cp_params(shape, int(rank))

    def _rank_for_keep_shape(self, shape, keep, extra):
        return cp_rank_for_keep(shape, keep, extra) or None

    def check_rank(self, module: nn.Module, rank: Any) -> str | None:
        """An integer R in [1, the largest R whose R(out + in + sum k) parameters stay below the
        dense layer's] (the same bound as the options and `unsupported_reason`)."""
        top = self.rank_for_keep(module, 1.0 - 1e-9) or 0
        if is_int(rank) and 1 <= rank <= top:
            return None
        sizes = "out + in + kh + kw" if len(module.kernel_size) == 2 else "out + in + k"
        return (
            f"rank must be an integer in [1, {top}] (the largest CP rank R whose R({sizes}) "
            f"parameters stay below the dense layer's {self.dense_params(module)}); "
            f"got {short_repr(rank)}"
        )


class ConvTucker2(TensorConvFactorizer):
    """Tucker-2 (HOOI by default, HOSVD with algorithm="hosvd"); rank (r_out, r_in)."""

    layer_cls = Tucker2Conv

    def _params(self, shape, rank):
        return tucker2_params(shape, tuple(rank))

    def options(self, module: nn.Module, site: LayerSite) -> list[Option]:
        """HOSVD errors of every grid rank from one SVD per channel unfolding: with orthonormal
        U_out, U_in the HOSVD error is ||K||^2 - ||K x_0 U_out^T x_1 U_in^T||^2."""
        w = module.weight.detach().to(torch.float64)
        u_out = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)[0]
        u_in = torch.linalg.svd(w.transpose(0, 1).reshape(w.shape[1], -1), full_matrices=False)[0]
        total = float((w**2).sum()) or 1.0
        # projections onto all leading vectors at once; prefix sums give every rank pair
        proj = torch.einsum("oi...,oa,ib->ab...", w, u_out, u_in)
        energy = (proj**2).reshape(proj.shape[0], proj.shape[1], -1).sum(-1)
        cum = energy.cumsum(0).cumsum(1)
        out = []
        for r in self._ranks(module):
            r_out, r_in = r
            kept = float(cum[r_out - 1, r_in - 1])
            out.append(
                Option(
                    r,
                    self.params(module, r),
                    self.flops(module, r, site),
                    max(0.0, 1 - kept / total),
                )
            )
        return out

    def _rank_for_keep_shape(self, shape, keep, extra):
        return tucker2_ranks_for_keep(shape, keep, extra)

    def check_rank(self, module: nn.Module, rank: Any) -> str | None:
        """2 integers (r_out, r_in), each at most its full rank (`tucker2_full_ranks`)."""
        full = tucker2_full_ranks(tuple(module.weight.shape))
        if _ints_within(rank, full):
            return None
        return (
            "rank must be 2 integers (r_out, r_in: the output and input channel ranks) with "
            f"r_out in [1, {full[0]}] and r_in in [1, {full[1]}] (the full ranks); "
            f"got {short_repr(rank)}"
        )


class ConvTT(TensorConvFactorizer):
    """Tensor-train by TT-SVD; ranks (r1, r2, r3) for Conv2d, (r1, r2) for Conv1d."""

    layer_cls = TTConv

    def _params(self, shape, rank):
        return tt_params(shape, tuple(rank))

    def _rank_for_keep_shape(self, shape, keep, extra):
        return tt_ranks_for_keep(shape, keep, extra)

    def check_rank(self, module: nn.Module, rank: Any) -> str | None:
        """One integer per inner bond of the (in, *k, out) train, r_j in [1, full_j]
        (`tt_full_ranks`), that TT-SVD can produce (`tt_feasible`)."""
        shape = tuple(module.weight.shape)
        full = tt_full_ranks(shape)
        n = len(full)
        if not _ints_within(rank, full):
            names = ", ".join(f"r{j + 1}" for j in range(n))
            bounds = ", ".join(f"r{j + 1} in [1, {f}]" for j, f in enumerate(full))
            return (
                f"rank must be {n} ranks ({names}: the TT bond ranks of the kernel ordered "
                f"{_tt_order(n)}), integers with {bounds} (the full TT ranks); "
                f"got {short_repr(rank)}"
            )
        reachable = tt_feasible(shape, tuple(rank))
        if reachable != tuple(rank):
            return (
                f"TT ranks {short_repr(rank)} are not reachable by TT-SVD for kernel {list(shape)} "
                "(need r_j <= r_(j-1) n_j and r_j <= n_(j+1) r_(j+1), n the sizes of "
                f"{_tt_order(n)}); the largest reachable ranks within them are {list(reachable)}"
            )
        return None


class ConvSpatialSVD(TensorConvFactorizer):
    """Spatial SVD (kh x 1 then 1 x kw); every useful rank with its exact error."""

    layer_cls = SpatialSVDConv

    def delegate(self, module: nn.Module) -> tuple[Factorizer, str] | None:
        if module.weight.ndim == 3:
            svd = find(module, "svd")
            if svd is not None:
                return svd, "Conv1d has one spatial axis: 'spatial_svd' is the matrix SVD here"
        return super().delegate(module)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.weight.ndim != 4:
            return (
                "'spatial_svd' needs a kernel with two spatial axes (Conv2d); on a "
                f"{type(module).__name__} it is the matrix SVD: use method 'svd'"
            )
        return super().unsupported_reason(module)

    def check_rank(self, module: nn.Module, rank: Any) -> str | None:
        """An integer in [1, min(in kh, out kw)], the rank of M[(i, h), (o, w)] = K[o, i, h, w]."""
        out, inp, kh, kw = module.weight.shape
        full = min(inp * kh, out * kw)
        if is_int(rank) and 1 <= rank <= full:
            return None
        return (
            f"rank must be an integer in [1, {full}] (the full rank of the spatial-SVD matrix, "
            f"(in*kh) x (out*kw) = {inp * kh}x{out * kw}); got {short_repr(rank)}"
        )

    def _params(self, shape, rank):
        return spatial_svd_params(shape, int(rank))

    def _rank_for_keep_shape(self, shape, keep, extra):
        return spatial_svd_rank_for_keep(shape, keep, extra) or None

    def _ranks(self, module: nn.Module) -> list[Any]:
        top = self.rank_for_keep(module, 1.0 - 1e-9)
        return list(range(1, (top or 0) + 1))

    def options(self, module: nn.Module, site: LayerSite) -> list[Option]:
        errors = spatial_svd_errors(module.weight.detach()).tolist()
        return [
            Option(r, self.params(module, r), self.flops(module, r, site), errors[r])
            for r in self._ranks(module)
        ]


AUTO_METHODS = ("svd", "cp", "tucker2", "tt", "spatial_svd")
LATENCY_SWAP_SLACK = 0.1


class ConvAuto(Factorizer):
    """Per layer, the candidate of the methods in AUTO_METHODS with the lowest relative squared
    weight error at each cost: the options are the Pareto front (cost, error) of all methods'
    options, each tagged with its method (Option.method; the option's rank is (method, rank)).
    Where two methods tie, the earlier one in AUTO_METHODS wins. When the layer's input shape is
    known, options measured slower than the dense layer are avoided (`latency_guard`, see
    `_faster_than_dense`)."""

    def __init__(self, methods: tuple[str, ...] = AUTO_METHODS, latency_guard: bool = True) -> None:
        self.methods = methods
        # With the layer's input shape known (compress with example_input), drop options that
        # measure slower than the dense layer (model/latency_cost.py).
        self.latency_guard = latency_guard

    def _members(self, module: nn.Module) -> list[Factorizer]:
        seen, out = set(), []
        for m in self.methods:
            f = find(module, m)
            if f is None:
                continue
            delegate = getattr(f, "delegate", None)
            d = delegate(module) if delegate else None
            if d is not None:
                f = d[0]
            if id(f) in seen or f.unsupported_reason(module) is not None:
                continue
            seen.add(id(f))
            out.append(f)
        return out

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if self._members(module):
            return None
        reasons = [
            f.unsupported_reason(module) for m in self.methods if (f := find(module, m)) is not None
        ]
        return reasons[0] if reasons else "no method supports this layer"

    def dense_params(self, module: nn.Module) -> int:
        return weight_dense_params(module)

    def dense_flops(self, module: nn.Module, site: LayerSite) -> int | None:
        return weight_dense_flops(module, site, module.out_channels)

    def options(self, module: nn.Module, site: LayerSite) -> list[Option]:
        pooled = []
        for f in self._members(module):
            pooled += [
                replace(o, rank=(f.method, o.rank), method=f.method)
                for o in f.options(module, site)
            ]
        if site.input_shape is not None and self.latency_guard:
            pooled = self._faster_than_dense(module, site, pooled)
        return pareto_front(pooled, lambda o: o.params, lambda o: o.error, 1e-12)

    def _faster_than_dense(self, module: nn.Module, site: LayerSite, pooled: list[Option]):
        """Avoid options that measure no faster than the dense layer on the site's input shape:
        each is dropped where an option that is faster costs between (1 - LATENCY_SWAP_SLACK) and
        1 times its parameters; otherwise it stays, so every budget can still be met (the plan
        then flags it).
        Per method, latency is taken to grow with its rank, so a binary search over its options
        (a handful of timings, cached) finds the largest one still faster."""
        from tensorslim.model.latency_cost import dense_latency, factorized_latency

        dense = dense_latency(module, site.input_shape)
        fast, slow = [], []
        for method in dict.fromkeys(o.method for o in pooled):
            mine = sorted((o for o in pooled if o.method == method), key=lambda o: o.params)
            f = find(module, method)
            lo, hi = 0, len(mine)  # mine[:lo] faster; mine[hi:] not
            while lo < hi:
                mid = (lo + hi) // 2
                if factorized_latency(f, module, mine[mid].rank[1], site.input_shape) < dense:
                    lo = mid + 1
                else:
                    hi = mid
            fast += mine[:lo]
            slow += mine[lo:]
        # a slow option is dropped where a fast one costs at most as much and at least
        # (1 - LATENCY_SWAP_SLACK) as much, so the budgets the allocators can meet barely change
        lows = sorted(o.params for o in fast)

        def replaceable(o: Option) -> bool:
            i = bisect.bisect_right(lows, o.params)
            return i > 0 and lows[i - 1] >= (1 - LATENCY_SWAP_SLACK) * o.params

        return fast + [o for o in slow if not replaceable(o)]

    def rank_for_keep(self, module: nn.Module, keep: float) -> Any:
        """(method, rank) of the lowest-error option within keep * dense parameters."""
        budget = keep * self.dense_params(module)
        fits = [o for o in self.options(module, LayerSite("")) if o.params <= budget]
        return fits[-1].rank if fits else None

    def check_rank(self, module: nn.Module, rank: Any) -> str | None:
        """[method, rank] (a list, as JSON gives it back, or a tuple): method one of the methods
        pooled for this layer (`_members`), rank valid for that method's factorizer."""
        members = {f.method: f for f in self._members(module)}
        form = (
            f"rank must be [method, rank] with method one of {list(members)} (the methods 'auto' "
            "pools for this layer) and rank a valid rank of that method"
        )
        if not (isinstance(rank, (list, tuple)) and len(rank) == 2):
            return f"{form}; got {short_repr(rank)}"
        method, r = rank
        f = members.get(method) if isinstance(method, str) else None
        if f is None:
            return f"{form}; got method {short_repr(method)}"
        why = f.check_rank(module, r)
        return None if why is None else f"method {method!r}: {why}"

    def apply(self, module: nn.Module, rank: Any) -> nn.Module:
        method, r = rank
        return find(module, method).apply(module, r)

    def apply_site(
        self, module: nn.Module, rank: Any, site: LayerSite
    ) -> tuple[nn.Module, dict[str, Any]]:
        method, r = rank
        f = find(module, method)
        if hasattr(f, "apply_site"):
            return f.apply_site(module, r, site)
        return f.apply(module, r), {}

    def empty(self, module: nn.Module, rank: Any) -> nn.Module:
        method, r = rank
        return find(module, method).empty(module, r)

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach()

    def reconstructed_weight(self, factorized: nn.Module) -> torch.Tensor:
        return factorized.dense_weight().detach()


TENSOR_METHODS = ("cp", "tucker2", "tt", "spatial_svd", "auto")


def register_tensor_methods() -> None:
    """Register the tensor factorizers for Conv1d / Conv2d, and the matrix-SVD fallback of every
    tensor method for the other layer types (Linear, Conv3d, ...)."""
    from tensorslim.model.registry import register, register_fallback

    for conv in (nn.Conv1d, nn.Conv2d):
        register(conv, "cp", ConvCP())
        register(conv, "tucker2", ConvTucker2())
        register(conv, "tt", ConvTT())
        register(conv, "spatial_svd", ConvSpatialSVD())
        register(conv, "auto", ConvAuto())
    for method in TENSOR_METHODS:
        register_fallback(method, "svd")
