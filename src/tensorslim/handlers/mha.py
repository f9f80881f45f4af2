"""nn.MultiheadAttention: two matrices, the packed input projection "in_proj" (3E x E, q, k and v
stacked) and the output projection "out_proj" (E x E), each applied once per token.

nn.MultiheadAttention reads its projection weights directly in its forward, so the replacement is
a RoutedMultiheadAttention (layers/routed_mha.py) computing the same function through projection
sub-modules. Calibration sees "in_proj" with input rows query, key and value (their Grams summed,
exact for self-attention up to a factor 3) and "out_proj" with the attention context, recomputed
by the routed module from the captured inputs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tensorslim.core.handler import Handler, register_handler
from tensorslim.core.target import LayerSite
from tensorslim.layers.routed_mha import RoutedMultiheadAttention

PARTS = ("in_proj", "out_proj")
_ATTEND = inspect.signature(RoutedMultiheadAttention.attend)


@register_handler(nn.MultiheadAttention)
class MHAHandler(Handler):
    """Supported: embed_dim = kdim = vdim, no bias_k / bias_v, no add_zero_attn."""

    name = "mha"

    def unsupported_reason(self, module: nn.Module) -> str | None:
        why = RoutedMultiheadAttention.supported(module)
        return None if why is None else f"nn.MultiheadAttention with {why} is not supported"

    def matrices(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {
            "in_proj": module.in_proj_weight.detach(),
            "out_proj": module.out_proj.weight.detach(),
        }

    def positions(self, module: nn.Module, site: LayerSite) -> dict[str, int | None]:
        """Tokens of the query (or output) for both projections: exact for self-attention, where
        keys and values are the query's tokens."""
        shape = site.input_shape if site.input_shape is not None else site.output_shape
        tokens = None if shape is None else math.prod(shape) // module.embed_dim
        return {part: tokens for part in PARTS}

    def extra_params(self, module: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        if module.in_proj_bias is not None:
            out["in_proj_bias"] = module.in_proj_bias.detach()
        if module.out_proj.bias is not None:
            out["out_proj.bias"] = module.out_proj.bias.detach()
        return out

    def assemble(self, module: nn.Module, ops: Mapping[str, nn.Module | None]) -> nn.Module:
        in_op, out_op = ops.get("in_proj"), ops.get("out_proj")
        if in_op is None and out_op is None:
            return module
        return RoutedMultiheadAttention.from_ops(module, in_op, out_op).train(module.training)

    def pack(self, module: nn.Module, values: Mapping[str, Any]) -> Any:
        """[in_proj value, out_proj value] when both matrices have one (the form plans store),
        else the mapping."""
        if all(values.get(p) is not None for p in PARTS):
            return [values[p] for p in PARTS]
        return dict(values)

    # -- calibration --------------------------------------------------------------------------
    def weight_parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {"in_proj": module.in_proj_weight, "out_proj": module.out_proj.weight}

    def grad_matrix(self, module: nn.Module, part: str, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def calibration_reason(self, module: nn.Module) -> str | None:
        return RoutedMultiheadAttention.supported(module)

    def rows(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> dict[str, torch.Tensor]:
        """in_proj: query, key and value rows stacked (3N x E); out_proj: the context (N x E)."""
        bound = _ATTEND.bind(None, *args, **kwargs)
        bound.arguments["need_weights"] = False
        e = module.embed_dim
        q, k, v = (bound.arguments[n] for n in ("query", "key", "value"))
        rows_in = torch.cat([x.reshape(-1, e) for x in (q, k, v)])
        routed = RoutedMultiheadAttention.from_dense(module).eval()
        ctx, _, _ = routed.attend(*list(bound.args)[1:], **bound.kwargs)
        return {"in_proj": rows_in, "out_proj": ctx.reshape(-1, e)}
