"""What a sharpness definition declares, and the table of the definitions found in the package.

A definition module (a public module of :mod:`flatcli.measures.sharpness`) ends with one
``define(Definition(...))``: the measure's name, source (paper and equation) and description,
its cost, its table header, when its standard error is reported, what it takes from the shared
computation (weight matrices, the curvature diagonal) and its ``compute(shared) -> Outcome``;
its registry metrics (value, stderr, extras) follow.
:func:`discover` imports every public module of the package once, so a new definition is one
new file; the package registers each definition with :mod:`flatcli.measures.registry`.

Definition modules import from here and from the package's private modules only, never from
the package itself, which is still being imported when :func:`discover` imports them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import Tensor, nn

from flatcli.measures.registry import Direction, Metric

if TYPE_CHECKING:
    from flatcli.curvature.diagonal import CurvatureDiagonal
    from flatcli.curvature.operators import CurvatureOperator, OperatorCache
    from flatcli.measures.sharpness._config import SharpnessConfig
    from flatcli.progress import ProgressFn

__all__ = [
    "Definition",
    "Outcome",
    "Shared",
    "define",
    "definitions",
    "discover",
    "measure_enum",
    "Extra",
    "hutchinson_diagonal",
    "diagonal_computed",
]

_PACKAGE = __name__.rsplit(".", 1)[0]


@dataclass
class Shared:
    """What the definitions of one :func:`compute_sharpness` call share.

    Attributes:
        model, x, y: the network (in eval mode) and the examples.
        config: the call's :class:`SharpnessConfig`.
        progress: the call's ``progress(description, done, total)`` callback.
        operators: one Hessian operator per loss head, built once (:meth:`hessian`).
        names: the weight matrices (trainable parameters with >= 2 dimensions).
        excluded: the other trainable parameters.
        diagonal: the curvature diagonal of ``config.normalized_loss`` over ``names``
            (``config.diag_method``), computed once when a chosen definition needs it, else None.
        outputs: outputs per example (K logits; T·V for token logits).
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    config: SharpnessConfig
    progress: ProgressFn
    operators: OperatorCache
    names: list[str]
    excluded: list[str]
    diagonal: CurvatureDiagonal | None = None
    outputs: int = 0

    def hessian(self, loss: str) -> CurvatureOperator:
        """The shared Hessian operator of the loss head ``loss`` (built on first use)."""
        return self.operators.get("hessian", loss_fn=loss, head_dtype=self.config.head)


@dataclass
class Outcome:
    """What one definition computed.

    Attributes:
        value: the measure.
        settings: the settings it used (``details()["settings"][name]``).
        stderr: its standard error, when it has one.
        extras: further metrics, reported after the stderr (``{metric key: value}``).
        per_layer: ``{parameter name: term}`` when the measure is a sum over layers.
        products: Hessian-vector products it used (``details()["products"][name]``), if counted.
        seconds: timings by part; None: its total time as ``details()["seconds"][name]``.
        info: further top-level ``details()`` entries (e.g. solver statistics).
    """

    value: float
    settings: dict[str, Any]
    stderr: float | None = None
    extras: dict[str, float] = field(default_factory=dict)
    per_layer: dict[str, float] | None = None
    products: int | None = None
    seconds: dict[str, float] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Extra(NamedTuple):
    """A further metric of a definition, reported after its standard error (always)."""

    key: str
    header: str
    description: str


