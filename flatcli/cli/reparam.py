"""``flatcli reparam``: apply a function-preserving reparametrisation and audit the sharpness
measures on the original and the transformed network (which ones moved?).

No ``from __future__ import annotations`` here: the option annotations must be objects, since
``analysis_command`` re-evaluates string annotations in its own module's namespace.
"""

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from flatcli.cli.errors import handle_errors
from flatcli.cli.options import analysis_command
from flatcli.cli.runner import AnalysisContext, run_analysis
from flatcli.cli.sharpness import (
    AdaptiveSteps,
    DiagMethodOpt,
    EpsSteps,
    LossOpt,
    MeasureOpt,
    Probes,
    TraceProbes,
    sharpness_options,
)
from flatcli.curvature.diagonal import DiagMethod
from flatcli.curvature.losses import LossName
from flatcli.errors import UsageError
from flatcli.io.checkpoint import save_checkpoint
from flatcli.reparam import InvarianceAudit, Transform, apply_transform, audit_invariance

TransformOpt = Annotated[
    str,
    typer.Option(
        "--transform", help="layer-scale (Dinh et al.), neuron-scale (Eqs. 15-16) or bn-scale."
    ),
]
Alpha = Annotated[float, typer.Option("--alpha", help="The transform's factor α > 0.")]
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
        help="Invariance threshold on the relative change "
        "(default 1e-6 in float64, 1e-3 in float32).",
    ),
]
Output = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Also write the transformed network as a .safetensors checkpoint (one input only).",
    ),
]


def _transform_name(value: str) -> str:
    name = value.strip().lower().replace("-", "_")
    valid = [t.value.replace("_", "-") for t in Transform]
    if name not in {t.value for t in Transform}:
        raise UsageError(f"Unknown transform {value!r}; choose one of {', '.join(valid)}.")
    return name


def register(app: typer.Typer) -> None:
    """Add ``reparam`` to the app."""

    @analysis_command(
        app,
        "reparam",
        help="Rescale a network without changing its function; "
        "show which sharpness measures change.",
    )
    def reparam(
        common,
        transform: TransformOpt = "layer-scale",
        alpha: Alpha = 10.0,
        layer: LayerOpt = None,
        neurons: Neurons = None,
        measure: MeasureOpt = None,
        diag_method: DiagMethodOpt = DiagMethod.GGN,
        loss: LossOpt = LossName.NSCE,
        probes: Probes = 100,
        trace_probes: TraceProbes = 100,
        eps_steps: EpsSteps = 20,
        adaptive_steps: AdaptiveSteps = 20,
        rtol: Rtol = None,
        output: Output = None,
    ) -> None:
        with handle_errors(common.debug):  # a bad option value: one line, exit 2
            name = _transform_name(transform)
            if not alpha > 0:
                raise UsageError(f"--alpha must be > 0; got {alpha}")
            config = sharpness_options(
                measure,
                diag_method,
                loss,
                LossName.CE,
                probes,
                10,
                0.5,
                1e-9,
                trace_probes,
                None,
                1e-3,
                eps_steps,
                None,
                "inf",
                adaptive_steps,
                0.25,
                "float64",
                common.seed,
                common.batch_size,
            )
            if output is not None:
                if len(common.checkpoints) != 1 or common.checkpoints[0].is_dir():
                    raise UsageError(
                        "--output writes one checkpoint: give exactly one checkpoint file"
                    )
                if name == Transform.BN_SCALE.value:
                    raise UsageError(
                        "--output cannot store bn-scale: it changes BatchNorm eps, which a "
                        "checkpoint "
                        "does not hold (the audit itself works without --output)"
                    )
            threshold = rtol if rtol is not None else (1e-6 if common.dtype == "float64" else 1e-3)
            parsed_layer: Any = (
                int(layer)
                if layer is not None and layer.isdigit() and name == "neuron_scale"
                else layer
            )

        def measure_fn(ctx: AnalysisContext) -> InvarianceAudit:
            cfg = dataclasses.replace(config, seed=ctx.seed, batch_size=ctx.batch_size)
            if output is not None:
                other = apply_transform(
                    ctx.model, name, alpha, ctx.seed, layer=parsed_layer, neurons=neurons
                )
                spec = ctx.spec.to_dict()
                meta = {
                    **(ctx.checkpoint.meta or {}),
                    "reparam": {
                        "transform": name,
                        "alpha": alpha,
                        "source": str(ctx.checkpoint.path),
                    },
                }
                save_checkpoint(output, other.state_dict(), spec=spec, meta=meta)
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
            "transform": name,
            "alpha": alpha,
            "layer": layer,
            "neurons": neurons,
            "rtol": threshold,
            "output": str(output) if output else None,
        }
        run_analysis(
            "reparam", common, {**config.to_dict(), **extra}, measure_fn, columns, rows=rows
        )
