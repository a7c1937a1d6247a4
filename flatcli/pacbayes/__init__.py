"""PAC-Bayes certificates for stochastic networks (Dziugaite & Roy 2017; Wu et al. 2020, App. F).

- :mod:`~flatcli.pacbayes.kl`: kl(q‖p), its certified inverse, the Gaussian KL(Q‖P).
- :mod:`~flatcli.pacbayes.bound`: the prior grid, B_RE (Eq. 45), the Monte-Carlo step, the bound.
- :mod:`~flatcli.pacbayes.posterior`: per-layer eigenbases, ToHessian/ToStandard (Eqs. 47-48).
- :mod:`~flatcli.pacbayes.optimize`: Algorithm 1 (Eq. 46 with RMSprop).
- :mod:`~flatcli.pacbayes.fquad`: the f-quad posterior from the prior's mean (Pérez-Ortiz et al.).
- :mod:`~flatcli.pacbayes.step`: one fused step of it: Eq. 46 and its closed-form gradients.
- :mod:`~flatcli.pacbayes.montecarlo`: the stochastic network's errors from weight samples.
- :mod:`~flatcli.pacbayes.prior`: a data-free prior's centre w₀ (the recorded initial weights).
- :mod:`~flatcli.pacbayes.data_prior`: a data-dependent prior: the split, its SGD, BatchNorm.
"""

from flatcli.pacbayes.bound import Certificate, b_re, best_grid_point, certify, mc_upper
from flatcli.pacbayes.data_prior import DataPrior, PriorSplit, split_indices, train_data_prior
from flatcli.pacbayes.fquad import bounded_cross_entropy, f_quad, optimize_fquad
from flatcli.pacbayes.kl import gaussian_kl_isotropic, kl_bernoulli, kl_inverse
from flatcli.pacbayes.optimize import Method, Posterior, optimize_posterior
from flatcli.pacbayes.posterior import Basis, LayerBasis, kfac_basis

__all__ = [
    # divergences
    "kl_bernoulli",
    "kl_inverse",
    "gaussian_kl_isotropic",
    # the certificate
    "Certificate",
    "b_re",
    "best_grid_point",
    "certify",
    "mc_upper",
    # posteriors and their optimisation
    "Basis",
    "LayerBasis",
    "kfac_basis",
    "Method",
    "Posterior",
    "optimize_posterior",
    "bounded_cross_entropy",
    "f_quad",
    "optimize_fquad",
    # data-dependent priors
    "DataPrior",
    "PriorSplit",
    "split_indices",
    "train_data_prior",
]
