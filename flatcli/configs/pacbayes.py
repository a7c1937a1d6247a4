"""``PacBayesConfig``: the options of ``flatcli pacbayes``: the prior (data-dependent or
data-free), the posterior families and the learning-rate schedules of the bound's
optimisation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from flatcli.configs._checks import require
from flatcli.errors import choice
from flatcli.options import choices, option

__all__ = ["Method", "PriorKind", "PriorStart", "Schedule", "PacBayesConfig"]


Method = choices(
    "Method",
    "f-quad vanilla approx-hessian iterative-hessian",
    "The posterior and its optimisation: f-quad (Pérez-Ortiz et al. 2021: started at the "
    "prior's mean, Adam on f_quad with a bounded cross-entropy), or Wu et al.'s Eq. 46 started "
    "at the trained weights with the covariance diagonal in the standard basis (vanilla) or in "
    "each layer's K-FAC eigenbasis (approx-hessian, iterative-hessian).",
)

PriorKind = choices(
    "PriorKind",
    "data-dependent data-free",
    "Where the prior's mean comes from: SGD on part of the training set (data-dependent), or "
    "the network's initialisation (data-free).",
)

PriorStart = choices(
    "PriorStart",
    "auto recorded fresh",
    "Where the data-dependent prior's SGD starts: the recorded initialisation (recorded), a "
    "fresh seeded initialisation of the spec (fresh), or the first that exists (auto).",
)

# The optimisation defaults of each posterior method: (epochs, lr, mini-batch).
# f-quad: Adam 1e-3, 20 epochs of batch 250 (the recipe of issue 25, measured on LeNet-5/mnist5k);
# Eq. 46: RMSprop 0.01, 40 epochs of batch 64 (more steps: one weight sample each).
METHOD_DEFAULTS: dict[str, tuple[int, float, int]] = {
    "f-quad": (20, 1e-3, 250),
    "vanilla": (40, 0.01, 64),
    "approx-hessian": (40, 0.01, 64),
    "iterative-hessian": (40, 0.01, 64),
}


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

    The prior is data-dependent unless ``--prior data-free`` or ``--prior-init`` says
    otherwise (Parrado-Hernández et al. 2012; Pérez-Ortiz et al. 2021): ``prior`` is resolved
    to its kind, and ``method``, ``epochs``, ``lr`` and ``opt_batch_size`` left at None take
    the defaults of that kind and method (:data:`METHOD_DEFAULTS`), so the config (and the
    report's ``config``) always holds the values used.
    """

    prior: str | None = option(
        None,
        "--prior",
        "data-dependent: a seeded --prior-fraction of the training examples trains the prior's "
        "mean by SGD and the certificate uses only the others; data-free: the prior is centred "
        "on the initialisation (--prior-init, else the recorded one). Default: data-dependent, "
        "or data-free when --prior-init is given.",
        choices=PriorKind,
    )
    prior_fraction: float = option(
        0.5,
        "--prior-fraction",
        "data-dependent: the fraction F of the n training examples (the first ⌊F·n⌋ of a seeded "
        "permutation) that train the prior; the bound is computed on the other m.",
    )
    prior_epochs: int = option(
        20, "--prior-epochs", "data-dependent: SGD epochs over the prior's examples.", min=0
    )
    prior_lr: float = option(
        0.05, "--prior-lr", "data-dependent: the prior's SGD learning rate (momentum 0.9)."
    )
    prior_batch_size: int = option(
        64, "--prior-batch-size", "data-dependent: the prior's SGD mini-batch.", min=1
    )
    prior_start: str = option(
        "auto",
        "--prior-start",
        "data-dependent: where the prior's SGD starts: recorded (the initialisation flatcli "
        "train recorded), fresh (a new seeded initialisation of the spec) or auto (recorded "
        "if there is one, else fresh).",
        choices=PriorStart,
    )

    method: str | None = option(
        None,
        "--method",
        "The posterior: f-quad (Pérez-Ortiz et al. 2021: started at the prior's mean with "
        "std --sigma0, Adam on f_quad with a bounded cross-entropy) or, started at the trained "
        "weights on Eq. 46 of Wu et al. with RMSprop, a covariance diagonal in the standard "
        "basis (vanilla, Dziugaite & Roy) or in each layer's K-FAC eigenbasis, fixed at the "
        "trained weights (approx-hessian) or recomputed every --eta epochs "
        "(iterative-hessian). Default: f-quad with a data-dependent prior, else vanilla.",
        choices=Method,
    )
    # Eq. 46: 40 passes; RMSprop lr τ = 0.01 (0.001 needs ~10x the steps); mini-batch 64: more
    # steps per epoch (one weight sample each); step schedule: lr ÷ 10 for the last quarter
    epochs: int | None = option(
        None, "--epochs", "Epochs of the bound optimisation (default: f-quad 20, else 40).", min=0
    )
    lr: float | None = option(
        None,
        "--lr",
        "Learning rate of the bound optimisation: Adam for f-quad (default 0.001), RMSprop "
        "for the others (default 0.01).",
    )
    opt_batch_size: int | None = option(
        None,
        "--opt-batch-size",
        "Mini-batch of the bound optimisation (default: f-quad 250, else 64).",
        min=1,
    )
    sigma0: float = option(
        0.03,
        "--sigma0",
        "f-quad: the posterior's initial standard deviation σ₀ and the prior's initial "
        "λ = σ₀² (both then optimised).",
    )
    p_min: float = option(
        1e-4,
        "--p-min",
        "f-quad: the bounded cross-entropy's probability floor: −ln max(p_y, p_min)/ln(1/p_min) "
        "lies in [0, 1].",
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
    # snn_test_error is an estimate, not a certificate: with 100 samples its Monte-Carlo
    # standard error (about 0.001 on LeNet-5) is far below the test set's own (0.0075 for
    # 1,000 examples at error 0.06), and the train step keeps its time
    test_mc_samples: int | None = option(
        None,
        "--test-mc-samples",
        "Weight samples for snn_test_error (default: --mc-samples, at most 100; 0: skip).",
        min=0,
    )
    delta: float = option(0.025, "--delta", "δ of the PAC-Bayes step.")
    delta_prime: float = option(0.01, "--delta-prime", "δ′ of the Monte-Carlo step.")
    b: float = option(100.0, "--b", "Prior grid λ = c·exp(−j/b): b.")
    c: float | None = option(
        None,
        "--c",
        "Prior grid λ = c·exp(−j/b): c (default: 0.1; f-quad: σ₀²·e^(1/b), so that the grid's "
        "first point λ₁ is the prior's starting σ₀² and costs no union term).",
    )
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
        "Checkpoint holding a data-free prior's centre w₀ (the network's initialisation); "
        "selects --prior data-free. Default: the initial weights flatcli train recorded in "
        "the checkpoint.",
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
        if self.prior is None:
            self.prior = "data-free" if self.prior_init is not None else "data-dependent"
        self.prior = choice(PriorKind, self.prior, "--prior")
        self.prior_start = choice(PriorStart, self.prior_start, "--prior-start")
        if self.method is None:
            self.method = "f-quad" if self.prior == PriorKind.DATA_DEPENDENT else "vanilla"
        self.method = choice(Method, self.method, "--method")
        epochs, lr, batch = METHOD_DEFAULTS[self.method]
        self.epochs = epochs if self.epochs is None else self.epochs
        self.lr = lr if self.lr is None else self.lr
        self.opt_batch_size = batch if self.opt_batch_size is None else self.opt_batch_size
        self.schedule = choice(Schedule, self.schedule, "--schedule")
        if self.c is None:
            first = self.sigma0**2 * math.exp(1.0 / self.b) if self.b > 0 else 0.1
            self.c = first if self.method == Method.F_QUAD else 0.1
        if self.test_mc_samples is None and self.mc_samples >= 1:
            self.test_mc_samples = min(self.mc_samples, 100)
        require(
            [
                (
                    not (self.prior == PriorKind.DATA_DEPENDENT and self.prior_init is not None),
                    "--prior-init names a data-free prior's centre; it cannot be combined with "
                    "--prior data-dependent (whose SGD starts from --prior-start)",
                ),
                (
                    0.0 < self.prior_fraction < 1.0,
                    f"--prior-fraction must be in (0, 1); got {self.prior_fraction}",
                ),
                (self.prior_epochs >= 0, f"--prior-epochs must be >= 0; got {self.prior_epochs}"),
                (self.prior_lr > 0, f"--prior-lr must be > 0; got {self.prior_lr}"),
                (
                    self.prior_batch_size >= 1,
                    f"--prior-batch-size must be >= 1; got {self.prior_batch_size}",
                ),
                (self.sigma0 > 0, f"--sigma0 must be > 0; got {self.sigma0}"),
                (0 < self.p_min < 1, f"--p-min must be in (0, 1); got {self.p_min}"),
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
        """The options as they go into a report's ``config`` (the resolved values)."""
        return asdict(self)

    @property
    def data_dependent(self) -> bool:
        """True when the prior's mean is trained on part of the training set."""
        return self.prior == PriorKind.DATA_DEPENDENT
