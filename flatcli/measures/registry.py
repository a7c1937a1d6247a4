"""The measure registry: every measure's name, config, compute function and the metrics it reports.

Each measure module registers itself at import (a :func:`register_measure` call at the bottom of
the module). The
lookups below first import every module of the :mod:`flatcli.measures` package, found on disk,
so the registry is complete whichever measure modules were imported before (a new measure is a
new module and nothing else). Commands use it to know which metric keys a run reports (a gate on any
other key is a usage error before any work), ``flatcli measures`` prints it, and commands that
rank measures read each metric's :class:`Direction`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pkgutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatcli.configs.choices import CLASS_LOSSES
from flatcli.errors import UsageError
from flatcli.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    from flatcli.io.load import Run


class Direction(str, Enum):
    """Which way a metric points.

    ``SHARPER``: a larger value means a sharper minimum, expected to go with a larger
    generalization gap. ``FLATTER``: a larger value means a flatter minimum. ``NEUTRAL``: not a
    flatness measure (counts, errors, diagnostics).
    """

    SHARPER = "sharper"
    FLATTER = "flatter"
    NEUTRAL = "neutral"


@dataclass(frozen=True)
class Metric:
    """One metric key of a report, with its direction and its source (paper and equation)."""

    key: str
    direction: Direction
    source: str
    description: str


@dataclass(frozen=True)
class Measure:
    """A measure: its name, the command that reports it, its config and compute function.

    ``compute(run, config, progress)`` returns a result with ``metrics()`` (flat numbers, keyed
    by the keys of ``metrics``) and ``details()`` (JSON-ready). ``cost`` says what one
    computation costs, in passes over the data or in products. ``reports(config)``, when
    given, says which metric keys a computation with ``config`` computes (default: all); the
    result's other keys are absent or None. ``check(run, config)``, when given, refuses a
    request that cannot succeed on this loaded checkpoint (more eigenvalues than parameters, a
    basis larger than memory) with a :class:`~flatcli.errors.UsageError`, cheaply and before
    any work: :func:`compute` calls it first (:func:`check`). ``losses`` are the losses it
    takes (docs: "Your model", Losses; default :data:`CLASS_LOSSES`, ``ce`` and ``nsce``); any other
    is refused by :func:`check` before work, with ``needs`` (what the measure needs) in the
    one-line message.
    """

    name: str
    command: str
    config_type: type
    compute: Callable[[Run, Any, ProgressFn], Any]
    metrics: tuple[Metric, ...]
    cost: str
    reports: Callable[[Any], Sequence[str]] | None = None
    check: Callable[[Run, Any], None] | None = None
    losses: tuple[str, ...] = ("ce", "nsce")
    needs: str = "class logits (N, K) with int64 labels (N,)"

    @property
    def keys(self) -> tuple[str, ...]:
        """The metric keys this measure reports."""
        return tuple(m.key for m in self.metrics)


_MEASURES: dict[str, Measure] = {}

NUM_PARAMS = Metric(
    "num_params",
    Direction.NEUTRAL,
    "-",
    "trainable parameters W the measure differentiates",
)
"""A metric several measures report; a key may be shared only by one and the same Metric."""


def register(measure: Measure) -> Measure:
    """Add ``measure`` to the registry and return it.

    Raises:
        ValueError: a measure of the same name is already registered, or a metric key another
            measure reports with a different definition (a programming error, not a user's).
    """
    if measure.name in _MEASURES:
        raise ValueError(f"measure {measure.name!r} is registered twice")
    keys = [m.key for m in measure.metrics]
    if len(set(keys)) != len(keys):
        raise ValueError(f"measure {measure.name!r} lists a metric key twice: {keys}")
    for other in _MEASURES.values():
        mine = {m.key: m for m in measure.metrics}
        clash = {m.key for m in other.metrics if m.key in mine and mine[m.key] != m}
        if clash:
            raise ValueError(
                f"metric key(s) {sorted(clash)} of {measure.name!r} are already reported by "
                f"{other.name!r}"
            )
    _MEASURES[measure.name] = measure
    return measure


def register_measure(
    name: str,
    config_type: type,
    compute: Callable[[Run, Any, ProgressFn], Any],
    *,
    metrics: Sequence[Metric],
    cost: str,
    command: str | None = None,
    reports: Callable[[Any], Sequence[str]] | None = None,
    check: Callable[[Run, Any], None] | None = None,
    losses: Sequence[str] = CLASS_LOSSES,
    needs: str = Measure.needs,
) -> Measure:
    """:func:`register` the :class:`Measure` of these fields; ``command`` defaults to ``name``.

    What a measure module ends with (``compute``: often :func:`on_run` of its library function).
    ``losses``: the losses it takes (default ``ce`` and ``nsce``); ``needs``: what it needs,
    for the refusal of any other loss.
    """
    measure = Measure(
        name, command or name, config_type, compute, tuple(metrics), cost, reports, check
    )
    return register(dataclasses.replace(measure, losses=tuple(losses), needs=needs))


def on_run(compute_fn: Callable[..., Any]) -> Callable[[Run, Any, ProgressFn], Any]:
    """``compute_fn(model, x, y, config, progress=...)`` as a measure's ``compute`` on a loaded
    checkpoint (:func:`flatcli.load`): on its model and examples. A config with a ``loss``
    field left None gets the run's loss (:func:`loss_of`)."""

    def compute(run: Run, config: Any, progress: ProgressFn) -> Any:
        if dataclasses.is_dataclass(config) and getattr(config, "loss", "") is None:
            config = dataclasses.replace(config, loss=loss_of(run, config))
        return compute_fn(run.model, run.x, run.y, config, progress=progress)

    return compute


_LOADED = False


def _ensure_loaded() -> None:
    """Import every module below this package (each registers its measures at import).

    The modules are found on disk (``pkgutil``) rather than through the package's
    ``__init__``, which imports this module: the registry imports only what it lists. A module
    already imported (normally all of them, by ``import flatcli.measures``) costs nothing, so
    the registration order stays that of the package's imports.
    """
    global _LOADED
    if _LOADED:
        return
    package = __name__.rpartition(".")[0]
    for info in pkgutil.walk_packages([str(Path(__file__).parent)], prefix=f"{package}."):
        importlib.import_module(info.name)
    _LOADED = True


def get_measure(name: str) -> Measure:
    """The registered measure called ``name``; else a UsageError listing the valid names."""
    _ensure_loaded()
    try:
        return _MEASURES[name]
    except KeyError:
        valid = ", ".join(sorted(_MEASURES))
        raise UsageError(f"unknown measure {name!r}; measures: {valid}") from None


def all_measures() -> list[Measure]:
    """Every registered measure, in registration order."""
    _ensure_loaded()
    return list(_MEASURES.values())


def find_metric(key: str) -> tuple[Measure, Metric]:
    """The measure reporting metric ``key`` and the metric; else a UsageError listing the keys."""
    _ensure_loaded()
    for measure in _MEASURES.values():
        for metric in measure.metrics:
            if metric.key == key:
                return measure, metric
    valid = ", ".join(sorted(m.key for ms in _MEASURES.values() for m in ms.metrics))
    raise UsageError(f"unknown metric {key!r}; metrics: {valid}")


def metrics_of(command: str) -> list[str]:
    """Every metric key the measures of ``command`` report, in registration order."""
    _ensure_loaded()
    return [k for m in _MEASURES.values() if m.command == command for k in m.keys]


def reported_keys(measure: Measure, config: Any) -> list[str]:
    """The metric keys ``measure`` computes with ``config`` (a gate on any other is an error)."""
    if measure.reports is None:
        return list(measure.keys)
    return list(measure.reports(config))


def make_config(measure: Measure, run: Run | None = None, **options: Any) -> Any:
    """``measure.config_type(**options)``, its ``seed`` and ``batch_size`` taken from ``run``.

    Raises:
        UsageError: an option the config does not have (the message lists the valid ones), or
            a bad option value.
    """
    names = [f.name for f in dataclasses.fields(measure.config_type)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise UsageError(
            f"{measure.name} has no option {', '.join(map(repr, unknown))}; "
            f"options: {', '.join(names)}"
        )
    if run is not None:
        for name in ("seed", "batch_size"):
            if name in names and name not in options:
                options[name] = getattr(run, name)
    return measure.config_type(**options)


def compute(
    name: str | Measure,
    run: Run,
    config: Any = None,
    *,
    progress: ProgressFn | None = None,
    **options: Any,
) -> Any:
    """Compute the measure ``name`` on ``run``: the result has ``metrics()`` and ``details()``.

    Args:
        name: a registered measure's name (or the :class:`Measure`).
        run: a loaded checkpoint (:func:`flatcli.load`).
        config: the measure's config; default: built from ``options`` (its ``seed`` and
            ``batch_size`` default to the run's).
        progress: optional ``progress(description, done, total)`` callback.
        **options: fields of the config (only without ``config``).
    """
    measure = name if isinstance(name, Measure) else get_measure(name)
    if config is None:
        config = make_config(measure, run, **options)
    elif options:
        raise UsageError("pass either config or keyword options, not both")
    check(measure, run, config)
    with torch_warnings_silenced():
        return measure.compute(run, config, progress or no_progress)


def loss_of(run: Run, config: Any) -> str:
    """The loss a measure computes with: its config's ``loss`` where it has one that is set
    (the Python API's override), else the run's (:attr:`flatcli.io.load.Run.loss`)."""
    loss = getattr(config, "loss", None)
    return str(loss) if isinstance(loss, str) else getattr(run, "loss", "ce")


BEFORE_WORK = "before_work"
"""The attribute :func:`check` sets (True) on the UsageError a measure's check raises: the
runner counts it, like a usage error while loading, as bad usage found before work (exit 2)."""


def check(measure: Measure, run: Run, config: Any) -> None:
    """Refuse a loss the measure does not take, then run ``measure.check(run, config)``.

    Raises:
        UsageError: the request cannot succeed on this checkpoint; marked ``before_work``
            (:data:`BEFORE_WORK`) so the runner reports it as bad usage (exit 2).
    """
    try:
        loss = loss_of(run, config)
        if loss not in measure.losses:
            raise UsageError(
                f"{measure.name} cannot take loss {loss}: it needs {measure.needs} "
                f"(losses {', '.join(measure.losses)})"
            )
        if measure.check is not None:
            measure.check(run, config)
    except UsageError as e:
        setattr(e, BEFORE_WORK, True)
        raise


@contextlib.contextmanager
def torch_warnings_silenced() -> Iterator[None]:
    """Hide torch's warning about its own use of ``torch.jit.script`` within the block.

    torch's first forward-mode product loads decompositions through ``torch.jit.script``, which
    warns (FutureWarning) about its own deprecation: nothing a flatcli user can act on. Only
    this warning, and only inside library calls: the caller's warning filters stay as they are.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        yield
