"""Ranking a sweep of trained checkpoints by flatness measures against their generalization gap.

>>> from flatcli.rank import RankConfig, rank_checkpoints              # doctest: +SKIP
>>> result = rank_checkpoints(["runs/a.safetensors", "runs/b.safetensors"],
...                           RankConfig(metrics=("gamma_hat",)))     # doctest: +SKIP
>>> result.statistics["gamma_hat"]["kendall_tau"]                    # doctest: +SKIP

:mod:`flatcli.rank.stats` holds the statistics (Kendall τ-a/τ-b, Spearman ρ, bootstrap
intervals, Jiang et al.'s granulated Ψ, the PGDL competition's conditional mutual information,
Dziugaite et al.'s robust sign-error), :mod:`flatcli.rank.sweep` reads gaps and
hyperparameters, :mod:`flatcli.rank.cache` is the resumable result cache and
:mod:`flatcli.rank.core` puts them together.
"""

from flatcli.rank.cache import ResultCache, default_cache_dir
from flatcli.rank.core import (
    LoadOptions,
    RankConfig,
    RankResult,
    plan_measures,
    rank_checkpoints,
    sweep_statistics,
)

__all__ = [
    "LoadOptions",
    "RankConfig",
    "RankResult",
    "ResultCache",
    "default_cache_dir",
    "plan_measures",
    "rank_checkpoints",
    "sweep_statistics",
]
