"""The options of ``flatcli rank``: what to rank and how (:class:`RankConfig`), how the sweep is
cached and gated against a baseline (:class:`SweepRun`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatcli.configs.common import check_gate_names, parse_gates
from flatcli.errors import UsageError
from flatcli.options import option

if TYPE_CHECKING:
    from flatcli.rank.cache import ResultCache

__all__ = [
    "GAP_KINDS",
    "TAU_VARIANTS",
    "RankConfig",
    "SweepRun",
    "parse_measure_options",
    "default_cache_dir",
]

GAP_KINDS = ("acc", "loss")
"""``acc``: train accuracy − test accuracy; ``loss``: test loss − train loss."""

TAU_VARIANTS = ("a", "b")
"""Kendall τ variants: ``a`` (Jiang et al. 2020; ties count 0) and ``b`` (tie-corrected)."""


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

    metrics: tuple[str, ...] = option(
        (),
        "--measures",
        "Comma-separated metric keys to rank (any of `flatcli measures`), e.g. "
        "gamma_hat,normalized_sharpness,top_eigenvalue.",
        parse=lambda text: tuple(_csv(text)),
    )
    options: dict[str, dict[str, Any]] | None = option(
        None,
        "--option",
        "A measure's option MEASURE.FIELD=VALUE (e.g. gamma.samples=50, eps_sharpness.eps=1e-3). "
        "Repeatable.",
        repeatable=True,
        parse=lambda specs: parse_measure_options(specs),
    )
    gap: str = option("acc", "--gap", "acc: train − test accuracy; loss: test − train loss.")
    evaluate: bool = option(
        False,
        "--evaluate",
        "Measure accuracy and loss on the training data and the test split instead of reading "
        "the training record.",
    )
    table: Path | None = option(
        None,
        "--table",
        "CSV of runs trained elsewhere: a checkpoint column, gap (or train_acc,test_acc / "
        "train_loss,test_loss) and hyperparameter columns.",
    )
    axes: tuple[str, ...] | None = option(
        None,
        "--axes",
        "Comma-separated hyperparameter axes of Ψ and the environments. Default: every "
        "hyperparameter that varies, except seed.",
        parse=lambda text: tuple(_csv(text)) or None,
    )
    tau: str = option("a", "--tau", "Kendall τ: a (Jiang et al. 2020; ties count 0) or b.")
    bootstrap: int = option(
        1000, "--bootstrap", "Bootstrap resamples of τ's interval (0: none).", min=0
    )
    level: float = option(0.95, "--level", "Confidence level of the interval.")
    test_size: int | None = option(
        None,
        "--test-size",
        "Test examples behind each accuracy (robust sign-error's noise filter). Default: the "
        "dataset's test split.",
        min=1,
    )
    min_ess: float = option(
        1.0,
        "--min-ess",
        "Smallest effective sample size of an environment of the robust sign-error (the "
        "paper: 12, with many seeds).",
    )
    seed: int = 0

    def __post_init__(self) -> None:
        self.metrics = tuple(dict.fromkeys(self.metrics))
        self.options = dict(self.options or {})
        if not self.metrics:
            raise UsageError(
                "--measures is required: the metric keys to rank, e.g. "
                "--measures gamma_hat,normalized_sharpness (`flatcli measures` lists them)"
            )
        if self.gap not in GAP_KINDS:
            raise UsageError(f"--gap must be acc or loss; got {self.gap!r}")
        if self.tau not in TAU_VARIANTS:
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


def parse_measure_options(specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``MEASURE.FIELD=VALUE`` options as ``{measure: {field: value}}`` (values read as YAML)."""
    import yaml

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


@dataclass(frozen=True)
class SweepRun:
    """How a sweep is cached, and the baseline its relative gates compare with."""

    cache_dir: Path | None = option(
        None,
        "--cache-dir",
        "Where measured results are cached. Default: $FLATCLI_CACHE/rank, else "
        "~/.cache/flatcli/rank.",
    )
    no_cache: bool = option(False, "--no-cache", "Compute everything; read and write no cache.")
    baseline: Path | None = option(
        None, "--baseline", "A reference checkpoint, measured the same way, for the baseline gates."
    )
    fail_above_baseline: tuple[str, ...] | None = option(
        None,
        "--fail-above-baseline",
        "Gate METRIC=F: exit 3 if METRIC > baseline + F·|baseline| (F=0.2: 20 % above). "
        "Repeatable.",
        repeatable=True,
    )
    fail_below_baseline: tuple[str, ...] | None = option(
        None,
        "--fail-below-baseline",
        "Gate METRIC=F: exit 3 if METRIC < baseline − F·|baseline|. Repeatable.",
        repeatable=True,
    )

    def relative_gates(self, reported: Sequence[str]) -> tuple[list, list]:
        """(above, below) baseline gates, checked against the ``reported`` metric keys."""
        above = parse_gates(self.fail_above_baseline or (), "--fail-above-baseline")
        below = parse_gates(self.fail_below_baseline or (), "--fail-below-baseline")
        flagged = [("--fail-above-baseline", g) for g in above]
        check_gate_names(flagged + [("--fail-below-baseline", g) for g in below], reported)
        if (above or below) and self.baseline is None:
            raise UsageError("--fail-above-baseline/--fail-below-baseline need --baseline CKPT")
        return above, below

    def cache_root(self) -> Path | None:
        """The folder of the result cache these options name (None with ``no_cache``)."""
        return None if self.no_cache else (self.cache_dir or default_cache_dir())

    def to_config(self, cache: ResultCache) -> dict[str, Any]:
        """The options as a report's ``config`` holds them."""
        return {
            "cache_dir": None if cache.root is None else str(cache.root),
            "baseline": str(self.baseline) if self.baseline else None,
            "fail_above_baseline": list(self.fail_above_baseline or ()),
            "fail_below_baseline": list(self.fail_below_baseline or ()),
        }


def default_cache_dir() -> Path:
    """``$FLATCLI_CACHE/rank`` if set, else ``~/.cache/flatcli/rank``."""
    root = os.environ.get("FLATCLI_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "flatcli"
    return base / "rank"
