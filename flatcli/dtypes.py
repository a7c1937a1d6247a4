"""The floating-point dtypes flatcli computes in, and their names: the one map between the two.

A dtype is named by its torch name without the ``torch.`` prefix (``"float32"``,
``"float64"``) in options, configs and reports.

>>> dtype_of("float64"), dtype_name(torch.float32)
(torch.float64, 'float32')
"""

from __future__ import annotations

import torch

from flatcli.errors import UsageError

__all__ = ["DTYPES", "dtype_of", "dtype_name"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""dtypes a model can be measured or trained in, and a loss head evaluated in, by name."""


def dtype_of(name: str | torch.dtype, option: str = "--dtype") -> torch.dtype:
    """``"float32"``/``"float64"`` (or that torch dtype) as a torch dtype.

    Raises:
        UsageError: any other value; the message names ``option``.
    """
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if name in DTYPES:
        return DTYPES[name]
    raise UsageError(f"{option} must be 'float32' or 'float64'; got '{name}'")


def dtype_name(dtype: torch.dtype | str) -> str:
    """A dtype's name as options and reports write it: ``torch.float64`` -> ``"float64"``.

    A string is returned without its ``torch.`` prefix, so a name maps to itself.
    """
    return str(dtype).removeprefix("torch.")
