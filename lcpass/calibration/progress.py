"""Rich progress bars for calibration and evaluation (disabled cleanly with ``progress=False``).

Example:
    >>> with progress_bar(False) as bar:
    ...     task = bar.add_task("scoring", total=3)
    ...     for _ in range(3):
    ...         bar.advance(task)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress]:
    """A rich `Progress` (to stderr) that draws nothing when `enabled` is False."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
        transient=False,
    )
    with bar:
        yield bar
