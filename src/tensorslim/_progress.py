"""A rich progress bar that can be switched off (tests, library use) with one flag."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(
    items: Iterable[T], description: str, enabled: bool, total: int | None = None
) -> Iterator[T]:
    """Yield from `items`, showing a progress bar on stderr when `enabled`."""
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import track as rich_track

    yield from rich_track(
        items, description=description, total=total, console=Console(stderr=True), transient=True
    )
