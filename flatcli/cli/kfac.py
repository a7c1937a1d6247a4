"""``flatcli kfac``: does the layer-wise Hessian factor as E[M] ⊗ E[xxᵀ] (Wu et al. 2020)?"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatcli.cli.options import Common, Paths, command
from flatcli.configs.kfac import KfacConfig
from flatcli.errors import UsageError
from flatcli.options import option

COLUMNS = [
    ("shape", "shape"),
    ("decoupling", "decoupling err"),
    ("stderr", "± stderr"),
    ("overlap10", "overlap@10"),
    ("spectral_ratio", "‖E[x]E[x]ᵀ‖/‖Σ‖"),
    ("mean_alignment", "|⟨Ê[x],v₁⟩|"),
    ("rank1", "σ₁/‖h₁‖_F"),
    ("gaps", "gap E[M]/H"),
]
COMPARE_COLUMNS = [("cross", "overlap@m vs compare"), ("predicted", "(Ê[x]₁ᵀÊ[x]₂)²")]


@dataclass(frozen=True)
class KfacFiles:
    """What ``kfac`` writes besides the report."""

    plot: Path | None = option(
        None,
        "--plot",
        "Folder for PNGs: overlap curves, correspondence heatmaps, spectra. Needs "
        "matplotlib: pip install 'flatcli\\[plot]'.",
    )


def layer_rows(name: str, entry: dict[str, Any], compare: bool) -> list[dict[str, Any]]:
    """The checkpoint's summary row, then one row per analysed layer."""
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
            "cross": _or_reason(m, "compare_overlap_at_m_min", entry["details"]),
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
            row["cross"] = _or_reason(layer["compare"], "exact_overlap_at_m", layer["compare"])
            row["predicted"] = layer["compare"]["predicted_overlap_at_m"]
        out.append(row)
    return out


def _or_reason(values: dict[str, Any], key: str, details: dict[str, Any]) -> Any:
    """``values[key]``, or ``n/a (cause)`` for a null one with a reason in ``details``."""
    why = (details.get("reasons") or details.get("nonfinite") or {}).get(key)
    return f"n/a ({why.split(':')[0]})" if values.get(key) is None and why else values.get(key)


@command(
    "kfac",
    help="Kronecker factors E[M] ⊗ E\\[xxᵀ] of each layer's Hessian against the exact block "
    "(Wu et al. 2020): overlaps, correspondences, E\\[xxᵀ] structure, decoupling error.",
)
def kfac(checkpoints: Paths, config: KfacConfig, files: KfacFiles, common: Common) -> None:
    """Compare every layer's Hessian block with its Kronecker factors, per checkpoint."""
    from flatcli.cli.render import analyse
    from flatcli.measures.registry import get_measure, reported_keys
    from flatcli.run import registered

    compare = config.compare is not None
    if compare and not Path(config.compare).is_file():
        raise UsageError(f"--compare: no checkpoint file {config.compare}")
    if files.plot is not None:  # before any measuring: a missing extra costs nothing
        from flatcli.io.plot import require_matplotlib

        require_matplotlib()

    def draw(entries: list[dict[str, Any]]) -> None:
        from flatcli.io.plot_kfac import plot_kfac

        plot_kfac(entries, files.plot)

    analyse(
        "kfac",
        checkpoints,
        registered(get_measure("kfac"), config),
        COLUMNS + (COMPARE_COLUMNS if compare else []),
        common=common,
        config={**config.to_dict(), "plot": str(files.plot) if files.plot else None},
        metrics=reported_keys(get_measure("kfac"), config),
        rows=lambda name, entry: layer_rows(name, entry, compare),
        after=draw if files.plot is not None else None,
    )
