"""``flatcli sharpness``: normalized sharpness and the classic sharpness measures.

No ``from __future__ import annotations`` here: the option annotations must be objects, since
``analysis_command`` re-evaluates string annotations in its own module's namespace.
"""

import dataclasses
from typing import Annotated, Any

import typer

from flatcli.cli.errors import handle_errors
from flatcli.cli.options import analysis_command
from flatcli.cli.runner import AnalysisContext, run_analysis
from flatcli.curvature.diagonal import DiagMethod
from flatcli.curvature.losses import LossName
from flatcli.errors import UsageError
from flatcli.measures.invariance import audit_invariance
from flatcli.measures.sharpness import (
    ALL_MEASURES,
    SharpnessConfig,
    SharpnessResult,
    compute_sharpness,
    sharpness_metric_keys,
)
from flatcli.reparam import Transform

MeasureOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--measure",
        help=f"Measure to compute (repeatable; default all): {', '.join(ALL_MEASURES)}.",
    ),
]
DiagMethodOpt = Annotated[
    DiagMethod,
    typer.Option(
        "--diag-method",
        help="Hessian diagonal: hutchinson (HVP probes), ggn (exact GGN), exact (small models).",
    ),
]
LossOpt = Annotated[
    LossName,
    typer.Option("--loss", help="Loss of the normalized measures' Hessian (nsce: Eq. 20)."),
]
ClassicLossOpt = Annotated[
    LossName,
    typer.Option(
        "--classic-loss", help="Loss of hessian_trace, eps_sharpness and adaptive_sharpness."
    ),
]
Probes = Annotated[
    int, typer.Option("--probes", min=2, help="Hutchinson probes for the Hessian diagonal.")
]
ProbeGroups = Annotated[
    int,
    typer.Option(
        "--probe-groups",
        min=1,
        help="Seeded probe groups (jackknife stderr of normalized sharpness).",
    ),
]
Lam = Annotated[float, typer.Option("--lam", help="λ of Eq. 17 (the paper uses 1/2).")]
SolverRtol = Annotated[
    float,
    typer.Option(
        "--solver-rtol",
        help="Stop each layer's solver when its certified gap is below this fraction.",
    ),
]
TraceProbes = Annotated[
    int, typer.Option("--trace-probes", min=2, help="Hutchinson probes for traces.")
]
TraceRelStderr = Annotated[
    float | None,
    typer.Option("--trace-rel-stderr", help="Stop trace probes at this relative stderr."),
]
Eps = Annotated[float, typer.Option("--eps", help="Keskar's box size ε of eps_sharpness.")]
EpsSteps = Annotated[int, typer.Option("--eps-steps", min=0, help="Ascent steps of eps_sharpness.")]
Rho = Annotated[
    float | None,
    typer.Option(
        "--rho", help="Radius of adaptive_sharpness (default 1e-3 for p=inf, 0.1 for p=2)."
    ),
]
POpt = Annotated[str, typer.Option("--p", help="Norm of adaptive_sharpness: inf or 2.")]
AdaptiveSteps = Annotated[
    int, typer.Option("--adaptive-steps", min=0, help="Ascent steps of adaptive_sharpness.")
]
StepSize = Annotated[
    float, typer.Option("--step-size", help="Ascent step as a fraction of the radius.")
]
HeadDtype = Annotated[
    str,
    typer.Option("--head-dtype", help="dtype of the loss head (float64 keeps confident examples)."),
]
Force = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Run --diag-method exact (one Hessian-vector product per parameter) even when its "
        "estimated time is over an hour.",
    ),
]
PerLayer = Annotated[
    bool, typer.Option("--per-layer", help="Also a row per weight matrix (its term of each sum).")
]

Invariance = Annotated[
    bool,
    typer.Option(
        "--invariance",
        help="Audit: each measure on the checkpoint and on a function-preserving "
        "reparametrisation of it (--transform, --alpha), with the relative change.",
    ),
]
TransformOpt = Annotated[
    str | None,
    typer.Option(
        "--transform",
        help="layer-scale (Dinh et al.), neuron-scale (Eqs. 15-16) or bn-scale "
        "(default with --invariance: layer-scale).",
    ),
]
Alpha = Annotated[
    float | None, typer.Option("--alpha", help="The transform's factor α > 0 (default 10).")
]
LayerOpt = Annotated[
    str | None,
    typer.Option(
        "--layer",
        help="neuron-scale: the weight layer whose units are rescaled; bn-scale: the BatchNorm.",
    ),
]
Neurons = Annotated[
    int | None,
    typer.Option(
        "--neurons", min=1, help="neuron-scale: how many units (random, seeded; default half)."
    ),
]
Rtol = Annotated[
    float | None,
    typer.Option(
        "--rtol",
        help="--invariance: threshold on the relative change "
        "(default 1e-6 in float64, 1e-3 in float32).",
    ),
]


