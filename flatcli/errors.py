"""Exceptions that carry a one-line, actionable message and a documented exit code."""

from __future__ import annotations


class FlatcliError(Exception):
    """Base of every error flatcli reports to a user: the message says what is wrong and what to do.

    ``exit_code`` follows the README's "Reports and exit codes": 1 for a checkpoint that failed
    to load or measure, 2 for bad usage (unknown dataset or zoo name, unreadable spec, bad option
    value).
    """

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # noqa: D105
        return self.message


class UsageError(FlatcliError):
    """Bad usage: unknown option value, unknown dataset or zoo name, unreadable spec (exit 2)."""

    exit_code = 2


class DataError(UsageError):
    """A dataset that cannot be found or read (exit 2: the user must fix the data location)."""


class SpecError(UsageError):
    """A model spec that cannot be read or built (exit 2)."""


class CheckpointError(FlatcliError):
    """A checkpoint that cannot be read, or whose weights do not fit the model (exit 1)."""


class MeasureError(FlatcliError):
    """A measure that cannot be computed on this checkpoint (exit 1)."""
