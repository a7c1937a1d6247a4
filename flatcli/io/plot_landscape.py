"""Figures of ``flatcli landscape --plot``: a line's loss (and accuracy), a plane's contours.

- A line (``--dims 1``): the loss against α, one curve per checkpoint, with the accuracy on a
  second axis (dashed) for classification losses; α = 0 (θ*) and, for ``--to``, α = 1 marked.
- A plane (``--dims 2``): one panel per checkpoint, the loss as a heatmap with contour lines
  over it, one colour scale for all panels, θ* marked with a cross (Li et al. 2018, §3, draw
  contour plots of f(α, β)).

Like :mod:`flatcli.io.plot`, matplotlib (the optional extra ``plot``) is imported only inside
the functions, and figures are drawn on an Agg canvas, never through ``pyplot``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flatcli.errors import MeasureError
from flatcli.io.plot import _colors, _figure, _labels, plot_format, require_matplotlib

__all__ = ["plot_landscape"]

_DPI = 90
_LOG_RATIO = 30.0
"""A loss whose largest finite value exceeds the smallest by this factor is drawn on a log
scale (the walls of a basin otherwise flatten its floor)."""


def plot_landscape(entries: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Draw ``flatcli landscape`` results into ``path`` (png, pdf or svg by suffix).

    Args:
        entries: report entries of ``landscape`` (those with an error are skipped), all lines
            or all planes.
        path: the figure file (parent folders are created).

    Returns:
        The path written.

    Raises:
        UsageError: matplotlib is missing or the suffix is not png/pdf/svg.
        MeasureError: no checkpoint was measured.
    """
    require_matplotlib()
    fmt = plot_format(path)
    measured = [e for e in entries if e.get("error") is None and e.get("details", {}).get("loss")]
    if not measured:
        raise MeasureError(f"no checkpoint was measured, so no plot was written to {path}")
    labels = _labels([e["checkpoint"] for e in measured])
    details = [e["details"] for e in measured]
    planes = ["betas" in d for d in details]
    fig = _planes(details, labels) if all(planes) else _lines(details, labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"pil_kwargs": {"optimize": True}} if fmt == "png" else {}
    fig.savefig(path, format=fmt, dpi=_DPI, **extra)
    return path


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else math.nan


def _log_scale(values: list[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > _LOG_RATIO


def _what(d: dict[str, Any]) -> str:
    """The directions in words, for a title."""
    info = d.get("directions") or {}
    kind = info.get("kind", "")
    norm = info.get("normalization")
    if kind == "random" and isinstance(norm, str):
        return f"random directions, {'filter-normalised' if norm == 'filter' else 'unnormalised'}"
    if kind == "to":
        return f"line to {Path(str(info.get('to', ''))).name}"
    return f"{kind} directions"


def _lines(details: list[dict], labels: list[str]):
    fig = _figure(7.0, 4.4)
    ax = fig.add_subplot()
    curves = [([_num(a) for a in d["alphas"]], [_num(v) for v in d["loss"]]) for d in details]
    accuracy = [d.get("accuracy") for d in details]
    twin = ax.twinx() if any(a is not None for a in accuracy) else None
    for (alphas, loss), acc, label, color in zip(
        curves, accuracy, labels, _colors(len(curves)), strict=True
    ):
        ax.plot(alphas, loss, color=color, linewidth=1.6, marker=".", label=label)
        if twin is not None and acc is not None:
            values = [_num(v) for v in acc]
            twin.plot(alphas, values, color=color, linewidth=1.1, linestyle="--", alpha=0.8)
    if _log_scale([v for _, loss in curves for v in loss]):
        ax.set_yscale("log")
    ax.axvline(0.0, color="0.4", linewidth=0.8, linestyle=":")
    if any((d.get("directions") or {}).get("kind") == "to" for d in details):
        ax.axvline(1.0, color="0.4", linewidth=0.8, linestyle=":")
    ax.set_xlabel("α (along d₁)")
    ax.set_ylabel("loss (solid)")
    if twin is not None:
        twin.set_ylabel("accuracy (dashed)")
        twin.set_ylim(-0.02, 1.02)
    ax.set_title(f"Loss along d₁ ({_what(details[0])})")
    ax.grid(True, alpha=0.3)
    if twin is not None:
        ax.plot([], [], color="0.4", linestyle="--", linewidth=1.1, label="accuracy")
    ax.legend(
        fontsize="small",
        frameon=False,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.14),
        ncol=min(4, len(curves) + (twin is not None)),
    )
    return fig


def _planes(details: list[dict], labels: list[str]):
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    n = len(details)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = _figure(4.6 * cols + 0.9, 4.0 * rows)
    grids = [np.array([[_num(v) for v in row] for row in d["loss"]], dtype=float) for d in details]
    values = np.concatenate([g.ravel() for g in grids])
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    log = _log_scale([lo, hi])
    norm = LogNorm(lo, hi) if log else Normalize(lo, hi if hi > lo else lo + 1.0)
    levels = np.geomspace(lo, hi, 14) if log else np.linspace(lo, hi if hi > lo else lo + 1.0, 14)
    mesh = None
    for i, (d, grid, label) in enumerate(zip(details, grids, labels, strict=True)):
        ax = fig.add_subplot(rows, cols, i + 1)
        alphas = np.array([_num(a) for a in d["alphas"]])
        betas = np.array([_num(b) for b in d["betas"]])
        z = np.ma.masked_invalid(grid.T)  # rows of the report are alphas: x is α, y is β
        mesh = ax.pcolormesh(alphas, betas, z, norm=norm, cmap="viridis", shading="nearest")
        if finite.size and hi > lo:
            ax.contour(alphas, betas, z, levels=levels, colors="white", linewidths=0.6)
        ax.plot([0.0], [0.0], marker="+", color="red", markersize=12, markeredgewidth=2)
        ax.set_xlabel("α (d₁)")
        ax.set_ylabel("β (d₂)")
        ax.set_title(f"{label}\n{_what(d)}", fontsize="small")
        ax.set_aspect("equal")
    if mesh is not None:
        fig.colorbar(mesh, ax=fig.axes, label="loss" + (" (log scale)" if log else ""))
    return fig
