"""``SharpnessConfig`` (:mod:`flatcli.configs.sharpness`) told the definitions' names, and those
names as a ``str`` Enum."""

from __future__ import annotations

from flatcli.configs.sharpness import SharpnessConfig, known_measures
from flatcli.measures.sharpness._definition import definitions, measure_enum

__all__ = ["SharpnessConfig", "SharpnessMeasure", "all_measures"]


def all_measures() -> tuple[str, ...]:
    """Every definition's name, in order (``ALL_MEASURES``)."""
    return tuple(d.name for d in definitions())


known_measures(all_measures)

SharpnessMeasure = measure_enum()
"""The definitions as a ``str`` Enum (``SharpnessMeasure.NORMALIZED == "normalized_sharpness"``)."""
