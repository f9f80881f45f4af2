"""The schedule of the learning-compression algorithm: the penalty parameters mu_k and the L step.

Carreira-Perpinan (2017), "Model compression as constrained optimization, with application to neural
nets. Part I", Sec. 4: mu is driven upwards along mu_k = mu_0 a^k (a slightly above 1, tens of
steps), and each L step is a few epochs of SGD on the penalized loss, its learning rate decaying
from step to step (the LC toolkit's examples: lr_k = lr_0 * 0.98^k, Nesterov momentum 0.9).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tensorslim.errors import TensorSlimError, is_int, short_repr

OPTIMIZERS = ("sgd", "adam")


def _number(value: Any, name: str, *, low: float = 0.0, strict: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        sign = ">" if strict else ">="
        raise TensorSlimError(f"{name} must be a finite number {sign} {low:g}; got {short_repr(value)}")
    return value


def _count(value: Any, name: str) -> int:
    if not is_int(value) or value < 1:
        raise TensorSlimError(f"{name} must be an integer >= 1; got {short_repr(value)}")
    return value


@dataclass(frozen=True)
class Schedule:
    """mu_k = mu0 * growth^k for k = 0 .. steps-1 (or the explicit, strictly increasing `mus`);
    each L step runs `epochs` passes over the data or `batches` optimizer steps (exactly one of
    the two; default one epoch) with `optimizer` ("sgd": Nesterov momentum `momentum`; "adam") at
    learning rate lr * lr_decay^k. Units: mu multiplies 1/2 the squared Frobenius distance of the
    weights to their compressed form, added to the (mean) training loss."""

    mu0: float = 1e-3
    growth: float = 1.1
    steps: int = 20
    mus: Sequence[float] | None = None
    epochs: int | None = None
    batches: int | None = None
    lr: float = 0.01
    lr_decay: float = 0.98
    optimizer: str = "sgd"
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.mus is not None:
            if isinstance(self.mus, (str, bytes)) or not isinstance(self.mus, Sequence):
                raise TensorSlimError(
                    f"mus must be a list of numbers > 0; got {short_repr(self.mus)}"
                )
            mus = tuple(_number(m, f"mus[{i}]") for i, m in enumerate(self.mus))
            if not mus:
                raise TensorSlimError("mus is empty: give at least one value of mu")
            for i in range(1, len(mus)):
                if mus[i] <= mus[i - 1]:
                    raise TensorSlimError(
                        f"the mu schedule must be increasing (the LC algorithm drives mu upwards); "
                        f"mus[{i}] = {mus[i]:g} follows mus[{i - 1}] = {mus[i - 1]:g}"
                    )
            object.__setattr__(self, "mus", mus)
        else:
            _number(self.mu0, "mu0")
            if _number(self.growth, "growth") <= 1.0:
                raise TensorSlimError(
                    f"growth must be > 1 so that the mu schedule increases (mu_k = mu0 * growth^k);"
                    f" got {self.growth!r}"
                )
            _count(self.steps, "steps")
        if self.epochs is not None and self.batches is not None:
            raise TensorSlimError(
                "give one of epochs (passes over the data per L step) and batches (optimizer "
                f"steps per L step); got epochs={self.epochs!r}, batches={self.batches!r}"
            )
        if self.epochs is None and self.batches is None:
            object.__setattr__(self, "epochs", 1)
        if self.epochs is not None:
            _count(self.epochs, "epochs")
        if self.batches is not None:
            _count(self.batches, "batches")
        _number(self.lr, "lr")
        if _number(self.lr_decay, "lr_decay") > 1.0:
            raise TensorSlimError(f"lr_decay must be in (0, 1]; got {self.lr_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise TensorSlimError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {short_repr(self.optimizer)}"
            )
        if _number(self.momentum, "momentum", strict=False) >= 1.0:
            raise TensorSlimError(f"momentum must be in [0, 1); got {self.momentum!r}")

    def mu_values(self) -> list[float]:
        """The penalty parameter of every LC step, increasing."""
        if self.mus is not None:
            return list(self.mus)
        return [self.mu0 * self.growth**k for k in range(self.steps)]

    def lr_at(self, step: int) -> float:
        """The L step's learning rate at LC step `step` (counted from 0)."""
        return self.lr * self.lr_decay**step

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mus"] = None if self.mus is None else list(self.mus)
        return d

    @classmethod
    def coerce(cls, value: Any) -> Schedule:
        """A Schedule from None (the defaults), a Schedule, a mapping of its fields or a list of
        mu values."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            names = set(cls.__dataclass_fields__)
            unknown = [k for k in value if k not in names]
            if unknown:
                raise TensorSlimError(
                    f"unknown schedule field {short_repr(unknown[0])}; fields: "
                    + ", ".join(sorted(names))
                )
            return cls(**value)
        if isinstance(value, (list, tuple)):
            return cls(mus=value)
        raise TensorSlimError(
            "schedule must be a tensorslim.lc.Schedule, a dict of its fields or a list of mu "
            f"values; got {short_repr(value)}"
        )
