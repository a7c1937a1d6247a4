"""``flatcli rank``: rank a sweep by its measures against the generalization gap
(:func:`flatcli.rank.core.rank_checkpoints`: the one runner plus the sweep's statistics)."""

from dataclasses import dataclass
from pathlib import Path

from flatcli.cli.errors import describe, print_error
from flatcli.cli.options import Common, Paths, command
from flatcli.configs.rank import RankConfig, SweepRun
from flatcli.options import option

STATS = [
    ("metric", "metric"),
    ("direction", "direction"),
    ("n", "n"),
    ("excluded", "excluded"),
    ("kendall_tau", "τ-{tau}"),
    ("ci", "{level:.0%} CI"),
    ("spearman", "Spearman ρ"),
    ("psi", "Ψ"),
    ("pgdl_cmi", "PGDL CMI"),
    ("robust_sign_error", "robust sign-err."),
]


@dataclass(frozen=True)
class SweepView:
    """How ``rank`` shows a sweep."""

    sort: str | None = option(
        None, "--sort", "Sort the table by METRIC (or gap); -METRIC for largest first."
    )
    plot: Path | None = option(
        None,
        "--plot",
        "Folder for one scatter PNG per metric (metric against gap). Needs matplotlib: "
        "pip install 'flatcli\\[plot]'.",
    )
    color_by: str | None = option(
        None, "--color-by", "Hyperparameter that colours the --plot points."
    )


@command(
    "rank",
    help="Rank a sweep of checkpoints by flatness measures against their generalization gap "
    "(Kendall τ, Ψ, PGDL score, robust sign-error), resumable, with CI gates.",
)
def rank(
    checkpoints: Paths, config: RankConfig, view: SweepView, sweep: SweepRun, common: Common
) -> None:
    """Measure and rank the sweep; gate it."""
    from flatcli.cli.output import Output
    from flatcli.cli.render import finish, table_rows
    from flatcli.rank.cache import ResultCache
    from flatcli.rank.core import plan_measures, rank_checkpoints, sort_rows, statistics_notes
    from flatcli.rank.gates import relative_failures

    plans, _ = plan_measures(config.metrics, config.options)  # usage errors before any work
    above, below = sweep.relative_gates(["gap"] + [k for p in plans for k in p.measure.keys])
    if view.plot is not None:
        from flatcli.io.plot import require_matplotlib

        require_matplotlib()
    out = Output.of(common)
    cache = ResultCache(sweep.cache_root())
    shown = {k: None if v is None else str(v) for k, v in vars(view).items()}
    result = rank_checkpoints(
        checkpoints,
        config,
        common,
        cache=cache,
        baseline=sweep.baseline,
        sink=out,
        gates=common,
        report_config={**shown, **sweep.to_config(cache)},
    )
    keys = list(config.metrics)
    cols = [(k, k) for k in keys]
    cells = table_rows(result.rows, cols, None)  # one row per checkpoint
    rows = [{**r, "gap": result.gap(e)} for e, r in zip(result.rows, cells, strict=True)]
    columns = [("checkpoint", "checkpoint"), ("gap", f"{config.gap} gap")]
    out.table(
        "flatcli rank",
        columns + cols,
        sort_rows(rows, view.sort, ["gap", *keys]),
    )
    ci = "[{:.3f}, {:.3f}]"
    stats = [
        {
            **st,
            "metric": key,
            "ci": "-" if st["kendall_tau_ci"] is None else ci.format(*st["kendall_tau_ci"]),
        }
        for key, st in result.statistics.items()
    ]
    axes = ", ".join(result.sweep["axes"]) or "none"
    headers = [(k, h.format(tau=config.tau, level=config.level)) for k, h in STATS]
    out.table(f"statistics against the {config.gap} gap (axes: {axes})", headers, stats)
    for line in statistics_notes(result.statistics):
        out.message(line)
    if cache.root is not None:
        out.message(
            f"cache {cache.root}: {result.cache_hits} result(s) reused, "
            f"{result.cache_misses} computed"
        )
    out.report(
        result.outcome.report(
            statistics=result.statistics, sweep=result.sweep, baseline=result.baseline
        )
    )
    failures = result.outcome.failure
    if view.plot is not None and not result.interrupted:
        from flatcli.io.plot_rank import plot_rank

        try:
            written = plot_rank(
                result.rows,
                result.statistics,
                view.plot,
                color_by=view.color_by,
                axes=result.sweep["axes"],
            )
            out.message(f"wrote {len(written)} plot(s) to {view.plot}")
        except Exception as e:  # noqa: BLE001 - the report is out; report the error, exit 1
            print_error(describe(e), e, common.debug)
            failures = max(failures, 1)
    if result.baseline is not None and result.baseline["error"] is not None:
        failures = max(failures, 1)
    relative = (above or below) and not failures
    more = relative_failures(result.rows, result.baseline, above, below) if relative else []
    finish(result.outcome, common, failures, more)
