"""Figures of ``flatcli kfac --plot DIR`` (Wu et al. 2020, Figs. 2-5), drawn from report entries.

Per checkpoint and layer, PNGs in DIR:

- ``<stem>.<layer>.overlap.png``: top-k eigenspace overlap of the Kronecker approximation and the
  exact block against k (Fig. 2b), with the cross-checkpoint overlaps of ``--compare`` (Fig. 5)
  and the prediction (Ê[x]₁ᵀÊ[x]₂)² at k = m;
- ``<stem>.<layer>.spectra.png``: the top eigenvalues of the exact block and of E[M] ⊗ E[xxᵀ]
  (Fig. 2a), and E[M]'s spectrum scaled by E[xxᵀ]'s top eigenvalue (Fig. 4);
- ``<stem>.<layer>.correspondence.png``: eigenvector correspondence matrices with E[M] and
  E[xxᵀ], exact and approximate (Fig. 3).

matplotlib is optional (the ``plot`` extra) and imported only here, inside the function.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from flatcli.io.plot import _DPI, _figure, require_matplotlib

__all__ = ["plot_kfac"]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "root"


def _pos(values: list[Any]) -> list[float]:
    return [float(v) if isinstance(v, int | float) and v > 0 else math.nan for v in values]


def plot_kfac(entries: list[dict[str, Any]], folder: str | Path) -> list[Path]:
    """Write the overlap, spectra and correspondence figures of every measured layer.

    Args:
        entries: report result entries of ``flatcli kfac`` (those with an error are skipped).
        folder: output directory (created).

    Returns:
        The files written.
    """
    require_matplotlib()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for entry in entries:
        if entry.get("error") is not None:
            continue
        stem = Path(entry["checkpoint"]).stem
        for layer in entry["details"]["layers"]:
            base = folder / f"{_safe(stem)}.{_safe(layer['name'])}"
            written.append(_overlap(layer, Path(f"{base}.overlap.png")))
            written.append(_spectra(layer, Path(f"{base}.spectra.png")))
            written.append(_correspondence(layer, Path(f"{base}.correspondence.png")))
    return written


def _title(layer: dict[str, Any]) -> str:
    m, n = layer["shape"]
    return f"{layer['name']} ({layer['kind']}, m={m}, n={n}, P={layer['positions']})"


def _overlap(layer: dict[str, Any], path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    ov = layer["overlap"]
    ks = list(range(1, len(ov) + 1))
    ax.plot(ks, ov, marker=".", label="E[M]⊗E[xxᵀ] vs exact block")
    cmp = layer.get("compare")
    if cmp:
        ax.plot(ks[: len(cmp["exact_overlap"])], cmp["exact_overlap"], label="exact vs compare")
        ax.plot(
            ks[: len(cmp["kron_overlap"])], cmp["kron_overlap"], ls="--", label="K-FAC vs compare"
        )
        if cmp.get("predicted_overlap_at_m") is not None:
            ax.scatter(
                [cmp["m"]],
                [cmp["predicted_overlap_at_m"]],
                marker="*",
                s=80,
                color="k",
                label="(Ê[x]₁ᵀÊ[x]₂)² at k = m",
                zorder=3,
            )
    ax.set_xlabel("k")
    ax.set_ylabel("top-k eigenspace overlap")
    ax.set_ylim(0, 1.02)
    ax.set_title(_title(layer), fontsize="medium")
    ax.legend(fontsize="small", frameon=False)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _spectra(layer: dict[str, Any], path: Path) -> Path:
    fig = _figure(10.0, 4.0)
    ax1, ax2 = fig.subplots(1, 2)
    ex, kr = _pos(layer["exact_eigenvalues"]), _pos(layer["kron_eigenvalues"])
    ax1.semilogy(range(1, len(ex) + 1), ex, marker="o", ls="", label="exact block")
    ax1.semilogy(range(1, len(kr) + 1), kr, marker="x", ls="", label="E[M]⊗E[xxᵀ]")
    ax1.set_xlabel("i")
    ax1.set_ylabel("eigenvalue")
    ax1.set_title("top eigenvalues", fontsize="medium")
    ax1.legend(fontsize="small", frameon=False)
    mu1 = (layer["exx_eigenvalues"] or [math.nan])[0]
    em = [v * mu1 for v in _pos(layer["em_eigenvalues"])][: max(len(ex), 1) * 2]
    ax2.semilogy(range(1, len(em) + 1), em, marker=".", label="eig(E[M]) · μ₁(E[xxᵀ])")
    ax2.semilogy(range(1, len(ex) + 1), ex, marker="o", ls="", label="exact block")
    ax2.set_xlabel("i")
    ax2.set_title(
        f"outliers (gap E[M] / block: {layer['em_outlier_gap']} / {layer['exact_outlier_gap']})",
        fontsize="medium",
    )
    ax2.legend(fontsize="small", frameon=False)
    fig.suptitle(_title(layer), fontsize="medium")
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _correspondence(layer: dict[str, Any], path: Path) -> Path:
    corr = layer["correspondence"]
    fig = _figure(10.0, 7.0)
    axes = fig.subplots(2, 2)
    panels = [
        ("exact_vs_em", "exact h_j vs u_i of E[M]"),
        ("kron_vs_em", "K-FAC h_j vs u_i of E[M]"),
        ("exact_vs_exx", "exact h_j vs v_i of E[xxᵀ]"),
        ("kron_vs_exx", "K-FAC h_j vs v_i of E[xxᵀ]"),
    ]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        data = [[math.nan if v is None else v for v in row] for row in corr[key]]
        extent = (0.5, len(data[0]) + 0.5, len(data) + 0.5, 0.5) if data and data[0] else None
        im = ax.imshow(
            data,
            vmin=0,
            vmax=1,
            cmap="viridis",
            aspect="auto",
            interpolation="none",
            extent=extent,
        )
        ax.set_title(title, fontsize="small")
        ax.set_xlabel("j (Hessian eigenvector)")
        ax.set_ylabel("i (factor eigenvector)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="Corr")
    fig.suptitle(_title(layer), fontsize="medium")
    fig.savefig(path, format="png", dpi=_DPI)
    return path