@dataclass(frozen=True)
class Definition:
    """One sharpness definition: its name, report keys, table columns, needs and computation.

    Attributes:
        name: the measure's name, also the metric key of its value.
        order: its place among the definitions (``ALL_MEASURES``, the table, the registry).
        header: its table column header.
        label: what the progress line says while it runs.
        source: the paper and equation that define it (authors, year, equation).
        description: what the value is, in one line of maths.
        cost: what one computation costs, in passes over the data or in products.
        compute: ``compute(shared) -> Outcome``.
        direction: which way the value points (default: larger is sharper).
        stderr: ``stderr(config)``: whether ``<name>_stderr`` is reported with ``config``
            (None: never).
        extras: further metrics (:class:`Extra`), reported after the stderr.
        weight_matrices: it sums over weight matrices (the model must have some).
        diagonal: ``diagonal(config)``: whether it uses the shared curvature diagonal.
        passes: ``passes(config, classes)``: its own cost in gradient passes over the examples
            (:mod:`~flatcli.measures.sharpness._cost`), the shared diagonal not included
            (None: nothing beyond it).
    """

    name: str
    order: int
    header: str
    label: str
    source: str
    description: str
    cost: str
    compute: Callable[[Shared], Outcome]
    direction: Direction = Direction.SHARPER
    stderr: Callable[[SharpnessConfig], bool] | None = None
    extras: tuple[Extra, ...] = ()
    weight_matrices: bool = False
    diagonal: Callable[[SharpnessConfig], bool] | None = None
    passes: Callable[[SharpnessConfig, int], float] | None = None

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """Its metrics for the registry: the value, ``<name>_stderr`` if any, the extras."""
        out = [Metric(self.name, self.direction, self.source, self.description)]
        if self.stderr is not None:
            stderr = f"standard error of {self.name}"
            out.append(Metric(f"{self.name}_stderr", Direction.NEUTRAL, self.source, stderr))
        out += [Metric(e.key, Direction.NEUTRAL, self.source, e.description) for e in self.extras]
        return tuple(out)

    def columns(self, config: SharpnessConfig) -> list[tuple[str, str]]:
        """Its ``(metric key, header)`` table columns with ``config``."""
        cols = [(self.name, self.header)]
        if self.stderr is not None and self.stderr(config):
            cols.append((f"{self.name}_stderr", "± stderr"))
        return cols + [(e.key, e.header) for e in self.extras]

    def keys(self, config: SharpnessConfig) -> list[str]:
        """The metric keys it reports with ``config``."""
        return [key for key, _ in self.columns(config)]

    def needs_diagonal(self, config: SharpnessConfig) -> bool:
        """Whether it uses the shared curvature diagonal with ``config``."""
        return self.diagonal is not None and self.diagonal(config)


def hutchinson_diagonal(config: SharpnessConfig) -> bool:
    """Whether ``config`` estimates the curvature diagonal with Hutchinson probes."""
    return config.diag_method == "hutchinson"


def diagonal_computed(config: SharpnessConfig) -> bool:
    """Whether a measure chosen by ``config`` needs the shared curvature diagonal (so it is
    computed once whatever else uses it)."""
    chosen = set(config.measures or ())
    return any(d.needs_diagonal(config) for d in definitions() if d.name in chosen)


_DEFINITIONS: dict[str, Definition] = {}
_LISTENERS: list[Callable[[Definition], Any]] = []
_discovered = False
_enum: type[Enum] | None = None


def define(definition: Definition) -> Definition:
    """Add ``definition`` to the table (and to the listeners, e.g. the registry); return it.

    Raises:
        ValueError: a definition of that name exists (a programming error, not a user's).
    """
    if definition.name in _DEFINITIONS:
        raise ValueError(f"sharpness definition {definition.name!r} is defined twice")
    _DEFINITIONS[definition.name] = definition
    for listener in _LISTENERS:
        listener(definition)
    return definition


def on_define(listener: Callable[[Definition], Any]) -> None:
    """Call ``listener`` with every definition defined from now on."""
    _LISTENERS.append(listener)


def definitions() -> list[Definition]:
    """Every definition, by ``order`` (the package's modules are imported on the first call)."""
    if not _discovered:
        discover()
    return sorted(_DEFINITIONS.values(), key=lambda d: d.order)


def discover() -> None:
    """Import every public module of the package not yet imported: each defines its definition."""
    global _discovered
    _discovered = True
    package = importlib.import_module(_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{_PACKAGE}.{info.name}")


def measure_enum() -> type[Enum]:
    """A ``str`` Enum of the definitions found at import.

    Member names drop the ``_sharpness`` suffix: ``SharpnessMeasure.NORMALIZED``.
    """
    global _enum
    if _enum is None:
        members = {d.name.upper().removesuffix("_SHARPNESS"): d.name for d in definitions()}
        _enum = Enum("SharpnessMeasure", members, type=str, module=_PACKAGE)
    return _enum
