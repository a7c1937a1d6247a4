"""Stochastic Lanczos quadrature density: a probability density whose moments are right."""

from __future__ import annotations

import math

import pytest
import torch

from flatcli.curvature.density import Density, spectral_density
from flatcli.curvature.linop import DenseOperator, random_vectors
from tests.curvature.test_linop import matrix_with_spectrum, spectrum


@pytest.mark.parametrize("name", ["mixed", "outliers", "negative"])
def test_density_integrates_to_one(name):
    op = DenseOperator(matrix_with_spectrum(spectrum(name)))
    d = spectral_density(op, runs=3, steps=40, seed=1)
    assert isinstance(d, Density) and d.matvecs == op.matvecs == 120
    assert bool((d.values >= 0).all())
    assert abs(float(torch.trapezoid(d.values, d.grid)) - 1.0) < 1e-6
    assert d.nodes.shape == d.weights.shape == (3, 40)
    torch.testing.assert_close(d.weights.sum(dim=1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("name", ["mixed", "outliers"])
def test_first_moment_estimates_trace_over_n(name):
    lam = spectrum(name)
    op = DenseOperator(matrix_with_spectrum(lam))
    d = spectral_density(op, runs=30, steps=10, seed=0)
    exact = float(lam.mean())
    assert abs(d.mean - exact) <= 3 * d.mean_stderr
    # the integral of t φ(t) over the grid is the same first moment (Gaussians are symmetric)
    assert abs(float(torch.trapezoid(d.grid * d.values, d.grid)) - d.mean) < 1e-6 * lam.abs().max()


def test_first_moment_of_each_run_is_its_rayleigh_quotient():
    A = matrix_with_spectrum(spectrum("mixed"))
    d = spectral_density(DenseOperator(A), runs=4, steps=15, seed=9)
    g = torch.Generator().manual_seed(9)
    for r in range(4):
        v = random_vectors(A.shape[0], 1, g, "gaussian")[:, 0]
        v = v / v.norm()
        assert abs(float(d.run_means()[r]) - float(v @ A @ v)) < 1e-10


def test_full_quadrature_is_the_exact_smoothed_density():
    lam = spectrum("negative")[:60]
    A = matrix_with_spectrum(lam)
    d = spectral_density(DenseOperator(A), runs=1, steps=60, seed=2, sigma=0.3)
    evals, U = torch.linalg.eigh(A)
    v = random_vectors(60, 1, torch.Generator().manual_seed(2), "gaussian")[:, 0]
    w = (U.T @ (v / v.norm())) ** 2
    z = (d.grid[:, None] - evals[None, :]) / 0.3
    exact = (torch.exp(-0.5 * z**2) / (0.3 * math.sqrt(2 * math.pi))) @ w
    torch.testing.assert_close(d.values, exact, atol=1e-9, rtol=0)


def test_extreme_nodes_converge_to_the_extreme_eigenvalues():
    lam = spectrum("mixed")
    d = spectral_density(DenseOperator(matrix_with_spectrum(lam)), runs=2, steps=40)
    assert abs(float(d.nodes.max()) - float(lam.max())) < 1e-8 * float(lam.max())
    assert float(d.grid[0]) < float(lam.min()) and float(d.grid[-1]) > float(lam.max())
    # default width: 1 % of the range of the nodes; the grid extends 5 sigma beyond them
    width = float(d.nodes.max() - d.nodes.min())
    assert abs(d.sigma - 0.01 * width) < 1e-12 * width
    assert abs(float(d.grid[-1]) - float(d.nodes.max()) - 5 * d.sigma) < 1e-9 * width


def test_breakdown_ends_a_run_with_zero_weight_padding():
    lam = torch.tensor([4.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    op = DenseOperator(matrix_with_spectrum(lam))
    d = spectral_density(op, runs=2, steps=8, seed=0)
    assert op.matvecs == 6  # 3 distinct eigenvalues: 3 steps per run
    assert bool((d.weights[:, 3:] == 0).all()) and torch.isfinite(d.nodes).all()
    assert abs(float(torch.trapezoid(d.values, d.grid)) - 1.0) < 1e-6
    # a multiple of the identity: a single node, the width falls back to a fraction of |λ|
    d = spectral_density(DenseOperator(2.0 * torch.eye(5, dtype=torch.float64)), steps=3)
    assert d.nodes.shape == (1, 3) and float(d.weights[0, 0]) == pytest.approx(1.0)
    assert d.sigma == pytest.approx(0.02)
    assert math.isnan(d.mean_stderr)


def test_arguments_are_checked():
    op = DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="runs=0"):
        spectral_density(op, runs=0)
    with pytest.raises(ValueError, match="sigma=-1"):
        spectral_density(op, sigma=-1.0)
