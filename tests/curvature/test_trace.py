"""Hutchinson, Hutch++ and the diagonal estimator: unbiased, and their standard errors honest.

Calibration tests run many seeds and compare the empirical spread of the estimates with the
mean reported standard error. With 200 seeds the empirical standard deviation itself has a
relative standard error of about 1/sqrt(2 * 199) = 5 % (more for heavier-tailed samples), and
the mean sample standard deviation of p probes is biased low by c4(p) (~1 % at p = 30): the
band [0.8, 1.25] is ~4 of those standard errors wide, so an honest stderr passes and one off by
a third fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from flatcli.curvature.linop import DenseOperator
from flatcli.curvature.trace import TraceEstimate, hutchinson, hutchinson_diagonal, hutchpp
from tests.curvature.test_linop import matrix_with_spectrum, spectrum

SEEDS = 200


def _hutchinson_std(A: torch.Tensor) -> float:
    """Exact std of one Rademacher probe zᵀAz: sqrt(2 Σ_{i≠j} A_ij²)."""
    off = A - torch.diag(torch.diag(A))
    return math.sqrt(2.0 * float((off**2).sum()))


@pytest.mark.parametrize("name", ["mixed", "outliers", "negative"])
@pytest.mark.parametrize("estimator", [hutchinson, hutchpp])
def test_estimate_within_three_stderr_of_the_trace(name, estimator):
    lam = spectrum(name)
    op = DenseOperator(matrix_with_spectrum(lam))
    est = estimator(op, probes=60, seed=3)
    assert isinstance(est, TraceEstimate)
    assert abs(est.value - float(lam.sum())) <= 3 * est.stderr
    assert est.matvecs == op.matvecs == 60


@pytest.mark.parametrize(
    ("estimator", "probes", "residual_probes"), [(hutchinson, 30, 30), (hutchpp, 60, 20)]
)
@pytest.mark.parametrize("name", ["mixed", "outliers"])
def test_reported_stderr_matches_the_spread_over_seeds(estimator, probes, residual_probes, name):
    lam = spectrum(name)
    op = DenseOperator(matrix_with_spectrum(lam))
    ests = [estimator(op, probes=probes, seed=s) for s in range(SEEDS)]
    values = torch.tensor([e.value for e in ests], dtype=torch.float64)
    stderrs = torch.tensor([e.stderr for e in ests], dtype=torch.float64)
    assert all(e.probes == residual_probes for e in ests)
    ratio = float(values.std()) / float(stderrs.mean())
    assert 0.8 <= ratio <= 1.25, ratio
    # unbiased: the mean over seeds is within 4 of its own standard errors of the trace
    spread = float(values.std()) / math.sqrt(SEEDS)
    assert abs(float(values.mean()) - float(lam.sum())) <= 4 * spread


def test_hutchinson_stderr_matches_the_exact_probe_variance():
    A = matrix_with_spectrum(spectrum("mixed"))
    stderrs = [hutchinson(DenseOperator(A), probes=40, seed=s).stderr for s in range(50)]
    expected = _hutchinson_std(A) / math.sqrt(40)
    assert 0.9 <= sum(stderrs) / len(stderrs) / expected <= 1.1


def test_hutchpp_beats_hutchinson_when_a_few_eigenvalues_dominate():
    op = DenseOperator(matrix_with_spectrum(spectrum("outliers")))
    exact = float(spectrum("outliers").sum())
    err_h = [abs(hutchinson(op, 60, seed=s).value - exact) for s in range(40)]
    err_pp = [abs(hutchpp(op, 60, seed=s).value - exact) for s in range(40)]
    # the 10 outliers (most of the trace) fall into the sketch; the residual bulk is tiny
    assert sum(err_pp) < 0.1 * sum(err_h)


def test_adaptive_stop_on_relative_stderr():
    lam = spectrum("outliers")
    op = DenseOperator(matrix_with_spectrum(lam))
    est = hutchinson(op, probes=2000, seed=0, target_rel_stderr=0.05)
    assert est.rel_stderr <= 0.05 and est.probes < 2000
    assert est.probes % 10 == 0 and est.matvecs == est.probes
    # one block fewer would not have met the target (the stop is not late by more than a block)
    early = hutchinson(op, probes=est.probes - 10, seed=0)
    assert early.rel_stderr > 0.05 * 0.9
    pp = hutchpp(op, probes=2000, seed=0, target_rel_stderr=0.01)
    assert pp.rel_stderr <= 0.01 and pp.matvecs < 2000
    # a target never reached: every probe is spent
    assert hutchinson(op, probes=30, seed=0, target_rel_stderr=1e-9).probes == 30


def test_exact_cases():
    D = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    est = hutchinson(DenseOperator(D), probes=5)
    assert est.value == 210.0 and est.stderr == 0.0
    # Hutch++ whose sketch spans the space is exact
    A = matrix_with_spectrum(torch.linspace(-1.0, 3.0, 12))
    est = hutchpp(DenseOperator(A), probes=39)
    assert abs(est.value - float(torch.trace(A))) < 1e-12


def test_float32_operator_and_few_probes():
    lam = spectrum("mixed")
    op = DenseOperator(matrix_with_spectrum(lam).float())
    est = hutchinson(op, probes=50, seed=1)
    assert abs(est.value - float(lam.sum())) <= 3 * est.stderr
    assert math.isnan(hutchinson(op, probes=1).stderr)
    with pytest.raises(ValueError, match="probes=0"):
        hutchinson(op, probes=0)
    with pytest.raises(ValueError, match="probes=2"):
        hutchpp(op, probes=2)


def test_seed_determines_the_estimate():
    op = DenseOperator(matrix_with_spectrum(spectrum("mixed")))
    assert hutchinson(op, 20, seed=4) == hutchinson(op, 20, seed=4)
    assert hutchinson(op, 20, seed=4).value != hutchinson(op, 20, seed=5).value
    assert hutchpp(op, 30, seed=4) == hutchpp(op, 30, seed=4)


def test_diagonal_within_its_stderr():
    A = matrix_with_spectrum(spectrum("mixed"))
    op = DenseOperator(A)
    probes = 64
    diag, stderr = hutchinson_diagonal(op, probes=probes, seed=2, block_size=7)
    assert diag.shape == stderr.shape == (A.shape[0],) and op.matvecs == probes
    true = torch.diag(A)
    z = (diag - true) / stderr
    # z is approximately standard normal entrywise (t with 63 degrees of freedom)
    assert 0.8 <= float((z**2).mean()) <= 1.25
    assert float((z.abs() > 3.5).float().mean()) < 0.01
    # the stderr of entry i estimates sqrt(Σ_{j≠i} A_ij² / p)
    exact = ((A**2).sum(dim=1) - true**2).sqrt() / math.sqrt(probes)
    assert 0.9 <= float((stderr / exact).mean()) <= 1.1


def test_diagonal_blocks_give_the_same_moments():
    op = DenseOperator(matrix_with_spectrum(spectrum("negative")))
    a = hutchinson_diagonal(op, probes=30, seed=1, block_size=30)
    b = hutchinson_diagonal(op, probes=30, seed=1, block_size=4)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    d, s = hutchinson_diagonal(DenseOperator(torch.eye(4, dtype=torch.float64)), probes=1)
    assert d.tolist() == [1.0] * 4 and bool(s.isnan().all())
