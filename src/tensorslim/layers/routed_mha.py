"""RoutedMultiheadAttention: nn.MultiheadAttention whose projections are ordinary sub-modules.

nn.MultiheadAttention's forward reads `in_proj_weight` and `out_proj.weight` directly
(F.multi_head_attention_forward), so replacing its projections with factorized layers would be
silently ignored. This module computes the same function (scaled dot-product attention, Vaswani et
al. 2017, with the same masks, dropout and batch layout) but routes the packed input projection
through `in_proj` and the output projection through `out_proj`, so either can be compressed. Each
projection is Linear-like with its bias: an nn.Linear (dense), a LowRankLinear (the packed in_proj
then shares one E -> r map for q, k and v) or an OpLinear around any operator module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tensorslim.layers.additive import Compressed
from tensorslim.layers.lowrank_linear import LowRankLinear, linear_from_op


class RoutedMultiheadAttention(nn.Module, Compressed):
    """Drop-in replacement for nn.MultiheadAttention (embed_dim = kdim = vdim, no bias_k/bias_v,
    no add_zero_attn) with `in_proj` and `out_proj` sub-modules. Same call signature and outputs."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        in_proj: nn.Module,
        out_proj: nn.Module,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.in_proj = in_proj
        self.out_proj = out_proj

    @staticmethod
    def supported(mha: nn.MultiheadAttention) -> str | None:
        """None if `mha` can be routed, else why not."""
        if not mha._qkv_same_embed_dim:
            return "kdim/vdim differ from embed_dim (separate q/k/v projection weights)"
        if mha.bias_k is not None or mha.bias_v is not None:
            return "add_bias_kv=True"
        if mha.add_zero_attn:
            return "add_zero_attn=True"
        return None

    @classmethod
    def from_dense(
        cls,
        mha: nn.MultiheadAttention,
        in_proj: nn.Module | None = None,
        out_proj: nn.Module | None = None,
    ) -> RoutedMultiheadAttention:
        """Same function as `mha`; projections given (Linear-like, with their bias), or dense
        copies of mha's."""
        why = cls.supported(mha)
        if why is not None:
            raise ValueError(f"cannot route this nn.MultiheadAttention: {why}")
        e = mha.embed_dim
        if in_proj is None:
            in_proj = _dense_linear(mha.in_proj_weight, mha.in_proj_bias)
        if out_proj is None:
            out_proj = _dense_linear(mha.out_proj.weight, mha.out_proj.bias)
        return cls(e, mha.num_heads, in_proj, out_proj, mha.dropout, mha.batch_first)

    @classmethod
    def from_ops(
        cls,
        mha: nn.MultiheadAttention,
        in_proj: nn.Module | None,
        out_proj: nn.Module | None,
    ) -> RoutedMultiheadAttention:
        """Same function as `mha` with each projection's (m x n) matrix replaced by an operator
        module (forward (..., n) -> (..., m) without bias, `dense_weight()`); mha's biases are
        kept. A bias-free LowRankLinear operator gives a LowRankLinear projection (the structure
        and state-dict keys of `from_dense` with factored projections); None keeps a projection
        dense."""
        e = mha.embed_dim
        if in_proj is not None:
            in_proj = linear_from_op(in_proj, mha.in_proj_bias, e, 3 * e)
        if out_proj is not None:
            out_proj = linear_from_op(out_proj, mha.out_proj.bias, e, e)
        return cls.from_dense(mha, in_proj, out_proj)

    def dense_matrices(self) -> dict[str, torch.Tensor]:
        """The matrices the projections compute with: in_proj (3E x E) and out_proj (E x E)."""
        return {"in_proj": _matrix(self.in_proj), "out_proj": _matrix(self.out_proj)}

    # -- projections ----------------------------------------------------------------------------
    def _project(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """q, k, v from query, key, value (each (L, N, E)). Inputs that are the same tensor share
        the low-rank first factor (LowRankLinear) or the whole projection (any other operator)."""
        e = self.embed_dim
        p = self.in_proj
        if isinstance(p, LowRankLinear):
            weight, bias = p.second.weight, p.second.bias
            hidden = _shared(p.first, xs)
        elif isinstance(p, nn.Linear):
            weight, bias = p.weight, p.bias
            hidden = xs
        else:
            full = _shared(p, xs)
            return [h[..., i * e : (i + 1) * e] for i, h in enumerate(full)]
        out = []
        for i, h in enumerate(hidden):
            sl = slice(i * e, (i + 1) * e)
            out.append(F.linear(h, weight[sl], None if bias is None else bias[sl]))
        return out

    # -- attention --------------------------------------------------------------------------------
    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """The attention context before `out_proj`, as (L, N, E), the weights, and whether the
        input was unbatched."""
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            same_kv = key is value
            same_qk = query is key
            query = query.transpose(0, 1)
            key = query if same_qk else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        tgt, bsz, e = query.shape
        src = key.shape[0]
        h, d = self.num_heads, self.head_dim
        q, k, v = self._project([query, key, value])
        q = q.reshape(tgt, bsz * h, d).transpose(0, 1)  # (N*H, L, d)
        k = k.reshape(src, bsz * h, d).transpose(0, 1)
        v = v.reshape(src, bsz * h, d).transpose(0, 1)

        mask = None  # additive float mask broadcastable to (N*H, L, S)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            if mask.dim() == 2:
                mask = mask.unsqueeze(0)
        if key_padding_mask is not None:
            kpm = _additive(key_padding_mask, q.dtype).view(bsz, 1, 1, src)
            kpm = kpm.expand(bsz, h, 1, src).reshape(bsz * h, 1, src)
            mask = kpm if mask is None else mask + kpm

        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(d)
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        if self.dropout > 0.0 and self.training:
            attn = F.dropout(attn, p=self.dropout)
        ctx = torch.bmm(attn, v)  # (N*H, L, d)
        ctx = ctx.transpose(0, 1).reshape(tgt, bsz, e)
        weights = None
        if need_weights:
            weights = attn.view(bsz, h, tgt, src)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        return ctx, weights, unbatched

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ctx, weights, unbatched = self.attend(
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
        )
        out = self.out_proj(ctx)
        if unbatched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1).contiguous()  # as nn.MultiheadAttention returns
        return out, weights

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}"
        )


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention's mask convention: bool True = not allowed -> -inf; floats are added."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _shared(fn: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """fn(x) for each x, computed once per distinct tensor."""
    cache: dict[int, torch.Tensor] = {}
    for x in xs:
        if id(x) not in cache:
            cache[id(x)] = fn(x)
    return [cache[id(x)] for x in xs]


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of `weight` (out x in) and `bias`."""
    out_f, in_f = weight.shape
    kw = {"device": weight.device, "dtype": weight.dtype}
    lin = nn.Linear(in_f, out_f, bias=bias is not None, **kw)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _matrix(proj: nn.Module) -> torch.Tensor:
    """The (out x in) matrix a Linear-like projection computes with."""
    fn = getattr(proj, "dense_weight", None)
    return fn() if callable(fn) else proj.weight
