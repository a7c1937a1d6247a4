"""``flatcli rank``: rank a sweep of checkpoints by their measures against the generalization gap.

No ``from __future__ import annotations`` here: the option annotations must be objects, since
``analysis_command`` re-evaluates string annotations in its own module's namespace.
"""

import math
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from flatcli import distributed
from flatcli.cli.errors import describe, print_error
from flatcli.cli.options import analysis_command
from flatcli.cli.output import Output
from flatcli.cli.runner import parse_gates
from flatcli.errors import UsageError
from flatcli.io.checkpoint import expand_checkpoints
from flatcli.io.load import resolve_device, resolve_dtype
from flatcli.io.report import build_report, environment_info

Measures = Annotated[
    str | None,
    typer.Option(
        "--measures",
        help="Comma-separated metric keys to rank (any of `flatcli measures`), e.g. gamma_hat,normalized_sharpness,top_eigenvalue.",
    ),
]
OptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--option",
        help="A measure's option MEASURE.FIELD=VALUE (e.g. gamma.samples=50, eps_sharpness.eps=1e-3). Repeatable.",
    ),
]
GapOpt = Annotated[
    str, typer.Option("--gap", help="acc: train − test accuracy; loss: test − train loss.")
]
Evaluate = Annotated[
    bool,
    typer.Option(
        "--evaluate",
        help="Measure accuracy and loss on the training data and the test split instead of reading the training record.",
    ),
]
TableOpt = Annotated[
    Path | None,
    typer.Option(
        "--table",
        help="CSV of runs trained elsewhere: a checkpoint column, gap (or train_acc,test_acc / train_loss,test_loss) and hyperparameter columns.",
    ),
]
AxesOpt = Annotated[
    str | None,
    typer.Option(
        "--axes",
        help="Comma-separated hyperparameter axes of Ψ and the environments. Default: every hyperparameter that varies, except seed.",
    ),
]
TauOpt = Annotated[
    str, typer.Option("--tau", help="Kendall τ: a (Jiang et al. 2020; ties count 0) or b.")
]
Bootstrap = Annotated[
    int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples of τ's interval (0: none).")
]
Level = Annotated[float, typer.Option("--level", help="Confidence level of the interval.")]
TestSize = Annotated[
    int | None,
    typer.Option(
        "--test-size",
        min=1,
        help="Test examples behind each accuracy (robust sign-error's noise filter). Default: the dataset's test split.",
    ),
]
MinEss = Annotated[
    float,
    typer.Option(
        "--min-ess",
        help="Smallest effective sample size of an environment of the robust sign-error (the paper: 12, with many seeds).",
    ),
]
Sort = Annotated[
    str | None,
    typer.Option("--sort", help="Sort the table by METRIC (or gap); -METRIC for largest first."),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Folder for one scatter PNG per metric (metric against gap). Needs matplotlib: pip install 'flatcli\\[plot]'.",
    ),
]
ColorBy = Annotated[
    str | None,
    typer.Option("--color-by", help="Hyperparameter that colours the --plot points."),
]
CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Where measured results are cached. Default: $FLATCLI_CACHE/rank, else ~/.cache/flatcli/rank.",
    ),
]
NoCache = Annotated[
    bool, typer.Option("--no-cache", help="Compute everything; read and write no cache.")
]
Baseline = Annotated[
    Path | None,
    typer.Option(
        "--baseline", help="A reference checkpoint, measured the same way, for the baseline gates."
    ),
]
FailAboveBaseline = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-above-baseline",
        help="Gate METRIC=F: exit 3 if METRIC > baseline + F·|baseline| (F=0.2: 20 % above). Repeatable.",
    ),
]
FailBelowBaseline = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-below-baseline",
        help="Gate METRIC=F: exit 3 if METRIC < baseline − F·|baseline|. Repeatable.",
    ),
]


