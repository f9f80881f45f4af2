"""Truncating a convolution kernel along cuts (Singh, Jahromi & Orús 2024, arXiv 2403.14379).

A cut is a bipartition of the kernel's four indices (out, in, kh, kw): four one-versus-three cuts
and three two-versus-two cuts. Truncating along a cut = matricize the kernel with the cut's two
sides as rows and columns, keep the χ largest singular values, reshape back (the best rank-χ
approximation of that matricization, Eckart-Young). Several cuts in sequence along an index
order = an MPS / tensor train along that order with bonds (χ1, χ2, χ3), computed by TT-SVD.

Singh, Jahromi & Orús (2024) leave some of these details open (our reading); the norm loss is reported
both as 1 - ||K~|| / ||K|| (the paper's) and 1 - ||K~||^2 / ||K||^2.

Pure math on tensors: imports nothing else from tensorslim except decompose.tensor.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from tensorslim.decompose.tensor import tt, tt_feasible, tt_reconstruct

INDEX_NAMES = ("out", "in", "kh", "kw")


@dataclass(frozen=True)
class Cut:
    """A bipartition of the four kernel indices; `left` holds index 0 (out) by convention."""

    left: tuple[int, ...]
    right: tuple[int, ...]

    @property
    def name(self) -> str:
        return (
            ",".join(INDEX_NAMES[i] for i in self.left)
            + "|"
            + ",".join(INDEX_NAMES[i] for i in self.right)
        )

    def max_bond(self, shape: tuple[int, ...]) -> int:
        return min(math.prod(shape[i] for i in self.left), math.prod(shape[i] for i in self.right))


def all_cuts(ndim: int = 4) -> list[Cut]:
    """The 2^(ndim-1) - 1 bipartitions (7 for a 2-D conv kernel): each side non-empty."""
    cuts = []
    rest = tuple(range(1, ndim))
    for size in range(0, ndim - 1):
        for extra in itertools.combinations(rest, size):
            left = (0, *extra)
            right = tuple(i for i in range(ndim) if i not in left)
            cuts.append(Cut(left, right))
    return cuts


def cut_by_name(name: str) -> Cut:
    for cut in all_cuts():
        if cut.name == name or _sides(cut.name) == _sides(name):
            return cut
    raise ValueError(f"unknown cut {name!r}; known: {', '.join(c.name for c in all_cuts())}")


def _sides(name: str) -> frozenset:
    return frozenset(frozenset(s.split(",")) for s in name.split("|"))


def norm_loss(k: torch.Tensor, k_trunc: torch.Tensor) -> tuple[float, float]:
    """(1 - ||K~|| / ||K||, 1 - ||K~||^2 / ||K||^2)."""
    n = float(torch.linalg.norm(k.double()))
    if n == 0:
        return 0.0, 0.0
    ratio = float(torch.linalg.norm(k_trunc.double())) / n
    return 1 - ratio, 1 - ratio**2


@dataclass(frozen=True)
class Truncation:
    kernel: torch.Tensor
    bond: int | tuple[int, ...]
    max_bond: int | tuple[int, ...]
    norm_loss: float  # 1 - ||K~|| / ||K||
    norm_loss_sq: float  # 1 - ||K~||^2 / ||K||^2


def truncate_cut(
    kernel: torch.Tensor,
    cut: Cut | str,
    *,
    chi: int | None = None,
    retain: float | None = None,
) -> Truncation:
    """Truncate `kernel` along `cut` to bond `chi`, or to the smallest bond whose kept norm
    ||K~|| / ||K|| is at least `retain` (exactly one of the two)."""
    if (chi is None) == (retain is None):
        raise ValueError("give exactly one of chi and retain")
    if isinstance(cut, str):
        cut = cut_by_name(cut)
    k = kernel.detach().to(torch.float64)
    if k.ndim != 4:
        raise ValueError(f"expected a 4-D kernel (out, in, kh, kw), got shape {tuple(k.shape)}")
    perm = cut.left + cut.right
    rows = math.prod(k.shape[i] for i in cut.left)
    m = k.permute(perm).reshape(rows, -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    full = s.numel()
    if chi is None:
        if not 0.0 < retain <= 1.0:
            raise ValueError(f"retain must be in (0, 1], got {retain}")
        kept = torch.cumsum(s**2, 0) / (s**2).sum()  # ||K~||^2 / ||K||^2 for each bond
        chi = int((kept >= retain**2 - 1e-12).nonzero()[0]) + 1 if float(s.sum()) > 0 else 1
    if chi < 1:
        raise ValueError(f"chi must be >= 1, got {chi}")
    chi = min(chi, full)
    approx = (u[:, :chi] * s[:chi]) @ vh[:chi]
    inv = [perm.index(i) for i in range(4)]
    shaped = approx.reshape([k.shape[i] for i in perm]).permute(inv).contiguous()
    out = shaped.to(kernel.dtype)
    loss, loss_sq = norm_loss(k, shaped)
    return Truncation(out, chi, full, loss, loss_sq)


def truncate_mps(
    kernel: torch.Tensor, bonds: tuple[int, int, int], order: tuple[int, ...] = (0, 1, 2, 3)
) -> Truncation:
    """Sequential truncation along the index `order` with bonds (χ1, χ2, χ3): TT-SVD of the kernel
    permuted to `order` (bonds clamped to what TT-SVD can reach), reconstructed and permuted back."""
    k = kernel.detach().to(torch.float32)
    order = tuple(order)
    if sorted(order) != [0, 1, 2, 3]:
        raise ValueError(f"order must be a permutation of (0, 1, 2, 3), got {order}")
    permuted = k.permute(order).contiguous()
    # decompose.tensor.tt orders a kernel (out, in, *k) as (in, *k, out); present the permuted
    # kernel so that this ordering is `order`: (p0, p1, p2, p3) -> pass (p3, p0, p1, p2).
    as_kernel = permuted.permute(3, 0, 1, 2).contiguous()
    full = tuple(
        min(math.prod(permuted.shape[: j + 1]), math.prod(permuted.shape[j + 1 :]))
        for j in range(3)
    )
    bonds = tuple(max(1, min(int(b), f)) for b, f in zip(bonds, full))
    bonds = tt_feasible(tuple(as_kernel.shape), bonds)
    dec = tt(as_kernel, bonds)
    rec = tt_reconstruct(dec.factors).permute(1, 2, 3, 0)  # back to the permuted order
    inv = [order.index(i) for i in range(4)]
    shaped = rec.permute(inv).contiguous().to(kernel.dtype)
    loss, loss_sq = norm_loss(kernel, shaped)
    return Truncation(shaped, bonds, full, loss, loss_sq)