def transform_name(value: str) -> str:
    """The :class:`Transform` value of ``value`` (``-`` or ``_``); UsageError if unknown."""
    name = value.strip().lower().replace("-", "_")
    if name not in {t.value for t in Transform}:
        valid = [t.value.replace("_", "-") for t in Transform]
        raise UsageError(f"Unknown transform {value!r}; choose one of {', '.join(valid)}.")
    return name


def check_alpha(alpha: float) -> float:
    """``alpha`` if it is a finite number > 0, else UsageError."""
    if not (alpha > 0 and alpha < float("inf")):
        raise UsageError(f"--alpha must be a finite number > 0; got {alpha}")
    return alpha


def layer_arg(layer: str | None, name: str) -> Any:
    """``--layer`` as given, or an int index for neuron-scale when it is all digits."""
    if layer is not None and layer.isdigit() and name == Transform.NEURON_SCALE.value:
        return int(layer)
    return layer


_HEADERS = {
    "normalized_sharpness": ("normalized", "normalized_sharpness_stderr"),
    "matrix_normalized_sharpness": ("matrix-norm.", "matrix_normalized_sharpness_stderr"),
    "hessian_trace": ("tr(H)", "hessian_trace_stderr"),
    "eps_sharpness": ("ε-sharpness %", None),
    "adaptive_sharpness": ("adaptive", None),
}


def sharpness_options(
    measure: list[str] | None,
    diag_method: DiagMethod,
    loss: LossName,
    classic_loss: LossName,
    probes: int,
    probe_groups: int,
    lam: float,
    solver_rtol: float,
    trace_probes: int,
    trace_rel_stderr: float | None,
    eps: float,
    eps_steps: int,
    rho: float | None,
    p: str,
    adaptive_steps: int,
    step_size: float,
    head_dtype: str,
    seed: int,
    batch_size: int | None,
    force: bool = False,
) -> SharpnessConfig:
    """A validated :class:`SharpnessConfig` from the command-line values (UsageError if bad)."""
    return SharpnessConfig(
        measures=tuple(measure) if measure else ALL_MEASURES,
        loss=loss.value,
        classic_loss=classic_loss.value,
        diag_method=diag_method.value,
        probes=probes,
        probe_groups=probe_groups,
        lam=lam,
        solver_rtol=solver_rtol,
        trace_probes=trace_probes,
        trace_rel_stderr=trace_rel_stderr,
        eps=eps,
        eps_steps=eps_steps,
        adaptive_rho=rho,
        adaptive_p=p,
        adaptive_steps=adaptive_steps,
        step_size=step_size,
        head_dtype=head_dtype,
        seed=seed,
        batch_size=batch_size,
        force=force,
    )


def columns_for(config: SharpnessConfig) -> list[tuple[str, str]]:
    """Table columns: each measure, its stderr where it is stochastic, and the solver gap."""
    cols: list[tuple[str, str]] = []
    for m in config.measures:
        header, se = _HEADERS[m]
        cols.append((m, header))
        stochastic = (
            (config.diag_method != "exact")
            if m == "hessian_trace"
            else config.diag_method == "hutchinson"
        )
        if se is not None and stochastic:
            cols.append((se, "± stderr"))
        if m == "normalized_sharpness":
            cols.append(("normalized_sharpness_gap", "gap"))
    return cols


