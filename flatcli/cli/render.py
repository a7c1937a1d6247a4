"""What every analysis command does after parsing: run the one runner, render, exit.

:func:`analyse` hands the checkpoints to :func:`flatcli.run.run_checkpoints` with the
command's ``measure``, prints the table of rows, writes the report and exits with the
documented code (:func:`finish`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import typer

from flatcli.cli.errors import describe, print_error
from flatcli.cli.options import Common
from flatcli.cli.output import Output
from flatcli.run import Gates, Measure, Outcome, run_checkpoints

Columns = Sequence[tuple[str, str]]
Rows = Callable[[str, dict[str, Any]], list[dict[str, Any]]]


def table_rows(results: Sequence[dict[str, Any]], columns: Columns, rows: Rows | None) -> list:
    """One table row per result (``rows(name, entry)`` for several), ``error`` for a failure."""
    out: list[dict[str, Any]] = []
    for entry in results:
        name = Path(entry["checkpoint"]).name
        if entry["error"] is not None:
            out.append(
                {"checkpoint": name, columns[0][0]: "error"} if columns else {"checkpoint": name}
            )
        elif rows is not None:
            out.extend(rows(name, entry))
        else:
            out.append({"checkpoint": name, **entry["metrics"]})
    return out


def analyse(
    command: str,
    checkpoints: Sequence[Path],
    measure: Measure,
    columns: Columns,
    *,
    common: Common,
    config: dict[str, Any],
    metrics: Sequence[str] | None = None,
    rows: Rows | None = None,
    after: Callable[[list[dict[str, Any]]], None] | None = None,
) -> NoReturn:
    """Measure every checkpoint with ``measure``, show the table, write the report, exit.

    ``after(results)`` runs once the report is written (a figure, say); an error in it is one
    ``error:`` line and exit 1, the report kept.
    """
    out = Output.of(common)
    outcome = run_checkpoints(
        command,
        checkpoints,
        measure,
        load_options=common,
        config=config,
        gates=common,
        metrics=metrics,
        sink=out,
    )
    title = f"flatcli {command}"
    out.table(
        title, [("checkpoint", "checkpoint"), *columns], table_rows(outcome.results, columns, rows)
    )
    out.report(outcome.report())
    failures = outcome.failure
    if after is not None:
        failures = max(failures, _after(after, outcome, out))
    finish(outcome, common, failures)


def _after(after: Callable[[list[dict[str, Any]]], None], outcome: Outcome, out: Output) -> int:
    from flatcli import distributed

    if outcome.interrupted or not distributed.is_main():
        return 0
    try:
        after(outcome.results)
    except Exception as e:  # noqa: BLE001 - the report is out; report the error, exit 1
        print_error(describe(e), e, out.debug)
        return 1
    return 0


def finish(outcome: Outcome, gates: Gates, failures: int = 0, more: Sequence[str] = ()) -> NoReturn:
    """Exit with the documented code: 130 interrupted, the failures' code, 3 for a failed gate
    (each failed gate one line, with the lines of ``more`` relative gates), else 0."""
    from flatcli import distributed

    if outcome.interrupted:
        print_error("interrupted")
        raise typer.Exit(130)
    if failures:
        raise typer.Exit(failures)
    code, messages = gates.failures(outcome.results)
    messages = [*messages, *more]
    if distributed.is_main():
        for m in messages:
            print_error(m)
    raise typer.Exit(code or (3 if more else 0))
