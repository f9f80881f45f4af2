"""An operator that stores a sparse matrix: its nonzero values and their positions.

W (m x n) has `nnz` stored entries: values (a Parameter at the layer's dtype, in ascending order of
position) and positions i * n + j, bit-packed at index_bits(m * n) = ceil(log2(m * n)) bits each
(layers.quantized.pack_bits), so the buffers hold what the plan counts: nnz * (value bits + index
bits), the index stream rounded up to whole bytes.

forward(x) on (..., n) gathers the inputs of the stored entries and adds the products into the
outputs (index_add): about 2 * nnz FLOPs per input vector. dense_weight() scatters the values into
an m x n zero matrix (what convolutions and the ONNX export compute with).
"""

from __future__ import annotations

import torch
from torch import nn

from tensorslim.layers.additive import Compressed
from tensorslim.layers.quantized import pack_bits, packed_bytes, unpack_bits

# Above this fraction of stored entries forward() multiplies by the dense matrix (a BLAS product
# beats a gather + index_add there).
DENSE_ABOVE = 0.25


def index_bits(size: int) -> int:
    """Bits of one position in a matrix of `size` entries: ceil(log2(size)), at least 1."""
    return max(1, (size - 1).bit_length())


class SparseOp(nn.Module, Compressed):
    """A sparse (m x n) matrix: `values` (nnz,) and packed flat positions (uint8 buffer
    `positions`, (packed_bytes(nnz, index_bits(m * n)),)), positions strictly increasing."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nnz: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        size = in_features * out_features
        if in_features < 1 or out_features < 1 or not 1 <= nnz <= size:
            raise ValueError(
                f"a {out_features} x {in_features} sparse matrix holds 1..{size} entries; "
                f"got nnz={nnz}"
            )
        self.in_features, self.out_features, self.nnz = in_features, out_features, nnz
        self.width = index_bits(size)
        self.values = nn.Parameter(torch.zeros(nnz, device=device, dtype=dtype or torch.float32))
        self.register_buffer(
            "positions",
            torch.zeros(packed_bytes(nnz, self.width), dtype=torch.uint8, device=device),
        )

    @classmethod
    def from_entries(
        cls, shape: tuple[int, int], positions: torch.Tensor, values: torch.Tensor
    ) -> SparseOp:
        """From flat positions (nnz,) into an (m, n) matrix (row-major) and their values."""
        m, n = shape
        order = torch.argsort(positions)
        pos, val = positions[order], values[order]
        if pos.numel() > 1 and not bool((pos[1:] > pos[:-1]).all()):
            raise ValueError("sparse positions must be distinct")
        op = cls(n, m, int(pos.numel()), device=values.device, dtype=values.dtype)
        with torch.no_grad():
            op.values.copy_(val)
            op.positions.copy_(pack_bits(pos, op.width).to(op.positions.device))
        return op

    def flat_positions(self) -> torch.Tensor:
        """The positions i * n + j, int64 (nnz,)."""
        return unpack_bits(self.positions, self.width, self.nnz)

    def dense_weight(self) -> torch.Tensor:
        """W (m x n): the values at their positions, zeros elsewhere."""
        size = self.out_features * self.in_features
        flat = self.values.new_zeros(size).scatter(0, self.flat_positions(), self.values)
        return flat.reshape(self.out_features, self.in_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        size = self.out_features * self.in_features
        if torch.onnx.is_in_onnx_export() or self.nnz > DENSE_ABOVE * size:
            return torch.nn.functional.linear(input, self.dense_weight())
        pos = self.flat_positions()
        rows = torch.div(pos, self.in_features, rounding_mode="floor")
        cols = pos - rows * self.in_features
        flat = input.reshape(-1, self.in_features)
        out = flat.new_zeros(flat.shape[0], self.out_features)
        out = out.index_add(1, rows, flat[:, cols] * self.values.to(flat.dtype))
        return out.reshape(*input.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}"
