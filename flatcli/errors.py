"""Exceptions that carry a one-line, actionable message and a documented exit code, and
:func:`choice`, the one check of a value against a fixed set of choices."""

from __future__ import annotations

from enum import Enum
from typing import Any


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


def choice(enum: type[Enum], value: Any, what: str) -> str:
    """``value`` as the string of a member of the ``str`` Enum ``enum``; else a UsageError
    that names ``what`` and lists the members.

    >>> from enum import Enum
    >>> class Fisher(str, Enum):
    ...     MC = "mc"
    ...     EXACT = "exact"
    >>> choice(Fisher, Fisher.MC, "fisher_type"), choice(Fisher, "exact", "fisher_type")
    ('mc', 'exact')
    >>> choice(Fisher, "emp", "fisher_type")
    Traceback (most recent call last):
    ...
    flatcli.errors.UsageError: Unknown fisher_type 'emp'; choose one of 'mc', 'exact'.
    """
    try:
        return enum(value).value
    except ValueError:
        valid = ", ".join(repr(e.value) for e in enum)
        raise UsageError(f"Unknown {what} {value!r}; choose one of {valid}.") from None


def listing(items: list[str], limit: int = 6) -> str:
    """The first ``limit`` of ``items`` for an error message, with their count.

    >>> listing(["a", "b", "c"], limit=2)
    '[a, b, ...] (3)'
    """
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"
