"""``flatcli pacbayes``: optimised, certified PAC-Bayes bounds (Dziugaite & Roy 2017; Wu et al.
2020)."""

from pathlib import Path

import typer

from flatcli.cli.options import OutputOptions, command
from flatcli.cli.render import analyse
from flatcli.io.checkpoint import expand_checkpoints
from flatcli.measures.pacbayes import PacBayesConfig
from flatcli.measures.registry import get_measure
from flatcli.pacbayes.prior import check_prior_available
from flatcli.run import Gates, LoadOptions, registered

COLUMNS = [
    ("bound", "bound"),
    ("kl", "KL(Q‖P)"),
    ("snn_train_error", "SNN train err"),
    ("snn_train_error_upper", "≤ (MC bound)"),
    ("snn_test_error", "SNN test err"),
    ("train_error", "train err"),
    ("test_error", "test err"),
    ("prior_variance", "λ"),
    ("num_train", "m"),
    ("vacuous", "vacuous"),
]


def _rows(name: str, entry: dict) -> list[dict]:
    """One table row; ``vacuous`` spelled out (kl⁻¹ caps the bound just below 1)."""
    vacuous = entry["details"].get("vacuous")
    return [{"checkpoint": name, **entry["metrics"], "vacuous": "yes" if vacuous else "no"}]


def register(app: typer.Typer) -> None:
    """Add ``pacbayes`` to the app."""

    @command(
        app,
        "pacbayes",
        help="Optimise a Gaussian posterior and certify its error (Dziugaite & Roy 2017; "
        "Wu et al. 2020, Eq. 43).",
    )
    def pacbayes(
        checkpoints: list[Path],
        config: PacBayesConfig,
        load: LoadOptions,
        gates: Gates,
        output: OutputOptions,
    ) -> None:
        for path in expand_checkpoints(checkpoints):  # no prior anywhere: exit 2 before work
            check_prior_available(path, config.prior_init, unsafe=load.unsafe_load)
        analyse(
            "pacbayes",
            checkpoints,
            registered(get_measure("pacbayes"), config),
            COLUMNS,
            load=load,
            gates=gates,
            output=output,
            config=config.to_dict(),
            rows=_rows,
        )
