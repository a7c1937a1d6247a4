"""``flatcli pacbayes``: optimised, certified PAC-Bayes bounds (Dziugaite & Roy 2017; Wu et al.
2020)."""

from flatcli.cli.options import Common, Paths, command
from flatcli.configs.pacbayes import PacBayesConfig

COLUMNS = [
    ("bound", "bound"),
    ("kl", "KL(Q‖P)"),
    ("snn_train_error", "SNN err (m)"),
    ("snn_train_error_upper", "≤ (MC bound)"),
    ("snn_test_error", "SNN test err"),
    ("posterior_mean_test_error", "mean test err"),
    ("train_error", "ckpt train err"),
    ("test_error", "ckpt test err"),
    ("prior_variance", "λ"),
    ("bound_examples", "m"),
    ("vacuous", "vacuous"),
]


def _rows(name: str, entry: dict) -> list[dict]:
    """One table row; ``vacuous`` spelled out (kl⁻¹ caps the bound just below 1)."""
    vacuous = entry["details"].get("vacuous")
    return [{"checkpoint": name, **entry["metrics"], "vacuous": "yes" if vacuous else "no"}]


@command(
    "pacbayes",
    help="Optimise a Gaussian posterior and certify its error (Dziugaite & Roy 2017; "
    "Wu et al. 2020, Eq. 43) with a prior trained on part of the data (Pérez-Ortiz et al. "
    "2021) or a data-free one.",
)
def pacbayes(checkpoints: Paths, config: PacBayesConfig, common: Common) -> None:
    """Certify every checkpoint."""
    from flatcli.cli.render import analyse
    from flatcli.io.checkpoint import expand_checkpoints
    from flatcli.measures.registry import get_measure, reported_keys
    from flatcli.pacbayes.prior import check_before_work
    from flatcli.run import registered

    for path in expand_checkpoints(checkpoints):  # no valid bound: exit 2 before any work
        check_before_work(path, config, model=common.model, unsafe=common.unsafe_load)
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
