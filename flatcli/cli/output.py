"""Rendering for people (Rich tables and progress on the right stream) and for machines (JSON)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def console(stderr: bool = False) -> Console:
    """A console on stdout or stderr; no colour off a terminal or with NO_COLOR set."""
    stream = sys.stderr if stderr else sys.stdout
    no_color = bool(os.environ.get("NO_COLOR")) or not stream.isatty()
    return Console(
        file=stream,
        no_color=no_color,
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
) -> None:
    """Print a table; ``columns`` are (key, header) pairs and each row maps keys to values."""
    table = Table(title=title, title_justify="left")
    for i, (_, header) in enumerate(columns):
        table.add_column(header, justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        table.add_row(*(fmt(row.get(key)) for key, _ in columns))
    console(stderr).print(table)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    """A Rich progress display on stderr, or ``None`` when disabled or stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    bar = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=True,
    )
    with bar:
        yield bar
