"""Small helpers shared by the measures' configs and results."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from flatcli.configs._checks import head_dtype_name, require  # noqa: F401 - re-exported
from flatcli.dtypes import DTYPES

HEAD_DTYPES = DTYPES
"""Loss-head dtypes a user can name: :data:`flatcli.dtypes.DTYPES`."""


def finite_or_none(v: Any) -> Any:
    """``v``, or None when it is a non-finite float (JSON reports write None as null)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def floats(t: Tensor) -> list[float | None]:
    """A tensor's entries as a JSON-ready list, non-finite entries as None."""
    return [finite_or_none(float(v)) for v in t.tolist()]
