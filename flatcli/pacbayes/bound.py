r"""The PAC-Bayes certificate: the prior-variance grid, B_RE, the Monte-Carlo step and the bound.

With the prior P_j = N(w₀, λ_j I), λ_j = c·exp(−j/b), j = 1, 2, ..., and confidence
δ_j = 6δ/(π² j²) for each j (Σ_j δ_j = δ), the PAC-Bayes-kl bound of Langford & Seeger (2001)
(Wu et al. 2020, Theorem F.1, Eq. 43) holds for every j at once with probability ≥ 1 − δ:

.. math::
    \mathrm{kl}\big(\hat e(Q)\,\|\,e(Q)\big) \le B_{RE}(j) =
    \frac{\mathrm{KL}(Q\|P_j) + 2\ln j + \ln\frac{\pi^2 m}{6\delta}}{m - 1}

(Eq. 45, where 2 ln(b ln(c/λ)) = 2 ln j on the grid; m = |S|). So j may be chosen after
seeing the data. ê(Q) is not computable exactly: n weight samples w_k ~ Q give the estimate
ê_n, and since each sample's training error lies in [0, 1], with probability ≥ 1 − δ′
ê(Q) ≤ kl⁻¹(ê_n, ln(2/δ′)/n) (Langford & Caruana 2002, as used by Dziugaite & Roy 2017, §3).
kl⁻¹ is increasing in its first argument, so with probability ≥ 1 − δ − δ′

.. math::
    e(Q) \le \mathrm{kl}^{-1}\big(\mathrm{kl}^{-1}(\hat e_n, \ln(2/\delta')/n),\; B_{RE}(j)\big).

Two separate confidences are spent, never one δ twice.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from flatcli.pacbayes.kl import KL_INVERSE_TOL, gaussian_kl_isotropic, kl_inverse

__all__ = [
    "VACUOUS_MARGIN",
    "Certificate",
    "best_grid_point",
    "b_re",
    "certify",
    "grid_lambda",
    "mc_upper",
    "union_term",
]

VACUOUS_MARGIN = 1e-6
"""A bound within this of 1 is reported vacuous (kl⁻¹ itself never exceeds 1)."""


def grid_lambda(j: int | float, *, b: float, c: float) -> float:
    """λ_j = c·exp(−j/b), the prior-variance grid of Dziugaite & Roy 2017 (Wu et al. 2020, §F)."""
    return c * math.exp(-j / b)


def union_term(j_value: float | torch.Tensor, m: int, delta: float) -> float | torch.Tensor:
    """2 ln j + ln(π² m / (6δ)): the confidence cost of grid point j (Wu et al. 2020, Eq. 45).

    ``j_value`` = b·ln(c/λ) may be a real number (the continuous relaxation optimised in
    Eq. 46) or a tensor; it must be ≥ 1.
    """
    const = math.log(math.pi**2 * m / (6.0 * delta))
    if isinstance(j_value, torch.Tensor):
        return 2.0 * torch.log(j_value) + const
    return 2.0 * math.log(j_value) + const


def b_re(kl: float, j: int, m: int, delta: float) -> float:
    """B_RE(j) = (KL(Q‖P_j) + 2 ln j + ln(π² m/(6δ))) / (m − 1) (Wu et al. 2020, Eq. 45).

    >>> round(b_re(100.0, 1, 1001, 0.025), 6)
    0.111095
    """
    if m < 2:
        raise ValueError(f"the bound needs at least 2 training examples; got {m}")
    if j < 1:
        raise ValueError(f"grid point j must be >= 1; got {j}")
    return (kl + union_term(float(j), m, delta)) / (m - 1)


def mc_upper(error_estimate: float, samples: int, delta_prime: float) -> float:
    """kl⁻¹(ê_n, ln(2/δ′)/n): an upper bound on the stochastic network's error ê(Q).

    Holds with probability ≥ 1 − δ′ over the n weight samples (Langford & Caruana 2002;
    Dziugaite & Roy 2017, §3).
    """
    if samples < 1:
        raise ValueError(f"need at least one Monte-Carlo sample; got {samples}")
    return kl_inverse(error_estimate, math.log(2.0 / delta_prime) / samples)


def best_grid_point(
    mean_diff_sq: float,
    var_sum: float,
    log_var_sum: float,
    num_params: int,
    m: int,
    delta: float,
    *,
    b: float,
    c: float,
    j_max: int | None = None,
) -> tuple[int, float, float]:
    """The grid point j ≥ 1 minimising B_RE(j), with its KL(Q‖P_j) and B_RE (float64).

    Every j is covered by the union bound, so choosing the best one after the optimisation
    is legitimate (Dziugaite & Roy 2017, §3). The KL of each λ_j is the closed form of
    :func:`flatcli.pacbayes.kl.gaussian_kl_isotropic`; the search is one vectorised pass over
    j = 1..j_max (default: up to λ = c·1e-12, far below any useful prior variance).

    Returns:
        (j, kl, b_re).
    """
    if j_max is None:
        j_max = max(1, int(math.ceil(b * math.log(1e12))))
    j = torch.arange(1, j_max + 1, dtype=torch.float64)
    lam = c * torch.exp(-j / b)
    kl = gaussian_kl_isotropic(mean_diff_sq, var_sum, log_var_sum, num_params, lam)
    bre = (kl + union_term(j, m, delta)) / (m - 1)
    k = int(torch.argmin(bre))
    return k + 1, float(kl[k]), float(bre[k])


@dataclass(frozen=True)
class Certificate:
    """Every number of the final bound, so that anyone can recompute it.

    ``bound`` = kl⁻¹(``snn_train_error_upper``, ``b_re``) holds with probability ≥
    ``confidence`` = 1 − ``delta`` − ``delta_prime``.
    """

    bound: float
    kl: float
    b_re: float
    j: int
    prior_variance: float
    snn_train_error: float
    snn_train_error_upper: float
    mc_samples: int
    num_train: int
    delta: float
    delta_prime: float
    confidence: float
    tolerance: float

    @property
    def vacuous(self) -> bool:
        """True when the bound says nothing: it is 1, up to ``VACUOUS_MARGIN``.

        kl⁻¹ never exceeds 1, so a "bound of 1 or more" shows as a number a hair below 1
        (e.g. 1 − 1e-8 when B_RE is large).
        """
        return self.bound >= 1.0 - VACUOUS_MARGIN

    @property
    def bound_pinsker(self) -> float:
        """ê_upper + sqrt(B_RE/2): the looser form of Eq. 44 (Pinsker), which may exceed 1."""
        return self.snn_train_error_upper + math.sqrt(max(self.b_re, 0.0) / 2.0)

    def to_dict(self) -> dict:
        """JSON-ready fields plus ``vacuous`` and ``bound_pinsker``."""
        return {**asdict(self), "vacuous": self.vacuous, "bound_pinsker": self.bound_pinsker}


def certify(
    *,
    kl: float,
    j: int,
    snn_train_error: float,
    mc_samples: int,
    num_train: int,
    delta: float,
    delta_prime: float,
    b: float,
    c: float,
) -> Certificate:
    """The PAC-Bayes bound on the stochastic network's true error (Wu et al. 2020, Eq. 43).

    Args:
        kl: KL(Q‖P_j) for the grid point ``j`` (P_j = N(w₀, λ_j I)).
        j: the grid point (λ_j = c·exp(−j/b)).
        snn_train_error: ê_n, the mean training error of ``mc_samples`` weight samples w ~ Q.
        mc_samples: n.
        num_train: m, the number of training examples (i.i.d., independent of the prior).
        delta, delta_prime: the confidences of the PAC-Bayes and the Monte-Carlo step.
        b, c: the grid's constants.
    """
    if not (0.0 < delta < 1.0 and 0.0 < delta_prime < 1.0 and delta + delta_prime < 1.0):
        raise ValueError(
            f"need 0 < delta, delta_prime and delta + delta_prime < 1; got {delta}, {delta_prime}"
        )
    bre = b_re(kl, j, num_train, delta)
    upper = mc_upper(snn_train_error, mc_samples, delta_prime)
    bound = kl_inverse(upper, bre)
    return Certificate(
        bound=bound,
        kl=kl,
        b_re=bre,
        j=j,
        prior_variance=grid_lambda(j, b=b, c=c),
        snn_train_error=snn_train_error,
        snn_train_error_upper=upper,
        mc_samples=mc_samples,
        num_train=num_train,
        delta=delta,
        delta_prime=delta_prime,
        confidence=1.0 - delta - delta_prime,
        tolerance=KL_INVERSE_TOL,
    )
