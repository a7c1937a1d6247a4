"""``flatcli kfac``: does the layer-wise Hessian factor as E[M] ⊗ E[xxᵀ] (Wu et al. 2020)?

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
from flatcli.curvature.kfac import FisherMode
from flatcli.measures.kfac import KfacConfig, KfacResult, compute_kfac, load_compare_model

Layer = Annotated[
    list[str] | None,
    typer.Option("--layer", help="Linear/Conv2d module name or glob to analyse. Repeatable."),
]
TopK = Annotated[
    int,
    typer.Option("--top-k", min=1, help="K: eigenpairs of each exact block and overlaps k = 1..K."),
]
FisherOpt = Annotated[
    FisherMode,
    typer.Option(
        "--fisher", help="E[M]: exact (all c rows of the output-Hessian root) or mc (sampled)."
    ),
]
McSamples = Annotated[
    int, typer.Option("--mc-samples", min=1, help="Sampled labels per example with --fisher mc.")
]
MatrixOpt = Annotated[
    str, typer.Option("--matrix", help="Exact block of the hessian (default) or the ggn.")
]
Tol = Annotated[float, typer.Option("--tol", help="Lanczos tolerance, relative to |λ_max|.")]
LanczosSteps = Annotated[
    int | None,
    typer.Option("--lanczos-steps", min=1, help="Lanczos budget per layer (default 3K + 20)."),
]
Probes = Annotated[
    int,
    typer.Option("--probes", min=2, help="Rademacher probes of the decoupling error (per layer)."),
]
CorrRows = Annotated[
    int,
    typer.Option("--corr-rows", min=1, help="Factor eigenvectors in each correspondence matrix."),
]
Compare = Annotated[
    Path | None,
    typer.Option(
        "--compare",
        help="A second checkpoint: per layer, the overlap of the two top-k eigenspaces (Fig. 5 "
        "of Wu et al. 2020) on the same examples.",
    ),
]
PlotDir = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Folder for PNGs: overlap curves, correspondence heatmaps, spectra. Needs "
        "matplotlib: pip install 'flatcli\\[plot]'.",
    ),
]


def _layer_rows(name: str, entry: dict[str, Any], compare: bool) -> list[dict[str, Any]]:
    m = entry["metrics"]
    out = [
        {
            "checkpoint": name,
            "shape": f"{m.get('kfac_layers')} layers",
            "decoupling": m.get("decoupling_error_max"),
            "overlap10": m.get("overlap_at_10_min"),
            "spectral_ratio": m.get("spectral_ratio_min"),
            "mean_alignment": m.get("mean_alignment_min"),
            "rank1": m.get("rank1_score_min"),
            "cross": m.get("compare_overlap_at_m_min"),
        }
    ]
    for layer in entry["details"]["layers"]:
        ov = layer["overlap"]
        row = {
            "checkpoint": f"  {layer['name']}",
            "shape": "x".join(map(str, layer["shape"])) + (f" P={layer['positions']}"),
            "decoupling": layer["decoupling_error"],
            "stderr": layer["decoupling_error_stderr"],
            "overlap10": ov[min(10, len(ov)) - 1] if ov else None,
            "spectral_ratio": layer["spectral_ratio"],
            "mean_alignment": layer["mean_alignment"],
            "rank1": layer["rank1_scores"][0] if layer["rank1_scores"] else None,
            "gaps": f"{layer['em_outlier_gap']}/{layer['exact_outlier_gap']}",
        }
        if compare and layer.get("compare"):
            c = layer["compare"]
            row["cross"] = c["exact_overlap_at_m"]
            row["predicted"] = c["predicted_overlap_at_m"]
        out.append(row)
    return out


def register(app: typer.Typer) -> None:
    """Add ``kfac`` to the app."""

    @analysis_command(
        app,
        "kfac",
        help="Kronecker factors E[M] ⊗ E\\[xxᵀ] of each layer's Hessian against the exact block "
        "(Wu et al. 2020): overlaps, correspondences, E\\[xxᵀ] structure, decoupling error.",
    )
    def kfac(
        common,
        layer: Layer = None,
        top_k: TopK = 20,
        fisher: FisherOpt = FisherMode.EXACT,
        mc_samples: McSamples = 1,
        matrix: MatrixOpt = "hessian",
        tol: Tol = 1e-4,
        lanczos_steps: LanczosSteps = None,
        probes: Probes = 20,
        corr_rows: CorrRows = 20,
        compare: Compare = None,
        plot: PlotDir = None,
    ) -> None:
        with handle_errors(common.debug):  # a bad option value: one line, exit 2
            config = KfacConfig(
                layers=tuple(layer) if layer else None,
                top_k=top_k,
                fisher=fisher.value,
                mc_samples=mc_samples,
                matrix=matrix,
                tol=tol,
                lanczos_steps=lanczos_steps,
                probes=probes,
                corr_rows=corr_rows,
                compare=str(compare) if compare is not None else None,
                seed=common.seed,
                batch_size=common.batch_size,
            )
            if compare is not None and not compare.is_file():
                from flatcli.errors import UsageError

                raise UsageError(f"--compare: no checkpoint file {compare}")
            if plot is not None:  # before any measuring: a missing extra costs nothing
                from flatcli.io.plot import require_matplotlib

                require_matplotlib()

        def measure(ctx: AnalysisContext) -> KfacResult:
            cfg = dataclasses.replace(config, seed=ctx.seed, batch_size=ctx.batch_size)
            other = load_compare_model(cfg.compare, ctx) if cfg.compare else None
            return compute_kfac(
                ctx.model, ctx.x, ctx.y, cfg, compare_model=other, progress=ctx.progress
            )

        columns = [
            ("shape", "shape"),
            ("decoupling", "decoupling err"),
            ("stderr", "± stderr"),
            ("overlap10", "overlap@10"),
            ("spectral_ratio", "‖E[x]E[x]ᵀ‖/‖Σ‖"),
            ("mean_alignment", "|⟨Ê[x],v₁⟩|"),
            ("rank1", "σ₁/‖h₁‖_F"),
            ("gaps", "gap E[M]/H"),
        ]
        if compare is not None:
            columns += [("cross", "overlap@m vs compare"), ("predicted", "(Ê[x]₁ᵀÊ[x]₂)²")]

        def draw(entries: list[dict[str, Any]]) -> None:
            from flatcli.io.plot_kfac import plot_kfac

            plot_kfac(entries, plot)

        run_analysis(
            "kfac",
            common,
            {**config.to_dict(), "plot": str(plot) if plot else None},
            measure,
            columns,
            rows=lambda name, entry: _layer_rows(name, entry, compare is not None),
            after=draw if plot is not None else None,
        )
