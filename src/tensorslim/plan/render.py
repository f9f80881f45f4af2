"""Plain-text rendering of a Plan (what `print(plan)` shows)."""

from __future__ import annotations

from typing import Any


def human(n: int | float | None) -> str:
    """1234567 -> '1.23M'; None -> '-'."""
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def render_plan(plan: Any, width: int = 160) -> str:
    """`plan` is a Plan, taken duck-typed (its fields only) so that this module needs nothing from
    tensorslim.plan.plan, which imports it."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=None, show_lines=False, pad_edge=False)
    for col, justify in (
        ("layer", "left"),
        ("type", "left"),
        ("shape", "left"),
        ("method", "left"),
        ("rank", "right"),
        ("params", "right"),
        ("FLOPs", "right"),
        ("storage", "right"),
        ("bits/w", "right"),
        ("vs f32", "right"),
        ("rel err", "right"),
        ("note", "left"),
    ):
        table.add_column(col, justify=justify, overflow="fold")
    for lp in plan.layers:
        params = f"{human(lp.params_before)}→{human(lp.params_after)}"
        flops = (
            "-" if lp.flops_before is None else f"{human(lp.flops_before)}→{human(lp.flops_after)}"
        )
        table.add_row(
            _layer_cell(lp.name, lp.extra.get("aliases") if isinstance(lp.extra, dict) else None),
            lp.type,
            "×".join(map(str, lp.shape)),
            lp.method,
            _params_cell(lp),
            params,
            flops,
            *_bits_cells(lp),
            "-" if lp.rel_error is None else f"{lp.rel_error:.3f}",
            lp.reason or "",
        )
    console = Console(width=width, record=True, file=_Null(), color_system=None)
    console.print(table)
    head = (
        f"Plan: method={plan.method} allocator={plan.allocator} cost={plan.cost} "
        f"keep requested={plan.keep:.3f} achieved={plan.achieved_keep:.3f} "
        f"(over compressible layers)"
    )
    tail = (
        f"Model params {human(plan.model_params_before)} → {human(plan.model_params_after)} "
        f"(compression ratio {plan.compression_ratio:.2f}×)"
    )
    if plan.model_flops_before is not None and plan.model_flops_after is not None:
        ratio = plan.model_flops_before / max(1, plan.model_flops_after)
        tail += (
            f"; FLOPs of Linear/Conv layers {human(plan.model_flops_before)} → "
            f"{human(plan.model_flops_after)} ({ratio:.2f}×)"
        )
    if plan.model_bits_before is not None and plan.model_bits_after is not None:
        ratio = plan.model_bits_before / max(1, plan.model_bits_after)
        tail += (
            f"; storage {human(plan.model_bits_before / 8)}B → "
            f"{human(plan.model_bits_after / 8)}B ({ratio:.2f}×)"
        )
    return head + "\n" + console.export_text() + tail


def _params_cell(lp: Any) -> str:
    """The rank of a one-component spec; the components' parameters when there are several."""
    spec = lp.spec
    if not spec:
        return "-"
    if len(spec) == 1 and lp.rank is not None:
        return str(lp.rank)
    return " + ".join(
        ",".join(f"{k}={v}" for k, v in c.items() if k != "kind") or c.get("kind", "?")
        for c in spec
    )


def _bits_cells(lp: Any) -> tuple[str, str, str]:
    """Storage bytes before -> after, stored bits per weight of the layer (biases included) and
    the compression ratio against the layer at 32 bits per weight."""
    if lp.bits_before is None or lp.bits_after is None or not lp.params_before:
        return "-", "-", "-"
    per = lp.bits_after / lp.params_before
    ratio = 32 * lp.params_before / max(1, lp.bits_after)
    storage = f"{human(lp.bits_before / 8)}B→{human(lp.bits_after / 8)}B"
    return storage, f"{per:.3g}", f"{ratio:.2f}×"


def _layer_cell(name: str, aliases: list[str] | None) -> str:
    """The layer's name ("(model)" for the model itself), with the other names of a shared one."""
    shown = name or "(model)"
    return f"{shown} (also {', '.join(aliases)})" if aliases else shown


class _Null:
    def write(self, _s: str) -> int:
        return 0

    def flush(self) -> None:
        pass
