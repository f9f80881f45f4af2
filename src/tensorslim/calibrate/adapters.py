"""How calibration sees one layer type: its weight matrices and the input rows each one multiplies.

Every compressible weight is viewed as a matrix W (m x n) acting as y = W x on n-dimensional input
rows x (the same view the factorizers use). An adapter names the layer's matrix "parts" ("" for a
layer with one matrix; nn.MultiheadAttention has "in_proj" and "out_proj"), gives each part's
parameter and how its gradient maps to the (m x n) matrix, and turns one forward call's inputs into
the rows X (N x n) of each part, so that calibration can accumulate X^T X and the Fisher diagonal.

Adapters are looked up by the module's class hierarchy, by type or by the class's qualified name
("transformers.pytorch_utils.Conv1D"), so optional libraries need not be imported to register them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Adapter(ABC):
    """The matrix view of one layer type for calibration."""

    def parts(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """part name -> the parameter holding that part's weight (gradients are taken of these)."""
        return {"": module.weight}

    def grad_matrix(self, module: nn.Module, part: str, grad: torch.Tensor) -> torch.Tensor:
        """A parameter gradient (shaped like the parameter) as the part's (m x n) matrix."""
        return grad.reshape(grad.shape[0], -1)

    @abstractmethod
    def rows(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> dict[str, torch.Tensor]:
        """part name -> input rows X (N x n) of that part's matrix for one forward call."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """None if input rows can be collected for this module, else why not."""
        return None


class LinearAdapter(Adapter):
    def rows(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        return {"": x.reshape(-1, x.shape[-1])}


class Conv1DAdapter(Adapter):
    """Hugging Face GPT-2 `Conv1D`: y = x @ weight + bias with weight (in, out), so W = weight^T."""

    def grad_matrix(self, module, part, grad):
        return grad.T

    def rows(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        return {"": x.reshape(-1, x.shape[-1])}


class ConvAdapter(Adapter):
    """Conv1d / Conv2d: rows are the unfolded input patches (C_in * prod(k)), matching
    weight.reshape(out, -1), so X^T X is the Gram matrix of the kernel-matrix's inputs."""

    def unsupported_reason(self, module):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} (give explicit padding to calibrate this conv)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
            return f"{type(module).__name__} (only Conv1d and Conv2d inputs are unfolded)"
        return None

    def rows(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        if isinstance(module, nn.Conv1d):
            if x.ndim == 2:
                x = x.unsqueeze(0)
            cols = F.unfold(
                x.unsqueeze(2),
                (1, module.kernel_size[0]),
                dilation=(1, module.dilation[0]),
                padding=(0, module.padding[0]),
                stride=(1, module.stride[0]),
            )
        else:
            if x.ndim == 3:
                x = x.unsqueeze(0)
            cols = F.unfold(
                x,
                module.kernel_size,
                dilation=module.dilation,
                padding=module.padding,
                stride=module.stride,
            )
        return {"": cols.transpose(1, 2).reshape(-1, cols.shape[1])}


_BY_TYPE: dict[type[nn.Module], Adapter] = {}
_BY_NAME: dict[str, Adapter] = {}


def register_adapter(module_type: type[nn.Module] | str, adapter: Adapter) -> None:
    """Teach calibration a layer type, given as a class or as its qualified name "pkg.mod.Class"."""
    if isinstance(module_type, str):
        _BY_NAME[module_type] = adapter
    else:
        _BY_TYPE[module_type] = adapter


def qualified_name(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


def adapter_for(module: nn.Module) -> Adapter | None:
    """The adapter of `module`'s type (following its class hierarchy), None if none."""
    for klass in type(module).__mro__:
        a = _BY_TYPE.get(klass) or _BY_NAME.get(qualified_name(klass))
        if a is not None:
            return a
    return None


register_adapter(nn.Linear, LinearAdapter())
register_adapter(nn.Conv1d, ConvAdapter())
register_adapter(nn.Conv2d, ConvAdapter())
register_adapter(nn.Conv3d, ConvAdapter())
register_adapter("transformers.pytorch_utils.Conv1D", Conv1DAdapter())
