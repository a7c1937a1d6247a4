"""``flatcli spectrum``: top eigenvalues, trace and spectral density of the Hessian, GGN or Fisher."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatcli.cli.options import Common, Paths, command
from flatcli.configs.spectrum import SpectrumConfig
from flatcli.options import option

_TOP = {"largest": "λ_max", "smallest": "λ_min", "magnitude": "|λ|_max"}


@dataclass(frozen=True)
class SpectrumFiles:
    """What ``spectrum`` writes besides the report."""

    save_eigenvectors: Path | None = option(
        None, "--save-eigenvectors", "Folder for <checkpoint>.eigenvectors.safetensors."
    )
    plot: Path | None = option(
        None,
        "--plot",
        "Write a figure (PNG; .pdf/.svg by suffix): the density with --density, else the "
        "top eigenvalue per layer with --per-layer, else the top-k eigenvalues. "
        "Needs matplotlib: pip install 'flatcli\\[plot]'.",
    )


@command("spectrum", help="Top eigenvalues (Lanczos), trace (Hutch++) and density (SLQ).")
def spectrum(
    checkpoints: Paths, config: SpectrumConfig, files: SpectrumFiles, common: Common
) -> None:
    """Measure the spectrum of every checkpoint."""
    from flatcli.cli.render import analyse
    from flatcli.io.plot import plot_format, plot_spectrum, require_matplotlib, spectrum_plot_kind
    from flatcli.measures.registry import get_measure, reported_keys
    from flatcli.measures.spectrum import save_eigenvectors
    from flatcli.run import Context, registered

    folder = files.save_eigenvectors
    config = dataclasses.replace(config, eigenvectors=folder is not None and config.top_k > 0)
    if files.plot is not None:  # before any measuring: a missing extra costs nothing
        kind = spectrum_plot_kind(
            density=config.density,
            per_layer=config.per_layer,
            top_k=config.top_k,
            trace=config.trace,
        )
        plot_format(files.plot)
        require_matplotlib()
    compute = registered(get_measure("spectrum"), config)

    def measure(ctx: Context) -> Any:
        result = compute(ctx)
        if config.eigenvectors:
            saved = save_eigenvectors(result, ctx, folder)
            result = dataclasses.replace(result, eigenvectors_file=saved)
        return result

    columns = [("top_eigenvalue", _TOP[config.which])] if config.top_k > 0 else []
    if config.trace:
        columns += [("trace", "trace"), ("trace_stderr", "± stderr")]

    def rows(name: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
        blocks = entry["details"].get("per_layer") or []
        return [{"checkpoint": name, **entry["metrics"]}] + [
            {**block, "checkpoint": f"  {block['name']}"} for block in blocks
        ]

    def draw(entries: list[dict[str, Any]]) -> None:
        plot_spectrum(entries, files.plot, kind, matrix=config.matrix, which=config.which)

    analyse(
        "spectrum",
        checkpoints,
        measure,
        [*columns, ("num_params", "params"), ("matvecs", "products")],
        common=common,
        config={**config.to_dict(), **{k: v and str(v) for k, v in vars(files).items()}},
        metrics=reported_keys(get_measure("spectrum"), config),
        rows=rows if config.per_layer else None,
        after=draw if files.plot is not None else None,
    )
