r"""Kullback-Leibler divergences of a PAC-Bayes certificate: Bernoulli, its inverse, Gaussians.

* :func:`kl_bernoulli` is kl(q‖p), the divergence between Bernoulli distributions that the
  PAC-Bayes-kl bound of Langford & Seeger (2001) bounds (Wu et al. 2020, Theorem F.1, Eq. 43).
* :func:`kl_inverse` is kl⁻¹(q, c) = sup{p ∈ [q, 1] : kl(q‖p) ≤ c}, the upper bound on a true
  error that Eq. 43 implies. It brackets the root by bisection and returns the **upper** end of
  the final bracket, so the returned value is never below the exact inverse (Dziugaite & Roy
  2017, Appendix B, approximate it with a few unchecked Newton steps instead).
* :func:`gaussian_kl_isotropic` is KL(Q‖P) for Q = N(w, R diag(s) Rᵀ) with R orthogonal and
  P = N(w₀, λI) (Dziugaite & Roy 2017; Wu et al. 2020, Eqs. 44-45). Because P is isotropic the
  value does not depend on R, which is what lets a posterior diagonal in a rotated (Hessian)
  basis pay the same KL as one diagonal in the standard basis.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["KL_INVERSE_TOL", "gaussian_kl_isotropic", "kl_bernoulli", "kl_inverse"]

KL_INVERSE_TOL = 1e-10
"""Width of the final bisection bracket of :func:`kl_inverse` (absolute, on p)."""


def kl_bernoulli(q: float, p: float) -> float:
    """kl(q‖p) = q ln(q/p) + (1−q) ln((1−q)/(1−p)) for q, p ∈ [0, 1], in float64.

    The convention 0 ln 0 = 0 holds; kl(q‖p) = +inf when p ∈ {0, 1} differs from q there.
    (Langford & Seeger 2001; the left side of Wu et al. 2020, Eq. 43.) Written as
    q·g(d/q) + (1−q)·g(−d/(1−q)) with d = p − q and g(x) = x − ln(1 + x) ≥ 0 (the first-order
    terms, +d and −d, cancel exactly; for q ∈ {0, 1} one term is left), a sum of two
    non-negative terms: accurate to a few ulps also when p is within 1e-8 of q, where the
    textbook form loses every digit.

    >>> round(kl_bernoulli(0.1, 0.2), 6)
    0.03669
    >>> kl_bernoulli(0.0, 0.0), kl_bernoulli(0.0, 1.0)
    (0.0, inf)
    >>> abs(kl_bernoulli(0.3, 0.3 + 1e-9) / (1e-18 / (2 * 0.3 * 0.7)) - 1) < 1e-6
    True
    """
    if not (0.0 <= q <= 1.0 and 0.0 <= p <= 1.0):
        raise ValueError(f"kl_bernoulli needs q, p in [0, 1]; got q={q!r}, p={p!r}")
    if p == q:
        return 0.0
    if (q > 0.0 and p == 0.0) or (q < 1.0 and p == 1.0):
        return math.inf
    if q == 0.0:
        return -math.log1p(-p)
    if q == 1.0:
        return -math.log(p)
    a, b = (p - q) / q, (q - p) / (1.0 - q)
    if max(abs(a), abs(b)) < 0.5:  # p near q: the two logarithms would cancel
        return q * _x_minus_log1p(a) + (1.0 - q) * _x_minus_log1p(b)
    return max(q * math.log(q / p) + (1.0 - q) * math.log((1.0 - q) / (1.0 - p)), 0.0)


def _x_minus_log1p(x: float) -> float:
    """x − ln(1 + x) for x > −1, without cancellation near 0 (its Taylor series there)."""
    if abs(x) < 1e-2:  # Σ_{k≥2} (−1)^k x^k / k; the terms to k = 12 reach float64's precision
        return sum((-x) ** k / k for k in range(12, 1, -1))
    return x - math.log1p(x)


def kl_inverse(q: float, c: float, *, tol: float = KL_INVERSE_TOL) -> float:
    """The PAC-Bayes-kl inverse kl⁻¹(q, c) = sup{p ∈ [q, 1] : kl(q‖p) ≤ c}, rounded up.

    kl(q‖·) is continuous and increasing on [q, 1), so bisection on the bracket [lo, hi] with
    kl(q‖lo) ≤ c < kl(q‖hi) converges to the inverse; it stops when hi − lo ≤ ``tol`` and
    returns ``hi``, an upper bound on the exact inverse within ``tol`` of it (Wu et al. 2020,
    Eq. 43 and Dziugaite & Roy 2017, §2: the bound on the true error is kl⁻¹(q̂, B)). With
    kl(q‖1) ≤ c (only possible for q = 1) the answer is 1.

    Args:
        q: an empirical error in [0, 1].
        c: the right-hand side, ≥ 0 (inf gives 1).
        tol: the width of the final bracket.

    >>> kl_inverse(0.0, 0.0)
    0.0
    >>> abs(kl_inverse(0.1, kl_bernoulli(0.1, 0.3)) - 0.3) < 1e-9
    True
    >>> kl_inverse(0.1, kl_bernoulli(0.1, 0.3)) >= 0.3
    True
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"kl_inverse needs q in [0, 1]; got {q!r}")
    if not c >= 0.0:  # also rejects NaN
        raise ValueError(f"kl_inverse needs c >= 0; got {c!r}")
    if not tol > 0.0:
        raise ValueError(f"kl_inverse needs tol > 0; got {tol!r}")
    if c == 0.0:
        return q
    if q == 1.0 or kl_bernoulli(q, 1.0) <= c:
        return 1.0
    lo, hi = q, 1.0  # invariant: kl(q‖lo) <= c < kl(q‖hi)
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:  # the bracket is as narrow as float64 allows
            break
        if kl_bernoulli(q, mid) <= c:
            lo = mid
        else:
            hi = mid
    return hi


