"""The progress callback that long library computations accept (the CLI draws it as a bar)."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]
"""``progress(description, completed, total)``; libraries call it, never print."""


def no_progress(description: str, completed: int, total: int) -> None:
    """A :data:`ProgressFn` that does nothing."""
