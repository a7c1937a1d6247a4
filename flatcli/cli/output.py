"""The one output sink of every command: tables for people, JSON reports for machines, bars.

As documented: stdout carries the table, or the JSON report with ``--json -`` (the table then goes
to stderr); progress bars and messages go to stderr; colour and bars switch off when the stream
is not a terminal or ``NO_COLOR`` is set. :class:`Output` is where each of those rules lives.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
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
from rich.table import Table
from rich.text import Text

from flatcli.errors import UsageError


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


def fmt(value: Any) -> str:
    """A number for a table cell: 6 significant digits, integers as they are, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.6g}"
    return str(value)


def render_table(
    title: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[dict[str, Any]],
    *,
    stderr: bool = False,
    numeric: bool = True,
) -> None:
    """Print a table; ``columns`` are (key, header) pairs and each row maps keys to values.

    ``numeric``: columns after the first hold numbers (right-aligned); else text (left).
    Headers and cells are plain text, never Rich markup (``E[xxᵀ]``, ``[low, high]`` print as is).
    """
    table = Table(title=title, title_justify="left")
    for i, (_, header) in enumerate(columns):
        right = numeric and i > 0
        table.add_column(Text(header), justify="right" if right else "left", overflow="fold")
    for row in rows:
        table.add_row(*(Text(fmt(row.get(key))) for key, _ in columns))
    console(stderr).print(table)


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


def check_writable(target: str | Path, option: str = "--json") -> None:
    """Fail early (exit 2, naming ``option`` and the path) when ``target`` cannot be written.

    Creates the missing parent folders, as writing the file later would.
    """
    if str(target) == "-":
        return
    path = Path(target)
    try:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=True):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        raise UsageError(f"{option} {target}: cannot write there ({reason})") from e


class Output:
    """Where a command's table, JSON report, messages and progress go.

    Args:
        json_target: ``--json``: a path, ``-`` (stdout; the table then goes to stderr) or None.
        quiet: ``--quiet``: no table, no progress bar.
    """

    def __init__(self, json_target: str | None = None, quiet: bool = False) -> None:
        self.json_target = json_target
        self.quiet = quiet

    @property
    def json_to_stdout(self) -> bool:
        """True when stdout carries the JSON report (``--json -``)."""
        return self.json_target == "-"

    def check(self) -> None:
        """Check the report's path can be written, before any work (exit 2 otherwise)."""
        if self.json_target:
            check_writable(self.json_target)

    def table(
        self,
        title: str,
        columns: Sequence[tuple[str, str]],
        rows: Sequence[dict[str, Any]],
        *,
        numeric: bool = True,
    ) -> None:
        """The table, on stdout (stderr with ``--json -``); nothing with ``--quiet``."""
        if not self.quiet:
            render_table(title, columns, rows, stderr=self.json_to_stdout, numeric=numeric)

    def message(self, text: str) -> None:
        """A line for people on stderr (nothing with ``--quiet``)."""
        if not self.quiet:
            console(stderr=True).print(text)

    def report(self, report: dict[str, Any], *, partial: bool = False) -> None:
        """Write the JSON report; ``partial`` reports (while running) go to a file only."""
        from flatcli.io.report import write_report

        if not self.json_target or (partial and self.json_to_stdout):
            return
        write_report(report, self.json_target)

    def progress(self):
        """A progress display on stderr, or ``None`` (quiet, not a terminal, NO_COLOR)."""
        return progress_bar(not self.quiet)
