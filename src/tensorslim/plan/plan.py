"""Plan: what happens to each layer (its compression spec and why), with costs before and after.
JSON round trip; plan files of format 1 (tensorslim 0.1.0: one method and rank per layer) load too."""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tensorslim.core.compressor import compressor_class, compressor_kinds
from tensorslim.core.spec import SpecError, legacy_spec, parse_spec, spec_to_json
from tensorslim.errors import WeightFileError, is_int, short_repr
from tensorslim.plan.render import render_plan

# 2: per-layer "spec" (a list of components) and bits; 1: "method" and "rank" (tensorslim 0.1.0).
PLAN_FORMAT = 2
# A plan of a model with a million layers is far smaller; larger files are refused unread.
MAX_PLAN_BYTES = 64 << 20


def label(name: str) -> str:
    """A layer's name for messages and tables: quoted, or "(model)" for the model itself ("")."""
    return "(model)" if name == "" else repr(name)


@dataclass
class LayerPlan:
    """One layer's fate: `spec` is its compression (a list of component objects, summed; [] for a
    layer left dense, with `reason` saying why). `method` and `rank` are read-only views of a
    one-component spec.

    `compressible` layers count in the keep base; `rel_error` is ||W - W_hat|| / ||W|| (Frobenius,
    all the layer's matrices together); bits are storage bits (factors at their dtype).
    """

    name: str
    type: str
    shape: list[int]
    spec: list[dict[str, Any]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None
    flops_after: int | None = None
    bits_before: int | None = None
    bits_after: int | None = None
    rel_error: float | None = None
    reason: str | None = None
    compressible: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def factorized(self) -> bool:
        return bool(self.spec)

    @property
    def components(self) -> list:
        """The spec as core.spec.Component objects."""
        return parse_spec(self.spec)

    @property
    def method(self) -> str:
        """"dense", the method name of a one-component spec ("svd" for kind "lowrank"), or the
        kinds joined by "+"."""
        if not self.spec:
            return "dense"
        kinds = [c.get("kind") if isinstance(c, dict) else None for c in self.spec]
        names = []
        for k in kinds:
            cls = compressor_class(k) if isinstance(k, str) else None
            names.append(cls.method if cls is not None and cls.kind == k else str(k))
        return "+".join(names)

    @property
    def rank(self) -> Any:
        """The "rank" of a one-component spec, else None."""
        if len(self.spec) == 1 and isinstance(self.spec[0], dict):
            return self.spec[0].get("rank")
        return None


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
    model_bits_before: int | None = None
    model_bits_after: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    format: int = PLAN_FORMAT
    # Whole-model speed, measured (compress(speedup=...) or measure=True); None if not measured.
    # Keys: see WHOLE_MODEL_FIELDS (target_speedup, dense_ms, compressed_ms, speedup, threads,
    # batch_shapes, steps, levers, breakdown, ...).
    whole_model: dict[str, Any] | None = None

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
        """The plan as JSON-ready data; each layer also carries its `method` view (informational:
        on reading it must agree with the spec)."""
        d = asdict(self)
        for lp, ld in zip(self.layers, d["layers"]):
            ld["method"] = lp.method
        return d

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
        fmt = d.get("format", 1)
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
        layers = [_layer_from_dict(i, lp, fmt) for i, lp in enumerate(d["layers"])]
        top = {f.name for f in fields(cls)} - {"layers", "format"}
        plan = cls(layers=layers, **{k: v for k, v in d.items() if k in top})
        plan.validate()
        return plan

    def validate(self) -> None:
        """Raise WeightFileError naming the layer (index and name), field, value and what is
        accepted if any field has the wrong type, a spec names an unknown compressor kind, or a
        layer name appears twice."""
        if not isinstance(self.layers, list):
            raise WeightFileError(f"plan field 'layers' must be a list; got {short_repr(self.layers)}")
        for key, (ok, accepted) in _PLAN_FIELDS.items():
            _check_field("plan", key, getattr(self, key), ok, accepted)
        if self.whole_model is not None:
            for key, (ok, accepted) in WHOLE_MODEL_FIELDS.items():
                if key in self.whole_model:
                    _check_field("plan whole_model", key, self.whole_model[key], ok, accepted)
        seen: dict[str, int] = {}
        for i, lp in enumerate(self.layers):
            if not isinstance(lp, LayerPlan):
                raise WeightFileError(f"plan layer {i} must be a LayerPlan; got {short_repr(lp)}")
            _check_field(f"plan layer {i}", "name", lp.name, *_LAYER_FIELDS["name"])
            where = f"plan layer {i} ({label(lp.name)})"
            _check_field(where, "spec", lp.spec, *_LAYER_FIELDS["spec"])
            try:
                lp.spec = spec_to_json(parse_spec(lp.spec))  # Component objects -> plain dicts
            except SpecError as exc:
                raise WeightFileError(
                    f"{where}: field 'spec' {short_repr(lp.spec)}: {exc}"
                ) from None
            for key, (ok, accepted) in _LAYER_FIELDS.items():
                _check_field(where, key, getattr(lp, key), ok, accepted)
            for c in lp.spec:
                if compressor_class(c["kind"]) is None:
                    raise WeightFileError(
                        f"{where}: spec names unknown compressor kind {short_repr(c['kind'])}; "
                        f"known kinds: {', '.join(map(repr, compressor_kinds()))}"
                    )
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


def _spec(v: Any) -> bool:
    """A list (the components are checked by parse_spec; parameter values against the layer by
    apply_plan, each compressor's `check`)."""
    return isinstance(v, list)


def _parses(v: Any) -> bool:
    try:
        parse_spec(v)
    except SpecError:
        return False
    return isinstance(v, list)


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
    "spec": (_spec, "a list of component objects {\"kind\": name, ...parameters}"),
    "params_before": _COUNT,
    "params_after": _COUNT,
    "flops_before": _OPT_COUNT,
    "flops_after": _OPT_COUNT,
    "bits_before": _OPT_COUNT,
    "bits_after": _OPT_COUNT,
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
    "model_bits_before": _OPT_COUNT,
    "model_bits_after": _OPT_COUNT,
    "meta": (lambda v: isinstance(v, dict), "an object"),
    "format": _FORMAT,
    "whole_model": (lambda v: v is None or isinstance(v, dict), "an object or null"),
}


