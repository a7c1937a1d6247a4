"""The loop every analysis command shares: checkpoints in, a row each, table and report out.

A command module parses its own options into a config, then calls :func:`run_analysis` with a
``measure(ctx) -> result`` function (``result.metrics()``, ``result.details()``). Loading, data,
devices, per-checkpoint error isolation, tables, JSON reports, gates and exit codes live here.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
import typer

from flatcli import distributed
from flatcli.cli.errors import describe, print_error, print_warning
from flatcli.cli.options import CommonOptions
from flatcli.cli.output import Output
from flatcli.errors import UsageError
from flatcli.io.checkpoint import expand_checkpoints
from flatcli.io.load import DatasetCache, Run, load, resolve_device, resolve_dtype
from flatcli.io.report import build_report, environment_info, result_entry
from flatcli.io.spec import ModelSpec, parse_model_option
from flatcli.progress import ProgressFn, no_progress


class MeasureResult(Protocol):
    """What a measure returns: flat metrics and JSON-ready details."""

    def metrics(self) -> dict[str, Any]: ...

    def details(self) -> dict[str, Any]: ...


@dataclass
class AnalysisContext(Run):
    """A :class:`~flatcli.io.load.Run` plus the progress callback of one command's run (the
    bar of its checkpoint) and scratch space for the command."""

    progress: ProgressFn = no_progress
    extra: dict = field(default_factory=dict)


Measure = Callable[[AnalysisContext], MeasureResult]


def parse_gates(specs: Sequence[str], flag: str) -> list[tuple[str, float]]:
    """Parse ``METRIC=VALUE`` gate options."""
    gates = []
    for s in specs:
        name, sep, value = s.partition("=")
        try:
            gates.append((name.strip(), float(value)))
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise UsageError(
                f"{flag} takes METRIC=VALUE (e.g. {flag} top_eigenvalue=50); got '{s}'"
            )
    return gates


class _DataCache(DatasetCache):
    """The datasets of one run, from the common options' --data-dir and --download."""

    def __init__(self, common: CommonOptions) -> None:
        super().__init__(common.data_dir, common.download)


def prepare_context(
    path: Path,
    common: CommonOptions,
    model_option: ModelSpec | None,
    data: DatasetCache,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressFn,
) -> AnalysisContext:
    """Load one checkpoint (:func:`flatcli.io.load.load`) with the common options applied."""
    run = load(
        path,
        model=model_option,
        dataset=common.dataset,
        split=common.split,
        max_examples=common.max_examples,
        seed=common.seed,
        device=device,
        dtype=dtype,
        unsafe_load=common.unsafe_load,
        batch_size=common.batch_size,
        datasets=data,
    )
    return AnalysisContext(**{f.name: getattr(run, f.name) for f in fields(Run)}, progress=progress)


