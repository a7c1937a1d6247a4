"""``flatcli gamma``: the Fisher log-determinant γ̂ (Jia & Su 2020, Eq. 5) and its baselines."""

from flatcli.cli.options import Common, Paths, command
from flatcli.configs.gamma import GammaConfig

COLUMNS = [
    ("gamma_hat", "γ̂"),
    ("gamma_hat_std", "± std"),
    ("fisher_trace", "tr/N'"),
    ("spectral_radius", "λ_max"),
    ("fisher_frobenius_sq", "‖ξ‖²_F/N'²"),
    ("fisher_frobenius_sq_diag", "Σ‖g‖⁴/N'"),
]


@command("gamma", help="γ̂ = mean ln|J Jᵀ| over samples (Jia & Su, Eq. 5).")
def gamma(checkpoints: Paths, config: GammaConfig, common: Common) -> None:
    """Measure γ̂ on every checkpoint."""
    from flatcli.cli.render import analyse
    from flatcli.measures.registry import get_measure, reported_keys
    from flatcli.run import registered

    measure = get_measure("gamma")
    robustness = [("robustness", "robustness")] if config.baselines else []
    analyse(
        "gamma",
        checkpoints,
        registered(measure, config),
        [*COLUMNS, *robustness, ("num_params", "params")],
        common=common,
        config=config.to_dict(),
        metrics=reported_keys(measure, config),
    )
