"""``flatcli pacbayes``: optimised, certified PAC-Bayes bounds (Dziugaite & Roy 2017; Wu et al.
2020)."""

from flatcli.cli.options import Common, Paths, command
from flatcli.configs.pacbayes import PacBayesConfig

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


@command(
    "pacbayes",
    help="Optimise a Gaussian posterior and certify its error (Dziugaite & Roy 2017; "
    "Wu et al. 2020, Eq. 43).",
)
def pacbayes(checkpoints: Paths, config: PacBayesConfig, common: Common) -> None:
    """Certify every checkpoint."""
    from flatcli.cli.render import analyse
    from flatcli.io.checkpoint import expand_checkpoints
    from flatcli.measures.registry import get_measure, reported_keys
    from flatcli.pacbayes.prior import check_data_free
    from flatcli.run import registered

    for path in expand_checkpoints(checkpoints):  # no valid data-free bound: exit 2 before work
        prior, vouched = config.prior_init, config.prior_is_data_free
        check_data_free(
            path, prior, model=common.model, unsafe=common.unsafe_load, data_free=vouched
        )
    measure = get_measure("pacbayes")
    analyse(
        "pacbayes",
        checkpoints,
        registered(measure, config),
        COLUMNS,
        common=common,
        config=config.to_dict(),
        metrics=reported_keys(measure, config),
        rows=_rows,
    )
