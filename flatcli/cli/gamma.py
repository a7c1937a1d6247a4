"""``flatcli gamma``: the Fisher log-determinant γ̂ (Jia & Su 2020, Eq. 5) and its baselines."""

from pathlib import Path

import typer

from flatcli.cli.options import OutputOptions, command
from flatcli.cli.render import analyse
from flatcli.measures.gamma import GammaConfig
from flatcli.measures.registry import get_measure, reported_keys
from flatcli.run import Gates, LoadOptions, registered

COLUMNS = [
    ("gamma_hat", "γ̂"),
    ("gamma_hat_std", "± std"),
    ("fisher_trace", "tr/N'"),
    ("spectral_radius", "λ_max"),
    ("fisher_frobenius_sq", "‖ξ‖²_F/N'²"),
    ("fisher_frobenius_sq_diag", "Σ‖g‖⁴/N'"),
]


def register(app: typer.Typer) -> None:
    """Add ``gamma`` to the app."""

    @command(app, "gamma", help="γ̂ = mean ln|J Jᵀ| over samples (Jia & Su, Eq. 5).")
    def gamma(
        checkpoints: list[Path],
        config: GammaConfig,
        load: LoadOptions,
        gates: Gates,
        output: OutputOptions,
    ) -> None:
        measure = get_measure("gamma")
        columns = [*COLUMNS, *([("robustness", "robustness")] if config.baselines else [])]
        analyse(
            "gamma",
            checkpoints,
            registered(measure, config),
            [*columns, ("num_params", "params")],
            load=load,
            gates=gates,
            output=output,
            config=config.to_dict(),
            metrics=reported_keys(measure, config),
        )
