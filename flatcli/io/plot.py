"""Figures of measured results (``flatcli spectrum --plot``).

The only module that imports matplotlib, and only inside functions: matplotlib is the optional
extra ``plot`` (``pip install 'flatcli[plot]'``), so everything else runs without it. Figures
are drawn on a :class:`~matplotlib.figure.Figure` with an Agg canvas, never through
``pyplot``: no display is needed and no global backend state is touched.

The figures are drawn from report entries (``result_entry`` dicts: ``checkpoint``, ``error``,
``details``), after every checkpoint is measured; an entry with an error is left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flatcli.errors import MeasureError, UsageError

__all__ = [
    "PLOT_INSTALL",
    "DENSITY_FLOOR",
    "plot_format",
    "require_matplotlib",
    "spectrum_plot_kind",
    "plot_spectrum",
]

PLOT_INSTALL = "pip install 'flatcli[plot]'"
"""The command that installs what ``--plot`` needs."""

DENSITY_FLOOR = 1e-7
"""Densities are clipped at this fraction of the highest peak before the log scale (PyHessian
adds 1e-7 to a density of unit mass for the same reason: the Gaussian tails reach 0)."""

_FORMATS = {"": "png", ".png": "png", ".pdf": "pdf", ".svg": "svg"}
_MATRIX = {"hessian": "Hessian", "ggn": "GGN", "fisher": "Fisher"}
_SYMBOL = {"largest": "λ_max", "smallest": "λ_min", "magnitude": "max |λ|"}
_DPI = 150
_MAX_BARS = 48
"""A per-layer chart with more (layer, checkpoint) pairs draws dots instead of bars."""


def require_matplotlib() -> None:
    """Raise a :class:`UsageError` naming the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends import backend_agg  # noqa: F401
    except ImportError:
        raise UsageError(
            f"--plot needs matplotlib, which is not installed; install it with: {PLOT_INSTALL}"
        ) from None


def plot_format(path: str | Path) -> str:
    """The file format for ``path`` from its suffix: png (also without a suffix), pdf or svg."""
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise UsageError(f"--plot writes .png, .pdf or .svg files; got '{path}'")
    return _FORMATS[suffix]


def spectrum_plot_kind(*, density: bool, per_layer: bool, top_k: int, trace: bool) -> str:
    """What ``spectrum --plot`` draws for these options.

    Returns:
        ``"density"`` (with ``--density``), ``"per_layer"`` (with ``--per-layer``: the top
        eigenvalue of each layer, or its trace when ``--top-k 0``) or ``"eigenvalues"``.

    Raises:
        UsageError: the options compute nothing a figure could show.
    """
    if density:
        return "density"
    if per_layer and (top_k > 0 or trace):
        return "per_layer"
    if top_k > 0:
        return "eigenvalues"
    raise UsageError("--plot needs something to draw: add --density, --per-layer or --top-k >= 1")


def plot_spectrum(
    entries: Sequence[dict[str, Any]],
    path: str | Path,
    kind: str,
    *,
    matrix: str = "hessian",
    which: str = "largest",
) -> Path:
    """Draw ``flatcli spectrum`` results into ``path`` (format from its suffix).

    Args:
        entries: report entries of ``spectrum``; those with an error are skipped.
        path: the figure file (parent folders are created).
        kind: ``"density"``, ``"per_layer"`` or ``"eigenvalues"``
            (see :func:`spectrum_plot_kind`).
        matrix: ``"hessian"``, ``"ggn"`` or ``"fisher"`` (for the labels).
        which: ``"largest"``, ``"smallest"`` or ``"magnitude"`` (for the labels).

    Returns:
        The path written.

    Raises:
        UsageError: matplotlib is missing or the suffix is not png/pdf/svg.
        MeasureError: no entry holds what ``kind`` draws (every checkpoint failed).
    """
    require_matplotlib()
    fmt = plot_format(path)
    draw = {"density": _density, "per_layer": _per_layer, "eigenvalues": _eigenvalues}
    if kind not in draw:
        raise ValueError(f"unknown plot kind {kind!r}")
    # the kind names the details field it draws
    measured = [e for e in entries if e.get("error") is None and (e.get("details") or {}).get(kind)]
    if not measured:
        raise MeasureError(f"no checkpoint was measured, so no plot was written to {path}")
    labels = _labels([e["checkpoint"] for e in measured])
    details = [e["details"] for e in measured]
    fig = draw[kind](details, labels, _MATRIX.get(matrix, matrix), which)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt, dpi=_DPI)
    return path


def _figure(width: float = 7.0, height: float = 4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _labels(checkpoints: list[str]) -> list[str]:
    """File names, or the whole paths when two checkpoints share a file name."""
    names = [Path(c).name for c in checkpoints]
    return names if len(set(names)) == len(names) else list(checkpoints)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](i / (n - 1)) for i in range(n)]


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else math.nan


def _log_scale_fits(values: list[float], ratio: float) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > ratio


