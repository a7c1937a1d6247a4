"""The loop every analysis command shares: checkpoints in, a row each, table and report out.

A command module parses its own options into a config, then calls :func:`run_analysis` with a
``measure(ctx) -> result`` function (``result.metrics()``, ``result.details()``). Loading, data,
devices, per-checkpoint error isolation, tables, JSON reports, gates and exit codes live here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import typer
from torch import Tensor, nn

from flatcli.cli.errors import describe, handle_errors, print_error
from flatcli.cli.options import CommonOptions
from flatcli.cli.output import progress_bar, render_table
from flatcli.errors import CheckpointError, UsageError
from flatcli.io.checkpoint import (
    Checkpoint,
    check_finite,
    expand_checkpoints,
    load_checkpoint,
    match_state_dict,
)
from flatcli.io.report import build_report, environment_info, result_entry, write_report
from flatcli.io.spec import (
    ModelSpec,
    build_model,
    fill_data_kwargs,
    parse_model_option,
    resolve_spec,
)
from flatcli.progress import ProgressFn


class MeasureResult(Protocol):
    """What a measure returns: flat metrics and JSON-ready details."""

    def metrics(self) -> dict[str, Any]: ...

    def details(self) -> dict[str, Any]: ...


@dataclass
class AnalysisContext:
    """Everything a measure needs for one checkpoint, already on the device and in the dtype."""

    checkpoint: Checkpoint
    spec: ModelSpec
    model: nn.Module
    dataset: Any
    x: Tensor
    y: Tensor
    num_classes: int
    device: torch.device
    dtype: torch.dtype
    seed: int
    batch_size: int | None
    progress: ProgressFn
    extra: dict = field(default_factory=dict)


Measure = Callable[[AnalysisContext], MeasureResult]


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else MPS, else CPU; an unavailable explicit device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps; got '{name}'") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {name} asked for CUDA but torch sees no CUDA device; use --device cpu"
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise UsageError(
            f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(
            "--device mps asked for Apple MPS, which is not available here; use --device cpu"
        )
    return device


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


class _DataCache:
    """Datasets loaded once per (name, normalisation) for a whole batch of checkpoints."""

    def __init__(self, common: CommonOptions) -> None:
        self.common = common
        self._cache: dict[str, Any] = {}

    def get(self, name: str, normalization: Any = "default"):
        from flatcli.data import load_dataset

        key = json.dumps([name, normalization], sort_keys=True, default=str)
        if key not in self._cache:
            self._cache[key] = load_dataset(
                name,
                data_dir=self.common.data_dir,
                download=self.common.download,
                normalization=normalization,
            )
        return self._cache[key]


def prepare_context(
    path: Path,
    common: CommonOptions,
    model_option: ModelSpec | None,
    data: _DataCache,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressFn,
) -> AnalysisContext:
    """Load one checkpoint, build and fill its model, and fetch its data on the device."""
    from flatcli.data import subset

    ckpt = load_checkpoint(path, unsafe=common.unsafe_load)
    spec = resolve_spec(path, model_option, ckpt.spec)
    meta = ckpt.meta or {}
    name = common.dataset or meta.get("dataset") or spec.dataset
    if name is None:
        raise CheckpointError(f"no dataset recorded for {path}: pass --dataset")
    normalization = (
        meta.get("normalization", "default") if name == meta.get("dataset") else "default"
    )
    dataset = data.get(name, normalization)
    spec = fill_data_kwargs(spec, dataset.num_classes, tuple(dataset.input_shape))
    model = build_model(spec).to(
        device=device, dtype=dtype
    )  # cast first: float64 weights stay exact
    state = match_state_dict(model, ckpt.state_dict, source=str(path))
    check_finite(state, source=str(path))
    model.load_state_dict(state)
    model.eval()
    if common.split in ("trained", "trained-clean"):
        from flatcli.train.prepare import rebuild_train_split

        if name != meta.get("dataset"):
            raise CheckpointError(
                f"--split trained rebuilds the data {path.name} was trained on, from dataset "
                f"{meta.get('dataset')!r}; drop --dataset {name} or use --split train"
            )
        split = rebuild_train_split(
            dataset.train, dataset.num_classes, meta, clean=common.split == "trained-clean"
        )
    else:
        split = dataset.split(common.split)
    split = subset(split, common.max_examples, common.seed)
    x = split.x.to(device=device, dtype=dtype)
    y = split.y.to(device=device)
    _check_fits(model, x, y, dataset.num_classes, spec, name, path)
    return AnalysisContext(
        checkpoint=ckpt,
        spec=spec,
        model=model,
        dataset=dataset,
        x=x,
        y=y,
        num_classes=dataset.num_classes,
        device=device,
        dtype=dtype,
        seed=common.seed,
        batch_size=common.batch_size,
        progress=progress,
    )


def _check_fits(
    model: nn.Module, x: Tensor, y: Tensor, num_classes: int, spec: ModelSpec, name: str, path: Path
) -> None:
    shape = tuple(x.shape[1:])
    if spec.input_shape is not None and tuple(spec.input_shape) != shape:
        raise CheckpointError(
            f"dataset {name} has inputs of shape {list(shape)} but the spec of {path.name} "
            f"expects {list(spec.input_shape)}; pick the matching --dataset or --model"
        )
    try:
        with torch.no_grad():
            out = model(x[:2])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"inputs of shape {list(shape)} from dataset {name} do not fit the model of "
            f"{path.name} "
            f"({first}); pick the matching --dataset or --model"
        ) from e
    if out.ndim != 2:
        raise CheckpointError(
            f"the model of {path.name} returns outputs of shape {list(out.shape)}; flatcli needs "
            "logits of shape (batch, classes)"
        )
    if out.shape[1] < num_classes or (y.numel() and int(y.max()) >= out.shape[1]):
        raise CheckpointError(
            f"the model of {path.name} has {out.shape[1]} outputs but dataset {name} has "
            f"{num_classes} classes; set num_classes in the spec or pick the matching --dataset"
        )


def run_analysis(
    command: str,
    common: CommonOptions,
    config: dict[str, Any],
    measure: Measure,
    columns: Sequence[tuple[str, str]],
    *,
    rows: Callable[[str, dict[str, Any]], list[dict[str, Any]]] | None = None,
    after: Callable[[list[dict[str, Any]]], None] | None = None,
) -> None:
    """Measure every checkpoint of ``common.checkpoints``, render, report, gate, and exit.

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

    Raises:
        typer.Exit: always, with the CONTRACTS.md exit code.
    """
    with handle_errors(common.debug):
        common.validate()
        gates = (
            parse_gates(common.fail_above, "--fail-above"),
            parse_gates(common.fail_below, "--fail-below"),
        )
        model_option = parse_model_option(common.model) if common.model else None
        device = resolve_device(common.device)
        dtype = {"float32": torch.float32, "float64": torch.float64}[common.dtype]
        paths = expand_checkpoints(common.checkpoints)
        data = _DataCache(common)
        if common.dataset is not None:
            data.get(
                common.dataset
            )  # an unknown or missing dataset is a usage error for the whole run

    results: list[dict[str, Any]] = []
    failures = 0
    with progress_bar(not common.quiet) as bar:
        overall = bar.add_task(f"{command}", total=len(paths)) if bar else None
        for path in paths:
            label = str(path)
            inner = bar.add_task(f"  {path.name}", total=None) if bar else None

            def progress(
                description: str, completed: int, total: int, _task=inner, _name=path.name
            ) -> None:
                if bar is not None:
                    bar.update(
                        _task,
                        description=f"  {_name}: {description}",
                        completed=completed,
                        total=total,
                    )

            start = time.perf_counter()
            sha, num_params = None, None
            try:
                ctx = prepare_context(path, common, model_option, data, device, dtype, progress)
                sha = ctx.checkpoint.sha256
                num_params = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
                result = measure(ctx)
                entry = result_entry(
                    label,
                    sha256=sha,
                    num_params=num_params,
                    metrics=result.metrics(),
                    details=result.details(),
                    seconds=time.perf_counter() - start,
                )
            except Exception as e:  # noqa: BLE001 - one bad checkpoint must not stop the others
                if isinstance(e, KeyboardInterrupt):
                    raise
                failures += 1
                print_error(f"{path}: {describe(e)}", e, common.debug)
                entry = result_entry(
                    label,
                    sha256=sha,
                    num_params=num_params,
                    seconds=time.perf_counter() - start,
                    error=e,
                )
            results.append(entry)
            if bar is not None:
                bar.remove_task(inner)
                bar.advance(overall)

    report = build_report(
        command, {**config, **common.to_config()}, environment_info(device, dtype), results
    )
    if not common.quiet:
        table_rows: list[dict[str, Any]] = []
        for entry in results:
            name = Path(entry["checkpoint"]).name
            if entry["error"] is not None:
                table_rows.append(
                    {"checkpoint": name, columns[0][0]: "error"}
                    if columns
                    else {"checkpoint": name}
                )
            elif rows is not None:
                table_rows.extend(rows(name, entry))
            else:
                table_rows.append({"checkpoint": name, **entry["metrics"]})
        render_table(
            f"flatcli {command}",
            [("checkpoint", "checkpoint"), *columns],
            table_rows,
            stderr=common.json == "-",
        )
    if common.json:
        write_report(report, common.json)
    if after is not None:
        try:
            after(results)
        except Exception as e:  # noqa: BLE001 - the report is out; report the error, exit 1
            failures += 1
            print_error(describe(e), e, common.debug)

    if failures:
        raise typer.Exit(1)
    code = _apply_gates(results, *gates)
    raise typer.Exit(code)


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
