"""The checks the configs share: a list of ``(ok, message)`` conditions, a loss head's dtype."""

from __future__ import annotations

from typing import Any

from flatcli.errors import UsageError

__all__ = ["require", "head_dtype_name"]


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise a UsageError with the message of the first ``(ok, message)`` check that failed."""
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def head_dtype_name(value: Any) -> str:
    """A loss-head dtype (``"float64"`` or ``torch.float64``) by name; else a UsageError."""
    from flatcli.dtypes import DTYPES, dtype_name

    name = dtype_name(value)
    if name not in DTYPES:
        raise UsageError(f"Unknown head dtype {value!r}; choose float32 or float64.")
    return name