def _legend(ax, n: int) -> None:
    ax.legend(fontsize="small", ncol=1 if n <= 6 else 2, frameon=False)


def _density(details: list[dict], labels: list[str], matrix: str, which: str):
    fig = _figure()
    ax = fig.add_subplot()
    curves = [
        ([_num(t) for t in d["density"]["grid"]], [_num(v) for v in d["density"]["values"]])
        for d in details
    ]
    peak = max((v for _, vals in curves for v in vals if math.isfinite(v)), default=1.0)
    floor = DENSITY_FLOOR * peak if peak > 0 else DENSITY_FLOOR
    for (grid, values), label, color in zip(curves, labels, _colors(len(curves)), strict=True):
        clipped = [max(v, floor) if math.isfinite(v) else math.nan for v in values]
        ax.plot(grid, clipped, label=label, color=color, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_ylim(floor * 0.5, peak * 3)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density (log scale)")
    runs = {d["density"].get("runs") for d in details}
    how = "stochastic Lanczos quadrature"
    if len(runs) == 1 and isinstance(r := runs.pop(), int):
        how += f", {r} run{'s' if r != 1 else ''}"
    ax.set_title(f"{matrix} spectral density ({how})")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, len(curves))
    return fig


def _per_layer(details: list[dict], labels: list[str], matrix: str, which: str):
    use_top = any(b.get("top_eigenvalue") is not None for d in details for b in d["per_layer"])
    key = "top_eigenvalue" if use_top else "trace"
    layers: list[str] = []
    for d in details:
        layers += [b["name"] for b in d["per_layer"] if b["name"] not in layers]
    values = [
        [_num({b["name"]: b.get(key) for b in d["per_layer"]}.get(name)) for name in layers]
        for d in details
    ]
    n, c = len(layers), len(details)
    bars = n * c <= _MAX_BARS  # else one dot per layer and checkpoint, joined per checkpoint
    per_layer_inches = 0.3 * c**0.5 if bars else 0.22
    fig = _figure(width=min(max(7.0, per_layer_inches * n + 2), 20.0), height=4.8)
    ax = fig.add_subplot()
    width = 0.8 / c
    for i, (row, label, color) in enumerate(zip(values, labels, _colors(c), strict=True)):
        if bars:
            xs = [j - 0.4 + width * (i + 0.5) for j in range(n)]
            ax.bar(xs, row, width=width, label=label, color=color)
        else:
            ax.plot(
                range(n),
                row,
                marker="o",
                markersize=4,
                linewidth=0.8,
                alpha=0.9,
                label=label,
                color=color,
            )
    ax.set_xticks(range(n))
    ax.set_xticklabels(
        layers,
        rotation=0 if n <= 6 else 60,
        ha="center" if n <= 6 else "right",
        rotation_mode="anchor",
        fontsize="small" if n > 12 else None,
    )
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("layer (its diagonal block of the matrix)")
    flat = [v for row in values for v in row]
    if _log_scale_fits(flat, 100):
        ax.set_yscale("log")
    elif any(v < 0 for v in flat if math.isfinite(v)):
        ax.axhline(0, color="black", linewidth=0.6)
    if use_top:
        symbol = _SYMBOL.get(which, which)
        ax.set_ylabel(symbol)
        ax.set_title(f"{matrix}: {symbol} of each layer's block")
    else:
        ax.set_ylabel("trace")
        ax.set_title(f"{matrix}: trace of each layer's block")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    _legend(ax, c)
    return fig


def _eigenvalues(details: list[dict], labels: list[str], matrix: str, which: str):
    from matplotlib.ticker import MaxNLocator

    fig = _figure()
    ax = fig.add_subplot()
    series = [[_num(v) for v in d["eigenvalues"]] for d in details]
    markers = "osD^vP*X"
    colors = _colors(len(series))
    for i, (vals, label, color) in enumerate(zip(series, labels, colors, strict=True)):
        ax.plot(
            range(1, len(vals) + 1),
            vals,
            marker=markers[i % len(markers)],
            markersize=5,
            linewidth=1.0,
            label=label,
            color=color,
        )
    k = max(len(s) for s in series)
    flat = [v for s in series for v in s]
    if _log_scale_fits(flat, 50):
        ax.set_yscale("log")
    elif any(v < 0 for v in flat if math.isfinite(v)):
        ax.axhline(0, color="black", linewidth=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, k + 0.5)
    order = {
        "largest": ("largest", "1 = largest"),
        "smallest": ("smallest", "1 = smallest"),
        "magnitude": ("largest-|λ|", "1 = largest |λ|"),
    }
    words, first = order.get(which, (which, "1 = first"))
    ax.set_xlabel(f"index i ({first})")
    ax.set_ylabel("eigenvalue λ_i")
    ax.set_title(f"The {k} {words} {matrix} eigenvalues (Lanczos)")
    ax.grid(True, alpha=0.3)
    _legend(ax, len(series))
    return fig
