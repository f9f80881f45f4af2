"""Find the layers a method can factorize, and measure each layer's shapes and cost on one input."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorslim.errors import ExampleInputError, NonFiniteWeightError
from tensorslim.layers import FactorizedConv, LowRankConv, LowRankLinear, LowRankRNN
from tensorslim.model import registry
from tensorslim.model.registry import Factorizer, LayerSite, is_registered_type, resolve

# Layers produced by tensorslim: never searched again for compressible children.
FACTORIZED_TYPES: tuple[type[nn.Module], ...] = (
    LowRankLinear,
    LowRankConv,
    FactorizedConv,
    LowRankRNN,
)

# Modules whose children's weights are read directly by the parent's forward, so replacing a child
# would be silently ignored (nn.MultiheadAttention calls F.multi_head_attention_forward on
# out_proj.weight). They are reported and left whole.
OPAQUE_TYPES: dict[type[nn.Module], str] = {
    nn.MultiheadAttention: (
        "nn.MultiheadAttention reads its projection weights directly in its forward; "
        "not supported by this method"
    ),
}


@dataclass
class LayerInfo:
    """One layer found in a model, with why it is (not) compressible."""

    name: str
    module: nn.Module
    factorizer: Factorizer | None
    reason: str | None  # None: compressible with the requested method
    site: LayerSite
    # Set when another method handles this layer (a tensor method on a Linear: the matrix SVD).
    note: str | None = None

    @property
    def type_name(self) -> str:
        return type(self.module).__name__

    @property
    def shape(self) -> tuple[int, ...]:
        w = getattr(self.module, "weight", None)
        if isinstance(w, torch.Tensor):
            return tuple(w.shape)
        return tuple(next(iter(self.module.parameters())).shape)

    @property
    def compressible(self) -> bool:
        return self.reason is None

    def params(self) -> int:
        if self.factorizer is not None:
            return self.factorizer.dense_params(self.module)
        return sum(p.numel() for p in self.module.parameters())

    def flops(self) -> int | None:
        if self.factorizer is not None:
            return self.factorizer.dense_flops(self.module, self.site)
        return None


def _matches(name: str, patterns: Sequence[str] | None) -> str | None:
    for p in patterns or ():
        if fnmatch.fnmatchcase(name, p):
            return p
    return None


def find_layers(
    model: nn.Module,
    method: str = "svd",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[LayerInfo]:
    """Every layer with a weight matrix, in module order, each with its factorizer or the reason
    it stays dense. `include` / `exclude` are fnmatch patterns on dotted names ("features.*").

    Raises NonFiniteWeightError if a selected layer's weight holds NaN or Inf.
    """
    if isinstance(include, str):
        include = [include]
    if isinstance(exclude, str):
        exclude = [exclude]
    found: list[LayerInfo] = []

    def visit(module: nn.Module, name: str) -> None:
        if name and isinstance(module, FACTORIZED_TYPES):
            found.append(LayerInfo(name, module, None, "already factorized", LayerSite(name)))
            return
        opaque = next((r for t, r in OPAQUE_TYPES.items() if isinstance(module, t)), None)
        if opaque is not None and registry.find(module, method) is None:
            found.append(LayerInfo(name, module, None, opaque, LayerSite(name)))
            return
        if name and is_registered_type(module):
            found.append(_classify(module, name, method, include, exclude))
            return
        children = list(module.named_children())
        if name and not children and any(p.ndim >= 2 for p in module.parameters(recurse=False)):
            reason = f"no factorizer registered for {type(module).__name__}"
            found.append(LayerInfo(name, module, None, reason, LayerSite(name)))
        for child_name, child in children:
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return found


def _classify(
    module: nn.Module,
    name: str,
    method: str,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
) -> LayerInfo:
    factorizer, note = resolve(module, method)
    site = LayerSite(name)
    if factorizer is None:
        reason = f"method {method!r} does not support {type(module).__name__}"
        return LayerInfo(name, module, None, reason, site)
    if include and _matches(name, include) is None:
        return LayerInfo(name, module, factorizer, "not matched by --include", site)
    hit = _matches(name, exclude)
    if hit is not None:
        return LayerInfo(name, module, factorizer, f"excluded by pattern {hit!r}", site)
    reason = factorizer.unsupported_reason(module)
    if reason is None:
        w = factorizer.weight(module)
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise NonFiniteWeightError(
                f"layer {name!r} ({type(module).__name__}) has {bad} NaN/Inf weight values; "
                "fix or exclude it (exclude=[...] / --exclude)"
            )
    return LayerInfo(name, module, factorizer, reason, site, note)


def run_model(model: nn.Module, example_input: Any) -> Any:
    """Run `model` on `example_input` (a tensor, a tuple of positional inputs or a dict of keyword
    inputs) without gradients; ExampleInputError with the model's message if it fails."""
    try:
        with torch.no_grad():
            if isinstance(example_input, dict):
                return model(**example_input)
            if isinstance(example_input, (tuple, list)):
                return model(*example_input)
            return model(example_input)
    except (
        Exception
    ) as exc:  # the model's own error, whatever its type, is the user's input problem
        raise ExampleInputError(
            f"the model rejected the example input ({_describe(example_input)}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}"
    if isinstance(x, dict):
        return "dict with keys " + ", ".join(map(str, x))
    if isinstance(x, (tuple, list)):
        return f"{len(x)} positional inputs"
    return type(x).__name__


def trace_sites(model: nn.Module, layers: list[LayerInfo], example_input: Any) -> None:
    """Run one forward pass with hooks and fill each layer's input/output shapes in place."""
    hooks = []

    def make_hook(info: LayerInfo):
        def hook(_mod, inputs, output):
            x = inputs[0] if inputs else None
            if isinstance(output, (tuple, list)):  # e.g. nn.MultiheadAttention: (output, weights)
                output = next((o for o in output if isinstance(o, torch.Tensor)), None)
            info.site = LayerSite(
                info.name,
                tuple(x.shape) if isinstance(x, torch.Tensor) else None,
                tuple(output.shape) if isinstance(output, torch.Tensor) else None,
            )

        return hook

    for info in layers:
        hooks.append(info.module.register_forward_hook(make_hook(info)))
    try:
        run_model(model, example_input)
    finally:
        for h in hooks:
            h.remove()


def count_params(model: nn.Module) -> int:
    """Total number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def summed(values: list[int | None]) -> int | None:
    """Sum, or None if any value is unknown."""
    return None if any(v is None for v in values) else int(math.fsum(values))
