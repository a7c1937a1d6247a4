"""Rank a sweep of checkpoints: measure each (cached), read its gap, and compute the statistics.

:func:`rank_checkpoints` is the library behind ``flatcli rank``. Per checkpoint it loads the
model once (the datasets once for the whole sweep), takes its generalization gap and
hyperparameters (:mod:`flatcli.rank.sweep`), computes every requested measure through the
measure registry, or takes it from the :class:`~flatcli.rank.cache.ResultCache`, and isolates
failures: a checkpoint that fails becomes an error row and the others are still ranked.
:func:`sweep_statistics` turns the rows into the per-metric statistics of
:mod:`flatcli.rank.stats`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatcli import distributed
from flatcli.errors import CheckpointError, UsageError
from flatcli.measures.registry import (
    Direction,
    Measure,
    compute,
    find_metric,
    make_config,
    reported_keys,
)
from flatcli.progress import ProgressFn, no_progress
from flatcli.rank import stats
from flatcli.rank.cache import ResultCache, config_dict, data_fingerprint
from flatcli.rank.sweep import (
    GAP_KINDS,
    SweepTable,
    detect_axes,
    evaluate_generalization,
    gap_of,
    read_table,
    record_generalization,
    record_hyperparameters,
)

__all__ = [
    "LoadOptions",
    "RankConfig",
    "MeasurePlan",
    "plan_measures",
    "RankResult",
    "rank_checkpoints",
    "sweep_statistics",
    "metric_sign",
]


@dataclass
class LoadOptions:
    """How each checkpoint is loaded (the arguments of :func:`flatcli.load`)."""

    model: str | None = None
    dataset: str | None = None
    split: str = "train"
    max_examples: int | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    data_dir: str | Path | None = None
    download: bool = False
    unsafe_load: bool = False
    batch_size: int | None = None


@dataclass
class RankConfig:
    """What to rank and how (the options of ``flatcli rank``).

    Attributes:
        metrics: metric keys of the registry to compute and rank (e.g. ``gamma_hat``).
        options: per measure name, fields of its config (e.g. ``{"gamma": {"samples": 50}}``).
        gap: ``acc`` (train − test accuracy) or ``loss`` (test − train loss).
        evaluate: measure accuracy and loss on the data instead of reading the record.
        table: a CSV of gaps and hyperparameters (overrides records and ``evaluate``).
        axes: the hyperparameter axes (default: every hyperparameter that varies, but seed).
        tau: Kendall τ variant, ``a`` (Jiang et al. 2020) or ``b``.
        bootstrap: resamples of the bootstrap interval of τ.
        level: its confidence level.
        test_size: examples behind each test accuracy (the robust sign-error's noise filter);
            default: the size of the dataset's test split (not with ``table``).
        min_ess: smallest effective sample size of an environment of the robust sign-error.
        seed: the seed of the bootstrap resamples (the CLI passes ``--seed``).
    """

    metrics: tuple[str, ...]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    gap: str = "acc"
    evaluate: bool = False
    table: str | Path | None = None
    axes: tuple[str, ...] | None = None
    tau: str = "a"
    bootstrap: int = 1000
    level: float = 0.95
    test_size: int | None = None
    min_ess: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.metrics = tuple(dict.fromkeys(self.metrics))
        if not self.metrics:
            raise UsageError("--measures needs at least one metric, e.g. --measures gamma_hat")
        if self.gap not in GAP_KINDS:
            raise UsageError(f"--gap must be acc or loss; got {self.gap!r}")
        if self.tau not in stats.TAU_VARIANTS:
            raise UsageError(f"--tau must be a or b; got {self.tau!r}")
        if not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise UsageError(
                f"--bootstrap must be a number of resamples >= 0; got {self.bootstrap}"
            )
        if not 0 < self.level < 1:
            raise UsageError(f"--level must be in (0, 1); got {self.level}")
        if self.test_size is not None and self.test_size < 1:
            raise UsageError(f"--test-size must be >= 1; got {self.test_size}")
        if not self.min_ess >= 0:
            raise UsageError(f"--min-ess must be >= 0; got {self.min_ess}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options (the report's ``config``)."""
        out = dataclasses.asdict(self)
        out["metrics"] = list(self.metrics)
        out["table"] = str(self.table) if self.table is not None else None
        out["axes"] = list(self.axes) if self.axes is not None else None
        return out


@dataclass
class MeasurePlan:
    """One registered measure to compute on every checkpoint, for the metric keys asked of it."""

    measure: Measure
    keys: list[str]
    options: dict[str, Any]


def metric_sign(direction: Direction) -> int:
    """+1 for a metric whose larger values mean sharper (or neutral), −1 for flatter."""
    return -1 if direction == Direction.FLATTER else 1


def _tailor(measure: Measure, keys: Sequence[str], options: dict[str, Any]) -> dict[str, Any]:
    """Options that make ``measure`` compute the requested ``keys`` and, where its config says
    which parts to compute, only those."""
    names = {f.name for f in dataclasses.fields(measure.config_type)}
    opts = dict(options)
    if "measures" in names and "measures" not in opts:
        base = []
        for k in keys:
            for suffix in ("_stderr", "_gap"):
                if k.endswith(suffix) and k[: -len(suffix)] in measure.keys:
                    k = k[: -len(suffix)]
            if k not in base:
                base.append(k)
        try:
            make_config(measure, None, **{**opts, "measures": tuple(base)})
            opts["measures"] = tuple(base)
        except (UsageError, ValueError, TypeError):
            pass
    if "top_k" in names and "top_k" not in opts:  # spectrum: only the eigenvalues asked for
        opts["top_k"] = 1 if any(k.startswith("top_eigen") for k in keys) else 0
    try:
        reported = set(reported_keys(measure, make_config(measure, None, **opts)))
    except UsageError as e:
        raise UsageError(f"--option {measure.name}: {e}") from None
    for k in keys:
        if k in reported:
            continue
        flag = k.removesuffix("_stderr")
        if flag in names and flag not in opts:  # e.g. spectrum's `trace` switch
            opts[flag] = True
    reported = set(reported_keys(measure, make_config(measure, None, **opts)))
    missing = [k for k in keys if k not in reported]
    if missing:
        raise UsageError(
            f"measure {measure.name} does not report {', '.join(missing)} with these options; "
            f"set its options with --option {measure.name}.FIELD=VALUE"
        )
    return opts


def plan_measures(
    metrics: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[list[MeasurePlan], dict[str, Direction]]:
    """Group the requested metric keys by the registered measure that reports them.

    Returns:
        The measures to compute (each once per checkpoint) and each metric's direction.

    Raises:
        UsageError: an unknown metric key (the message lists the valid ones), options for a
            measure that computes none of the metrics, or an option the measure does not have.
    """
    options = {k: dict(v) for k, v in (options or {}).items()}
    plans: dict[str, MeasurePlan] = {}
    directions: dict[str, Direction] = {}
    for key in metrics:
        measure, metric = find_metric(key)
        directions[key] = metric.direction
        plans.setdefault(measure.name, MeasurePlan(measure, [], {})).keys.append(key)
    stray = sorted(set(options) - set(plans))
    if stray:
        raise UsageError(
            f"--option for {', '.join(stray)}, which computes none of --measures "
            f"({', '.join(metrics)})"
        )
    for plan in plans.values():
        plan.options = _tailor(plan.measure, plan.keys, options.get(plan.measure.name, {}))
    return list(plans.values()), directions


@dataclass
class RankResult:
    """The rows (one per checkpoint, report-entry shaped), the statistics and the bookkeeping."""

    rows: list[dict[str, Any]]
    statistics: dict[str, dict[str, Any]]
    sweep: dict[str, Any]
    baseline: dict[str, Any] | None = None
    interrupted: bool = False
    cache_hits: int = 0
    cache_misses: int = 0
    timings: list[dict[str, float]] = field(default_factory=list)


def _jsonable_value(value: dict[str, Any]) -> dict[str, Any]:
    """A measure's output through JSON and back: cached and fresh values compare equal."""
    from flatcli.io.report import _jsonable, finite_metrics

    details = _jsonable(dict(value["details"]))
    metrics = finite_metrics(dict(value["metrics"]), details)
    text = json.dumps(
        {"metrics": _jsonable(metrics), "details": details, "seconds": value["seconds"]},
        allow_nan=False,
    )
    return json.loads(text)


class _Fingerprints:
    """Data fingerprints, hashed once per distinct set of examples."""

    def __init__(self, opts: LoadOptions) -> None:
        self.opts = opts
        self._memo: dict[str, str] = {}

    def of_run(self, run: Any) -> str:
        trained = run.split in ("trained", "trained-clean")
        memo = json.dumps(
            [
                id(run.dataset),
                run.split,
                self.opts.max_examples,
                run.seed,
                str(run.dtype),
                (run.record.get("train"), run.record.get("data_info")) if trained else None,
            ],
            sort_keys=True,
            default=str,
        )
        if memo not in self._memo:
            self._memo[memo] = data_fingerprint(run.x, run.y, run.split)
        return self._memo[memo]

    def of_dataset(self, run: Any) -> str:
        data = run.dataset
        memo = json.dumps([id(data), "whole", str(run.dtype)])
        if memo not in self._memo:
            parts = [data_fingerprint(data.train.x, data.train.y, "train")]
            if data.test is not None:
                parts.append(data_fingerprint(data.test.x, data.test.y, "test"))
            self._memo[memo] = "+".join(parts)
        return self._memo[memo]


def _generalization(
    run: Any,
    path: Path,
    config: RankConfig,
    table: SweepTable | None,
    cache: ResultCache,
    prints: _Fingerprints,
) -> tuple[dict[str, Any], dict[str, Hashable]]:
    """(generalization numbers with their ``source``, hyperparameters) of one checkpoint."""
    if table is not None:
        row = table.find(path)
        return {**row["generalization"], "source": "table"}, dict(row["hyperparameters"])
    hparams = record_hyperparameters(run.record or {}, run.spec)
    test_size = len(run.dataset.test) if run.dataset.test is not None else None
    if config.evaluate:
        key = cache.key(
            run.checkpoint.sha256,
            "evaluate",
            {"batch": 1024},
            prints.of_dataset(run),
            str(run.device),
            str(run.dtype),
        )
        value = cache.get(key)
        if value is None:
            value = evaluate_generalization(run)
            cache.put(key, value)
        return {**value, "source": "evaluate", "test_size": test_size}, hparams
    gen = record_generalization(run.record or {})
    if gen is None:
        raise CheckpointError(
            f"{path.name} has no training record with test accuracy and loss (not trained by "
            "flatcli train?): pass --evaluate to measure them, or --table with its gap"
        )
    return {**gen, "source": "record", "test_size": test_size}, hparams


def _measure_one(
    path: Path,
    plans: Sequence[MeasurePlan],
    config: RankConfig,
    opts: LoadOptions,
    table: SweepTable | None,
    cache: ResultCache,
    prints: _Fingerprints,
    datasets: Any,
    progress: ProgressFn,
    *,
    need_gap: bool = True,
) -> tuple[dict[str, Any], dict[str, float]]:
    """One checkpoint's row (report-entry shaped, plus ``gap`` and ``hyperparameters``)."""
    from flatcli.io.load import load

    start = time.perf_counter()
    timing = {"load": 0.0, "measure": 0.0, "total": 0.0}
    row: dict[str, Any] = {
        "checkpoint": str(path),
        "sha256": None,
        "num_params": None,
        "metrics": {},
        "details": {},
        "seconds": 0.0,
        "error": None,
        "gap": None,
        "hyperparameters": {},
    }
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    seconds = 0.0
    try:
        run = load(
            path,
            model=opts.model,
            dataset=opts.dataset,
            split=opts.split,
            max_examples=opts.max_examples,
            seed=opts.seed,
            device=opts.device,
            dtype=opts.dtype,
            unsafe_load=opts.unsafe_load,
            batch_size=opts.batch_size,
            datasets=datasets,
        )
        row["sha256"] = run.checkpoint.sha256
        row["num_params"] = run.num_params
        if need_gap:
            gen, hparams = _generalization(run, path, config, table, cache, prints)
            row["hyperparameters"] = hparams
            details["generalization"] = gen
            row["gap"] = gap_of(gen, config.gap)
            if row["gap"] is None:
                raise CheckpointError(
                    f"no {config.gap} gap for {path.name}: its {gen['source']} lacks "
                    + ("train_acc/test_acc" if config.gap == "acc" else "train_loss/test_loss")
                )
        timing["load"] = time.perf_counter() - start
        fingerprint = prints.of_run(run)
        for plan in plans:
            cfg = make_config(plan.measure, run, **plan.options)
            key = cache.key(
                run.checkpoint.sha256,
                plan.measure.name,
                cfg,
                fingerprint,
                str(run.device),
                str(run.dtype),
            )
            value = cache.get(key)
            if value is None:
                t0 = time.perf_counter()
                result = compute(plan.measure, run, cfg, progress=progress)
                took = time.perf_counter() - t0
                timing["measure"] += took
                value = _jsonable_value(
                    {"metrics": result.metrics(), "details": result.details(), "seconds": took}
                )
                cache.put(key, value)
            metrics.update(value["metrics"])
            details[plan.measure.name] = {**value["details"], "config": config_dict(cfg)}
            seconds += float(value["seconds"])
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one bad checkpoint must not stop the sweep
        row["error"] = {"type": type(e).__name__, "message": str(e) or type(e).__name__}
        row["metrics"] = {}
        row["details"] = details
        row["seconds"] = round(seconds, 4)
        timing["total"] = time.perf_counter() - start
        return row, timing
    row["metrics"] = metrics
    row["details"] = details
    row["seconds"] = round(seconds, 4)
    timing["total"] = time.perf_counter() - start
    return row, timing


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def sweep_statistics(
    rows: Sequence[Mapping[str, Any]],
    directions: Mapping[str, Direction],
    config: RankConfig,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per-metric rank statistics of the rows against their gaps, and the sweep's description.

    Each metric's values are multiplied by its sign (−1 for a ``flatter`` metric) first, so a
    positive τ always means "ranks the sweep the way its direction predicts". A checkpoint
    without a gap or without a finite value of the metric is excluded from that metric (counted
    in ``excluded``). Every statistic that is not defined is ``None`` with its reason in
    ``reasons``.

    Returns:
        ``(statistics, sweep)``: ``statistics[key]`` holds ``kendall_tau``, ``kendall_tau_ci``,
        ``spearman``, ``psi``, ``psi_axes``, ``psi_groups``, ``pgdl_cmi``,
        ``robust_sign_error`` (and its ``_mean``, ``_axes``, ``_environments``), ``n``,
        ``excluded``, ``direction``, ``sign``, ``tau_variant`` and ``reasons``; ``sweep`` has
        the ``axes``, the hyperparameters left out and why, the gap kind and the test size of
        the noise filter.
    """
    ok = [r for r in rows if r.get("error") is None and _finite(r.get("gap"))]
    axes, axis_notes = detect_axes([r["hyperparameters"] for r in ok], config.axes)
    if config.gap == "acc":
        sizes = [(r.get("details") or {}).get("generalization", {}).get("test_size") for r in ok]
        test_size = config.test_size
        if test_size is None and sizes and all(s is not None for s in sizes):
            test_size = int(min(sizes))
        noise_note = (
            f"pairs weighted by Hoeffding's bound with {test_size} test examples"
            if test_size is not None
            else "no test-set size known (pass --test-size): every pair weighs 1"
        )
    else:
        test_size = None
        noise_note = "loss gaps: no Monte-Carlo noise filter (Hoeffding needs accuracies)"
    failed = sum(1 for r in rows if r.get("error") is not None)
    out: dict[str, dict[str, Any]] = {}
    for key, direction in directions.items():
        sign = metric_sign(direction)
        use = [r for r in ok if _finite(r["metrics"].get(key))]
        values = [sign * float(r["metrics"][key]) for r in use]
        gaps = [float(r["gap"]) for r in use]
        hps = [r["hyperparameters"] for r in use]
        reasons: dict[str, str] = {}
        tau, why = (
            stats.kendall_tau(values, gaps, config.tau)
            if len(use) >= 2
            else (
                None,
                f"needs at least 2 ranked checkpoints; got {len(use)}",
            )
        )
        if why:
            reasons["kendall_tau"] = why
        if config.bootstrap > 0:
            ci, why = stats.bootstrap_tau_ci(
                values,
                gaps,
                variant=config.tau,
                resamples=config.bootstrap,
                level=config.level,
                seed=config.seed,
            )
        else:
            ci, why = None, "--bootstrap 0"
        if why:
            reasons["kendall_tau_ci"] = why
        rho, why = stats.spearman(values, gaps)
        if why:
            reasons["spearman"] = why
        gran = stats.granulated_tau(values, gaps, hps, axes, variant=config.tau)
        if gran.reason:
            reasons["psi"] = gran.reason
        for axis, r in gran.axis_reasons.items():
            reasons[f"psi_axes.{axis}"] = r
        cmi, why = stats.pgdl_cmi(values, gaps, hps, axes)
        if why:
            reasons["pgdl_cmi"] = why
        rob = stats.robust_sign_error(
            values, gaps, hps, axes, test_size=test_size, min_ess=config.min_ess
        )
        if rob.reason:
            reasons["robust_sign_error"] = rob.reason
        left = len(rows) - len(use)
        if left:
            no_value = len(ok) - len(use)
            parts = []
            if failed:
                parts.append(f"{failed} failed to load or measure")
            if len(rows) - failed - len(ok):
                parts.append(f"{len(rows) - failed - len(ok)} have no gap")
            if no_value:
                parts.append(f"{no_value} have no finite value of {key}")
            reasons["excluded"] = "; ".join(parts)
        out[key] = {
            "kendall_tau": tau,
            "kendall_tau_ci": ci,
            "spearman": rho,
            "psi": gran.psi,
            "psi_axes": gran.psi_axes,
            "psi_groups": gran.groups,
            "pgdl_cmi": cmi,
            "robust_sign_error": rob.value,
            "robust_sign_error_mean": rob.mean,
            "robust_sign_error_axes": rob.per_axis,
            "robust_environments": {"total": rob.environments, "kept": rob.kept},
            "n": len(use),
            "excluded": left,
            "direction": direction.value,
            "sign": sign,
            "tau_variant": config.tau,
            "reasons": reasons,
        }
    sweep = {
        "axes": axes,
        "left_out": axis_notes,
        "gap": config.gap,
        "test_size": test_size,
        "noise_filter": noise_note,
        "checkpoints": len(rows),
        "failed": failed,
    }
    return out, sweep


def rank_checkpoints(
    paths: Sequence[str | Path],
    config: RankConfig,
    load_options: LoadOptions | None = None,
    *,
    cache: ResultCache | None = None,
    baseline: str | Path | None = None,
    progress: ProgressFn | None = None,
    on_start: Callable[[Path], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> RankResult:
    """Measure every checkpoint of ``paths``, read its gap, and rank the sweep.

    Args:
        paths: checkpoint files (directories already expanded).
        config: what to rank and how (:class:`RankConfig`).
        load_options: how to load each checkpoint (:class:`LoadOptions`).
        cache: the result cache (default: none; every measure is computed).
        baseline: a checkpoint measured the same way for relative gates; it is not ranked.
        progress: ``progress(description, done, total)`` of the measure being computed.
        on_start: called with each checkpoint's path before it is measured.
        on_row: called with each finished row.

    Returns:
        A :class:`RankResult`. A Ctrl-C during the sweep returns the rows finished so far with
        ``interrupted=True`` (every finished measure is already in the cache).

    Raises:
        UsageError: an unknown metric or option, or an unreadable ``--table`` (before any work).
    """
    from flatcli.io.load import DatasetCache

    opts = load_options or LoadOptions()
    cache = cache or ResultCache(None)
    progress = progress or no_progress
    plans, directions = plan_measures(config.metrics, config.options)
    table = read_table(config.table) if config.table is not None else None
    datasets = DatasetCache(opts.data_dir, opts.download)
    if opts.dataset is not None:
        datasets.get(opts.dataset)  # an unknown or missing dataset stops the whole run early
    prints = _Fingerprints(opts)
    rows: list[dict[str, Any]] = []
    timings: list[dict[str, float]] = []
    base_row = None
    interrupted = False
    # under torchrun each process measures its contiguous share of the checkpoints alone (its
    # results go into the shared cache as they finish); the rows are gathered below
    sharded = distributed.active()
    if sharded:
        paths = distributed.split_items(list(paths))
    alone = distributed.local_work() if sharded else contextlib.nullcontext()
    with alone:
        try:
            if baseline is not None:
                base_row, _ = _measure_one(
                    Path(baseline),
                    plans,
                    config,
                    opts,
                    None,
                    cache,
                    prints,
                    datasets,
                    progress,
                    need_gap=False,
                )
            for path in paths:
                if on_start is not None:
                    on_start(Path(path))
                row, timing = _measure_one(
                    Path(path), plans, config, opts, table, cache, prints, datasets, progress
                )
                rows.append(row)
                timings.append(timing)
                if on_row is not None:
                    on_row(row)
        except KeyboardInterrupt:
            interrupted = True
    hits, misses = cache.hits, cache.misses
    if sharded:
        shares = distributed.gather_objects((rows, timings, hits, misses, interrupted))
        rows = [row for share in shares for row in share[0]]
        timings = [t for share in shares for t in share[1]]
        hits, misses = sum(sh[2] for sh in shares), sum(sh[3] for sh in shares)
        interrupted = any(sh[4] for sh in shares)
    statistics, sweep = sweep_statistics(rows, directions, config)
    return RankResult(
        rows=rows,
        statistics=statistics,
        sweep=sweep,
        baseline=base_row,
        interrupted=interrupted,
        cache_hits=hits,
        cache_misses=misses,
        timings=timings,
    )
