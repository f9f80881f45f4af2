"""Rich tables from rows of dicts, and their Markdown form for result files."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def rich_table(rows: Sequence[dict[str, Any]], title: str | None = None):
    """A rich.table.Table with one column per key of the first row."""
    from rich.table import Table

    table = Table(title=title)
    if not rows:
        return table
    for key in rows[0]:
        table.add_column(str(key), justify="left" if isinstance(rows[0][key], str) else "right")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row.values()))
    return table


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub-flavoured Markdown table with one column per key of the first row. A "|" inside a
    cell (e.g. a cut name "out|in,kh,kw") is escaped so it does not split the cell."""
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0])
    lines = [
        "| " + " | ".join(_cell(k) for k in keys) + " |",
        "|" + "|".join("---" for _ in keys) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(_fmt(row.get(k))) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
