"""The certificate's pieces: union bound over the prior grid, B_RE, MC step, the bound."""

from __future__ import annotations

import math

import pytest
import torch

from flatcli.pacbayes.bound import (
    b_re,
    best_grid_point,
    certify,
    grid_lambda,
    mc_upper,
    union_term,
)
from flatcli.pacbayes.kl import gaussian_kl_isotropic, kl_bernoulli


def test_union_bound_over_the_grid_spends_exactly_delta():
    delta, m = 0.025, 1000
    # δ_j = exp(−(union_term(j) − ln m)) = 6δ/(π² j²) and Σ_j δ_j = δ
    deltas = [math.exp(-(union_term(float(j), m, delta) - math.log(m))) for j in range(1, 200001)]
    assert deltas[0] == pytest.approx(6 * delta / math.pi**2, rel=1e-12)
    assert sum(deltas) == pytest.approx(delta, rel=1e-4)
    assert sum(deltas) < delta


def test_grid_term_equals_eq45_on_the_grid():
    b, c = 100.0, 0.1
    for j in (1, 7, 250):
        lam = grid_lambda(j, b=b, c=c)
        eq45 = 2 * math.log(b * math.log(c / lam)) + math.log(math.pi**2 * 500 / (6 * 0.05))
        assert union_term(float(j), 500, 0.05) == pytest.approx(eq45, rel=1e-12)


def test_b_re_formula():
    kl, j, m, delta = 123.4, 17, 5000, 0.025
    ref = (kl + 2 * math.log(j) + math.log(math.pi**2 * m / (6 * delta))) / (m - 1)
    assert b_re(kl, j, m, delta) == pytest.approx(ref, rel=1e-14)
    with pytest.raises(ValueError):
        b_re(kl, 0, m, delta)


def test_best_grid_point_is_the_brute_force_minimum():
    mds, vs, lvs, p, m, delta, b, c = 3.0, 40.0, -2000.0, 500, 2000, 0.025, 100.0, 0.1
    j, kl, bre = best_grid_point(mds, vs, lvs, p, m, delta, b=b, c=c)
    brute = []
    for jj in range(1, 3000):
        k = float(gaussian_kl_isotropic(mds, vs, lvs, p, grid_lambda(jj, b=b, c=c)))
        brute.append((b_re(k, jj, m, delta), jj, k))
    best = min(brute)
    assert j == best[1] and kl == pytest.approx(best[2], rel=1e-10)
    assert bre == pytest.approx(best[0], rel=1e-10)


def test_mc_upper_is_the_kl_inverse_with_log_2_over_delta_prime():
    up = mc_upper(0.05, 1000, 0.01)
    assert up > 0.05
    assert kl_bernoulli(0.05, up) == pytest.approx(math.log(2 / 0.01) / 1000, rel=1e-6)


def test_certificate_ordering_and_confidence():
    cert = certify(
        kl=800.0,
        j=120,
        snn_train_error=0.03,
        mc_samples=500,
        num_train=10000,
        delta=0.025,
        delta_prime=0.01,
        b=100.0,
        c=0.1,
    )
    assert cert.bound >= cert.snn_train_error_upper >= cert.snn_train_error
    assert cert.confidence == pytest.approx(0.965)
    assert cert.prior_variance == pytest.approx(0.1 * math.exp(-1.2))
    assert kl_bernoulli(cert.snn_train_error_upper, cert.bound) == pytest.approx(
        cert.b_re, rel=1e-6
    )
    assert not cert.vacuous and cert.bound_pinsker >= cert.bound


def test_a_huge_kl_is_vacuous():
    cert = certify(
        kl=1e6,
        j=5,
        snn_train_error=0.01,
        mc_samples=100,
        num_train=1000,
        delta=0.025,
        delta_prime=0.01,
        b=100.0,
        c=0.1,
    )
    assert cert.vacuous and cert.bound <= 1.0 and cert.bound_pinsker > 1.0


def test_certify_rejects_spending_more_than_all_confidence():
    with pytest.raises(ValueError):
        certify(
            kl=1.0,
            j=1,
            snn_train_error=0.1,
            mc_samples=10,
            num_train=100,
            delta=0.6,
            delta_prime=0.5,
            b=100.0,
            c=0.1,
        )


def test_kl_q_p_closed_form_on_the_grid_matches_torch_at_the_chosen_j():
    from torch.distributions import Normal, kl_divergence

    g = torch.Generator().manual_seed(0)
    w, w0 = (
        torch.randn(50, generator=g, dtype=torch.float64),
        torch.randn(50, generator=g, dtype=torch.float64),
    )
    s = torch.rand(50, generator=g, dtype=torch.float64) * 0.1 + 0.01
    j, kl, _ = best_grid_point(
        float((w - w0).square().sum()),
        float(s.sum()),
        float(s.log().sum()),
        50,
        300,
        0.025,
        b=100.0,
        c=0.1,
    )
    lam = grid_lambda(j, b=100.0, c=0.1)
    ref = float(kl_divergence(Normal(w, s.sqrt()), Normal(w0, math.sqrt(lam))).sum())
    assert kl == pytest.approx(ref, rel=1e-10)
