"""Progress bars for long work (rich), silent when DFAD_EDGE_QUIET is set and on torchrun ranks other than 0."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .distributed import is_main

T = TypeVar("T")
console = Console(stderr=True)


def quiet() -> bool:
    """DFAD_EDGE_QUIET set, or a torchrun rank other than 0 (rank 0 speaks for the run)."""
    return bool(os.environ.get("DFAD_EDGE_QUIET")) or not is_main()


def new_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        console=console, disable=quiet(), transient=False,
    )


def track(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    with new_progress() as progress:
        task = progress.add_task(description, total=total, status="")
        for item in items:
            yield item
            progress.advance(task)


def log(message: str) -> None:
    """A status line; rich markup allowed, so callers escape user text."""
    if not quiet():
        console.print(message, highlight=False)
