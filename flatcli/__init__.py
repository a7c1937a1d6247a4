"""flatcli: flatness and sharpness of trained networks, and how they relate to generalization.

>>> import flatcli
>>> run = flatcli.load("ckpt.safetensors")                         # doctest: +SKIP
>>> flatcli.measures.gamma(run, samples=100).metrics()             # doctest: +SKIP
>>> flatcli.measures.spectrum(run, top_k=5, trace=True).metrics()  # doctest: +SKIP

Importing ``flatcli`` itself is light (no torch): :func:`load`, :class:`Run`, and the
subpackages ``measures``, ``io`` and ``data`` are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flatcli._version import __version__

__all__ = ["__version__", "load", "Run", "measures", "io", "data"]

_LAZY = {"load": ("flatcli.io.load", "load"), "Run": ("flatcli.io.load", "Run")}
_SUBPACKAGES = ("measures", "io", "data")

if TYPE_CHECKING:
    from flatcli import data, io, measures
    from flatcli.io.load import Run, load


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"flatcli.{name}")
    else:
        raise AttributeError(f"module 'flatcli' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
