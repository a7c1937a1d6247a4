"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

The spectral density ``φ(t) = (1/n) Σ_i δ(t − λ_i)`` is smoothed by a Gaussian of width ``σ``
and estimated as in Ghorbani, Krishnan & Xiao, *An Investigation into Neural Net Optimization
via Hessian Eigenvalue Density*, ICML 2019, §2.2 (the definition PyHessian implements): for
``runs`` random unit start vectors ``v``, ``m`` Lanczos steps give nodes ``θ_j`` (Ritz values)
and weights ``τ_j²`` (squared first components of the eigenvectors of ``T``), a Gauss quadrature
of ``vᵀ f(A) v`` (see :func:`~flatcli.curvature.lanczos.lanczos_quadrature`), and

    φ_σ(t) ≈ (1/runs) Σ_runs Σ_j τ_j² g_σ(t − θ_j),   g_σ(x) = exp(−x²/2σ²) / (σ√(2π)).

Since ``E[v vᵀ] = I/n`` for a unit random ``v``, the density's first moment
``(1/runs) Σ_runs Σ_j τ_j² θ_j = (1/runs) Σ vᵀ A v`` estimates ``tr(A)/n``.

>>> import torch
>>> from flatcli.curvature.linop import DenseOperator
>>> A = torch.diag(torch.linspace(0.0, 1.0, 50, dtype=torch.float64))
>>> d = spectral_density(DenseOperator(A), runs=2, steps=20)
>>> round(float(torch.trapezoid(d.values, d.grid)), 6)
1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flatcli.curvature.lanczos import lanczos_quadrature
from flatcli.curvature.linop import LinearOperator, random_vectors, work_device
from flatcli.distributed import broadcast_for
from flatcli.progress import ProgressFn, no_progress

__all__ = ["Density", "spectral_density"]

DEFAULT_SIGMA_FRACTION = 0.01
"""Default Gaussian width as a fraction of the range of the nodes."""

DEFAULT_PAD_SIGMAS = 5.0
"""The grid extends this many ``σ`` beyond the extreme nodes, so every Gaussian integrates to 1
within 6e-7."""


@dataclass(frozen=True)
class Density:
    """A smoothed spectral density and the quadrature behind it.

    Attributes:
        grid: ``(G,)`` float64 points ``t``.
        values: ``(G,)`` float64 density ``φ_σ(t)``; integrates to 1 over the grid.
        nodes: ``(runs, m)`` float64 Ritz values of each run (padded with weight 0 where a run
            ended early).
        weights: ``(runs, m)`` float64 quadrature weights; each row sums to 1.
        sigma: width of the Gaussian kernel.
        matvecs: products spent.
    """

    grid: Tensor
    values: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    matvecs: int

    @property
    def runs(self) -> int:
        return int(self.nodes.shape[0])

    def run_means(self) -> Tensor:
        """``(runs,)`` first moment of each run's quadrature, ``vᵀ A v``."""
        return (self.weights * self.nodes).sum(dim=1)

    @property
    def mean(self) -> float:
        """First moment of the density, an estimate of ``tr(A) / n``."""
        return float(self.run_means().mean())

    @property
    def mean_stderr(self) -> float:
        """Standard error of :attr:`mean` over the runs (NaN with one run)."""
        if self.runs < 2:
            return math.nan
        return float(self.run_means().std(correction=1)) / math.sqrt(self.runs)


def spectral_density(
    op: LinearOperator,
    runs: int = 1,
    steps: int = 90,
    seed: int = 0,
    *,
    probe: Literal["gaussian", "rademacher"] = "gaussian",
    grid_points: int = 1000,
    sigma: float | None = None,
    sigma_fraction: float = DEFAULT_SIGMA_FRACTION,
    pad: float | None = None,
    progress: ProgressFn | None = None,
) -> Density:
    """Stochastic Lanczos quadrature estimate of the spectral density of ``op``.

    Args:
        op: a symmetric operator.
        runs: number of random start vectors (the density is averaged over them).
        steps: Lanczos steps per run (products per run; capped at ``dim``).
        seed: seeds the start vectors.
        probe: distribution of the start vectors before normalisation.
        grid_points: points of the evaluation grid.
        sigma: Gaussian width; default ``sigma_fraction`` times the range of the nodes.
        sigma_fraction: see ``sigma``.
        pad: margin of the grid beyond the extreme nodes; default ``5σ``.
        progress: called as ``progress("density", steps done, runs · m)`` after each Lanczos
            step (``m = min(steps, dim)``; a run that breaks down early counts as ``m``).

    Returns:
        A :class:`Density`.
    """
    if runs < 1 or steps < 1:
        raise ValueError(f"runs and steps must be positive. Got runs={runs}, steps={steps}.")
    start = op.matvecs
    generator = torch.Generator().manual_seed(seed)
    m = min(steps, op.dim)
    nodes = torch.zeros(runs, m, dtype=torch.float64)
    weights = torch.zeros(runs, m, dtype=torch.float64)
    report = progress or no_progress
    for r in range(runs):
        v = broadcast_for(op, random_vectors(op.dim, 1, generator, probe, work_device(op))[:, 0])
        theta, w = lanczos_quadrature(
            op, v, m, progress=lambda _, j, _m, r=r: report("density", r * m + j, runs * m)
        )
        report("density", (r + 1) * m, runs * m)
        j = len(theta)
        nodes[r, :j], weights[r, :j] = theta, w
        nodes[r, j:] = theta[-1]  # padding carries weight 0

    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        width = hi - lo if hi > lo else max(abs(hi), 1.0)
        sigma = sigma_fraction * width
    if sigma <= 0:
        raise ValueError(f"sigma must be positive. Got sigma={sigma}.")
    if pad is None:
        pad = DEFAULT_PAD_SIGMAS * sigma
    grid = torch.linspace(lo - pad, hi + pad, grid_points, dtype=torch.float64)
    z = (grid[:, None] - nodes.reshape(1, -1)) / sigma  # (G, runs * m)
    kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    values = kernel @ weights.reshape(-1) / runs
    return Density(grid, values, nodes, weights, float(sigma), op.matvecs - start)
