"""``flatcli pacbayes``: optimised, certified PAC-Bayes bounds (Dziugaite & Roy 2017; Wu et al. 2020).

No ``from __future__ import annotations`` here: the option annotations must be objects, since
``analysis_command`` re-evaluates string annotations in its own module's namespace.
"""

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from flatcli.cli.errors import handle_errors
from flatcli.cli.options import analysis_command
from flatcli.cli.runner import AnalysisContext, run_analysis
from flatcli.io.checkpoint import expand_checkpoints
from flatcli.measures.pacbayes import PacBayesConfig, PacBayesResult, pacbayes_on_run
from flatcli.pacbayes.optimize import Method, Schedule
from flatcli.pacbayes.prior import check_prior_available

PriorInit = Annotated[
    Path | None,
    typer.Option(
        "--prior-init",
        help="Checkpoint holding the prior's centre w₀ (the network's initialisation). Default: the initial weights flatcli train recorded in the checkpoint.",
    ),
]
MethodOpt = Annotated[
    Method,
    typer.Option(
        "--method",
        help="Posterior covariance: diagonal in the standard basis (vanilla, Dziugaite & Roy) or in each layer's K-FAC eigenbasis, fixed at the trained weights (approx-hessian) or recomputed every --eta epochs (iterative-hessian).",
    ),
]
Epochs = Annotated[int, typer.Option("--epochs", min=0, help="Epochs of the bound optimisation.")]
Lr = Annotated[float, typer.Option("--lr", help="RMSprop learning rate of the bound optimisation.")]
OptBatch = Annotated[
    int, typer.Option("--opt-batch-size", min=1, help="Mini-batch of the bound optimisation.")
]
ScheduleOpt = Annotated[
    Schedule,
    typer.Option("--schedule", help="constant, step (lr/10 for the last quarter) or cosine."),
]
McSamples = Annotated[
    int,
    typer.Option(
        "--mc-samples", min=1, help="n: weight samples of the certificate's Monte-Carlo step."
    ),
]
TestMcSamples = Annotated[
    int | None,
    typer.Option(
        "--test-mc-samples",
        min=0,
        help="Weight samples for snn_test_error (default: --mc-samples; 0: skip).",
    ),
]
Delta = Annotated[float, typer.Option("--delta", help="δ of the PAC-Bayes step.")]
DeltaPrime = Annotated[float, typer.Option("--delta-prime", help="δ′ of the Monte-Carlo step.")]
B = Annotated[float, typer.Option("--b", help="Prior grid λ = c·exp(−j/b): b.")]
C = Annotated[float, typer.Option("--c", help="Prior grid λ = c·exp(−j/b): c.")]
Eta = Annotated[
    int,
    typer.Option(
        "--eta", min=1, help="iterative-hessian: recompute the eigenbasis every η epochs."
    ),
]
KfacExamples = Annotated[
    int,
    typer.Option(
        "--kfac-examples", min=1, help="Training examples the K-FAC factors are estimated on."
    ),
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="Fuse the bound optimisation's elementwise work with torch.compile: faster steps; the last bits of the numbers may differ. Needs a C++ compiler on a CPU; the first run compiles (about 20 s), later runs reuse the cache (about 3 s).",
    ),
]

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

    @analysis_command(
        app,
        "pacbayes",
        help="Optimise a Gaussian posterior and certify its error (Dziugaite & Roy 2017; Wu et al. 2020, Eq. 43).",
    )
    def pacbayes(
        common,
        prior_init: PriorInit = None,
        method: MethodOpt = Method.VANILLA,
        epochs: Epochs = PacBayesConfig.epochs,
        lr: Lr = PacBayesConfig.lr,
        opt_batch_size: OptBatch = PacBayesConfig.opt_batch_size,
        schedule: ScheduleOpt = Schedule.STEP,
        mc_samples: McSamples = PacBayesConfig.mc_samples,
        test_mc_samples: TestMcSamples = None,
        delta: Delta = PacBayesConfig.delta,
        delta_prime: DeltaPrime = PacBayesConfig.delta_prime,
        b: B = PacBayesConfig.b,
        c: C = PacBayesConfig.c,
        eta: Eta = PacBayesConfig.eta,
        kfac_examples: KfacExamples = PacBayesConfig.kfac_examples,
        compile: CompileOpt = PacBayesConfig.compile,
    ) -> None:
        with handle_errors(common.debug):  # a bad option value or no prior: one line, exit 2
            config = PacBayesConfig(
                method=method.value,
                epochs=epochs,
                lr=lr,
                opt_batch_size=opt_batch_size,
                schedule=schedule.value,
                mc_samples=mc_samples,
                test_mc_samples=test_mc_samples,
                delta=delta,
                delta_prime=delta_prime,
                b=b,
                c=c,
                eta=eta,
                kfac_examples=kfac_examples,
                prior_init=None if prior_init is None else str(prior_init),
                unsafe_load=common.unsafe_load,
                seed=common.seed,
                batch_size=common.batch_size,
                compile=compile,
            )
            for path in expand_checkpoints(common.checkpoints):
                check_prior_available(path, prior_init, unsafe=common.unsafe_load)

        def measure(ctx: AnalysisContext) -> PacBayesResult:
            cfg = dataclasses.replace(config, seed=ctx.seed, batch_size=ctx.batch_size)
            return pacbayes_on_run(ctx, cfg, ctx.progress)

        run_analysis("pacbayes", common, config.to_dict(), measure, COLUMNS, rows=_rows)
