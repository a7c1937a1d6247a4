"""``PacBayesConfig``: the options of ``flatcli pacbayes``, the posterior families and the
learning-rate schedules of the bound's optimisation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from flatcli.configs._checks import require
from flatcli.errors import choice
from flatcli.options import choices, option

__all__ = ["Method", "Schedule", "PacBayesConfig"]


Method = choices(
    "Method",
    "vanilla approx-hessian iterative-hessian",
    "The posterior family: which basis its covariance is diagonal in.",
)


Schedule = choices(
    "Schedule",
    "constant step cosine",
    "Learning-rate schedules of the bound optimisation (step: lr/10 for the last quarter).",
)


@dataclass
class PacBayesConfig:
    """Options of ``flatcli pacbayes``; the defaults are the command line's.

    The paper's constants are the defaults: b = 100, c = 0.1, δ = 0.025, ρ₀ = −3, and
    δ′ = 0.01 (total confidence 0.965, Table 1 of Wu et al. 2020). Epochs, learning rate,
    batch size and Monte-Carlo samples are scaled to finish on a CPU in minutes for an MLP;
    Dziugaite & Roy 2017 evaluate with 150,000 weight samples.
    """

    method: str = option(
        "vanilla",
        "--method",
        "Posterior covariance: diagonal in the standard basis (vanilla, Dziugaite & Roy) or in "
        "each layer's K-FAC eigenbasis, fixed at the trained weights (approx-hessian) or "
        "recomputed every --eta epochs (iterative-hessian).",
        choices=Method,
    )
    # 40 passes; RMSprop lr τ = 0.01 (0.001 needs ~10x the steps); mini-batch 64: more steps per
    # epoch (one weight sample each); step schedule: lr ÷ 10 for the last quarter of the epochs
    epochs: int = option(40, "--epochs", "Epochs of the bound optimisation.", min=0)
    lr: float = option(0.01, "--lr", "RMSprop learning rate of the bound optimisation.")
    opt_batch_size: int = option(
        64, "--opt-batch-size", "Mini-batch of the bound optimisation.", min=1
    )
    schedule: str = option(
        "step",
        "--schedule",
        "constant, step (lr/10 for the last quarter) or cosine.",
        choices=Schedule,
    )
    mc_samples: int = option(
        1000, "--mc-samples", "n: weight samples of the certificate's Monte-Carlo step.", min=1
    )
    test_mc_samples: int | None = option(
        None,
        "--test-mc-samples",
        "Weight samples for snn_test_error (default: --mc-samples; 0: skip).",
        min=0,
    )
    delta: float = option(0.025, "--delta", "δ of the PAC-Bayes step.")
    delta_prime: float = option(0.01, "--delta-prime", "δ′ of the Monte-Carlo step.")
    b: float = option(100.0, "--b", "Prior grid λ = c·exp(−j/b): b.")
    c: float = option(0.1, "--c", "Prior grid λ = c·exp(−j/b): c.")
    eta: int = option(
        10, "--eta", "iterative-hessian: recompute the eigenbasis every η epochs.", min=1
    )
    rho_init: float = -3.0
    kfac_examples: int = option(
        4096, "--kfac-examples", "Training examples the K-FAC factors are estimated on.", min=1
    )
    prior_init: str | None = option(
        None,
        "--prior-init",
        "Checkpoint holding the prior's centre w₀ (the network's initialisation). Default: the "
        "initial weights flatcli train recorded in the checkpoint.",
    )
    prior_is_data_free: bool = option(
        False,
        "--prior-is-data-free",
        "Vouch that the --prior-init checkpoint never saw the training examples (e.g. trained "
        "on other data): without it, a prior whose record says it was trained, or with the "
        "certified weights, is refused (the bound is invalid if the prior saw the data).",
    )
    unsafe_load: bool = False
    seed: int = 0
    batch_size: int | None = None  # examples per forward of the Monte-Carlo evaluation
    compile: bool = option(
        False,
        "--compile/--no-compile",
        "Fuse the bound optimisation's elementwise work with torch.compile: faster steps; the "
        "last bits of the numbers may differ. Needs a C++ compiler on a CPU; the first run "
        "compiles (about 20 s), later runs reuse the cache (about 3 s).",
    )

    def __post_init__(self) -> None:
        self.method = choice(Method, self.method, "--method")
        self.schedule = choice(Schedule, self.schedule, "--schedule")
        require(
            [
                (self.epochs >= 0, f"--epochs must be >= 0; got {self.epochs}"),
                (self.lr > 0, f"--lr must be > 0; got {self.lr}"),
                (
                    self.opt_batch_size >= 1,
                    f"--opt-batch-size must be >= 1; got {self.opt_batch_size}",
                ),
                (self.mc_samples >= 1, f"--mc-samples must be >= 1; got {self.mc_samples}"),
                (
                    self.test_mc_samples is None or self.test_mc_samples >= 0,
                    f"--test-mc-samples must be >= 0; got {self.test_mc_samples}",
                ),
                (0 < self.delta < 1, f"--delta must be in (0, 1); got {self.delta}"),
                (
                    0 < self.delta_prime < 1,
                    f"--delta-prime must be in (0, 1); got {self.delta_prime}",
                ),
                (
                    self.delta + self.delta_prime < 1,
                    "--delta + --delta-prime must be < 1 (the total confidence is 1 − δ − δ′)",
                ),
                (self.b > 0, f"--b must be > 0; got {self.b}"),
                (self.c > 0, f"--c must be > 0; got {self.c}"),
                (self.eta >= 1, f"--eta must be >= 1; got {self.eta}"),
                (
                    self.kfac_examples >= 1,
                    f"--kfac-examples must be >= 1; got {self.kfac_examples}",
                ),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """The options as they go into a report's ``config``."""
        return asdict(self)
