"""LowRankLinear: y = second(first(x)) = A (B x) + b, two standard matmuls.

Without bias it is also the operator module of the low-rank compressor (x (..., n) -> A B x); the
handlers turn such an operator back into a LowRankLinear carrying the layer's bias
(`linear_from_op`), so a compressed Linear keeps one structure and one set of state-dict keys.
"""

from __future__ import annotations

import torch
from torch import nn

from tensorslim.decompose import truncated_svd
from tensorslim.layers.additive import Compressed, OpLinear


class LowRankLinear(nn.Module, Compressed):
    """A Linear layer W (out x in) stored as A (out x r) @ B (r x in), bias kept.

    `first` is nn.Linear(in, r, bias=False) holding B; `second` is nn.Linear(r, out) holding A and
    the original bias. Input (..., in) -> output (..., out), like nn.Linear.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        kw = {"device": device, "dtype": dtype}
        self.first = nn.Linear(in_features, rank, bias=False, **kw)
        self.second = nn.Linear(rank, out_features, bias=bias, **kw)

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int, svd_method: str = "auto") -> LowRankLinear:
        """Truncated SVD of `linear.weight` at `rank` (Eckart-Young optimal)."""
        w = linear.weight.detach()
        a, b = truncated_svd(w, rank, method=svd_method)
        return cls.from_factors(a, b, linear.bias)

    @classmethod
    def from_factors(
        cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None
    ) -> LowRankLinear:
        """Build from A (out x r), B (r x in) and an optional bias (out,)."""
        out_f, r = a.shape
        in_f = b.shape[1]
        layer = cls(in_f, out_f, r, bias=bias is not None, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            layer.first.weight.copy_(b)
            layer.second.weight.copy_(a)
            if bias is not None:
                layer.second.bias.copy_(bias.detach())
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(input))

    def dense_weight(self) -> torch.Tensor:
        """The reconstructed weight A @ B, shape (out, in)."""
        return self.second.weight @ self.first.weight

    def balance_(self) -> None:
        """Rescale the factors in place (A D, D^-1 B; the product is unchanged) so that each
        column of A and the matching row of B have equal norms (see balance_factors_)."""
        balance_factors_(self.second.weight, self.first.weight)

    def to_dense(self) -> nn.Linear:
        """An nn.Linear computing the same function."""
        w = self.dense_weight()
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.second.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.second.bias is not None:
                lin.bias.copy_(self.second.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@torch.no_grad()
def balance_factors_(a: torch.Tensor, b: torch.Tensor) -> None:
    """In place: A (m, r, ...) times D and B (r, ...) times D^-1 along the rank, D = sqrt(|B_i| /
    |A_i|) per rank index i, so |A_i| = |B_i| and A B is unchanged (up to rounding). Gradient
    training with a per-parameter step size (Adam) then moves both factors on the same scale:
    whitened factors (B = V^T S^-1) can be ~1e-3 of A, where Adam at lr 1e-4 wrecks B."""
    m, r = a.shape[0], a.shape[1]
    a2, b2 = a.reshape(m, r, -1), b.reshape(r, -1)
    na = a2.transpose(0, 1).reshape(r, -1).norm(dim=1).to(torch.float64)
    nb = b2.norm(dim=1).to(torch.float64)
    ok = (na > 0) & (nb > 0)
    d = torch.where(ok, (nb / na.clamp_min(1e-300)).sqrt(), torch.ones_like(na))
    a.mul_(d.to(a.dtype).reshape(1, r, *([1] * (a.ndim - 2))))
    b.div_(d.to(b.dtype).reshape(r, *([1] * (b.ndim - 1))))


def factors_of(op: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A (m x r), B (r x n)) of a bias-free LowRankLinear operator, None for any other module."""
    if isinstance(op, LowRankLinear) and op.second.bias is None:
        return op.second.weight.detach(), op.first.weight.detach()
    return None


def linear_from_op(
    op: nn.Module, bias: torch.Tensor | None, in_features: int, out_features: int
) -> nn.Module:
    """A Linear-like layer computing op(x) + bias on (..., in_features): a LowRankLinear holding
    the factors and the bias when `op` is a bias-free LowRankLinear, else an OpLinear."""
    factors = factors_of(op)
    if factors is not None:
        return LowRankLinear.from_factors(*factors, None if bias is None else bias.detach())
    return OpLinear(op, None if bias is None else bias.detach(), in_features, out_features)
