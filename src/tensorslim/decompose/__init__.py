"""Pure math on tensors: factors in, factors out. Imports nothing from the rest of the package."""

from tensorslim.decompose.curves import output_error, truncation_curves, weighted_error
from tensorslim.decompose.svd import (
    RANDOMIZED_MIN_DIM,
    full_rank,
    matrix_params,
    max_useful_rank,
    randomized_svd,
    rank_for_keep,
    relative_error,
    singular_values,
    svd,
    tail_energy,
    truncated_svd,
)
from tensorslim.decompose.weighted import (
    DEFAULT_SOLVER,
    SOLVERS,
    WeightedResult,
    fvd,
    fwsvd,
    fwsvd_factors,
    row_importance,
)
from tensorslim.decompose.whitened import Whitening, whitened_factors, whitened_svd, whitening

__all__ = [
    "DEFAULT_SOLVER",
    "SOLVERS",
    "WeightedResult",
    "Whitening",
    "fvd",
    "fwsvd",
    "fwsvd_factors",
    "output_error",
    "row_importance",
    "truncation_curves",
    "weighted_error",
    "whitened_factors",
    "whitened_svd",
    "whitening",
    "RANDOMIZED_MIN_DIM",
    "full_rank",
    "matrix_params",
    "max_useful_rank",
    "randomized_svd",
    "rank_for_keep",
    "relative_error",
    "singular_values",
    "svd",
    "tail_energy",
    "truncated_svd",
]
