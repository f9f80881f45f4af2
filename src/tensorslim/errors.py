"""One exception family for every refusal tensorslim makes.

Every message names the layer (or file), the offending value and what would be accepted, so the CLI
can print it as one line and exit with status 2.
"""

from __future__ import annotations

from typing import Any


class TensorSlimError(ValueError):
    """Base class of all errors caused by user input (bad values, files, models)."""


class InvalidKeepError(TensorSlimError):
    """`keep` is outside (0, 1] or not a number."""


class InvalidRankError(TensorSlimError):
    """A rank is <= 0, above the matrix's full rank, or not an integer."""


class NonFiniteWeightError(TensorSlimError):
    """A layer's weight contains NaN or Inf."""


class ExampleInputError(TensorSlimError):
    """The model raised an error when run on the example input."""


class WeightFileError(TensorSlimError):
    """A weight or plan file is missing, unreadable or corrupt."""


class PlanMismatchError(TensorSlimError):
    """A plan names a layer the model lacks, or a layer of another type or shape."""


class ModelSpecError(TensorSlimError):
    """An unknown zoo name or `package.module:factory` spec that cannot be resolved."""


class UnsupportedLayerError(TensorSlimError):
    """A layer type or configuration that the requested method cannot factorize."""


def check_keep(keep: float) -> float:
    """Return `keep` as a float if 0 < keep <= 1, else raise InvalidKeepError (bools and strings,
    which float() would take, are refused: `keep=True` is not 1.0)."""
    if isinstance(keep, (bool, str, bytes)):
        raise InvalidKeepError(
            f"keep must be a number in (0, 1], got {keep!r} ({type(keep).__name__})"
        )
    try:
        k = float(keep)
    except (TypeError, ValueError):
        raise InvalidKeepError(f"keep must be a number in (0, 1], got {keep!r}") from None
    if not (0.0 < k <= 1.0):  # also rejects NaN
        raise InvalidKeepError(
            f"keep must be in (0, 1] (the fraction of the cost that remains), got {keep!r}"
        )
    return k


def is_int(value: Any) -> bool:
    """True for an int that is not a bool (JSON's true would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def short_repr(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
