"""Progress on stderr: Rich bars (with the time left) for a run and each of its checkpoints,
off with ``--quiet``, off a terminal and with ``NO_COLOR``; and the runner's sink
(:class:`flatcli.run.Sink`) that drives them and prints its warnings and errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def no_color() -> bool:
    """True when ``NO_COLOR`` is set to anything non-empty (https://no-color.org)."""
    return bool(os.environ.get("NO_COLOR"))


def console(stderr: bool = False) -> Console:
    """A console on stdout or stderr; no colour off a terminal or with NO_COLOR set."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(
        file=stream,
        no_color=no_color() or not stream.isatty(),
        highlight=False,
        soft_wrap=False,
        width=None if stream.isatty() else 160,
    )


def bars_enabled(enabled: bool = True) -> bool:
    """Whether progress bars are drawn: asked for, stderr is a terminal and NO_COLOR is unset."""
    return enabled and sys.stderr.isatty() and not no_color()


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    """A Rich progress display on stderr (with the time left), or ``None`` when bars are off."""
    if not bars_enabled(enabled):
        yield None
        return
    bar = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console(stderr=True),
        transient=True,
    )
    with bar:
        yield bar


class Bars:
    """The progress half of :class:`flatcli.cli.output.Output`: the runner's sink."""

    quiet: bool
    debug: bool
    _bar: Progress | None = None

    def progress(self):
        """A progress display on stderr, or ``None`` (quiet, not a terminal, NO_COLOR)."""
        return progress_bar(not self.quiet)

    # the runner's sink (flatcli.run.Sink)

    @contextmanager
    def overall(self, command: str, total: int) -> Iterator[Any]:
        """The run's bar, one step per checkpoint; yields the function that advances it."""
        with self.progress() as bar:
            self._bar = bar
            task = bar.add_task(command, total=total) if bar else None
            try:
                yield (lambda: bar.advance(task)) if bar is not None else (lambda: None)
            finally:
                self._bar = None

    @contextmanager
    def checkpoint(self, name: str) -> Iterator[Any]:
        """A sub-task of the run's bar for one checkpoint; yields its progress callback."""
        bar = self._bar
        if bar is None:
            yield lambda description, completed, total: None
            return
        inner = bar.add_task(f"  {name}", total=None)

        def progress(description: str, completed: int, total: int) -> None:
            bar.update(
                inner, description=f"  {name}: {description}", completed=completed, total=total
            )

        try:
            yield progress
        finally:
            bar.remove_task(inner)

    def warning(self, text: str) -> None:
        """``warning: text`` on stderr."""
        from flatcli.cli.errors import print_warning

        print_warning(text)

    def failed(self, path: Path, error: BaseException) -> None:
        """``error: PATH: what went wrong`` on stderr (the traceback with ``--debug``)."""
        from flatcli.cli.errors import describe, print_error

        print_error(f"{path}: {describe(error)}", error, self.debug)

    def partial(self, report: dict[str, Any]) -> None:
        """The report so far, rewritten after every checkpoint (a file only)."""
        self.report(report, partial=True)
