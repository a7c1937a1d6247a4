"""One map from exceptions to a one-line message and an exit code; tracebacks only with --debug."""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator

import typer

from flatcli.errors import FlatcliError


def describe(error: BaseException) -> str:
    """One line for a user: our own errors as written, others with their type and a hint."""
    if isinstance(error, FlatcliError):
        return error.message
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return f"out of memory ({_first_line(error)}); lower --batch-size or --max-examples"
    return f"{type(error).__name__}: {_first_line(error)} (run with --debug for the traceback)"


def exit_code_of(error: BaseException) -> int:
    """The CONTRACTS.md exit code for an error: its own for flatcli errors, else 1."""
    return error.exit_code if isinstance(error, FlatcliError) else 1


def print_error(message: str, error: BaseException | None = None, debug: bool = False) -> None:
    """Print ``error: message`` to stderr (and the traceback when ``debug``)."""
    if debug and error is not None:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def handle_errors(debug: bool = False) -> Iterator[None]:
    """Turn an escaping exception into one stderr line and the matching exit code."""
    try:
        yield
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except KeyboardInterrupt:
        print_error("interrupted")
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001 - the one place that maps every error
        print_error(describe(e), e, debug)
        raise typer.Exit(exit_code_of(e)) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
