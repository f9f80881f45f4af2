"""What a compressor is given: one matrix of a layer, or a whole layer (tensor methods on convs).

`LayerSite` is what one forward pass and the calibration data told us about a layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class LayerSite:
    """A layer's input and output shapes (None if unknown), calibration statistics
    (tensorslim.calibrate.LayerStats, None without calibration data) and data-aware settings
    (objective and compressor options, see core.context)."""

    name: str
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    stats: Any = field(default=None, compare=False, repr=False)
    settings: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class MatrixTarget:
    """One matrix W (m x n) of a layer, acting as y = W x on n-vectors.

    layer: the layer's dotted name; part: the matrix's name in the layer ("" for a layer with one
    matrix); weight: W (detached), None when only the structure is built (loading); positions: how
    many n-vectors one forward call multiplies (None if unknown); stats: this matrix's calibration
    statistics or None; settings: objective and options of this compress call.
    """

    layer: str
    part: str
    shape: tuple[int, int]
    dtype: torch.dtype = torch.float32
    device: torch.device | None = None
    weight: torch.Tensor | None = field(default=None, compare=False, repr=False)
    positions: int | None = None
    stats: Any = field(default=None, compare=False, repr=False)
    settings: Any = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        name = repr(self.layer) if self.layer else "(model)"
        return f"{name} matrix {self.part!r}" if self.part else name

    def flops(self, macs: int) -> int | None:
        """FLOPs (2 per multiply-add) of `macs` multiply-adds per input vector."""
        return None if self.positions is None else 2 * self.positions * macs


@dataclass(frozen=True)
class LayerTarget:
    """A whole layer, for compressors of form "layer" (a conv kernel as a 4-way tensor)."""

    layer: str
    module: nn.Module = field(compare=False, repr=False)
    site: LayerSite = field(compare=False, repr=False)
    handler: Any = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        return repr(self.layer) if self.layer else "(model)"
