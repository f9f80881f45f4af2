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
    text = head + "\n" + console.export_text() + tail
    wm = getattr(plan, "whole_model", None)
    if isinstance(wm, dict) and wm:
        text += "\n" + render_whole_model(wm)
    return text


def render_whole_model(wm: dict[str, Any]) -> str:
    """The plan's whole-model section: measured speed, the search steps, levers, breakdown."""
    lines = []
    shapes = ", ".join("×".join(map(str, s)) for s in wm.get("batch_shapes", [])) or "?"
    if "speedup" in wm:
        lines.append(
            f"Whole model (measured, input {shapes}, {wm.get('threads', '?')} CPU threads, "
            f"dense and compressed timed alternately, best of {wm.get('rounds', '?')} medians): "
            f"dense {wm.get('dense_ms', 0):.3g} ms → compressed {wm.get('compressed_ms', 0):.3g} ms, "
            f"speedup {wm['speedup']:.2f}×"
        )
    if "speedup_vs_levered_dense" in wm:
        levers = ", ".join(wm.get("dense_levers") or []) or "levers"
        lines.append(
            f"  against the dense model given the same levers ({levers}): "
            f"{wm.get('levered_dense_ms', 0):.3g} ms, speedup {wm['speedup_vs_levered_dense']:.2f}× "
            "(the compression's own part)"
        )
    target = wm.get("target_speedup")
    if target is not None:
        met = wm.get("met")
        verdict = "met" if met else "NOT met"
        lines.append(f"Target speedup {target:.2f}×: {verdict}")
    if wm.get("reason"):
        lines.append(f"  {wm['reason']}")
    steps = wm.get("steps") or []
    if steps:
        measured = [s for s in steps if not s.get("reused")]
        shown = ", ".join(
            f"keep {s.get('keep', 0):.3f} → {s.get('speedup', 0):.2f}×" for s in measured
        )
        reused = len(steps) - len(measured)
        if reused:
            shown += f" (+{reused} probes that allocated the same layers as one of these)"
        lines.append(f"Search ({wm.get('n_steps', len(measured))} measured steps): {shown}")
    share = wm.get("compressible_share")
    if share is not None:
        bound = wm.get("amdahl_bound")
        lines.append(
            f"Compressible layers: {100 * share:.0f}% of the dense model's time (profiler)"
            + (f"; Amdahl bound {bound:.2f}× if they took no time" if bound is not None else "")
        )
    if "levers" in wm:
        kept = [_lever_name(lv) for lv in wm["levers"]]
        lines.append("Levers kept: " + (", ".join(kept) if kept else "none"))
        if kept and wm.get("levers_note"):
            lines.append(f"  {wm['levers_note']}")
    breakdown = wm.get("breakdown") or []
    if breakdown:
        lines.append("Where the time goes after compression (torch.profiler, ms per forward):")
        for kind in ("module", "op"):
            rows = [r for r in breakdown if r.get("kind") == kind]
            if rows:
                cells = ", ".join(
                    f"{r.get('name')}"
                    + (f" ({r['type']})" if kind == "module" and r.get("type") else "")
                    + f" {r.get('ms', 0):.3g} ({100 * r.get('share', 0):.0f}%)"
                    for r in rows
                )
                lines.append(f"  {kind}s: {cells}")
    return "\n".join(lines)


def _lever_name(lever: Any) -> str:
    if isinstance(lever, dict):
        name = lever.get("name") or lever.get("lever") or lever.get("kind") or "?"
        where = lever.get("where") or lever.get("layers") or lever.get("layer")
        if isinstance(where, list):
            where = ", ".join(map(str, where[:4])) + (" ..." if len(where) > 4 else "")
        return f"{name} ({where})" if where else str(name)
    return str(lever)


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
