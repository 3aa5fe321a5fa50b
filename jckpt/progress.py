"""A byte-counting progress bar on stderr (rich), silent when stderr is not a terminal.

Used by verify, restore (``progress=``), export, import and the CLI.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Protocol


class Progress(Protocol):
    def advance(self, nbytes: int) -> None: ...


class _Silent:
    def advance(self, nbytes: int) -> None:
        pass


class _Bar:
    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def advance(self, nbytes: int) -> None:
        self._progress.advance(self._task, nbytes)


@contextlib.contextmanager
def bar(description: str, total_bytes: int | None, enabled: bool | None = None) -> Iterator[Progress]:
    """A progress bar counting ``total_bytes``.

    Args:
      description: what is being done, e.g. ``"export safetensors"``.
      total_bytes: the bytes the bar reaches at the end; None for work that
        cannot be counted (a spinner and the elapsed time).
      enabled: force on or off; None shows it only when stderr is a terminal.

    Yields:
      An object whose ``advance(nbytes)`` moves the bar.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield _Silent()
        return
    from rich.console import Console  # imported only when a bar is shown
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as RichProgress

    if total_bytes is None:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    else:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
    with RichProgress(*columns, console=Console(stderr=True), transient=True) as progress:
        yield _Bar(progress, progress.add_task(description, total=total_bytes))
