"""Rich progress bars that can be switched off (tests, library use) with one flag."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
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


@contextlib.contextmanager
def bar(
    enabled: bool,
    description: str,
    total: int | None,
    fields: Sequence[str] = (),
    completed: int = 0,
) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr with a text column per name in `fields`, starting at
    `completed` (a resumed run); yields `update(advance=1, **values)` (values shown as given, 4
    significant digits for floats). Disabled: `update` does nothing."""
    if not enabled:
        yield lambda advance=1, **values: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(
            description, total=total, completed=completed, **{name: "-" for name in fields}
        )

        def update(advance: int = 1, **values: object) -> None:
            shown = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in values.items()}
            progress.update(task, advance=advance, **shown)

        yield update
