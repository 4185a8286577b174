"""One stderr console, one progress-bar style for every long-running step, and the CLIs' error handling."""
from __future__ import annotations

import sys
from typing import Callable

import rich.markup
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from bge.errors import UserError

# rich lays out anything that is not a terminal at 80 columns (or at COLUMNS, which pytest, for one, exports as 80):
# a log file's paths broke onto a second line and its tables' numbers were cut short ("0.71…"). A log or a pipe
# gets whole lines instead.
LOG_WIDTH = 250


def console_for(stream: str = "stderr") -> Console:
    """A console on stderr or stdout: a terminal's own width, LOG_WIDTH columns for a file or a pipe."""
    tty = getattr(getattr(sys, stream), "isatty", lambda: False)()
    return Console(stderr=stream == "stderr", width=None if tty else LOG_WIDTH)


console = console_for("stderr")


def progress(*extra_columns, transient: bool = False, disable: bool = False) -> Progress:
    """A rich progress bar: description, bar, n/total, elapsed, ETA, then any extra columns."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), *extra_columns,
                    console=console, transient=transient, disable=disable)


def run_cli(main: Callable[[], None]) -> None:
    """Run a CLI entry point: a UserError becomes `error: <message>` on stderr and exit status 2, never a traceback."""
    try:
        main()
    except UserError as e:
        console.print(f"[bold red]error:[/] {rich.markup.escape(str(e))}", soft_wrap=True, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
