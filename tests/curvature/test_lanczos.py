"""Lanczos against torch.linalg.eigh on dense float64 matrices with known spectra."""

from __future__ import annotations

import pytest
import torch

from flatcli.curvature.lanczos import EigenResult, Which, lanczos, lanczos_quadrature
from flatcli.curvature.linop import DenseOperator
from tests.curvature.test_linop import matrix_with_spectrum, spectrum
from tests.references import extreme_eigenvalues


def _true_residuals(A: torch.Tensor, res: EigenResult) -> torch.Tensor:
    X = res.eigenvectors.double()
    return torch.linalg.vector_norm(A @ X - X * res.eigenvalues, dim=0)


@pytest.mark.parametrize("max_basis", [None, 30], ids=["growing", "thick-restart"])
@pytest.mark.parametrize(
    ("name", "which", "k"),
    [
        ("mixed", "largest", 8),  # outliers, then a cluster with gaps 1e-3
        ("mixed", "magnitude", 6),  # includes the negative outlier -8
        ("negative", "smallest", 6),
        ("negative", "largest", 4),
        ("outliers", "largest", 10),
    ],
)
def test_eigenvalues_match_eigh(name, which, k, max_basis):
    lam = spectrum(name)
    A = matrix_with_spectrum(lam)
    op = DenseOperator(A)
    res = lanczos(op, k, which, steps=lam.numel(), tol=1e-10, max_basis=max_basis)
    expected = extreme_eigenvalues(lam, which, k)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-8, atol=0.0)
    assert res.matvecs == op.matvecs == res.steps
    assert res.eigenvalues.shape == res.residuals.shape == (k,)
    assert res.eigenvectors is None


def test_growing_space_needs_far_fewer_products_than_dim():
    lam = spectrum("mixed")
    res = lanczos(DenseOperator(matrix_with_spectrum(lam)), 3, tol=1e-8)
    assert res.converged and res.matvecs < 60


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_reported_residuals_are_true_residuals(which):
    A = matrix_with_spectrum(spectrum("mixed"))
    # a loose tolerance leaves residuals well above rounding, where they can be compared
    res = lanczos(DenseOperator(A), 4, which, tol=1e-3, return_vectors=True)
    true = _true_residuals(A, res)
    assert res.converged and bool((res.residuals <= 1e-3 * 100.0).all())
    torch.testing.assert_close(res.residuals, true, rtol=1e-6, atol=1e-10)
    # eigenvectors: unit, orthogonal
    X = res.eigenvectors
    torch.testing.assert_close(X.T @ X, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)


def test_verify_measures_residuals_with_extra_products():
    A = matrix_with_spectrum(spectrum("mixed"))
    op = DenseOperator(A)
    res = lanczos(op, 3, tol=1e-4, verify=True, return_vectors=True)
    assert res.matvecs == res.steps + 3 == op.matvecs
    torch.testing.assert_close(res.residuals, _true_residuals(A, res), rtol=1e-9, atol=1e-12)


def test_budget_exhausted_is_reported_not_converged():
    A = matrix_with_spectrum(spectrum("mixed"))
    res = lanczos(DenseOperator(A), 8, steps=12, tol=1e-12)
    assert not res.converged and res.steps == 12 == res.matvecs
    assert bool((res.residuals > 0).any())


def test_steps_at_least_dim_is_exact():
    lam = torch.linspace(-3.0, 5.0, 40, dtype=torch.float64) ** 3
    A = matrix_with_spectrum(lam, seed=3)
    res = lanczos(DenseOperator(A), 40, "smallest", steps=100, tol=1e-12)
    assert res.converged and res.steps == 40
    torch.testing.assert_close(res.eigenvalues, torch.sort(lam).values, rtol=0, atol=1e-10)


