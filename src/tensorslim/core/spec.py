"""A layer's compression spec: an ordered list of components whose weights are summed.

Each component is a compressor kind with its parameters, e.g. ``{"kind": "lowrank", "rank": 64}``,
``{"kind": "tucker2", "rank": [48, 24]}``. ``[]`` is the dense layer. On a layer with several
matrices (an RNN's gate matrices, attention's projections) a parameter may be an object mapping
matrix names to values (``null``: that matrix stays dense for this component) or a list in the
layer's matrix order; a plain value applies to every matrix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tensorslim.errors import is_int, short_repr

# Method names of plan files written before specs existed (tensorslim 0.1.0) whose kind differs.
LEGACY_KINDS = {"svd": "lowrank", "spatial_svd": "spatial"}


class SpecError(ValueError):
    """A spec that is not a list of {"kind": str, ...} objects (the caller adds where it was read)."""


@dataclass(frozen=True)
class Component:
    """One summand of a layer's compressed weight: a compressor `kind` and its parameters."""

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **_plain(dict(self.params))}

    @classmethod
    def from_dict(cls, d: Any) -> Component:
        if isinstance(d, Component):
            return d
        if not isinstance(d, Mapping):
            raise SpecError(f"a spec component must be an object; got {short_repr(d)}")
        kind = d.get("kind")
        if not isinstance(kind, str) or not kind:
            raise SpecError(
                f"a spec component needs a 'kind' (a compressor name); got {short_repr(d)}"
            )
        params = {k: v for k, v in d.items() if k != "kind"}
        for k, v in params.items():
            if not isinstance(k, str) or not _json_value(v):
                raise SpecError(
                    f"component {kind!r}: parameter {short_repr(k)} must be a number, string, "
                    f"null, or a list/object of them; got {short_repr(v)}"
                )
        return cls(kind, params)

    def __getitem__(self, key: str) -> Any:
        return self.params[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)


Spec = list[Component]


def parse_spec(value: Any) -> Spec:
    """A spec from its JSON form (a list of component objects; None or [] is dense)."""
    if value is None:
        return []
    if isinstance(value, (Mapping, Component)):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise SpecError(f"a spec must be a list of component objects; got {short_repr(value)}")
    return [Component.from_dict(c) for c in value]


def spec_to_json(spec: Spec) -> list[dict[str, Any]]:
    return [c.to_dict() for c in spec]


def legacy_spec(method: str, rank: Any) -> list[dict[str, Any]]:
    """The spec of a 0.1.0 plan layer's (method, rank): [] for "dense"; method "auto" recorded
    its choice in the rank as [method, rank]."""
    if method == "dense":
        return []
    if method == "auto":
        ok = (
            isinstance(rank, (list, tuple))
            and len(rank) == 2
            and isinstance(rank[0], str)
            and rank[0] not in ("auto", "dense")
        )
        if not ok:
            raise SpecError(
                "a format-1 layer with method 'auto' records its choice as rank [method, rank] "
                f"(e.g. [\"cp\", 18]); got {short_repr(rank)}"
            )
        method, rank = rank
    return [{"kind": LEGACY_KINDS.get(method, method), "rank": rank}]


def _json_value(v: Any, depth: int = 0) -> bool:
    if depth > 4:
        return False
    if v is None or isinstance(v, (bool, str)) or is_int(v):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return all(_json_value(x, depth + 1) for x in v)
    if isinstance(v, Mapping):
        return all(isinstance(k, str) and _json_value(x, depth + 1) for k, x in v.items())
    return False


def _plain(v: Any) -> Any:
    """Tuples as lists, so that a spec compares equal to its JSON round trip."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v
