"""``flatcli spectrum``: top eigenvalues, trace and spectral density of the Hessian, GGN or Fisher.

No ``from __future__ import annotations`` here: the option annotations must be objects, since
``analysis_command`` re-evaluates string annotations in its own module's namespace.
"""

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer
from safetensors.torch import save_file

from flatcli import distributed
from flatcli.cli.options import analysis_command
from flatcli.cli.runner import AnalysisContext, run_analysis
from flatcli.curvature.lanczos import DEFAULT_TOL, Which
from flatcli.curvature.losses import LossName
from flatcli.curvature.operators import HvpMethod, Kind
from flatcli.curvature.params import unflatten_columns
from flatcli.io.plot import plot_format, plot_spectrum, require_matplotlib, spectrum_plot_kind
from flatcli.measures.registry import get_measure, reported_keys
from flatcli.measures.spectrum import SpectrumConfig, SpectrumResult, TraceMethod, compute_spectrum

_TOP = {"largest": "λ_max", "smallest": "λ_min", "magnitude": "|λ|_max"}


TopK = Annotated[int, typer.Option("--top-k", min=0, help="Eigenvalues to compute (0: none).")]
WhichOpt = Annotated[Which, typer.Option("--which", help="End of the spectrum to look at.")]
MatrixOpt = Annotated[Kind, typer.Option("--matrix", help="Curvature matrix of the mean loss.")]
Tol = Annotated[
    float, typer.Option("--tol", help="Lanczos residual tolerance, relative to |λ_max|.")
]
LanczosSteps = Annotated[
    int | None,
    typer.Option(
        "--lanczos-steps",
        min=1,
        help="Most Lanczos steps for the eigenvalues; steps per density run (default 90).",
    ),
]
TraceFlag = Annotated[
    bool, typer.Option("--trace", help="Estimate the trace, with a standard error.")
]
TraceMethodOpt = Annotated[
    TraceMethod,
    typer.Option(
        "--trace-method", help="hutchpp (fewer products when a few eigenvalues dominate)."
    ),
]
Probes = Annotated[int, typer.Option("--probes", min=2, help="Products the trace may spend.")]
TraceRelStderr = Annotated[
    float | None,
    typer.Option(
        "--trace-rel-stderr",
        help="Stop the trace once its standard error is below this fraction of it.",
    ),
]
DensityFlag = Annotated[
    bool,
    typer.Option("--density", help="Spectral density by stochastic Lanczos quadrature (JSON)."),
]
DensityRuns = Annotated[int, typer.Option("--density-runs", min=1, help="Random start vectors.")]
Layer = Annotated[
    list[str] | None,
    typer.Option("--layer", help="Module name or glob: restrict to its parameters. Repeatable."),
]
PerLayer = Annotated[
    bool,
    typer.Option("--per-layer", help="Also a row per parameterised module (its diagonal block)."),
]
LossOpt = Annotated[
    LossName, typer.Option("--loss", help="Loss head (nsce: normalized softmax CE).")
]
HeadDtype = Annotated[
    str,
    typer.Option("--head-dtype", help="dtype of the loss head (float64 keeps confident examples)."),
]
HvpMethodOpt = Annotated[HvpMethod, typer.Option("--hvp-method", help="How products are formed.")]
SaveEigenvectors = Annotated[
    Path | None,
    typer.Option("--save-eigenvectors", help="Folder for <checkpoint>.eigenvectors.safetensors."),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Write a figure (PNG; .pdf/.svg by suffix): the density with --density, else the "
        "top eigenvalue per layer with --per-layer, else the top-k eigenvalues. "
        "Needs matplotlib: pip install 'flatcli\\[plot]'.",
    ),
]


