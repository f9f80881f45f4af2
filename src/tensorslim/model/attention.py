"""nn.MultiheadAttention: factorize its packed input projection (3E x E) and its output projection
(E x E) with any matrix method ("svd", "fwsvd", "fvd", "whitened").

The module is replaced by a RoutedMultiheadAttention (layers/attention.py) computing the same
function through LowRankLinear projections. Its rank is a pair (r_in, r_out); the options tie the two
proportionally (r_out = round(r_in * R_out / R_in), R the largest useful rank of each matrix; the
plan records [r_in, r_out]), so the
allocator sees one chain of options per attention module. The option error combines both matrices:
summed absolute errors over summed normalisers for the relative objectives, summed loss-increase
estimates for "fisher". The packed in_proj shares one E -> r map for q, k and v.

Calibration (see calibrate/adapters.py) sees two parts: "in_proj" with input rows query, key and value
(their Grams summed, exact for self-attention up to a factor 3) and "out_proj" with the attention
context, recomputed by the routed module from the captured inputs.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from tensorslim.calibrate import Adapter, register_adapter
from tensorslim.decompose import max_useful_rank
from tensorslim.decompose.svd import cast_factors
from tensorslim.errors import TensorSlimError, is_int, short_repr
from tensorslim.layers import LowRankLinear
from tensorslim.layers.attention import RoutedMultiheadAttention
from tensorslim.model.data_aware import (
    DEFAULT_OBJECTIVE,
    NEEDS,
    OBJECTIVE_NEEDS,
    _stats,
    nested_factors,
    objective_curve,
    risk_facts,
    setting,
    solve,
)
from tensorslim.model.factorizers import refuse_overflow
from tensorslim.model.registry import (
    Factorizer,
    LayerSite,
    Option,
    register,
)

PARTS = ("in_proj", "out_proj")


def _matrices(mha: nn.MultiheadAttention) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    return {
        "in_proj": (mha.in_proj_weight.detach(), mha.in_proj_bias),
        "out_proj": (mha.out_proj.weight.detach(), mha.out_proj.bias),
    }


class MHAFactorizer(Factorizer):
    """Factorizes nn.MultiheadAttention's two projection matrices with one matrix method."""

    def __init__(self, needs: frozenset[str] = frozenset()) -> None:
        self.needs = needs

    def unsupported_reason(self, module: nn.Module) -> str | None:
        why = RoutedMultiheadAttention.supported(module)
        if why is not None:
            return f"nn.MultiheadAttention with {why} is not supported"
        if max_useful_rank(module.embed_dim, module.embed_dim) == 0:
            return f"too small to gain: embed_dim {module.embed_dim}"
        return None

    def dense_params(self, module: nn.Module) -> int:
        return sum(
            w.numel() + (0 if b is None else b.numel()) for w, b in _matrices(module).values()
        )

    def _tokens(self, module: nn.Module, site: LayerSite) -> int | None:
        if site.input_shape is None:
            return None
        return int(torch.Size(site.input_shape).numel()) // module.embed_dim

    def dense_flops(self, module: nn.Module, site: LayerSite) -> int | None:
        t = self._tokens(module, site)
        e = module.embed_dim
        return None if t is None else 2 * t * 4 * e * e  # projections only (self-attention)

    def _pairs(self, module: nn.Module) -> list[tuple[int, int]]:
        e = module.embed_dim
        r_in, r_out = max_useful_rank(3 * e, e), max_useful_rank(e, e)
        return [(r, max(1, min(r_out, round(r * r_out / r_in)))) for r in range(1, r_in + 1)]

    def _params(self, module: nn.Module, rank: tuple[int, int]) -> int:
        e = module.embed_dim
        bias = sum(0 if b is None else b.numel() for _, b in _matrices(module).values())
        return rank[0] * 4 * e + rank[1] * 2 * e + bias

    def options(self, module: nn.Module, site: LayerSite) -> list[Option]:
        objective = setting(site, "objective") or DEFAULT_OBJECTIVE[self.method]
        method = self.method
        pairs = self._pairs(module)
        if not pairs:
            return []
        curves, totals = {}, {}
        for part, (w, _) in _matrices(module).items():
            st = None
            if self.needs or OBJECTIVE_NEEDS[objective]:
                st = _stats(site, method, self.needs | OBJECTIVE_NEEDS[objective], part)
            k = max(p[PARTS.index(part)] for p in pairs)
            a, b = nested_factors(method, w, st, k, site)
            curves[part], totals[part] = objective_curve(objective, w, a, b, st)
        norm = None if totals["in_proj"] is None else (sum(totals.values()) or 1.0)
        t = self._tokens(module, site)
        e = module.embed_dim
        out = []
        for r_in, r_out in pairs:
            err = float(curves["in_proj"][r_in] + curves["out_proj"][r_out])
            out.append(
                Option(
                    rank=[r_in, r_out],  # a list, as the plan's JSON gives it back
                    params=self._params(module, (r_in, r_out)),
                    flops=None if t is None else 2 * t * (r_in * 4 * e + r_out * 2 * e),
                    error=err if norm is None else err / norm,
                )
            )
        return out

    def rank_for_keep(self, module: nn.Module, keep: float) -> Any:
        budget = keep * self.dense_params(module)
        fits = [p for p in self._pairs(module) if self._params(module, p) <= budget]
        return list(fits[-1]) if fits else None

    def check_rank(self, module: nn.Module, rank: Any) -> str | None:
        """2 integers (r_in, r_out): the ranks of in_proj (3E x E) and out_proj (E x E), each in
        [1, its matrix's full rank] (E, the embed_dim)."""
        shapes = {part: tuple(w.shape) for part, (w, _) in _matrices(module).items()}
        full = tuple(min(shapes[part]) for part in PARTS)
        if (
            isinstance(rank, (list, tuple))
            and len(rank) == 2
            and all(is_int(r) and 1 <= r <= f for r, f in zip(rank, full))
        ):
            return None
        sizes = {part: "x".join(map(str, shapes[part])) for part in PARTS}
        return (
            f"rank must be 2 integers (r_in, r_out: the ranks of in_proj, {sizes['in_proj']}, "
            f"and out_proj, {sizes['out_proj']}) with r_in in [1, {full[0]}] and r_out in "
            f"[1, {full[1]}] (the full ranks); got {short_repr(rank)}"
        )

    def _build(self, module, factors) -> RoutedMultiheadAttention:
        mats = _matrices(module)
        projs = {}
        for part, (a, b) in factors.items():
            w, bias = mats[part]
            projs[part] = LowRankLinear.from_factors(*cast_factors(a, b, w.dtype), bias)
        return RoutedMultiheadAttention.from_dense(module, projs["in_proj"], projs["out_proj"])

    def apply(self, module: nn.Module, rank: Any) -> nn.Module:
        if self.needs:
            raise TensorSlimError(
                f"method {self.method!r} needs calibration statistics: use tensorslim.compress(..., "
                "calibration=batches, loss=fn); to rebuild a saved model use tensorslim.load"
            )
        factors = {
            part: nested_factors("svd", w, None, r, LayerSite(""))
            for (part, (w, _)), r in zip(_matrices(module).items(), rank)
        }
        return self._build(module, factors)

    def apply_site(self, module: nn.Module, rank: Any, site: LayerSite):
        if not self.needs:
            return refuse_overflow(self.apply(module, rank), module, site, self.method, rank), {}
        factors, extra = {}, {}
        for (part, (w, _)), r in zip(_matrices(module).items(), rank):
            st = _stats(site, self.method, self.needs, part)
            a, b, facts = solve(self.method, w, st, r, site)
            facts.update(risk_facts(w, st, r, a @ b, site))
            factors[part] = (a, b)
            if facts:
                extra[part] = facts
        new = refuse_overflow(self._build(module, factors), module, site, self.method, rank)
        return new, extra

    def empty(self, module: nn.Module, rank: Any) -> nn.Module:
        e = module.embed_dim
        w = module.in_proj_weight
        kw = {"device": w.device, "dtype": w.dtype}
        in_proj = LowRankLinear(e, 3 * e, rank[0], bias=module.in_proj_bias is not None, **kw)
        out_proj = LowRankLinear(e, e, rank[1], bias=module.out_proj.bias is not None, **kw)
        return RoutedMultiheadAttention.from_dense(module, in_proj, out_proj)

    def weight(self, module: nn.Module) -> torch.Tensor:
        return torch.cat([module.in_proj_weight.detach(), module.out_proj.weight.detach()])

    def reconstructed_weight(self, factorized: nn.Module) -> torch.Tensor:
        parts = [factorized.in_proj, factorized.out_proj]
        return torch.cat(
            [p.dense_weight() if isinstance(p, LowRankLinear) else p.weight for p in parts]
        ).detach()


