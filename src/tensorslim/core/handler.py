"""The layer-handler protocol and its registry: one handler per layer type.

A handler gives a uniform view of its layer type: the matrices it multiplies with (each W (m x n)
acting as y = W x), how often one forward call applies each, the parameters outside them (biases),
the conv kernel for compressors of form "layer", how calibration sees the layer (the input rows of
each matrix and its gradient), and the replacement rule (`assemble`: the layer rebuilt around one
operator module per compressed matrix). A new layer type is one handler file::

    @tensorslim.register_handler(MyLayer)
    class MyLayerHandler(tensorslim.Handler):
        name = "my_layer"
        def matrices(self, module): ...
        def positions(self, module, site): ...
        def assemble(self, module, ops): ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from tensorslim.core.registry import TypeRegistry
from tensorslim.core.target import LayerSite
from tensorslim.errors import TensorSlimError, short_repr


class Handler:
    """The view of one layer type; see the module docstring."""

    name: ClassVar[str] = ""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """None if the layer can be compressed, else a one-line reason it stays dense."""
        return None

    def matrices(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """part name -> the detached (m x n) matrix; "" names the only matrix of a layer."""
        raise NotImplementedError

    def positions(self, module: nn.Module, site: LayerSite) -> dict[str, int | None]:
        """part name -> how many n-vectors one forward call on the site's input multiplies by
        that matrix (None if unknown)."""
        raise NotImplementedError

    def extra_params(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Parameters outside the matrices, kept as they are (biases)."""
        return {}

    def kernel(self, module: nn.Module) -> torch.Tensor | None:
        """The weight as a tensor for compressors of form "layer" (a conv kernel), else None."""
        return None

    def assemble(self, module: nn.Module, ops: Mapping[str, nn.Module | None]) -> nn.Module:
        """The layer rebuilt with `ops[part]` (an operator module: forward (..., n) -> (..., m)
        without bias, `dense_weight()` -> (m, n)) in place of each matrix; None keeps a
        matrix dense. Biases and the layer's other settings are kept."""
        raise NotImplementedError

    def compressed_flops(
        self,
        module: nn.Module,
        site: LayerSite,
        targets: Mapping[str, Any],
        compressed: Mapping[str, list],
    ) -> int | None:
        """FLOPs of the layer with `compressed` parts (part -> [(component, params, Cost)]),
        where they are not the sum of the parts' (an implementation that rebuilds the dense
        matrices); None: the sum."""
        return None

    def pack(self, module: nn.Module, values: Mapping[str, Any]) -> Any:
        """A per-matrix parameter (part -> value) as a plan stores it: the value itself for a
        layer with one matrix, else the mapping."""
        if list(values) == [""]:
            return values[""]
        return dict(values)

    # -- calibration (tensorslim.calibrate) ---------------------------------------------------
    def weight_parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """part name -> the parameter holding that matrix (gradients are taken of these)."""
        return {"": module.weight}

    def grad_matrix(self, module: nn.Module, part: str, grad: torch.Tensor) -> torch.Tensor:
        """A parameter gradient as the part's (m x n) matrix."""
        return grad.reshape(grad.shape[0], -1)

    def rows(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> dict[str, torch.Tensor]:
        """part name -> input rows X (N x n) of that matrix for one forward call."""
        raise NotImplementedError

    def calibration_reason(self, module: nn.Module) -> str | None:
        """None if calibration can collect input rows for this layer, else why not."""
        return None if type(self).rows is not Handler.rows else "no calibration view"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_HANDLERS: TypeRegistry[Handler] = TypeRegistry()


def register_handler(*module_types: type[nn.Module] | str):
    """Class decorator: handle layers of `module_types` (and their subclasses without a handler
    of their own) with an instance of the decorated Handler subclass. A type may also be given
    by qualified name ("transformers.pytorch_utils.Conv1D")."""
    if not module_types:
        raise TensorSlimError("register_handler needs at least one module type")

    def decorate(cls: type[Handler]) -> type[Handler]:
        if not (isinstance(cls, type) and issubclass(cls, Handler)):
            raise TensorSlimError(
                f"@register_handler decorates a tensorslim.Handler subclass; got {short_repr(cls)}"
            )
        handler = cls()
        for t in module_types:
            _HANDLERS.register(t, handler)
        return cls

    return decorate


def unregister_handler(module_type: type[nn.Module] | str) -> None:
    """Forget the handler of `module_type` (plugins and tests that register one for a while)."""
    _HANDLERS.unregister(module_type)


def handler_for(module: nn.Module) -> Handler | None:
    """The handler of `module`'s type (following its class hierarchy), None if none."""
    return _HANDLERS.lookup(module)


def handlers() -> list[Handler]:
    return _HANDLERS.values()


def split_param(parts: list[str], value: Any) -> dict[str, Any]:
    """A component parameter as one value per matrix part: a mapping is per part (a part it does
    not name is None: dense), a list with one entry per part (several parts) is positional, any
    other value applies to every part."""
    if isinstance(value, Mapping):
        if parts == [""]:
            raise TensorSlimError(
                "this layer has one matrix: give the value itself (e.g. an integer rank), not an "
                f"object naming matrices; got {short_repr(value)}"
            )
        unknown = [k for k in value if k not in parts]
        if unknown:
            raise TensorSlimError(
                f"unknown matrix {short_repr(unknown[0])}; this layer's matrices are "
                + ", ".join(repr(p) for p in parts)
            )
        return {p: value.get(p) for p in parts}
    if isinstance(value, (list, tuple)) and len(parts) > 1:
        if len(value) != len(parts):
            raise TensorSlimError(
                f"a list gives one value per matrix of this layer ({', '.join(map(repr, parts))});"
                f" got {len(value)} values {short_repr(value)}"
            )
        return dict(zip(parts, value))
    return {p: value for p in parts}


def split_params(parts: list[str], params: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """A component's parameters per matrix part; None where any parameter is None (that matrix
    stays dense for this component)."""
    per: dict[str, dict[str, Any]] = {p: {} for p in parts}
    for key, value in params.items():
        for part, v in split_param(parts, value).items():
            per[part][key] = v
    return {p: (None if any(v is None for v in d.values()) else d) for p, d in per.items()}
