"""One map from exceptions to a one-line message and an exit code; tracebacks only with --debug.

:data:`ERROR_MAP` is the map; :func:`handle_errors` applies it once, around each command (the
``analysis_command`` wrapper, ``train``, ``measures``), and the runner uses :func:`describe` for
the one-line message of a checkpoint that failed while the others ran on.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Callable, Iterator

import typer

from flatcli.errors import FlatcliError


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or "out of memory" in str(error).lower()


ERROR_MAP: list[tuple[Callable[[BaseException], bool], int | None, Callable[[BaseException], str]]]
ERROR_MAP = [
    # (matches, exit code (None: the error's own), message)
    (lambda e: isinstance(e, FlatcliError), None, lambda e: e.message),  # type: ignore[attr-defined]
    (lambda e: isinstance(e, KeyboardInterrupt), 130, lambda e: "interrupted"),
    (
        _out_of_memory,
        1,
        lambda e: f"out of memory ({_first_line(e)}); lower --batch-size or --max-examples",
    ),
    (
        lambda e: True,
        1,
        lambda e: f"{type(e).__name__}: {_first_line(e)} (run with --debug for the traceback)",
    ),
]
"""In order, the first match wins: FlatcliError (its own message and exit code: 1 or 2),
Ctrl-C (130), out of memory (1, with what to lower), anything else (1, type and first line)."""


def _lookup(error: BaseException) -> tuple[int, str]:
    for matches, code, message in ERROR_MAP:
        if matches(error):
            return (error.exit_code if code is None else code), message(error)  # type: ignore[attr-defined]
    raise AssertionError("ERROR_MAP ends with a catch-all")  # pragma: no cover


def describe(error: BaseException) -> str:
    """One line for a user: our own errors as written, others with their type and a hint."""
    return _lookup(error)[1]


def exit_code_of(error: BaseException) -> int:
    """The documented exit code for an error: its own for flatcli errors, 130 for Ctrl-C, else 1."""
    return _lookup(error)[0]


def print_error(message: str, error: BaseException | None = None, debug: bool = False) -> None:
    """Print ``error: message`` to stderr (and the traceback when ``debug``)."""
    if debug and error is not None:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def print_warning(message: str) -> None:
    """Print ``warning: message`` to stderr."""
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def handle_errors(debug: bool = False) -> Iterator[None]:
    """Turn an escaping exception into one stderr line and the exit code of :data:`ERROR_MAP`."""
    try:
        yield
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the one place mapping errors
        code, message = _lookup(e)
        print_error(message, None if isinstance(e, KeyboardInterrupt) else e, debug)
        raise typer.Exit(code) from None