def parse_measure_options(specs: list[str]) -> dict[str, dict[str, Any]]:
    """``MEASURE.FIELD=VALUE`` options as ``{measure: {field: value}}`` (values read as YAML)."""
    out: dict[str, dict[str, Any]] = {}
    for s in specs:
        lhs, sep, value = s.partition("=")
        measure, dot, name = lhs.strip().partition(".")
        if not sep or not dot or not measure or not name:
            raise UsageError(
                f"--option takes MEASURE.FIELD=VALUE (e.g. --option gamma.samples=50); got '{s}'"
            )
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, list):
            parsed = tuple(parsed)
        out.setdefault(measure, {})[name] = parsed
    return out


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _sort_rows(rows: list[dict[str, Any]], sort: str | None, known: list[str]) -> list[dict]:
    if sort is None:
        return rows
    key, reverse = (sort[1:], True) if sort.startswith("-") else (sort, False)
    if key not in known:
        raise UsageError(f"--sort {key}: not a column of this table; columns: {', '.join(known)}")
    ok = [r for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    rest = [r for r in rows if r not in ok]
    return sorted(ok, key=lambda r: r[key], reverse=reverse) + rest


def _fmt_ci(ci: Any) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def register(app: typer.Typer) -> None:
    """Add ``rank`` to the app."""

    @analysis_command(
        app,
        "rank",
        help="Rank a sweep of checkpoints by flatness measures against their generalization gap "
        "(Kendall τ, Ψ, PGDL score, robust sign-error), resumable, with CI gates.",
    )
    def rank(
        common,
        measures: Measures = None,
        option: OptionOpt = None,
        gap: GapOpt = "acc",
        evaluate: Evaluate = False,
        table: TableOpt = None,
        axes: AxesOpt = None,
        tau: TauOpt = "a",
        bootstrap: Bootstrap = 1000,
        level: Level = 0.95,
        test_size: TestSize = None,
        min_ess: MinEss = 1.0,
        sort: Sort = None,
        plot: PlotOpt = None,
        color_by: ColorBy = None,
        cache_dir: CacheDir = None,
        no_cache: NoCache = False,
        baseline: Baseline = None,
        fail_above_baseline: FailAboveBaseline = None,
        fail_below_baseline: FailBelowBaseline = None,
    ) -> None:
        from flatcli.rank.cache import ResultCache, default_cache_dir
        from flatcli.rank.core import LoadOptions, RankConfig, plan_measures, rank_checkpoints
        from flatcli.rank.gates import absolute_failures, check_gate_names, relative_failures

        common.validate()
        if not measures:
            raise UsageError(
                "--measures is required: the metric keys to rank, e.g. "
                "--measures gamma_hat,normalized_sharpness (`flatcli measures` lists them)"
            )
        config = RankConfig(
            metrics=tuple(_csv(measures)),
            options=parse_measure_options(option or []),
            gap=gap,
            evaluate=evaluate,
            table=table,
            axes=tuple(_csv(axes)) or None,
            tau=tau,
            bootstrap=bootstrap,
            level=level,
            test_size=test_size,
            min_ess=min_ess,
            seed=common.seed,
        )
        plans, _ = plan_measures(config.metrics, config.options)  # usage errors before any work
        reported = ["gap"] + [k for p in plans for k in p.measure.keys]
        gates = {
            "--fail-above": parse_gates(common.fail_above, "--fail-above"),
            "--fail-below": parse_gates(common.fail_below, "--fail-below"),
            "--fail-above-baseline": parse_gates(
                fail_above_baseline or [], "--fail-above-baseline"
            ),
            "--fail-below-baseline": parse_gates(
                fail_below_baseline or [], "--fail-below-baseline"
            ),
        }
        check_gate_names([(f, g) for f, gs in gates.items() for g in gs], reported)
        relative = gates["--fail-above-baseline"] + gates["--fail-below-baseline"]
        if relative and baseline is None:
            raise UsageError("--fail-above-baseline/--fail-below-baseline need --baseline CKPT")
        if plot is not None:
            from flatcli.io.plot import require_matplotlib

            require_matplotlib()
        device = resolve_device(common.device)
        distributed.init(device)  # under torchrun: the checkpoints are split across ranks
        device = distributed.device_for(device)
        main = distributed.is_main()  # only rank 0 prints and writes

        def say(*args: Any, **kwargs: Any) -> None:
            if main:
                print_error(*args, **kwargs)

        out = Output(common.json if main else None, common.quiet or not main)
        out.check()
        dtype = resolve_dtype(common.dtype)
        paths = expand_checkpoints(common.checkpoints)
        opts = LoadOptions(
            model=common.model,
            dataset=common.dataset,
            split=common.split,
            max_examples=common.max_examples,
            seed=common.seed,
            device=str(device),
            dtype=common.dtype,
            data_dir=common.data_dir,
            download=common.download,
            unsafe_load=common.unsafe_load,
            batch_size=common.batch_size,
        )
        cache = ResultCache(None if no_cache else (cache_dir or default_cache_dir()))
        run_config = {
            **config.to_dict(),
            **common.to_config(),
            "sort": sort,
            "plot": str(plot) if plot else None,
            "color_by": color_by,
            "cache_dir": None if no_cache else str(cache.root),
            "baseline": str(baseline) if baseline else None,
            "fail_above_baseline": list(fail_above_baseline or []),
            "fail_below_baseline": list(fail_below_baseline or []),
        }
        environment = environment_info(device, dtype, world_size=distributed.world_size())
        finished: list[dict[str, Any]] = []

        def report(result: Any = None, interrupted: bool = False) -> dict[str, Any]:
            rows = result.rows if result is not None else finished
            rep = build_report("rank", run_config, environment, rows, interrupted=interrupted)
            if result is not None:
                from flatcli.io.report import _jsonable

                rep["statistics"] = _jsonable(result.statistics)
                rep["sweep"] = _jsonable(result.sweep)
                if result.baseline is not None:
                    rep["baseline"] = _jsonable(result.baseline)
            return rep

        with out.progress() as bar:
            overall = bar.add_task("rank", total=len(paths)) if bar else None
            inner = bar.add_task("", total=None) if bar else None

            def on_start(path: Path) -> None:
                if bar is not None:
                    bar.update(inner, description=f"  {path.name}", completed=0, total=None)

            def on_row(row: dict[str, Any]) -> None:
                finished.append(row)
                if row["error"] is not None:
                    say(f"{row['checkpoint']}: {row['error']['message']}")
                out.report(report(interrupted=True), partial=True)
                if bar is not None:
                    bar.advance(overall)

            def progress(description: str, completed: int, total: int) -> None:
                if bar is not None:
                    bar.update(
                        inner, description=f"  {description}", completed=completed, total=total
                    )

            result = rank_checkpoints(
                paths,
                config,
                opts,
                cache=cache,
                baseline=baseline,
                progress=progress,
                on_start=on_start,
                on_row=on_row,
            )

        final = report(result, interrupted=result.interrupted)
        keys = list(config.metrics)
        table_rows = []
        for r in result.rows:
            name = Path(r["checkpoint"]).name
            if r["error"] is not None:
                table_rows.append({"checkpoint": name, "gap": r["gap"], keys[0]: "error"})
            else:
                table_rows.append({"checkpoint": name, "gap": r["gap"], **r["metrics"]})
        table_rows = _sort_rows(table_rows, sort, ["gap", *keys])
        out.table(
            "flatcli rank",
            [("checkpoint", "checkpoint"), ("gap", f"{config.gap} gap"), *[(k, k) for k in keys]],
            table_rows,
        )
        stat_rows = []
        for key, st in result.statistics.items():
            stat_rows.append(
                {
                    "metric": key,
                    "direction": st["direction"],
                    "n": st["n"],
                    "excluded": st["excluded"],
                    "tau": st["kendall_tau"],
                    "ci": _fmt_ci(st["kendall_tau_ci"]),
                    "rho": st["spearman"],
                    "psi": st["psi"],
                    "cmi": st["pgdl_cmi"],
                    "rse": st["robust_sign_error"],
                }
            )
        out.table(
            f"statistics against the {config.gap} gap (axes: "
            f"{', '.join(result.sweep['axes']) or 'none'})",
            [
                ("metric", "metric"),
                ("direction", "direction"),
                ("n", "n"),
                ("excluded", "excluded"),
                ("tau", f"τ-{config.tau}"),
                ("ci", f"{config.level:.0%} CI"),
                ("rho", "Spearman ρ"),
                ("psi", "Ψ"),
                ("cmi", "PGDL CMI"),
                ("rse", "robust sign-err."),
            ],
            stat_rows,
        )
        notes: dict[str, list[str]] = {}
        for key, st in result.statistics.items():
            for stat, why in st["reasons"].items():
                if stat in ("psi", "pgdl_cmi", "robust_sign_error", "excluded"):
                    notes.setdefault(why, []).append(key)
        for why, keys_of in notes.items():
            who = "every metric" if len(keys_of) == len(keys) > 1 else ", ".join(keys_of)
            out.message(f"note ({who}): {why}")
        if cache.root is not None:
            out.message(
                f"cache {cache.root}: {result.cache_hits} result(s) reused, "
                f"{result.cache_misses} computed"
            )
        out.report(final)
        if result.interrupted:
            say("interrupted")
            raise typer.Exit(130)

        failures = sum(r["error"] is not None for r in result.rows)
        if plot is not None and main:
            from flatcli.io.plot_rank import plot_rank

            try:
                written = plot_rank(
                    result.rows,
                    result.statistics,
                    plot,
                    color_by=color_by,
                    axes=result.sweep["axes"],
                )
                out.message(f"wrote {len(written)} plot(s) to {plot}")
            except Exception as e:  # noqa: BLE001 - the report is out; report the error, exit 1
                failures += 1
                say(describe(e), e, common.debug)
        if result.baseline is not None and result.baseline["error"] is not None:
            say(f"baseline {baseline}: {result.baseline['error']['message']}")
            failures += 1
        if failures:
            raise typer.Exit(1)
        messages = absolute_failures(result.rows, gates["--fail-above"], gates["--fail-below"])
        if relative:
            messages += relative_failures(
                result.rows,
                result.baseline,
                gates["--fail-above-baseline"],
                gates["--fail-below-baseline"],
            )
        for m in messages:
            say(m)
        raise typer.Exit(3 if messages else 0)