def register(app: typer.Typer) -> None:
    """Add ``sharpness`` to the app."""

    @analysis_command(
        app,
        "sharpness",
        help="Normalized sharpness (scale-invariant, Tsuzuku et al.) "
        "and the classic sharpness measures.",
    )
    def sharpness(
        common,
        measure: MeasureOpt = None,
        diag_method: DiagMethodOpt = DiagMethod.GGN,
        loss: LossOpt = LossName.NSCE,
        classic_loss: ClassicLossOpt = LossName.CE,
        probes: Probes = 100,
        probe_groups: ProbeGroups = 10,
        lam: Lam = 0.5,
        solver_rtol: SolverRtol = 1e-9,
        trace_probes: TraceProbes = 100,
        trace_rel_stderr: TraceRelStderr = None,
        eps: Eps = 1e-3,
        eps_steps: EpsSteps = 20,
        rho: Rho = None,
        p: POpt = "inf",
        adaptive_steps: AdaptiveSteps = 20,
        step_size: StepSize = 0.25,
        head_dtype: HeadDtype = "float64",
        force: Force = False,
        per_layer: PerLayer = False,
        invariance: Invariance = False,
        transform: TransformOpt = None,
        alpha: Alpha = None,
        layer: LayerOpt = None,
        neurons: Neurons = None,
        rtol: Rtol = None,
    ) -> None:
        with handle_errors(common.debug):  # a bad option value: one line, exit 2
            audit_opts = {
                "--transform": transform,
                "--alpha": alpha,
                "--layer": layer,
                "--neurons": neurons,
                "--rtol": rtol,
            }
            given = [k for k, v in audit_opts.items() if v is not None]
            if given and not invariance:
                raise UsageError(
                    f"{', '.join(given)} only apply with --invariance "
                    "(to write a reparametrised checkpoint, use `flatcli reparam`)"
                )
            if invariance and per_layer:
                raise UsageError("--per-layer does not combine with --invariance")
            config = sharpness_options(
                measure,
                diag_method,
                loss,
                classic_loss,
                probes,
                probe_groups,
                lam,
                solver_rtol,
                trace_probes,
                trace_rel_stderr,
                eps,
                eps_steps,
                rho,
                p,
                adaptive_steps,
                step_size,
                head_dtype,
                common.seed,
                common.batch_size,
                force,
            )

        if invariance:
            _audit(common, config, transform or "layer-scale", alpha, layer, neurons, rtol)

        def measure_fn(ctx: AnalysisContext) -> SharpnessResult:
            cfg = dataclasses.replace(config, seed=ctx.seed, batch_size=ctx.batch_size)
            return compute_sharpness(ctx.model, ctx.x, ctx.y, cfg, progress=ctx.progress)

        def rows(name: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
            out = [{"checkpoint": name, **entry["metrics"]}]
            layers = entry["details"].get("per_layer") or {}
            names = list(dict.fromkeys(k for terms in layers.values() for k in terms))
            for layer in names:
                out.append(
                    {"checkpoint": f"  {layer}", **{m: t.get(layer) for m, t in layers.items()}}
                )
            return out

        run_analysis(
            "sharpness",
            common,
            config.to_dict(),
            measure_fn,
            columns_for(config),
            rows=rows if per_layer else None,
            metrics=sharpness_metric_keys(config),
        )


def _audit(
    common: Any,
    config: SharpnessConfig,
    transform: str,
    alpha: float | None,
    layer: str | None,
    neurons: int | None,
    rtol: float | None,
) -> None:
    """``sharpness --invariance``: each measure on the checkpoint and on a reparametrised copy."""
    with handle_errors(common.debug):
        name = transform_name(transform)
        alpha = check_alpha(10.0 if alpha is None else alpha)
        threshold = rtol if rtol is not None else (1e-6 if common.dtype == "float64" else 1e-3)
        parsed_layer = layer_arg(layer, name)

    def measure_fn(ctx: AnalysisContext):
        cfg = dataclasses.replace(config, seed=ctx.seed, batch_size=ctx.batch_size)
        return audit_invariance(
            ctx.model,
            ctx.x,
            ctx.y,
            cfg,
            name,
            alpha,
            ctx.seed,
            rtol=threshold,
            layer=parsed_layer,
            neurons=neurons,
            progress=ctx.progress,
        )

    def rows(label: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
        out = [
            {
                "checkpoint": label,
                "max_logit_difference": entry["metrics"].get("max_logit_difference"),
            }
        ]
        for row in entry["details"].get("rows", []):
            out.append(
                {
                    "checkpoint": f"  {row['measure']}",
                    **row,
                    "invariant": "yes" if row["invariant"] else "NO",
                }
            )
        return out

    columns = [
        ("original", "original"),
        ("transformed", "transformed"),
        ("rel_change", "rel. change"),
        ("invariant", "invariant"),
        ("max_logit_difference", "max |Δ logit|"),
    ]
    extra = {
        "invariance": True,
        "transform": name,
        "alpha": alpha,
        "layer": layer,
        "neurons": neurons,
        "rtol": threshold,
    }
    metrics = ["max_logit_difference", *(f"{m}_rel_change" for m in config.measures)]
    run_analysis(
        "sharpness",
        common,
        {**config.to_dict(), **extra},
        measure_fn,
        columns,
        rows=rows,
        metrics=metrics,
    )
