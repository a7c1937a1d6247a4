"""Small helpers shared by the measures' configs and results."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from flatcli.dtypes import DTYPES, dtype_name
from flatcli.errors import UsageError

HEAD_DTYPES = DTYPES
"""Loss-head dtypes a user can name: :data:`flatcli.dtypes.DTYPES`."""


def head_dtype_name(value: Any) -> str:
    """A loss-head dtype (``"float64"`` or ``torch.float64``) by name; else a UsageError."""
    name = dtype_name(value)
    if name not in DTYPES:
        raise UsageError(f"Unknown head dtype {value!r}; choose float32 or float64.")
    return name


def finite_or_none(v: Any) -> Any:
    """``v``, or None when it is a non-finite float (JSON reports write None as null)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def floats(t: Tensor) -> list[float | None]:
    """A tensor's entries as a JSON-ready list, non-finite entries as None."""
    return [finite_or_none(float(v)) for v in t.tolist()]


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise a UsageError with the message of the first ``(ok, message)`` check that failed."""
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
