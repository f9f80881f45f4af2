"""Plan: what happens to each layer (method, rank, why), with costs before and after. JSON round-trip."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tensorslim.errors import WeightFileError

PLAN_FORMAT = 1


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
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        try:
            if d.get("format", PLAN_FORMAT) > PLAN_FORMAT:
                raise WeightFileError(
                    f"plan format {d['format']} is newer than this tensorslim reads ({PLAN_FORMAT})"
                )
            known = {f.name for f in fields(LayerPlan)}
            layers = [
                LayerPlan(**{k: v for k, v in lp.items() if k in known}) for lp in d["layers"]
            ]
            top = {f.name for f in fields(cls)} - {"layers"}
            return cls(layers=layers, **{k: v for k, v in d.items() if k in top})
        except (KeyError, TypeError, AttributeError) as exc:
            raise WeightFileError(f"not a valid tensorslim plan: {exc!r}") from exc

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Plan:
        """Parse a plan from JSON text or from a path to a .json file."""
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
            p = Path(text_or_path)
            try:
                text = p.read_text()
            except OSError as exc:
                raise WeightFileError(f"cannot read plan file {str(p)!r}: {exc.strerror}") from exc
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WeightFileError(f"plan is not valid JSON: {exc}") from exc
        if not isinstance(d, dict):
            raise WeightFileError("plan JSON must be an object")
        return cls.from_dict(d)

    # -- display ------------------------------------------------------------------------------
    def __str__(self) -> str:
        from tensorslim.plan.table import render_plan

        return render_plan(self)
