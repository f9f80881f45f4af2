"""Kind "fwsvd": Fisher-weighted SVD (Hsu et al. 2022, "Language model compression with weighted
low-rank factorization", ICLR, arXiv 2207.00112, Sec. 3).

With the empirical Fisher diagonal I (m x n) of W, the row importance I^_i = sum_j I_ij
(max-normalised, plus `eps`) weights the rows: min_{rank(X) <= r} ||D (W - X)||_F^2 with
D = diag(sqrt(I^)) is solved in closed form by the SVD of D W (decompose.weighted). The allocator
minimises the "fisher" objective by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tensorslim.compressors._factors import EPS, Factors, check_options, nested_fwsvd
from tensorslim.compressors.lowrank import DataAwareLowRank
from tensorslim.core.compressor import register_compressor


@register_compressor("fwsvd")
class FWSVD(DataAwareLowRank):
    """Row-weighted truncated SVD of W (m x n): A = D^-1 U_r S_r (m x r), B = V_r^T (r x n);
    needs the Fisher estimate (calibration=batches and loss=fn)."""

    needs = frozenset({"fisher"})
    objective = "fisher"

    @dataclass(frozen=True)
    class Options:
        """eps: added to the max-normalised row importance (> 0: every row keeps a weight)."""

        eps: float = 1e-6

        def __post_init__(self) -> None:
            check_options(self, {"eps": EPS})

    def nested(self, w: torch.Tensor, st: Any, k: int) -> Factors:
        return nested_fwsvd(w, st, k, self.options.eps)
