"""Figures of ``flatcli rank --plot DIR``: one scatter per metric, the metric against the gap.

Like :mod:`flatcli.io.plot`, matplotlib (the optional extra ``plot``) is imported only inside
the functions, and figures are drawn on an Agg canvas, never through ``pyplot``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flatcli.errors import MeasureError, UsageError
from flatcli.io.plot import _colors, _figure, require_matplotlib

__all__ = ["plot_rank"]

_DPI = 150


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".png"


def _label(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_label(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def plot_rank(
    rows: Sequence[Mapping[str, Any]],
    statistics: Mapping[str, Mapping[str, Any]],
    folder: str | Path,
    *,
    color_by: str | None = None,
    axes: Sequence[str] = (),
) -> list[Path]:
    """Write ``<folder>/<metric>.png`` for every metric of ``statistics``.

    Each figure plots the metric (as measured, not sign-flipped) against the generalization
    gap, one point per ranked checkpoint, coloured by the hyperparameter ``color_by`` (default:
    the sweep's first axis); the title gives Kendall's τ with its bootstrap interval and Ψ.

    Args:
        rows: the rank rows (report entries with ``gap`` and ``hyperparameters``); rows with an
            error or without the metric are left out.
        statistics: the per-metric statistics of :func:`flatcli.rank.core.sweep_statistics`.
        folder: where the PNG files go (created if missing).
        color_by: a hyperparameter to colour by.
        axes: the sweep's axes (the default ``color_by`` is the first).

    Returns:
        The paths written.

    Raises:
        UsageError: matplotlib is missing, or ``color_by`` is no hyperparameter of the rows.
        MeasureError: no checkpoint was ranked.
    """
    require_matplotlib()
    ok = [r for r in rows if r.get("error") is None and r.get("gap") is not None]
    if not ok:
        raise MeasureError(f"no checkpoint was ranked, so no plot was written to {folder}")
    hue = color_by or (axes[0] if axes else None)
    if hue is not None and all(hue not in r.get("hyperparameters", {}) for r in ok):
        names = sorted({k for r in ok for k in r.get("hyperparameters", {})})
        raise UsageError(
            f"--color-by {hue}: not a hyperparameter of these checkpoints; "
            f"hyperparameters: {', '.join(names)}"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key, st in statistics.items():
        use = [
            r
            for r in ok
            if isinstance(r["metrics"].get(key), int | float) and math.isfinite(r["metrics"][key])
        ]
        fig = _figure(6.0, 4.4)
        ax = fig.add_subplot()
        if hue is not None:
            levels = sorted({r["hyperparameters"].get(hue) for r in use}, key=repr)
            for level, color in zip(levels, _colors(len(levels)), strict=True):
                pts = [r for r in use if r["hyperparameters"].get(hue) == level]
                ax.scatter(
                    [r["gap"] for r in pts],
                    [r["metrics"][key] for r in pts],
                    color=color,
                    label=f"{hue} = {_label(level)}",
                    s=28,
                )
            if levels:
                ax.legend(fontsize="small", frameon=False)
        else:
            ax.scatter([r["gap"] for r in use], [r["metrics"][key] for r in use], s=28)
        tau, ci, psi = st.get("kendall_tau"), st.get("kendall_tau_ci"), st.get("psi")
        title = f"{key} ({st.get('direction')}): τ-{st.get('tau_variant', 'a')} = "
        title += "n/a" if tau is None else f"{tau:.3f}"
        if ci is not None:
            title += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
        title += ", Ψ = " + ("n/a" if psi is None else f"{psi:.3f}")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("generalization gap")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
        path = folder / _file_name(key)
        fig.savefig(path, format="png", dpi=_DPI)
        written.append(path)
    return written
