"""Progress bars for long work (rich, on stderr; silent when not a terminal or disabled)."""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def progress_bar(label: str, total: int, enabled: bool = True, completed: int = 0):
    """Yield ``advance(description, steps=1)``; draws a bar with count, elapsed time and ETA.

    ``completed`` starts the bar part-way (a resumed run).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"),
                   console=console, disable=not (enabled and sys.stderr.isatty()))
    with bar:
        task = bar.add_task("", total=total, completed=completed)

        def advance(description: str = "", steps: int = 1) -> None:
            bar.update(task, advance=steps, description=description)

        yield advance