_ATTEND = inspect.signature(RoutedMultiheadAttention.attend)


class MHAAdapter(Adapter):
    """Calibration view of nn.MultiheadAttention: parts "in_proj" and "out_proj"."""

    def parts(self, module):
        return {"in_proj": module.in_proj_weight, "out_proj": module.out_proj.weight}

    def grad_matrix(self, module, part, grad):
        return grad

    def unsupported_reason(self, module):
        return RoutedMultiheadAttention.supported(module)

    def rows(self, module, args, kwargs, output):
        bound = _ATTEND.bind(None, *args, **kwargs)
        bound.arguments["need_weights"] = False
        e = module.embed_dim
        q, k, v = (bound.arguments[n] for n in ("query", "key", "value"))
        rows_in = torch.cat([x.reshape(-1, e) for x in (q, k, v)])
        routed = RoutedMultiheadAttention.from_dense(module).eval()
        ctx, _, _ = routed.attend(*list(bound.args)[1:], **bound.kwargs)
        return {"in_proj": rows_in, "out_proj": ctx.reshape(-1, e)}


def register_attention() -> None:
    """Register nn.MultiheadAttention for svd, fwsvd, fvd and whitened, and its calibration view."""
    for method in ("svd", "fwsvd", "fvd", "whitened"):
        register(nn.MultiheadAttention, method, MHAFactorizer(NEEDS[method]))
    register_adapter(nn.MultiheadAttention, MHAAdapter())