def test_invariant_subspace_breakdown_continues_with_a_fresh_vector():
    # rank 3: the Krylov space of any start vector is invariant after 4 steps (3 + null part)
    lam = torch.zeros(50, dtype=torch.float64)
    lam[:3] = torch.tensor([5.0, -2.0, 1.0])
    A = matrix_with_spectrum(lam)
    res = lanczos(DenseOperator(A), 5, "largest", tol=1e-10, return_vectors=True)
    assert res.converged and torch.isfinite(res.eigenvalues).all()
    torch.testing.assert_close(
        res.eigenvalues, torch.tensor([5.0, 1.0, 0.0, 0.0, 0.0]).double(), atol=1e-10, rtol=0
    )
    assert bool((_true_residuals(A, res) < 1e-10).all())
    # the negative eigenvalue at the other end, and a breakdown at step 1 (A = 0)
    assert abs(float(lanczos(DenseOperator(A), 1, "smallest").eigenvalues[0]) + 2.0) < 1e-10
    zero = lanczos(DenseOperator(torch.zeros(6, 6, dtype=torch.float64)), 2)
    assert zero.converged and zero.eigenvalues.tolist() == [0.0, 0.0]


def test_exactly_repeated_eigenvalues_are_found_with_their_multiplicity():
    lam = torch.tensor([5.0, 5.0, 5.0, 2.0, 1.0, 1.0] + [0.0] * 14, dtype=torch.float64)
    res = lanczos(DenseOperator(matrix_with_spectrum(lam)), 4, tol=1e-10)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, lam[:4], atol=1e-10, rtol=0)


def test_float32_operator_keeps_a_float64_basis():
    lam = spectrum("mixed")
    A = matrix_with_spectrum(lam)
    res = lanczos(DenseOperator(A.float()), 3, tol=1e-6, return_vectors=True)
    assert res.converged and res.eigenvectors.dtype == torch.float32
    assert res.eigenvalues.dtype == torch.float64
    # float32 products carry ~1e-7 relative noise; the eigenvalues keep that accuracy
    torch.testing.assert_close(
        res.eigenvalues, extreme_eigenvalues(lam, "largest", 3), rtol=1e-6, atol=0
    )


def test_seed_determines_the_result():
    A = matrix_with_spectrum(spectrum("mixed"))
    a, b = (lanczos(DenseOperator(A), 3, tol=1e-3, seed=7) for _ in range(2))
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.steps == b.steps
    c = lanczos(DenseOperator(A), 3, tol=1e-3, seed=8)
    assert not torch.equal(a.eigenvalues, c.eigenvalues)


def test_arguments_are_checked():
    op = DenseOperator(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="k=0"):
        lanczos(op, 0)
    with pytest.raises(ValueError, match="k=6"):
        lanczos(op, 6)
    with pytest.raises(ValueError, match="steps=2"):
        lanczos(op, 3, steps=2)
    with pytest.raises(ValueError, match="max_basis=3"):
        lanczos(op, 3, max_basis=3)
    with pytest.raises(ValueError, match="'biggest'"):
        lanczos(op, 1, "biggest")
    assert Which("magnitude") is Which.MAGNITUDE and Which.LARGEST == "largest"


def test_quadrature_is_gauss_quadrature_of_the_start_vector():
    lam = spectrum("mixed")
    A = matrix_with_spectrum(lam)
    v = torch.randn(lam.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = v / v.norm()
    m = 8
    nodes, weights = lanczos_quadrature(DenseOperator(A), v, m)
    assert nodes.shape == weights.shape == (m,)
    assert bool((weights >= 0).all())
    # exact for polynomials of degree <= 2m - 1: compare moments v^T A^p v
    scale = float(lam.abs().max())
    Av = v.clone()
    for p in range(2 * m):
        exact = float(v @ Av)
        assert abs(float((weights * nodes**p).sum()) - exact) <= 1e-10 * scale**p
        Av = A @ Av


def test_quadrature_stops_at_breakdown_with_an_exact_rule():
    lam = torch.tensor([3.0, 3.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    A = matrix_with_spectrum(lam)
    v = torch.ones(6, dtype=torch.float64)
    nodes, weights = lanczos_quadrature(DenseOperator(A), v, 6)
    assert len(nodes) == 3  # three distinct eigenvalues: the Krylov space has dimension 3
    torch.testing.assert_close(nodes, torch.tensor([0.0, 1.0, 3.0]).double(), atol=1e-12, rtol=0)
    assert abs(float(weights.sum()) - 1.0) < 1e-12
