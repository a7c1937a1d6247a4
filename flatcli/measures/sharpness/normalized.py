"""Normalized sharpness (Tsuzuku et al. 2020, Eq. 17, Algorithm 1).

Per weight matrix W the minimum over row/column scales σ, σ' of
``Σ h_ij (σ_iσ'_j)² + W_ij² / (2λ(σ_iσ'_j)²)``, summed over the weight matrices; h is the shared
curvature diagonal of ``config.normalized_loss`` (the NSCE surrogate of Eq. 20 by default)
clipped at 0.
The per-layer convex solve and its certified gap are in :mod:`._solver`. Reported with
``normalized_sharpness_gap`` (the layers' certified gaps, summed) and, with Hutchinson diagonals
in two or more probe groups, ``normalized_sharpness_stderr`` (jackknife over the groups,
leaving one out; it measures the spread over probes, not the upward bias of the clipping).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from flatcli.curvature.diagonal import CurvatureDiagonal
from flatcli.curvature.params import param_slices
from flatcli.measures.sharpness._definition import (
    Definition,
    Extra,
    Outcome,
    Shared,
    define,
    hutchinson_diagonal,
)
from flatcli.measures.sharpness._solver import LayerSolution, layer_terms, solve_normalized_layer

if TYPE_CHECKING:
    from flatcli.measures.sharpness._config import SharpnessConfig

NAME = "normalized_sharpness"
SOURCE = "Tsuzuku et al. 2020, Eq. 17"
JACKKNIFE_RTOL = 1e-6
"""Solver tolerance for the jackknife replicates (their spread is far above it)."""


def compute(shared: Shared) -> Outcome:
    """Eq. 17 on the shared diagonal: the per-layer minima, their gaps and the jackknife."""
    model, names, config, diag = shared.model, shared.names, shared.config, shared.diagonal
    assert diag is not None
    start = time.perf_counter()
    h = {k: v.numpy() for k, v in diag.values.items()}
    sols = _solve_all(model, names, h, config, config.solver_rtol)
    solver = {
        k: {
            "value": s.value,
            "gap": s.gap,
            "iterations": s.iterations,
            "newton_steps": s.newton_steps,
            "converged": s.converged,
            "active_rows": s.active_rows,
            "active_cols": s.active_cols,
            "vanishing_entries": s.vanishing_entries,
            "clipped_entries": int((diag.values[k] < 0).sum()) + int((diag.values[k] == 0).sum()),
        }
        for k, s in sols.items()
    }
    seconds = {"solver": time.perf_counter() - start}
    settings = {
        "loss": config.normalized_loss,
        "lam": config.lam,
        "diag_method": config.diag_method,
        "matrix": diag.matrix,
        "probes": diag.probes,
        "clip": "h <- max(h, 0) (Algorithm 1)",
        "solver": "exact alternating minimisation + safeguarded Newton, GP-dual gap",
        "solver_rtol": config.solver_rtol,
        "one_dim_params": "excluded (footnote 5)",
    }
    stderr = None
    if diag.group_values is not None and diag.group_values.shape[0] >= 2:
        start = time.perf_counter()
        stderr = _jackknife(model, names, diag, config, sols)
        seconds["jackknife"] = time.perf_counter() - start
        settings["stderr"] = (
            f"jackknife over {diag.group_values.shape[0]} independently seeded probe groups "
            "(spread only: clipping noisy entries at 0 biases the estimate upward)"
        )
    return Outcome(
        value=float(sum(s.value for s in sols.values())),
        settings=settings,
        stderr=stderr,
        extras={f"{NAME}_gap": float(sum(s.gap for s in sols.values()))},
        per_layer={k: s.value for k, s in sols.items()},
        seconds=seconds,
        info={"solver": solver},
    )


def _groups(model: nn.Module, name: str) -> int:
    """The ``groups`` of the convolution owning parameter ``name`` (1 for anything else)."""
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    is_conv = isinstance(owner, nn.modules.conv._ConvNd) and not owner.transposed
    return int(owner.groups) if is_conv else 1


def _solve_all(
    model: nn.Module,
    names: list[str],
    diag: dict[str, np.ndarray],
    config: SharpnessConfig,
    rtol: float,
    warm: dict[str, LayerSolution] | None = None,
) -> dict[str, LayerSolution]:
    """Eq. 17's minimum for each weight matrix (warm-started from ``warm`` when given)."""
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        a, b = layer_terms(
            params[name].detach().double().cpu().numpy(),
            diag[name],
            config.lam,
            _groups(model, name),
        )
        out[name] = solve_normalized_layer(
            a,
            b,
            rtol=rtol,
            max_iter=config.solver_max_iter,
            y0=None if warm is None else warm[name].y,
        )
    return out


def _jackknife(
    model: nn.Module,
    names: list[str],
    diag: CurvatureDiagonal,
    config: SharpnessConfig,
    full: dict[str, LayerSolution],
) -> float:
    """Leave-one-group-out jackknife standard error of normalized sharpness (warm-started)."""
    groups = diag.group_values  # (G, dim)
    g = int(groups.shape[0])
    total = groups.sum(dim=0)
    slices = param_slices({k: diag.values[k].shape for k in names})
    reps = []
    for i in range(g):
        flat = ((total - groups[i]) / (g - 1)).numpy()
        h = {k: flat[sl].reshape(tuple(diag.values[k].shape)) for k, sl in slices.items()}
        sols = _solve_all(model, names, h, config, JACKKNIFE_RTOL, warm=full)
        reps.append(sum(s.value for s in sols.values()))
    reps_a = np.asarray(reps)
    return float(math.sqrt((g - 1) / g * ((reps_a - reps_a.mean()) ** 2).sum()))


define(
    Definition(
        name=NAME,
        order=10,
        header="normalized",
        label="normalized sharpness",
        source=SOURCE,
        description="Σ over weight matrices of min over row/column scales σ, σ' of "
        "Σ h_ij(σ_iσ'_j)² + W_ij²/(2λ(σ_iσ'_j)²)",
        cost="one curvature diagonal (ggn: K backward passes per example; hutchinson: --probes "
        "Hessian-vector products; exact: one per weight) and a convex solve per layer",
        compute=compute,
        stderr=hutchinson_diagonal,
        extras=(
            Extra(
                f"{NAME}_gap", "gap", "certified optimality gap of the per-layer solves (summed)"
            ),
        ),
        weight_matrices=True,
        diagonal=lambda config: True,
    )
)