def gaussian_kl_isotropic(
    mean_diff_sq: Tensor | float,
    var_sum: Tensor | float,
    log_var_sum: Tensor | float,
    num_params: int,
    prior_variance: Tensor | float,
) -> Tensor:
    r"""KL(Q‖P) for Q = N(w, R diag(s) Rᵀ), R orthogonal, and P = N(w₀, λ I) on ℝᴾ.

    .. math::
        \mathrm{KL}(Q\|P) = \tfrac12\Big[\frac{\sum_i s_i + \|w - w_0\|^2}{\lambda}
            - P + P\ln\lambda - \sum_i \ln s_i\Big]

    (the D_KL(Q‖P) of Wu et al. 2020, Theorem F.1 and Eq. 44, with Dziugaite & Roy 2017's
    Gaussian prior and posterior; Eq. 45 prints D_KL(P‖Q) but its derivation from Eq. 43 needs
    KL(Q‖P)). It depends on R only through tr(R diag(s) Rᵀ) = Σ s_i and ln det = Σ ln s_i,
    both invariant, so the same formula holds in any orthonormal basis.

    Args:
        mean_diff_sq: ‖w − w₀‖² (in the standard basis, or any orthonormal one).
        var_sum: Σ_i s_i.
        log_var_sum: Σ_i ln s_i.
        num_params: P.
        prior_variance: λ > 0 (a tensor keeps the graph for optimising λ).

    >>> float(gaussian_kl_isotropic(0.0, 3.0, 0.0, 3, 1.0))
    0.0
    """
    lam = (
        torch.as_tensor(prior_variance, dtype=torch.float64)
        if not isinstance(prior_variance, Tensor)
        else prior_variance
    )
    mds = torch.as_tensor(mean_diff_sq, dtype=lam.dtype)
    vs = torch.as_tensor(var_sum, dtype=lam.dtype)
    lvs = torch.as_tensor(log_var_sum, dtype=lam.dtype)
    return 0.5 * ((vs + mds) / lam - num_params + num_params * torch.log(lam) - lvs)
