"""One stderr console and one progress-bar style for every long-running step."""
from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

console = Console(stderr=True)


def progress(*extra_columns, transient: bool = False, disable: bool = False) -> Progress:
    """A rich progress bar: description, bar, n/total, elapsed, ETA, then any extra columns."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), *extra_columns,
                    console=console, transient=transient, disable=disable)