def _save_eigenvectors(result: SpectrumResult, ctx: AnalysisContext, folder: Path) -> str:
    """Write ``<folder>/<checkpoint stem>.eigenvectors.safetensors``: one ``(k, *shape)`` tensor
    per parameter (row i is eigenvector i) and ``eigenvalues`` (k,); returns the path.

    Under ``torchrun`` every process holds the same (replicated) eigenvectors and only rank 0
    writes the file; the others return the same path.
    """
    assert result.eigen is not None and result.eigenvectors is not None
    shapes = {n: p.shape for n, p in ctx.model.named_parameters() if n in result.slices}
    tensors = unflatten_columns(result.eigenvectors.detach(), shapes)
    tensors = {n: t.contiguous().cpu() for n, t in tensors.items()}
    tensors["eigenvalues"] = result.eigen.eigenvalues.clone()
    path = folder / f"{Path(ctx.checkpoint.path).stem}.eigenvectors.safetensors"
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"flatcli.matrix": result.config.matrix, "flatcli.which": result.config.which}
        save_file(tensors, str(path), metadata=meta)
    return str(path)


def register(app: typer.Typer) -> None:
    """Add ``spectrum`` to the app."""

    @analysis_command(
        app, "spectrum", help="Top eigenvalues (Lanczos), trace (Hutch++) and density (SLQ)."
    )
    def spectrum(
        common,
        top_k: TopK = 10,
        which: WhichOpt = Which.LARGEST,
        matrix: MatrixOpt = Kind.HESSIAN,
        tol: Tol = DEFAULT_TOL,
        lanczos_steps: LanczosSteps = None,
        trace: TraceFlag = False,
        trace_method: TraceMethodOpt = TraceMethod.HUTCHPP,
        probes: Probes = 100,
        trace_rel_stderr: TraceRelStderr = None,
        density: DensityFlag = False,
        density_runs: DensityRuns = 1,
        layer: Layer = None,
        per_layer: PerLayer = False,
        loss: LossOpt = LossName.CE,
        head_dtype: HeadDtype = "float64",
        hvp_method: HvpMethodOpt = HvpMethod.AUTO,
        save_eigenvectors: SaveEigenvectors = None,
        plot: PlotOpt = None,
    ) -> None:
        config = SpectrumConfig(
            matrix=matrix.value,
            top_k=top_k,
            which=which.value,
            tol=tol,
            lanczos_steps=lanczos_steps,
            trace=trace,
            trace_method=trace_method.value,
            probes=probes,
            trace_rel_stderr=trace_rel_stderr,
            density=density,
            density_runs=density_runs,
            layers=tuple(layer) if layer else None,
            per_layer=per_layer,
            seed=common.seed,
            batch_size=common.batch_size,
            head_dtype=head_dtype,
            loss=loss.value,
            hvp_method=hvp_method.value,
            eigenvectors=save_eigenvectors is not None and top_k > 0,
        )
        if plot is not None:  # before any measuring: a missing extra costs nothing
            plot_kind = spectrum_plot_kind(
                density=density, per_layer=per_layer, top_k=top_k, trace=trace
            )
            plot_format(plot)
            require_matplotlib()

        def measure(ctx: AnalysisContext) -> SpectrumResult:
            cfg = dataclasses.replace(config, seed=ctx.seed, batch_size=ctx.batch_size)
            result = compute_spectrum(ctx.model, ctx.x, ctx.y, cfg, progress=ctx.progress)
            if cfg.eigenvectors:
                saved = _save_eigenvectors(result, ctx, save_eigenvectors)
                result = dataclasses.replace(result, eigenvectors_file=saved)
            return result

        columns = [("top_eigenvalue", _TOP[which.value])] if top_k > 0 else []
        if trace:
            columns += [("trace", "trace"), ("trace_stderr", "± stderr")]
        columns += [("num_params", "params"), ("matvecs", "products")]

        def rows(name: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
            out = [{"checkpoint": name, **entry["metrics"]}]
            for block in entry["details"].get("per_layer") or []:
                out.append({**block, "checkpoint": f"  {block['name']}"})
            return out

        def draw(entries: list[dict[str, Any]]) -> None:
            plot_spectrum(entries, plot, plot_kind, matrix=config.matrix, which=config.which)

        extra = {
            "save_eigenvectors": str(save_eigenvectors) if save_eigenvectors else None,
            "plot": str(plot) if plot else None,
        }
        run_analysis(
            "spectrum",
            common,
            {**config.to_dict(), **extra},
            measure,
            columns,
            rows=rows if per_layer else None,
            after=draw if plot is not None else None,
            metrics=reported_keys(get_measure("spectrum"), config),
        )