def run_analysis(
    command: str,
    common: CommonOptions,
    config: dict[str, Any],
    measure: Measure,
    columns: Sequence[tuple[str, str]],
    *,
    rows: Callable[[str, dict[str, Any]], list[dict[str, Any]]] | None = None,
    after: Callable[[list[dict[str, Any]]], None] | None = None,
    metrics: Sequence[str] | None = None,
) -> None:
    """Measure every checkpoint of ``common.checkpoints``, render, report, gate, and exit.

    Errors raised here (bad options, unknown datasets, an unwritable ``--json`` path) propagate
    to the command's one error handler (:func:`flatcli.cli.errors.handle_errors`); errors of
    one checkpoint are recorded in its result entry and the others still run. With ``--json
    PATH`` the report is rewritten (atomically) after every checkpoint; until the run ends it
    carries ``"interrupted": true``, so Ctrl-C (exit 130) or a crash leaves a valid report of
    every finished checkpoint that says the run did not finish.

    Args:
        command: the subcommand's name (report ``command``).
        common: the parsed common options.
        config: the command's own options (merged into the report ``config``).
        measure: ``measure(ctx) -> result`` for one checkpoint.
        columns: table columns as (metric key, header); the checkpoint column comes first.
        rows: optional ``rows(checkpoint_label, result_entry) -> table rows`` for commands that
            show several rows per checkpoint (e.g. one per layer).
        after: optional ``after(result_entries)``, called once the report is written and before
            the exit code is decided (e.g. to draw a figure); an error in it is printed as one
            ``error:`` line and makes the exit code 1, without losing the report.
        metrics: the metric keys this run reports (from the measure registry); a gate on any
            other key is then a usage error before any work. None: checked after the run.

    Raises:
        typer.Exit: always, with the documented exit code.
    """
    common.validate()
    gates = (
        parse_gates(common.fail_above, "--fail-above"),
        parse_gates(common.fail_below, "--fail-below"),
    )
    if metrics is not None:
        check_gate_metrics(gates, metrics, command)
    device = resolve_device(common.device)
    distributed.init(device)  # joins the torchrun process group (a no-op in one process)
    device = distributed.device_for(device)  # cuda -> cuda:LOCAL_RANK under torchrun
    main = distributed.is_main()  # under torchrun only rank 0 prints and writes
    out = Output(common.json if main else None, common.quiet or not main)
    out.check()
    model_option = parse_model_option(common.model) if common.model else None
    dtype = resolve_dtype(common.dtype)
    paths = expand_checkpoints(common.checkpoints)
    data = _DataCache(common)
    if common.dataset is not None:
        data.get(common.dataset)  # an unknown or missing dataset is a usage error for the run

    results: list[dict[str, Any]] = []
    run_config = {**config, **common.to_config()}
    environment = environment_info(device, dtype, world_size=distributed.world_size())

    def report(interrupted: bool) -> dict[str, Any]:
        return build_report(command, run_config, environment, results, interrupted=interrupted)

    failure = 0  # the largest exit code of a failed checkpoint (2: bad usage, e.g. its spec)
    try:
        with out.progress() as bar:
            overall = bar.add_task(f"{command}", total=len(paths)) if bar else None
            for path in paths:
                entry, code = _measure_one(
                    path, common, model_option, data, device, dtype, measure, bar, environment
                )
                failure = max(failure, code)
                results.append(entry)
                out.report(report(interrupted=True), partial=True)
                if bar is not None:
                    bar.advance(overall)
    except BaseException:
        out.report(report(interrupted=True))  # every finished checkpoint, marked unfinished
        raise

    final = report(interrupted=False)
    table_rows: list[dict[str, Any]] = []
    for entry in results:
        name = Path(entry["checkpoint"]).name
        if entry["error"] is not None:
            table_rows.append(
                {"checkpoint": name, columns[0][0]: "error"} if columns else {"checkpoint": name}
            )
        elif rows is not None:
            table_rows.extend(rows(name, entry))
        else:
            table_rows.append({"checkpoint": name, **entry["metrics"]})
    out.table(f"flatcli {command}", [("checkpoint", "checkpoint"), *columns], table_rows)
    out.report(final)
    if after is not None and main:
        try:
            after(results)
        except Exception as e:  # noqa: BLE001 - the report is out; report the error, exit 1
            failure = max(failure, 1)
            print_error(describe(e), e, common.debug)

    if failure:
        raise typer.Exit(failure)
    raise typer.Exit(_apply_gates(results, *gates))


