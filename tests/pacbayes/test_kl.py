"""kl(q‖p), its inverse and the Gaussian KL against brute force and torch.distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, MultivariateNormal, Normal, kl_divergence

from flatcli.pacbayes.kl import KL_INVERSE_TOL, gaussian_kl_isotropic, kl_bernoulli, kl_inverse

F64 = torch.float64


@pytest.mark.parametrize("q,p", [(0.1, 0.2), (0.5, 0.01), (0.93, 0.5), (0.3, 0.999999)])
def test_kl_bernoulli_matches_torch(q, p):
    ref = float(
        kl_divergence(Bernoulli(torch.tensor(q, dtype=F64)), Bernoulli(torch.tensor(p, dtype=F64)))
    )
    assert kl_bernoulli(q, p) == pytest.approx(ref, rel=1e-12)


def test_kl_bernoulli_edges():
    assert kl_bernoulli(0.0, 0.3) == pytest.approx(-math.log(0.7), rel=1e-15)
    assert kl_bernoulli(1.0, 0.3) == pytest.approx(-math.log(0.3), rel=1e-15)
    assert kl_bernoulli(0.2, 0.0) == math.inf and kl_bernoulli(0.2, 1.0) == math.inf
    assert kl_bernoulli(0.4, 0.4) == 0.0
    with pytest.raises(ValueError):
        kl_bernoulli(-0.1, 0.5)


def _brute_inverse(q: float, c: float, n: int = 2_000_001) -> tuple[float, float]:
    """The largest grid point p in [q, 1] with kl(q‖p) <= c, and the grid step."""
    p = np.linspace(q, 1.0, n)[:-1]  # kl(q||1) = inf for q < 1
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(q > 0, q * np.log(q / p), 0.0)
        t2 = (1 - q) * np.log((1 - q) / (1 - p))
    kl = t1 + t2
    ok = p[kl <= c]
    return float(ok.max()), (1.0 - q) / (n - 1)


@pytest.mark.parametrize("q", [0.0, 0.01, 0.05, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("c", [1e-4, 0.01, 0.1, 1.0, 5.0])
def test_kl_inverse_matches_brute_force_and_is_never_below_it(q, c):
    got = kl_inverse(q, c)
    brute, step = _brute_inverse(q, c)
    assert got >= brute  # the upper end of the bracket: never below the root
    assert got - brute <= step + KL_INVERSE_TOL
    # and it is an upper end: at (or beyond) the root, unless capped at 1
    assert got == 1.0 or kl_bernoulli(q, got) >= c - 1e-12


@pytest.mark.parametrize("c", [1e-6, 0.02, 0.7, 3.0, 30.0])
def test_kl_inverse_known_values(c):
    # kl(0‖p) = −ln(1 − p), so kl⁻¹(0, c) = 1 − e^{−c}
    assert kl_inverse(0.0, c) == pytest.approx(1 - math.exp(-c), abs=2 * KL_INVERSE_TOL)
    assert kl_inverse(0.0, c) >= 1 - math.exp(-c) - 1e-15
    # the inverse of a forward value
    for q, p in [(0.1, 0.3), (0.02, 0.2), (0.4, 0.41)]:
        assert kl_inverse(q, kl_bernoulli(q, p)) == pytest.approx(p, abs=2 * KL_INVERSE_TOL)


def test_kl_inverse_degenerate_arguments():
    assert kl_inverse(0.3, 0.0) == 0.3
    assert kl_inverse(1.0, 0.5) == 1.0
    assert kl_inverse(0.3, math.inf) == 1.0
    with pytest.raises(ValueError):
        kl_inverse(0.3, -1.0)
    with pytest.raises(ValueError):
        kl_inverse(0.3, float("nan"))


def test_kl_inverse_is_increasing_in_q():
    vals = [kl_inverse(q, 0.05) for q in np.linspace(0, 0.9, 50)]
    assert all(b >= a for a, b in zip(vals, vals[1:], strict=False))


def _random_orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q


def test_gaussian_kl_diagonal_matches_torch():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(30, generator=g, dtype=F64)
    w0 = torch.randn(30, generator=g, dtype=F64)
    s = torch.rand(30, generator=g, dtype=F64) + 0.05
    lam = 0.37
    ref = kl_divergence(Normal(w, s.sqrt()), Normal(w0, math.sqrt(lam))).sum()
    got = gaussian_kl_isotropic((w - w0).square().sum(), s.sum(), s.log().sum(), 30, lam)
    assert float(got) == pytest.approx(float(ref), rel=1e-12)


def test_gaussian_kl_diagonal_in_a_rotated_basis_matches_torch():
    n = 7
    g = torch.Generator().manual_seed(2)
    w = torch.randn(n, generator=g, dtype=F64)
    w0 = torch.randn(n, generator=g, dtype=F64)
    s = torch.rand(n, generator=g, dtype=F64) + 0.1
    r = _random_orthogonal(n, 3)
    cov = r @ torch.diag(s) @ r.T
    lam = 0.8
    ref = kl_divergence(
        MultivariateNormal(w, covariance_matrix=cov),
        MultivariateNormal(w0, covariance_matrix=lam * torch.eye(n, dtype=F64)),
    )
    got = gaussian_kl_isotropic((w - w0).square().sum(), s.sum(), s.log().sum(), n, lam)
    assert float(got) == pytest.approx(float(ref), rel=1e-10)


def test_gaussian_kl_is_kl_q_to_p_not_p_to_q():
    # the two directions differ; the bound needs KL(Q‖P)
    w, w0, s, lam = (
        torch.zeros(1, dtype=F64),
        torch.ones(1, dtype=F64),
        torch.tensor([0.1], dtype=F64),
        2.0,
    )
    qp = float(kl_divergence(Normal(w, s.sqrt()), Normal(w0, math.sqrt(lam))).sum())
    pq = float(kl_divergence(Normal(w0, math.sqrt(lam)), Normal(w, s.sqrt())).sum())
    got = float(gaussian_kl_isotropic(1.0, 0.1, math.log(0.1), 1, lam))
    assert got == pytest.approx(qp, rel=1e-12) and abs(got - pq) > 1.0


def _mp_inverse(q: float, c: float):
    """kl⁻¹(q, c) in 60-digit arithmetic: bisection on the exact (mpmath) kl(q‖p)."""
    mp = pytest.importorskip("mpmath")
    with mp.workdps(60):
        qq, cc = mp.mpf(q), mp.mpf(c)

        def kl(p):
            first = qq * mp.log(qq / p) if qq > 0 else mp.mpf(0)
            return first + (1 - qq) * mp.log((1 - qq) / (1 - p))

        lo, hi = qq, mp.mpf(1) - mp.mpf(10) ** -50
        if kl(hi) <= cc:
            return 1.0
        for _ in range(200):  # the bracket shrinks to 1e-60, far below float64's resolution
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if kl(mid) <= cc else (lo, mid)
        return lo


@pytest.mark.parametrize("q", [0.0, 1e-6, 1e-3, 0.05, 0.2, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("c", [1e-15, 1e-13, 1e-12, 1e-10, 1e-7, 1e-4, 0.1, 1.0, 5.0])
def test_kl_inverse_is_never_below_the_exact_inverse(q, c):
    """Against high-precision arithmetic, also where the textbook kl(q‖p) rounds to garbage:
    for c below 1e-12 the root is within 1e-6 of q, and kl evaluated as q ln(q/p) + ... is
    then all cancellation (it used to return up to 7.5e-10 below the exact inverse)."""
    exact = _mp_inverse(q, c)
    got = kl_inverse(q, c)
    assert got >= exact  # the certificate may be loose, never optimistic
    assert got - exact <= KL_INVERSE_TOL + 1e-15


@pytest.mark.parametrize("q,d", [(0.3, 1e-9), (0.01, 1e-12), (0.7, -1e-8), (0.5, 3e-7)])
def test_kl_bernoulli_is_accurate_next_to_q(q, d):
    """kl(q‖q + d) ≈ d² / (2q(1 − q)): relative accuracy where both logarithms cancel."""
    mp = pytest.importorskip("mpmath")
    p = q + d  # the float64 p; the exact value is of this p
    with mp.workdps(60):
        qq, pp = mp.mpf(q), mp.mpf(p)
        exact = qq * mp.log(qq / pp) + (1 - qq) * mp.log((1 - qq) / (1 - pp))
    assert kl_bernoulli(q, p) == pytest.approx(float(exact), rel=1e-9)
