"""Operators that store a quantized matrix: a float codebook and bit-packed codes.

W (m x n) has W[i, j] = codebook[g(i), code[i, j]] with g(i) = 0 (one codebook per layer) or i
(one per output row: per channel). The codes are stored bit-packed at `bits` bits each
(`pack_bits`: a little-endian bit stream in uint8 bytes), so the module's buffers hold what the
plan counts: m*n*bits bits of codes (rounded up to whole bytes) and the codebook at its dtype.
`dense_weight()` unpacks and looks the codes up on each call (integer arithmetic only, so the
ONNX graph dequantizes too); `forward(x)` is x @ W^T on (..., n).

`QuantizedOp` holds an adaptive codebook (groups x 2^bits); `ScaledSignOp` holds one scale a per
group and fixed levels: binary {-a, a} (1 bit) or ternary {-a, 0, a} (2 bits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tensorslim.layers.additive import Compressed

# Levels of the scaled sign quantizers, by code.
SIGN_LEVELS = {"binary": (-1.0, 1.0), "ternary": (-1.0, 0.0, 1.0)}
SIGN_BITS = {"binary": 1, "ternary": 2}


# -- bit packing ----------------------------------------------------------------------------------
def packed_bytes(count: int, width: int) -> int:
    """Bytes of `count` codes of `width` bits packed back to back."""
    return (count * width + 7) // 8


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Codes (any shape, integers in [0, 2^width)) as a uint8 bit stream: code t occupies bits
    t*width .. t*width + width - 1, least significant first (byte b holds bits 8b..8b+7, least
    significant bit first). Shape (packed_bytes(numel, width),)."""
    if not 1 <= width <= 32:
        raise ValueError(f"width must be in [1, 32]; got {width}")
    flat = codes.detach().reshape(-1).to(torch.int64).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >> width):
        lo, hi = int(flat.min()), int(flat.max())
        raise ValueError(f"codes must be in [0, 2^{width}); got [{lo}, {hi}]")
    out = torch.zeros(packed_bytes(flat.numel(), width), dtype=torch.int64)
    base = torch.arange(flat.numel(), dtype=torch.int64) * width
    for bit in range(width):  # one pass per bit: memory stays O(numel)
        pos = base + bit
        out.index_add_(0, pos // 8, ((flat >> bit) & 1) << (pos % 8))
    return out.to(torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The `count` codes of `pack_bits`, int64 (count,). Uses gathers, multiplications, integer
    division and remainder only (exports to ONNX)."""
    span = (width + 7 + 7) // 8  # bytes one code can touch (it may start mid-byte)
    data = torch.cat([packed.to(torch.int64), packed.new_zeros(span).to(torch.int64)])
    start = torch.arange(count, dtype=torch.int64, device=packed.device) * width
    first = torch.div(start, 8, rounding_mode="floor")
    shift = start - first * 8
    scale = 256 ** torch.arange(span, dtype=torch.int64, device=packed.device)
    word = (data[first[:, None] + torch.arange(span, device=packed.device)] * scale).sum(dim=1)
    word = torch.div(word, torch.pow(2, shift), rounding_mode="floor")
    return torch.remainder(word, 1 << width)


# -- operators ------------------------------------------------------------------------------------
class QuantizedOp(nn.Module, Compressed):
    """W (m x n) = codebook[g(i), codes[i, j]]: codebook (groups, 2^bits) at the layer's dtype
    (a Parameter: it can be fine-tuned), codes bit-packed (uint8 buffer
    (packed_bytes(m * n, bits),)); groups 1 (one codebook) or m (per output row)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        groups: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_shape(in_features, out_features, bits, groups)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.groups = bits, groups
        self.codebook = nn.Parameter(
            torch.zeros(groups, self.levels, device=device, dtype=dtype or torch.float32)
        )
        count = in_features * out_features
        self.register_buffer(
            "codes", torch.zeros(packed_bytes(count, bits), dtype=torch.uint8, device=device)
        )

    @property
    def levels(self) -> int:
        """Codebook entries per group (2^bits)."""
        return 1 << self.bits

    @classmethod
    def from_codes(cls, codebook: torch.Tensor, codes: torch.Tensor, bits: int) -> QuantizedOp:
        """From a codebook (groups, <= 2^bits) and codes (m, n) (integers indexing it)."""
        m, n = codes.shape
        groups, k = codebook.shape
        if k > 1 << bits:
            raise ValueError(f"a {bits}-bit code indexes at most {1 << bits} values; got {k}")
        op = cls(n, m, bits, groups, device=codebook.device, dtype=codebook.dtype)
        with torch.no_grad():
            op.codebook.zero_()
            op.codebook[:, :k] = codebook
            if k < op.levels:  # unused entries repeat the last one
                op.codebook[:, k:] = codebook[:, -1:]
            op.codes.copy_(pack_bits(codes, bits).to(op.codes.device))
        return op

    def codebook_matrix(self) -> torch.Tensor:
        """The codebook, (groups, 2^bits)."""
        return self.codebook

    def code_matrix(self) -> torch.Tensor:
        """The codes, int64 (m, n)."""
        count = self.out_features * self.in_features
        return unpack_bits(self.codes, self.bits, count).reshape(
            self.out_features, self.in_features
        )

    def dense_weight(self) -> torch.Tensor:
        """W (m x n), looked up from the codebook."""
        book = self.codebook_matrix()
        codes = self.code_matrix()
        if self.groups == 1:
            return book[0][codes]
        return torch.gather(book, 1, codes)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.dense_weight())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, groups={self.groups}"
        )


class ScaledSignOp(QuantizedOp):
    """W (m x n) = scale[g(i)] * level[codes[i, j]] with fixed levels: binary (-1, 1) at 1 bit or
    ternary (-1, 0, 1) at 2 bits. Stores `scale` (groups, 1) and the packed codes."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kind: str,
        groups: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if kind not in SIGN_LEVELS:
            raise ValueError(f"kind must be one of {sorted(SIGN_LEVELS)}; got {kind!r}")
        super().__init__(
            in_features, out_features, SIGN_BITS[kind], groups, device=device, dtype=dtype
        )
        self.kind = kind
        del self.codebook
        dtype = dtype or torch.float32
        self.scale = nn.Parameter(torch.zeros(groups, 1, device=device, dtype=dtype))
        self.register_buffer(
            "signs", torch.tensor(SIGN_LEVELS[kind], device=device, dtype=self.scale.dtype),
            persistent=False,
        )

    @classmethod
    def from_scale(cls, kind: str, scale: torch.Tensor, codes: torch.Tensor) -> ScaledSignOp:
        """From scales (groups,) or (groups, 1) and codes (m, n) indexing SIGN_LEVELS[kind]."""
        m, n = codes.shape
        scale = scale.reshape(-1, 1)
        op = cls(n, m, kind, scale.shape[0], device=scale.device, dtype=scale.dtype)
        with torch.no_grad():
            op.scale.copy_(scale)
            op.codes.copy_(pack_bits(codes, op.bits).to(op.codes.device))
        return op

    def codebook_matrix(self) -> torch.Tensor:
        return self.scale * self.signs.to(self.scale.dtype)[None]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kind={self.kind}, groups={self.groups}"
        )


def _check_shape(in_features: int, out_features: int, bits: int, groups: int) -> None:
    if in_features < 1 or out_features < 1:
        raise ValueError(f"in/out features must be >= 1; got {in_features}, {out_features}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8]; got {bits}")
    if groups not in (1, out_features):
        raise ValueError(f"groups must be 1 or out_features ({out_features}); got {groups}")
