"""``flatcli gamma``: the Fisher log-determinant γ̂ of fisher-gamma-local-minima.md Eq. 5.

No ``from __future__ import annotations`` here: the option annotations must be objects, since
``analysis_command`` re-evaluates string annotations in its own module's namespace.
"""

import dataclasses
from typing import Annotated

import typer

from flatcli.cli.options import analysis_command
from flatcli.cli.runner import AnalysisContext, run_analysis
from flatcli.curvature.gram import GramMethod
from flatcli.measures.gamma import BNMode, GammaConfig, GammaResult, compute_gamma
from flatcli.measures.registry import get_measure, reported_keys

Samples = Annotated[
    int, typer.Option("--samples", min=1, help="N': examples per sample S^t (the paper: 100).")
]
Trials = Annotated[int, typer.Option("--trials", min=1, help="T: samples drawn (the paper: 100).")]
Baselines = Annotated[
    bool,
    typer.Option(
        "--baselines",
        help="Also the robustness baseline (mean squared spectral norm of d softmax / d input, "
        "by power iteration over every example). The Gram-based baselines are always reported.",
    ),
]
LogitScale = Annotated[
    float | None,
    typer.Option(
        "--logit-scale",
        help="Rescale the logits to this norm before the softmax (the authors' code: 25 = 1/0.04).",
    ),
]
BNModeOpt = Annotated[
    BNMode,
    typer.Option(
        "--bn-mode",
        help="BatchNorm statistics: eval (running) or train (of each sample, as the authors' "
        "code; exact but N' backward passes per sample).",
    ),
]
MethodOpt = Annotated[
    GramMethod,
    typer.Option(
        "--method",
        help="Gram engine: ghost (one forward+backward per chunk, never forms J), materialize "
        "(vmap per-example gradients) or auto (ghost where it applies).",
    ),
]
HeadDtype = Annotated[
    str,
    typer.Option("--head-dtype", help="dtype of the loss head (float64 keeps confident examples)."),
]


def register(app: typer.Typer) -> None:
    """Add ``gamma`` to the app."""

    @analysis_command(app, "gamma", help="γ̂ = mean ln|J Jᵀ| over samples (Jia & Su, Eq. 5).")
    def gamma(
        common,
        samples: Samples = 100,
        trials: Trials = 100,
        baselines: Baselines = False,
        logit_scale: LogitScale = None,
        bn_mode: BNModeOpt = BNMode.EVAL,
        method: MethodOpt = GramMethod.AUTO,
        head_dtype: HeadDtype = "float64",
    ) -> None:
        config = GammaConfig(
            samples=samples,
            trials=trials,
            logit_scale=logit_scale,
            baselines=baselines,
            bn_mode=bn_mode.value,
            seed=common.seed,
            batch_size=common.batch_size,
            method=method.value,
            head_dtype=head_dtype,
        )

        def measure(ctx: AnalysisContext) -> GammaResult:
            cfg = dataclasses.replace(config, seed=ctx.seed, batch_size=ctx.batch_size)
            return compute_gamma(ctx.model, ctx.x, ctx.y, cfg, progress=ctx.progress)

        columns = [
            ("gamma_hat", "γ̂"),
            ("gamma_hat_std", "± std"),
            ("fisher_trace", "tr/N'"),
            ("spectral_radius", "λ_max"),
            ("fisher_frobenius_sq", "‖ξ‖²_F/N'²"),
            ("fisher_frobenius_sq_diag", "Σ‖g‖⁴/N'"),
        ]
        if baselines:
            columns.append(("robustness", "robustness"))
        columns.append(("num_params", "params"))
        metrics = reported_keys(get_measure("gamma"), config)
        run_analysis("gamma", common, config.to_dict(), measure, columns, metrics=metrics)
