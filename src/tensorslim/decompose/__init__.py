"""Pure math on tensors: factors in, factors out. Imports nothing from the rest of the package."""

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

__all__ = [
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
