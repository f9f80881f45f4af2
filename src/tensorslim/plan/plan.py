"""Plan: what happens to each layer (method, rank, why), with costs before and after. JSON round-trip."""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tensorslim.errors import WeightFileError, is_int, short_repr
from tensorslim.plan.table import render_plan

PLAN_FORMAT = 1
# A plan of a model with a million layers is far smaller; larger files are refused unread.
MAX_PLAN_BYTES = 64 << 20


def label(name: str) -> str:
    """A layer's name for messages and tables: quoted, or "(model)" for the model itself ("")."""
    return "(model)" if name == "" else repr(name)


@dataclass
class LayerPlan:
    """One layer's fate. `method` is "dense" for a layer left as it was, with `reason` saying why.

    `compressible` layers count in the keep base; `rel_error` is ||W - W_hat|| / ||W|| (Frobenius).
    """

    name: str
    type: str
    shape: list[int]
    method: str = "dense"
    rank: Any = None
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None
    flops_after: int | None = None
    rel_error: float | None = None
    reason: str | None = None
    compressible: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def factorized(self) -> bool:
        return self.method != "dense"


@dataclass
class Plan:
    """Per-layer decisions and totals. `keep` is requested; `achieved_keep` is measured over the
    compressible layers in the `cost` unit ("params" or "flops")."""

    layers: list[LayerPlan]
    keep: float
    cost: str = "params"
    method: str = "svd"
    allocator: str = "global"
    achieved_keep: float = 1.0
    model_params_before: int = 0
    model_params_after: int = 0
    model_flops_before: int | None = None
    model_flops_after: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    format: int = PLAN_FORMAT

    # -- accounting -------------------------------------------------------------------------
    @property
    def factorized_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if lp.factorized]

    @property
    def compression_ratio(self) -> float:
        """Whole-model parameters before / after."""
        return self.model_params_before / max(1, self.model_params_after)

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The plan as indented JSON; also written to `path` if given (not atomically: see io.save)."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        """A Plan from its JSON object; WeightFileError naming the layer, field and value if any
        field has the wrong type (see `validate`). Unknown keys are ignored."""
        if not isinstance(d, dict):
            raise WeightFileError(f"a plan must be a JSON object; got {type(d).__name__}")
        fmt = d.get("format", PLAN_FORMAT)
        _check_field("plan", "format", fmt, *_FORMAT)
        if fmt > PLAN_FORMAT:
            raise WeightFileError(
                f"plan format {fmt} is newer than this tensorslim reads ({PLAN_FORMAT})"
            )
        for key in ("layers", "keep"):
            if key not in d:
                raise WeightFileError(f"not a valid tensorslim plan: missing field {key!r}")
        if not isinstance(d["layers"], list):
            raise WeightFileError(
                f"plan field 'layers' must be a list of layer objects; got {short_repr(d['layers'])}"
            )
        layers = [_layer_from_dict(i, lp) for i, lp in enumerate(d["layers"])]
        top = {f.name for f in fields(cls)} - {"layers"}
        plan = cls(layers=layers, **{k: v for k, v in d.items() if k in top})
        plan.validate()
        return plan

    def validate(self) -> None:
        """Raise WeightFileError naming the layer (index and name), field, value and what is
        accepted if any field has the wrong type or a layer name appears twice."""
        if not isinstance(self.layers, list):
            raise WeightFileError(f"plan field 'layers' must be a list; got {short_repr(self.layers)}")
        for key, (ok, accepted) in _PLAN_FIELDS.items():
            _check_field("plan", key, getattr(self, key), ok, accepted)
        seen: dict[str, int] = {}
        for i, lp in enumerate(self.layers):
            if not isinstance(lp, LayerPlan):
                raise WeightFileError(f"plan layer {i} must be a LayerPlan; got {short_repr(lp)}")
            _check_field(f"plan layer {i}", "name", lp.name, *_LAYER_FIELDS["name"])
            where = f"plan layer {i} ({label(lp.name)})"
            for key, (ok, accepted) in _LAYER_FIELDS.items():
                _check_field(where, key, getattr(lp, key), ok, accepted)
            if lp.name in seen:
                raise WeightFileError(
                    f"plan lists layer {label(lp.name)} twice (layers {seen[lp.name]} and {i}); "
                    "each layer appears once"
                )
            seen[lp.name] = i

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Plan:
        """Parse a plan from JSON text or from a path to a .json file (at most 64 MiB, UTF-8)."""
        text = str(text_or_path)
        where = "plan"
        if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
            where = f"plan file {str(text_or_path)!r}"
            text = _read_text(Path(text_or_path))
        elif len(text) > MAX_PLAN_BYTES:
            raise WeightFileError(f"plan text is over {MAX_PLAN_BYTES >> 20} MiB; refusing it")
        try:
            d = json.loads(text)
        except RecursionError:
            raise WeightFileError(f"{where} is nested too deeply to be a plan") from None
        except ValueError as exc:  # JSONDecodeError, or an integer with thousands of digits
            raise WeightFileError(f"{where} is not valid JSON: {exc}") from exc
        return cls.from_dict(d)

    # -- display ------------------------------------------------------------------------------
    def __str__(self) -> str:
        return render_plan(self)


# -- validation -----------------------------------------------------------------------------------
Check = Callable[[Any], bool]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v: Any) -> bool:
    return is_int(v) and v >= 0


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _rank(v: Any) -> bool:
    """None, an int, a list of ints, or an object of ints or nulls (an RNN's per-matrix ranks);
    the range is checked against the layer by apply_plan."""
    if isinstance(v, dict):
        return all(isinstance(k, str) and (x is None or is_int(x)) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return all(is_int(x) for x in v)
    return v is None or is_int(v)


def _extra(v: Any) -> bool:
    aliases = v.get("aliases", []) if isinstance(v, dict) else None
    return isinstance(aliases, list) and all(isinstance(a, str) for a in aliases)


_FORMAT: tuple[Check, str] = (lambda v: is_int(v) and v >= 1, "an integer >= 1")
_STR = (lambda v: isinstance(v, str), "a string")
_COUNT = (_count, "an integer >= 0")
_OPT_COUNT = (_optional(_count), "an integer >= 0 or null")
_LAYER_FIELDS: dict[str, tuple[Check, str]] = {
    "name": _STR,
    "type": _STR,
    "shape": (
        lambda v: isinstance(v, (list, tuple)) and all(_count(x) for x in v),
        "a list of integers >= 0",
    ),
    "method": _STR,
    "rank": (
        _rank,
        "null, an integer, a list of integers or an object mapping matrix names to an integer "
        "or null",
    ),
    "params_before": _COUNT,
    "params_after": _COUNT,
    "flops_before": _OPT_COUNT,
    "flops_after": _OPT_COUNT,
    "rel_error": (_optional(lambda v: _is_number(v) and v >= 0), "a finite number >= 0 or null"),
    "reason": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "compressible": (lambda v: isinstance(v, bool), "true or false"),
    "extra": (_extra, "an object (its 'aliases', if any, a list of strings)"),
}
_PLAN_FIELDS: dict[str, tuple[Check, str]] = {
    "keep": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "cost": _STR,
    "method": _STR,
    "allocator": _STR,
    "achieved_keep": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "model_params_before": _COUNT,
    "model_params_after": _COUNT,
    "model_flops_before": _OPT_COUNT,
    "model_flops_after": _OPT_COUNT,
    "meta": (lambda v: isinstance(v, dict), "an object"),
    "format": _FORMAT,
}


def _check_field(where: str, key: str, value: Any, ok: Check, accepted: str) -> None:
    if not ok(value):
        raise WeightFileError(f"{where}: field {key!r} must be {accepted}; got {short_repr(value)}")


def _layer_from_dict(i: int, d: Any) -> LayerPlan:
    if not isinstance(d, dict):
        raise WeightFileError(f"plan layer {i} must be an object; got {short_repr(d)}")
    for key in ("name", "type", "shape"):
        if key not in d:
            name = d.get("name")
            where = f"plan layer {i}" + (f" ({label(name)})" if isinstance(name, str) else "")
            raise WeightFileError(f"{where}: missing field {key!r}")
    known = {f.name for f in fields(LayerPlan)}
    return LayerPlan(**{k: v for k, v in d.items() if k in known})


def _read_text(path: Path) -> str:
    """The UTF-8 text of a plan file; WeightFileError naming the file if it is missing, not a
    regular file, over MAX_PLAN_BYTES or not UTF-8."""
    try:
        st = os.stat(path)  # before opening: opening a FIFO would block
        if not stat.S_ISREG(st.st_mode):
            raise WeightFileError(f"plan file {str(path)!r} is not a regular file")
        if st.st_size > MAX_PLAN_BYTES:
            raise WeightFileError(
                f"plan file {str(path)!r} is {st.st_size} bytes, over the "
                f"{MAX_PLAN_BYTES >> 20} MiB a plan may have; refusing to read it"
            )
        with open(path, "rb") as f:
            data = f.read(MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise WeightFileError(f"cannot read plan file {str(path)!r}: {exc.strerror}") from exc
    if len(data) > MAX_PLAN_BYTES:  # grew while being read
        raise WeightFileError(f"plan file {str(path)!r} is over {MAX_PLAN_BYTES >> 20} MiB")
    try:
        return data.decode("utf-8-sig")  # a BOM from a Windows editor is fine
    except UnicodeDecodeError as exc:
        raise WeightFileError(
            f"plan file {str(path)!r} is not UTF-8 text (invalid byte at offset {exc.start})"
        ) from None
