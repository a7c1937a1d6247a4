"""The one output sink of every command: tables for people, JSON reports for machines, bars.

As documented: stdout carries the table, or the JSON report with ``--json -`` (the table then goes
to stderr); progress bars and messages go to stderr; colour and bars switch off when the stream
is not a terminal or ``NO_COLOR`` is set. :class:`Output` is where each of those rules lives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from flatcli.cli.progress import (  # noqa: F401 - re-exported
    Bars,
    bars_enabled,
    console,
    no_color,
    progress_bar,
)
from flatcli.io.writable import check_writable


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


class Output(Bars):
    """Where a command's table, JSON report, messages and progress go; the runner's sink.

    Under ``torchrun`` only rank 0 prints and writes (asked at each call: the process group is
    joined by the runner).

    Args:
        json_target: ``--json``: a path, ``-`` (stdout; the table then goes to stderr) or None.
        quiet: ``--quiet``: no table, no progress bar.
        debug: ``--debug``: tracebacks with the error lines.
    """

    def __init__(
        self, json_target: str | None = None, quiet: bool = False, debug: bool = False
    ) -> None:
        self._json = json_target
        self._quiet = quiet
        self.debug = debug
        self._bar = None

    @classmethod
    def of(cls, options: Any) -> Output:
        """The output the ``--json``, ``--quiet`` and ``--debug`` of ``options`` ask for,
        checked (an unwritable report path is exit 2 before any work)."""
        out = cls(options.json, options.quiet, options.debug)
        out.check()
        return out

    @property
    def json_target(self) -> str | None:
        """``--json`` on the main process, else None."""
        from flatcli import distributed

        return self._json if distributed.is_main() else None

    @property
    def quiet(self) -> bool:
        """``--quiet``, or a process other than the main one."""
        from flatcli import distributed

        return self._quiet or not distributed.is_main()

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