def _positive(v: Any) -> bool:
    return _is_number(v) and v > 0


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and all(_is_number(x) and x >= 0 for x in v)


def _shapes(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(s, list) and all(_count(x) for x in s) for s in v
    )


def _objects(keys: dict[str, tuple[Check, str]]) -> Check:
    """A list of objects whose listed keys, where present, pass their checks."""

    def ok(v: Any) -> bool:
        return isinstance(v, list) and all(
            isinstance(o, dict) and all(k not in o or c(o[k]) for k, (c, _) in keys.items())
            for o in v
        )

    return ok


_OPT_NUMBER = (_optional(lambda v: _is_number(v) and v >= 0), "a finite number >= 0 or null")
_STEP_FIELDS: dict[str, tuple[Check, str]] = {
    "keep": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "speedup": (_positive, "a finite number > 0"),
    "achieved_keep": _OPT_NUMBER,
}
_BREAKDOWN_FIELDS: dict[str, tuple[Check, str]] = {
    "kind": _STR,
    "name": _STR,
    "ms": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "share": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
}
# The whole_model object's fields (all optional; other keys are kept as they are).
WHOLE_MODEL_FIELDS: dict[str, tuple[Check, str]] = {
    "target_speedup": (_optional(lambda v: _is_number(v) and v > 1), "a number > 1 or null"),
    "dense_ms": (_positive, "a finite number > 0"),
    "compressed_ms": (_positive, "a finite number > 0"),
    "speedup": (_positive, "a finite number > 0"),
    "threads": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "batch_shapes": (_shapes, "a list of shapes (lists of integers >= 0)"),
    "rounds": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "dense_round_ms": (_numbers, "a list of numbers >= 0"),
    "compressed_round_ms": (_numbers, "a list of numbers >= 0"),
    "steps": (
        _objects(_STEP_FIELDS),
        "a list of objects {keep: number in (0, 1], speedup: number > 0, ...}",
    ),
    "n_steps": _COUNT,
    "met": (_optional(lambda v: isinstance(v, bool)), "true, false or null"),
    "reason": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "levers": (lambda v: isinstance(v, list), "a list"),
    "breakdown": (
        _objects(_BREAKDOWN_FIELDS),
        "a list of objects {kind, name, ms >= 0, share >= 0, ...}",
    ),
    "levered_dense_ms": (_positive, "a finite number > 0"),
    "speedup_vs_levered_dense": (_positive, "a finite number > 0"),
    "compressible_share": _OPT_NUMBER,
    "amdahl_bound": _OPT_NUMBER,
}


def _check_field(where: str, key: str, value: Any, ok: Check, accepted: str) -> None:
    if not ok(value):
        raise WeightFileError(f"{where}: field {key!r} must be {accepted}; got {short_repr(value)}")


def _layer_from_dict(i: int, d: Any, fmt: int) -> LayerPlan:
    if not isinstance(d, dict):
        raise WeightFileError(f"plan layer {i} must be an object; got {short_repr(d)}")
    name = d.get("name")
    where = f"plan layer {i}" + (f" ({label(name)})" if isinstance(name, str) else "")
    for key in ("name", "type", "shape"):
        if key not in d:
            raise WeightFileError(f"{where}: missing field {key!r}")
    known = {f.name for f in fields(LayerPlan)}
    values = {k: v for k, v in d.items() if k in known}
    if fmt < 2:  # tensorslim 0.1.0: one method and one rank per layer
        method = d.get("method", "dense")
        _check_field(where, "method", method, *_STR)
        try:
            values["spec"] = legacy_spec(method, d.get("rank"))
        except SpecError as exc:
            raise WeightFileError(f"{where}: {exc}") from None
    elif "rank" in d:
        raise WeightFileError(
            f"{where}: field 'rank' belongs to plan format 1; this plan (format {fmt}) keeps "
            "ranks in 'spec' (edit the component's \"rank\" there)"
        )
    lp = LayerPlan(**values)
    if fmt >= 2 and "method" in d and _parses(lp.spec) and d["method"] != lp.method:
        raise WeightFileError(
            f"{where}: field 'method' is {short_repr(d['method'])} but its spec says "
            f"{lp.method!r}; 'method' only shows the spec: edit 'spec' instead"
        )
    return lp


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
