"""Kind "whitened": activation-whitened (truncation-aware) SVD, SVD-LLM (Wang et al. 2024,
"SVD-LLM: Truncation-aware singular value decomposition for large language model compression",
arXiv 2403.07378).

With the calibration inputs' Gram matrix G = X^T X (n x n) and S S^T = G + damping (Cholesky),
the SVD of W S truncated at r gives W_r = U_r S_r V_r^T S^-1, the rank-r matrix of least output
error ||(W - W_r) X^T||_F on those inputs (decompose.whitened). The allocator minimises the
"feature" objective (relative output error) by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tensorslim.compressors._factors import Factors, OptionSpec, check_options, nested_whitened
from tensorslim.compressors.lowrank import DataAwareLowRank
from tensorslim.core.compressor import register_compressor


@register_compressor("whitened")
class Whitened(DataAwareLowRank):
    """Whitened truncated SVD of W (m x n): A = U_r S_r (m x r), B = V_r^T S^-1 (r x n); needs
    calibration inputs (calibration=batches)."""

    needs = frozenset({"gram"})
    objective = "feature"

    @dataclass(frozen=True)
    class Options:
        """damp: Gram damping relative to its mean diagonal (>= 0)."""

        damp: float = 1e-6

        def __post_init__(self) -> None:
            check_options(self, {"damp": OptionSpec(float, 0.0)})

    def nested(self, w: torch.Tensor, st: Any, k: int) -> Factors:
        return nested_whitened(w, st, k, self.options.damp)
