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

import dataclasses
import json
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatcli import distributed
from flatcli.configs.rank import (  # noqa: F401 - SweepRun, parse_measure_options: re-exported
    RankConfig,
    SweepRun,
    parse_measure_options,
)
from flatcli.errors import CheckpointError, UsageError
from flatcli.evaluation import EVAL_BATCH_SIZE
from flatcli.measures.registry import (
    BEFORE_WORK,
    Direction,
    Measure,
    find_metric,
    make_config,
    reported_keys,
)
from flatcli.rank import stats
from flatcli.rank.cache import ResultCache, config_dict, data_fingerprint
from flatcli.rank.sweep import (
    SweepTable,
    check_gap_kind,
    detect_axes,
    evaluate_generalization,
    gap_of,
    read_table,
    record_generalization,
    record_hyperparameters,
)
from flatcli.run import (
    Gates,
    LoadOptions,
    Outcome,
    Sink,
    compute_cached,
    run_checkpoints,
)

NO_GAP = "no_gap"
"""The ``details.generalization`` key saying why a checkpoint has no gap (it is excluded)."""

__all__ = [
    "LoadOptions",
    "RankConfig",
    "MeasurePlan",
    "plan_measures",
    "RankResult",
    "rank_checkpoints",
    "sweep_statistics",
    "metric_sign",
    "missing_gap",
]


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
    """The runner's outcome (a row per checkpoint, report-entry shaped, with its gap), the
    statistics, the baseline's row and the cache's bookkeeping."""

    outcome: Outcome
    statistics: dict[str, dict[str, Any]]
    sweep: dict[str, Any]
    baseline: dict[str, Any] | None = None
    cache_hits: int = 0
    cache_misses: int = 0

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One row per checkpoint."""
        return self.outcome.results

    @staticmethod
    def gap(row: Mapping[str, Any]) -> Any:
        """A row's gap as a table shows it: the number, or ``no gap (why)`` for a checkpoint
        excluded for lack of one (:func:`missing_gap`)."""
        why = missing_gap(row)
        return f"no gap ({why})" if why else row.get("gap")

    @property
    def interrupted(self) -> bool:
        """Whether Ctrl-C ended the sweep early."""
        return self.outcome.interrupted


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
    """(generalization numbers with their ``source``, hyperparameters) of one checkpoint; a
    checkpoint the ``--table`` lacks has only ``source`` and ``no_gap`` (why it has none)."""
    if table is not None:
        row = table.find(path)
        if row is None:
            return {"source": "table", NO_GAP: "not in --table"}, {}
        return {**row["generalization"], "source": "table"}, dict(row["hyperparameters"])
    hparams = record_hyperparameters(run.record or {}, run.spec)
    test_size = len(run.dataset.test) if run.dataset.test is not None else None
    try:  # an accuracy gap of a loss without accuracy (mse): exit 2, before any work
        check_gap_kind(config.gap, run.loss, run.dataset.train.y)
    except UsageError as e:
        setattr(e, BEFORE_WORK, True)
        raise
    if config.evaluate:
        options: dict[str, Any] = {"batch": run.batch_size or EVAL_BATCH_SIZE}
        if run.loss != "ce":  # keys of ce evaluations as before the other losses
            options["loss"] = run.loss
        key = cache.key(
            run.checkpoint.sha256,
            "evaluate",
            options,
            prints.of_dataset(run),
            str(run.device),
            str(run.dtype),
        )
        value = cache.get(key)
        if value is None:
            value = evaluate_generalization(run, run.batch_size)
            cache.put(key, value)
        return {
            **value,
            "source": "evaluate",
            "loss": run.loss,
            "test_size": test_size,
        }, hparams
    gen = record_generalization(run.record or {})
    if gen is None:
        raise CheckpointError(
            f"{path.name} has no training record with test accuracy and loss (not trained by "
            "flatcli train?): pass --evaluate to measure them, or --table with its gap"
        )
    return {**gen, "source": "record", "test_size": test_size}, hparams


def _rank_measure(
    plans: Sequence[MeasurePlan],
    config: RankConfig,
    table: SweepTable | None,
    cache: ResultCache,
    prints: _Fingerprints,
    *,
    need_gap: bool = True,
) -> Callable[[Any], Any]:
    """The runner's ``measure(ctx)`` of a sweep: the checkpoint's gap and hyperparameters (kept
    in its row even when a measure fails later), then every planned measure, cached."""

    def measure(ctx: Any) -> Any:
        ctx.row.update(gap=None, hyperparameters={}, details={}, seconds=0.0)
        details, metrics, seconds = ctx.row["details"], {}, 0.0
        if need_gap:
            gen, hparams = _generalization(ctx, ctx.path, config, table, cache, prints)
            ctx.row["hyperparameters"] = hparams
            details["generalization"] = gen
            ctx.row["gap"] = gap_of(gen, config.gap)
            if ctx.row["gap"] is None and gen["source"] == "table":  # excluded, still measured
                gen.setdefault(NO_GAP, f"{config.gap} gap empty in --table")
            elif ctx.row["gap"] is None:
                raise CheckpointError(
                    f"no {config.gap} gap for {ctx.path.name}: its {gen['source']} lacks "
                    + ("train_acc/test_acc" if config.gap == "acc" else "train_loss/test_loss")
                )
        fingerprint = prints.of_run(ctx)
        for plan in plans:
            cfg = make_config(plan.measure, ctx, **plan.options)
            value = compute_cached(plan.measure, ctx, cfg, cache, fingerprint)
            metrics.update(value["metrics"])
            details[plan.measure.name] = {**value["details"], "config": config_dict(cfg)}
            seconds += float(value["seconds"])
            ctx.row["seconds"] = round(seconds, 4)
        return _Row(metrics, details)

    return measure


@dataclass
class _Row:
    values: dict[str, Any]
    info: dict[str, Any]

    def metrics(self) -> dict[str, Any]:
        return self.values

    def details(self) -> dict[str, Any]:
        return self.info


def missing_gap(row: Mapping[str, Any]) -> str | None:
    """Why a checkpoint that did not fail has no gap (``details.generalization.no_gap``: not in
    the ``--table``, or an empty cell there), else None."""
    if row.get("error") is not None or row.get("gap") is not None:
        return None
    return ((row.get("details") or {}).get("generalization") or {}).get(NO_GAP)


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
                why = sorted({missing_gap(r) or "" for r in rows if r.get("error") is None} - {""})
                parts.append(
                    f"{len(rows) - failed - len(ok)} have no gap"
                    + (f" ({'; '.join(why)})" if why else "")
                )
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
    sink: Sink | None = None,
    gates: Gates | None = None,
    report_config: dict[str, Any] | None = None,
) -> RankResult:
    """Measure every checkpoint of ``paths`` through the one runner, read its gap, and rank.

    Args:
        paths: checkpoint files and directories.
        config: what to rank and how (:class:`RankConfig`).
        load_options: how to load each checkpoint (:class:`~flatcli.run.LoadOptions`).
        cache: the result cache (default: none; every measure is computed).
        baseline: a checkpoint measured the same way for relative gates; it is not ranked.
        sink: where progress, messages and partial reports go (:class:`flatcli.run.Sink`).
        gates: absolute gates, checked against the planned metrics before any work.
        report_config: more of the report's ``config`` (the command line's own options).

    Returns:
        A :class:`RankResult`. A Ctrl-C during the sweep returns the rows finished so far with
        ``interrupted=True`` (every finished measure is already in the cache). Under torchrun
        each process measures its own share of the checkpoints.

    Raises:
        UsageError: an unknown metric or option, or an unreadable ``--table`` (before any work).
    """
    opts = load_options or LoadOptions()
    cache = cache or ResultCache(None)
    plans, directions = plan_measures(config.metrics, config.options)
    table = read_table(config.table) if config.table is not None else None
    prints = _Fingerprints(opts)
    metrics = ["gap"] + [k for p in plans for k in p.measure.keys]
    base_row = None
    if baseline is not None:
        base = run_checkpoints(
            "rank",
            [baseline],
            _rank_measure(plans, config, None, cache, prints, need_gap=False),
            load_options=opts,
            sink=sink,
            shard="checkpoints",
            row_keys={"gap": None, "hyperparameters": {}},
        )
        base_row = base.results[0] if base.results else None
    outcome = run_checkpoints(
        "rank",
        paths,
        _rank_measure(plans, config, table, cache, prints),
        load_options=opts,
        config={**config.to_dict(), **(report_config or {})},
        gates=gates,
        metrics=metrics,
        sink=sink,
        shard="checkpoints",
        row_keys={"gap": None, "hyperparameters": {}},
    )
    hits, misses = cache.hits, cache.misses
    if distributed.active():
        counts = distributed.gather_objects((hits, misses))
        hits, misses = sum(c[0] for c in counts), sum(c[1] for c in counts)
    statistics, sweep = sweep_statistics(outcome.results, directions, config)
    return RankResult(outcome, statistics, sweep, base_row, hits, misses)


def sort_rows(rows: list[dict[str, Any]], sort: str | None, known: list[str]) -> list[dict]:
    """``rows`` sorted by the column ``sort`` (``-KEY``: largest first); rows without a finite
    value last. UsageError for a column not in ``known``."""
    if sort is None:
        return rows
    key, reverse = (sort[1:], True) if sort.startswith("-") else (sort, False)
    if key not in known:
        raise UsageError(f"--sort {key}: not a column of this table; columns: {', '.join(known)}")
    ok = [r for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    return sorted(ok, key=lambda r: r[key], reverse=reverse) + [r for r in rows if r not in ok]


def statistics_notes(statistics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per reason a statistic is undefined, naming the metrics it concerns."""
    notes: dict[str, list[str]] = {}
    for key, st in statistics.items():
        for stat, why in st["reasons"].items():
            if stat in ("psi", "pgdl_cmi", "robust_sign_error", "excluded"):
                notes.setdefault(why, []).append(key)
    every = len(statistics)
    return [
        f"note ({'every metric' if len(who) == every > 1 else ', '.join(who)}): {why}"
        for why, who in notes.items()
    ]
