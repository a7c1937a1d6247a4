"""The one runner: every checkpoint argument → load → measure → report row → gates.

:func:`run_checkpoints` is the path every analysis command (and ``rank``) takes a checkpoint
through. Directories are expanded; each checkpoint is loaded (:func:`flatcli.io.load.load`) and
measured in isolation, so one that fails becomes an error row and the others still run; the
report is rewritten after every checkpoint (``"interrupted": true`` until the run ends), so
Ctrl-C keeps every finished row; under ``torchrun`` every process either shares each
checkpoint's examples (``shard="data"``) or measures its own share of the checkpoints
(``shard="checkpoints"``, as ``rank`` does); registered measures can be read from and written
to a :class:`~flatcli.rank.cache.ResultCache` (:func:`compute_cached`). Gates turn the rows into
an exit code. Nothing here prints: a :class:`Sink` receives progress, warnings, errors and the
partial reports, and the command line renders them.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from flatcli import distributed
from flatcli.configs.common import (  # noqa: F401 - gate_failure, parse_gates: re-exported
    Gates,
    LoadOptions,
    gate_failure,
    parse_gates,
)
from flatcli.devices import resolve_device
from flatcli.dtypes import dtype_of
from flatcli.errors import UsageError
from flatcli.io.checkpoint import expand_checkpoints
from flatcli.io.load import DatasetCache, Run, load
from flatcli.io.report import build_report, environment_info, result_entry
from flatcli.io.spec import parse_model_option
from flatcli.progress import ProgressFn, no_progress

__all__ = [
    "LoadOptions",
    "Gates",
    "Context",
    "Sink",
    "Outcome",
    "check_gates",
    "run_checkpoints",
    "registered",
    "compute_cached",
]


def check_gates(gates: Gates, metrics: Sequence[str] | None, command: str) -> None:
    """A gate on a metric this run does not report is a usage error, before any work.

    Raises:
        UsageError: a malformed gate, or one naming a metric not in ``metrics`` (the message
            names the gate, the metrics the run reports and, when another measure reports the
            gate's metric, where it comes from). ``metrics=None``: only the gates' form.
    """
    from flatcli.measures.registry import find_metric

    parsed = gates.above, gates.below  # a malformed gate is an error even without metrics
    if metrics is None:
        return
    for flag, specs in zip(("--fail-above", "--fail-below"), parsed, strict=True):
        for name, _ in specs:
            if name in metrics:
                continue
            try:
                owner, _ = find_metric(name)
            except UsageError:
                hint = "no flatcli measure reports it"
            else:
                hint = (
                    f"other options of `flatcli {command}` compute it"
                    if owner.command == command
                    else f"`flatcli {owner.command}` reports it"
                )
            raise UsageError(
                f"{flag} {name}: this run does not report {name} ({hint}); "
                f"its metrics: {', '.join(metrics)}"
            )


@dataclass
class Context(Run):
    """One loaded checkpoint (a :class:`~flatcli.io.load.Run`) as a measure receives it: the
    progress callback of its row, and ``row``: keys a measure adds to its report entry (kept
    when it fails later, e.g. ``rank``'s gap)."""

    progress: ProgressFn = no_progress
    row: dict[str, Any] = field(default_factory=dict)


class Sink(Protocol):
    """Where a run's progress, messages and partial reports go (the command line's output)."""

    def overall(
        self, command: str, total: int
    ) -> contextlib.AbstractContextManager[Callable[[], None]]:
        """A context whose value advances the run's overall progress by one checkpoint."""
        ...

    def checkpoint(self, name: str) -> contextlib.AbstractContextManager[ProgressFn]:
        """A context whose value is the progress callback of one checkpoint."""
        ...

    def warning(self, text: str) -> None:
        """A warning line."""
        ...

    def failed(self, path: Path, error: BaseException) -> None:
        """Checkpoint ``path`` failed with ``error`` (the run goes on)."""
        ...

    def partial(self, report: dict[str, Any]) -> None:
        """The report so far (rewritten after every checkpoint)."""
        ...


class SilentSink:
    """A :class:`Sink` that shows nothing: the Python API's default."""

    @contextlib.contextmanager
    def overall(self, command: str, total: int) -> Iterator[Callable[[], None]]:
        yield lambda: None

    @contextlib.contextmanager
    def checkpoint(self, name: str) -> Iterator[ProgressFn]:
        yield no_progress

    def warning(self, text: str) -> None:
        warnings.warn(text, stacklevel=2)

    def failed(self, path: Path, error: BaseException) -> None:
        pass

    def partial(self, report: dict[str, Any]) -> None:
        pass


@dataclass
class Outcome:
    """What a run produced: its report rows, whether it finished, and its exit code."""

    command: str
    config: dict[str, Any]
    environment: dict[str, Any]
    results: list[dict[str, Any]]
    interrupted: bool = False
    failure: int = 0
    """The largest exit code of a failed checkpoint (2: a usage error found while loading it)."""

    def report(self, *, interrupted: bool | None = None, **extra: Any) -> dict[str, Any]:
        """The JSON report (``flatcli/report-v1``), with ``extra`` top-level keys;
        ``interrupted`` overrides the outcome's own flag (True while the run goes on)."""
        from flatcli.io.report import _jsonable

        stopped = self.interrupted if interrupted is None else interrupted
        rep = build_report(
            self.command, self.config, self.environment, self.results, interrupted=stopped
        )
        rep.update({k: _jsonable(v) for k, v in extra.items() if v is not None})
        return rep


Measure = Callable[[Context], Any]
"""``measure(ctx) -> result`` with ``result.metrics()`` and ``result.details()``."""


def run_checkpoints(
    command: str,
    checkpoints: Sequence[str | Path],
    measure: Measure,
    *,
    load_options: LoadOptions | None = None,
    config: dict[str, Any] | None = None,
    gates: Gates | None = None,
    metrics: Sequence[str] | None = None,
    sink: Sink | None = None,
    shard: str = "data",
    row_keys: dict[str, Any] | None = None,
) -> Outcome:
    """Take every checkpoint of ``checkpoints`` (directories expanded) through ``measure``.

    Args:
        command: the command's name (the report's ``command``).
        checkpoints: files and directories.
        measure: ``measure(ctx) -> result`` for one loaded checkpoint (:class:`Context`).
        load_options: how to load each checkpoint.
        config: the command's own options, for the report's ``config``.
        gates: CI gates, checked against ``metrics`` before any work.
        metrics: the metric keys this run reports (None: gates are checked after the run).
        sink: where progress, messages and partial reports go (default: nowhere).
        shard: under torchrun, ``"data"`` (every process measures every checkpoint on its
            share of the examples) or ``"checkpoints"`` (every process measures its own share of
            the checkpoints alone; the rows are gathered at the end).
        row_keys: keys every row has beyond the report's (with these defaults; a measure sets
            them through ``ctx.row``), e.g. ``rank``'s gap, also on a checkpoint that failed.

    Returns:
        The :class:`Outcome`. Ctrl-C ends the run early with ``interrupted=True`` and every
        finished row.

    Raises:
        UsageError: bad options, an unknown or missing dataset, a gate on a metric the run
            does not report (before any work).
    """
    opts = load_options or LoadOptions()
    gates = gates or Gates()
    sink = sink or SilentSink()
    opts.validate()
    check_gates(gates, metrics, command)
    device = setup_device(opts.device)
    dtype = dtype_of(opts.dtype)
    model = parse_model_option(opts.model) if opts.model else None
    paths = expand_checkpoints([Path(p) for p in checkpoints])
    datasets = DatasetCache(opts.data_dir, opts.download)
    if opts.dataset is not None:
        # an unknown or missing dataset (or text too short for --seq-len) is a usage error
        datasets.get(opts.dataset, seq_len=opts.seq_len)
    environment = environment_info(device, dtype, world_size=distributed.world_size())
    outcome = Outcome(
        command, {**(config or {}), **opts.load_config(), **gates.gate_config()}, environment, []
    )
    sharded = shard == "checkpoints" and distributed.active()
    mine = distributed.split_items(list(paths)) if sharded else paths
    losses: list[str] = []  # the loss of every loaded checkpoint: config.loss names the one used

    def one(path: Path) -> tuple[dict[str, Any], int]:
        with _warnings_as_lines(path.name, sink), sink.checkpoint(path.name) as progress:
            return _measure_one(
                path,
                opts,
                model,
                datasets,
                device,
                dtype,
                measure,
                progress,
                sink,
                environment if not sharded else None,
                collective=not sharded,
                losses=losses,
            )

    with distributed.local_work() if sharded else contextlib.nullcontext():
        try:
            with sink.overall(command, len(mine)) as advance:
                for path in mine:
                    entry, code = one(path)
                    entry = {**entry, **{k: entry.get(k, v) for k, v in (row_keys or {}).items()}}
                    outcome.failure = max(outcome.failure, code)
                    outcome.results.append(entry)
                    if opts.loss is None and losses:
                        used = list(dict.fromkeys(losses))
                        outcome.config["loss"] = used[0] if len(used) == 1 else used
                    sink.partial(outcome.report(interrupted=True))
                    advance()
        except KeyboardInterrupt:
            outcome.interrupted = True
    if sharded:
        shares = distributed.gather_objects((outcome.results, outcome.failure, outcome.interrupted))
        outcome.results = [row for share in shares for row in share[0]]
        outcome.failure = max(share[1] for share in shares)
        outcome.interrupted = any(share[2] for share in shares)
    return outcome


def setup_device(name: str) -> Any:
    """The device ``name`` stands for (``auto``: CUDA when there is one), after joining the
    torchrun process group (a no-op in one process): ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    device = resolve_device(name)
    distributed.init(device)
    return distributed.device_for(device)


def _measure_one(
    path: Path,
    opts: LoadOptions,
    model: Any,
    datasets: DatasetCache,
    device: Any,
    dtype: Any,
    measure: Measure,
    progress: ProgressFn,
    sink: Sink,
    environment: dict[str, Any] | None,
    *,
    collective: bool,
    losses: list[str] | None = None,
) -> tuple[dict[str, Any], int]:
    """Load and measure one checkpoint: its report entry (with the error, if it failed) and
    the exit code its failure calls for (0 when measured; 2 for a usage error while loading,
    such as a spec beside it that cannot be built, or from a registered measure's check on
    the loaded model, such as ``--top-k`` above the parameter count; else 1)."""
    start = time.perf_counter()
    sha, num_params, loading, ctx = None, None, True, None
    agree = distributed.agree if collective else _raise_if
    try:
        failed = None
        try:
            run = load(path, model, device=device, dtype=dtype, datasets=datasets, **opts.data())
            ctx = Context(**{f.name: getattr(run, f.name) for f in fields(Run)}, progress=progress)
            if losses is not None:
                losses.append(run.loss)
        except Exception as e:  # noqa: BLE001 - every process must learn of it (below)
            failed = e
        # under torchrun: no process measures (collectives) unless every process loaded
        agree(failed, f"loading {path.name}")
        assert ctx is not None
        loading = False
        sha, num_params = ctx.checkpoint.sha256, ctx.num_params
        if environment is not None:
            environment.update(distributed.environment(int(ctx.x.shape[0])))
        try:
            result, failed = measure(ctx), None
        except Exception as e:  # noqa: BLE001 - every process must learn of it (below)
            failed = e
        agree(failed, f"measuring {path.name}")
        entry = result_entry(
            str(path),
            sha256=sha,
            num_params=num_params,
            metrics=result.metrics(),
            details=result.details(),
            seconds=time.perf_counter() - start,
        )
        return {**entry, **ctx.row}, 0
    except Exception as e:  # noqa: BLE001 - one bad checkpoint must not stop the others
        if distributed.is_main() or not collective:
            sink.failed(path, e)
        entry = result_entry(
            str(path),
            sha256=sha,
            num_params=num_params,
            seconds=time.perf_counter() - start,
            error=e,
        )
        if ctx is not None:
            entry = {**entry, **ctx.row, "metrics": {}, "error": entry["error"]}
        # A spec or dataset that cannot be used is bad usage (2) whether it came from an
        # option or from beside the checkpoint, and so is a request a measure's check refuses
        # on the loaded model before any work (``before_work``: registry.check); a checkpoint
        # that failed to load or measure otherwise is 1; ``usage`` marks a peer's UsageError
        usage = isinstance(e, UsageError) or getattr(e, "usage", False)
        before = loading or getattr(e, "before_work", False)
        return entry, 2 if before and usage else 1


def _raise_if(error: BaseException | None, what: str) -> None:
    if error is not None:
        raise error


@contextlib.contextmanager
def _warnings_as_lines(name: str, sink: Sink) -> Iterator[None]:
    """flatcli's warnings inside the block (a cost estimate, a dataset that differs from the
    recorded one, an optimisation that had not converged) passed to the sink as they are
    raised, one line each, on the main process: a cost estimate comes before the work."""
    with warnings.catch_warnings():
        warnings.filterwarnings("always", category=UserWarning, module=r"flatcli\.")
        previous = warnings.showwarning

        def show(message: Any, category: type[Warning], *where: Any, **kw: Any) -> None:
            if not distributed.is_main():
                return
            if issubclass(category, UserWarning):
                sink.warning(f"{name}: {message}")
            else:
                previous(message, category, *where, **kw)

        warnings.showwarning = show
        yield


def compute_cached(measure: Any, ctx: Run, config: Any, cache: Any, fingerprint: str) -> dict:
    """A registered measure's ``{"metrics", "details", "seconds"}`` on ``ctx``, from ``cache``
    when it holds this (checkpoint, measure, config, data, device, dtype), else computed and
    stored. Values pass through JSON either way, so cached and fresh ones compare equal."""
    from flatcli.io.report import _jsonable, finite_metrics
    from flatcli.measures.registry import compute

    if is_dataclass(config) and getattr(config, "loss", "") is None:
        config = replace(config, loss=ctx.loss)  # the key names the loss the run takes
    key = cache.key(
        ctx.checkpoint.sha256, measure.name, config, fingerprint, str(ctx.device), str(ctx.dtype)
    )
    value = cache.get(key)
    if value is None:
        t0 = time.perf_counter()
        result = compute(measure, ctx, config, progress=getattr(ctx, "progress", None))
        took = time.perf_counter() - t0
        details = _jsonable(dict(result.details()))
        metrics = finite_metrics(dict(result.metrics()), details)
        value = json.loads(
            json.dumps(
                {"metrics": _jsonable(metrics), "details": details, "seconds": took},
                allow_nan=False,
            )
        )
        cache.put(key, value)
    return value


def registered(measure: Any, config: Any) -> Measure:
    """The runner's ``measure(ctx)`` for a registered measure (a name or a
    :class:`~flatcli.measures.registry.Measure`) with ``config``; the config's ``seed`` and
    ``batch_size``, where it has them, are the run's."""
    from flatcli.measures.registry import compute, get_measure

    measure = get_measure(measure) if isinstance(measure, str) else measure
    names = {f.name for f in fields(config)}
    own = {k: None for k in ("seed", "batch_size") if k in names}

    def on_checkpoint(ctx: Context) -> Any:
        cfg = replace(config, **{k: getattr(ctx, k) for k in own}) if own else config
        return compute(measure, ctx, cfg, progress=ctx.progress)

    return on_checkpoint
