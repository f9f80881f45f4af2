"""What the allocator minimises per target (the `error` of each proposal):

- "weight":  relative squared weight error ||W - W_hat||^2 / ||W||^2 (Eckart-Young: truncated SVD
             is optimal for it);
- "fisher":  1/2 sum_ij I_ij (W - W_hat)_ij^2, the diagonal-Fisher second-order estimate of the loss
             increase (Hsu et al. 2022, "Language model compression with weighted low-rank
             factorization", Eq. 3); absolute, so that layers are comparable;
- "feature": relative squared output error ||(W - W_hat) X^T||^2 / ||W X^T||^2 on the calibration
             inputs X (the objective of activation-whitened SVD).
"""

from __future__ import annotations

from typing import Any

import torch

from tensorslim.decompose import output_error, weighted_error
from tensorslim.errors import TensorSlimError

OBJECTIVES = ("weight", "fisher", "feature")
# The calibration statistics each objective reads.
OBJECTIVE_NEEDS = {
    "weight": frozenset(),
    "fisher": frozenset({"fisher"}),
    "feature": frozenset({"gram"}),
}


def objective_error(
    objective: str, w: torch.Tensor, w_hat: torch.Tensor, stats: Any = None
) -> float:
    """The error of replacing `w` by `w_hat` (same shape, (m, n) or a kernel) under `objective`.
    `stats`: the matrix's calibration statistics (LayerStats) for "fisher" and "feature"."""
    if objective == "weight":
        total = weighted_error(w, torch.zeros_like(w))
        return weighted_error(w, w_hat) / (total or 1.0)
    if objective == "fisher":
        fisher = getattr(stats, "fisher", None)
        if fisher is None:
            raise TensorSlimError("objective 'fisher' needs a Fisher estimate (calibration and loss)")
        return 0.5 * weighted_error(w, w_hat, fisher.reshape(w.shape))
    if objective == "feature":
        gram = getattr(stats, "gram", None)
        if gram is None:
            raise TensorSlimError("objective 'feature' needs calibration inputs")
        m = w.shape[0]
        w2, h2 = w.reshape(m, -1), w_hat.reshape(m, -1)
        total = output_error(w2, torch.zeros_like(w2), gram)
        return output_error(w2, h2, gram) / (total or 1.0)
    raise TensorSlimError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