def _measure_one(
    path: Path,
    common: CommonOptions,
    model_option: ModelSpec | None,
    data: DatasetCache,
    device: torch.device,
    dtype: torch.dtype,
    measure: Measure,
    bar: Any,
    environment: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], int]:
    """Load and measure one checkpoint: its result entry (with the error, if it failed) and
    the exit code its failure calls for (0 when it was measured; 2 for a usage error while
    loading, such as a spec beside it that cannot be read or built, as for a bad --model;
    else 1)."""
    start = time.perf_counter()
    sha, num_params, loading = None, None, True
    with _warnings_as_lines(path.name), _progress_task(bar, path.name) as progress:
        try:
            ctx, failed = None, None
            try:
                ctx = prepare_context(path, common, model_option, data, device, dtype, progress)
            except Exception as e:  # noqa: BLE001 - every process must learn of it (below)
                failed = e
            # under torchrun: no process measures (collectives) unless every process loaded
            distributed.agree(failed, f"loading {path.name}")
            assert ctx is not None
            loading = False
            sha = ctx.checkpoint.sha256
            num_params = ctx.num_params
            if environment is not None:
                environment.update(distributed.environment(int(ctx.x.shape[0])))
            try:
                result, failed = measure(ctx), None
            except Exception as e:  # noqa: BLE001 - every process must learn of it (below)
                failed = e
            distributed.agree(failed, f"measuring {path.name}")
            entry = result_entry(
                str(path),
                sha256=sha,
                num_params=num_params,
                metrics=result.metrics(),
                details=result.details(),
                seconds=time.perf_counter() - start,
            )
            return entry, 0
        except Exception as e:  # noqa: BLE001 - one bad checkpoint must not stop the others
            if distributed.is_main():
                print_error(f"{path}: {describe(e)}", e, common.debug)
            entry = result_entry(
                str(path),
                sha256=sha,
                num_params=num_params,
                seconds=time.perf_counter() - start,
                error=e,
            )
            # A spec or dataset that cannot be used is bad usage (2) whether it came
            # from an option or from beside the checkpoint; a checkpoint that failed to load or
            # measure otherwise is 1 (even a UsageError of the measure, e.g. too few examples);
            # ``usage`` marks a peer process's UsageError
            usage = isinstance(e, UsageError) or getattr(e, "usage", False)
            return entry, 2 if loading and usage else 1


@contextlib.contextmanager
def _progress_task(bar: Any, name: str) -> Iterator[ProgressFn]:
    """A sub-task of the progress ``bar`` for one checkpoint (removed afterwards) and the
    progress callback that drives it; :func:`no_progress` without a bar."""
    if bar is None:
        yield no_progress
        return
    inner = bar.add_task(f"  {name}", total=None)

    def progress(description: str, completed: int, total: int) -> None:
        bar.update(inner, description=f"  {name}: {description}", completed=completed, total=total)

    try:
        yield progress
    finally:
        bar.remove_task(inner)


@contextlib.contextmanager
def _warnings_as_lines(name: str) -> Iterator[None]:
    """flatcli's own warnings inside the block (a dataset that differs from the recorded one,
    an optimisation that had not converged) printed afterwards as one line each, on rank 0."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("always", category=UserWarning, module=r"flatcli\.")
            yield
    finally:
        if distributed.is_main():
            for w in caught:
                if issubclass(w.category, UserWarning):
                    print_warning(f"{name}: {w.message}")
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def check_gate_metrics(
    gates: tuple[list[tuple[str, float]], list[tuple[str, float]]],
    metrics: Sequence[str],
    command: str,
) -> None:
    """A gate on a metric this run does not report is a usage error (before any work).

    Raises:
        UsageError: naming the gate, the metrics this run reports, and where the gate's metric
            comes from when some measure reports it.
    """
    from flatcli.measures.registry import find_metric

    for flag, specs in (("--fail-above", gates[0]), ("--fail-below", gates[1])):
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


def _apply_gates(
    results: list[dict[str, Any]], above: list[tuple[str, float]], below: list[tuple[str, float]]
) -> int:
    failed = False
    for name, limit, sign in [(n, v, ">") for n, v in above] + [(n, v, "<") for n, v in below]:
        if results and all(name not in r["metrics"] for r in results):
            known = sorted({k for r in results for k in r["metrics"]})
            print_error(f"gate metric '{name}' is not in this report; metrics: {', '.join(known)}")
            return 2
        for r in results:
            value = r["metrics"].get(name)
            if value is None:
                print_error(
                    f"gate {name}{sign}{limit:g} cannot be checked for {r['checkpoint']}: "
                    "value is null"
                )
                failed = True
            elif (sign == ">" and value > limit) or (sign == "<" and value < limit):
                print_error(
                    f"gate failed: {r['checkpoint']}: {name} = {value:.6g} {sign} {limit:g}"
                )
                failed = True
    return 3 if failed else 0
