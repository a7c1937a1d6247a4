"""The operator protocol, the dense operator, and the float64 boundary.

Also holds :func:`matrix_with_spectrum`, the symmetric test matrices with known spectra that the
Lanczos, trace and density tests share.
"""

from __future__ import annotations

import pytest
import torch

from flatcli.curvature.linop import (
    DenseOperator,
    Difference,
    LinearOperator,
    apply_float64,
    random_vectors,
    to_dense,
)


def matrix_with_spectrum(eigenvalues, seed: int = 0) -> torch.Tensor:
    """A dense symmetric float64 matrix ``Q diag(λ) Qᵀ`` with a random orthogonal ``Q``."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=torch.float64))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def spectrum(name: str, seed: int = 0) -> torch.Tensor:
    """Known spectra (float64, unsorted) the tests share.

    - ``mixed``: a Gaussian bulk around 0 (so half negative), a tight cluster at 30
      (gaps 1e-3), outliers 100, 60, 40 and a negative outlier -8.
    - ``outliers``: a nonnegative bulk in [0, 0.1] plus 10 outliers in [10, 50] (the shape of a
      trained network's GGN: a few large eigenvalues carry most of the trace).
    - ``negative``: eigenvalues spread over [-20, 5] with the most negative ones separated.
    """
    g = torch.Generator().manual_seed(1000 + seed)
    if name == "mixed":
        bulk = 0.5 * torch.randn(190, generator=g, dtype=torch.float64)
        tail = torch.tensor([30.0, 30.001, 30.002, 30.003, 100.0, 60.0, 40.0, -8.0, 12.0, 7.0])
        return torch.cat([bulk, tail.double()])
    if name == "outliers":
        bulk = 0.1 * torch.rand(290, generator=g, dtype=torch.float64)
        return torch.cat([bulk, torch.linspace(10.0, 50.0, 10, dtype=torch.float64)])
    if name == "negative":
        bulk = torch.rand(140, generator=g, dtype=torch.float64) * 10.0 - 5.0
        tail = torch.tensor([-20.0, -17.0, -15.0, -12.0, -10.0, -9.0, 5.5, 7.0, 9.0, 11.0])
        return torch.cat([bulk, tail.double()])
    raise KeyError(name)


def test_dense_operator_products_and_count():
    A = matrix_with_spectrum([3.0, 1.0, -2.0])
    op = DenseOperator(A)
    assert isinstance(op, LinearOperator)
    assert (op.dim, op.dtype, op.device.type, op.matvecs) == (3, torch.float64, "cpu", 0)
    v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), A @ v)
    assert op.matvecs == 1
    V = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), A @ V)
    assert op.matvecs == 5


def test_dense_operator_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"square. Got shape \(3, 4\)"):
        DenseOperator(torch.zeros(3, 4))
    op = DenseOperator(torch.eye(3))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        op.matvec(torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(3, k\)"):
        op.matmat(torch.zeros(4, 2))


def test_apply_float64_casts_at_the_boundary():
    A = matrix_with_spectrum([2.0, 1.0, 0.5, -1.0]).float()
    op = DenseOperator(A)
    v = torch.randn(4, dtype=torch.float64)
    out = apply_float64(op, v)
    assert out.dtype == torch.float64 and out.shape == (4,)
    torch.testing.assert_close(out, (A @ v.float()).double())
    out = apply_float64(op, torch.randn(4, 3, dtype=torch.float64))
    assert out.shape == (4, 3) and op.matvecs == 4


def test_random_vectors_are_seeded_and_distributed_as_named():
    a = random_vectors(1000, 3, torch.Generator().manual_seed(5))
    b = random_vectors(1000, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.float64
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    g = random_vectors(20000, 1, torch.Generator().manual_seed(0), "gaussian")
    assert abs(float(g.mean())) < 0.03 and abs(float(g.std()) - 1) < 0.03
    with pytest.raises(ValueError, match="'uniform'"):
        random_vectors(3, 1, torch.Generator(), "uniform")


def test_to_dense_recovers_the_matrix():
    A = matrix_with_spectrum(torch.arange(10.0))
    op = DenseOperator(A)
    torch.testing.assert_close(to_dense(op, block=3), A)
    assert op.matvecs == 10


def test_difference_is_a_minus_b_and_counts_its_products():
    g = torch.Generator().manual_seed(0)
    A, B = (torch.randn(5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    a, b = DenseOperator(A + A.T), DenseOperator(B + B.T)
    diff = Difference(a, b)
    V = torch.randn(5, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(diff.matmat(V), (A + A.T - B - B.T) @ V, rtol=0, atol=1e-14)
    torch.testing.assert_close(diff.matvec(V[:, 0]), (A + A.T - B - B.T) @ V[:, 0])
    assert (diff.matvecs, a.matvecs, b.matvecs) == (4, 4, 4)
    with pytest.raises(ValueError, match="cannot be subtracted"):
        Difference(a, DenseOperator(torch.eye(2)))
