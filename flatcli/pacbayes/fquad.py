r"""The f-quad posterior: a Gaussian that starts at the prior's mean and stays near it.

Pérez-Ortiz et al. 2021 ("Tighter risk certificates for neural networks") train a
stochastic network Q = N(μ, diag(σ²)) by minimising a relaxation of the PAC-Bayes-kl bound
written with a surrogate loss in [0, 1], the quadratic objective

.. math::
    f_{quad}(Q) = \Big(\sqrt{\hat L(Q) + B/2} + \sqrt{B/2}\Big)^2 .

It follows from kl(q‖p) ≥ (p − q)²/(2p) for 0 ≤ q ≤ p: kl(q‖p) ≤ B then gives
(p − q)² ≤ 2pB, whose larger root in p is q + B + √(2qB + B²) = f_quad(q, B). So
f_quad(q, B) ≥ kl⁻¹(q, B), and minimising it minimises an upper bound on the certificate.
Here B is B_RE of Wu et al. 2020, Eq. 45 — KL(Q‖P_λ) plus the union cost of the prior-variance
grid, over m − 1 with m the certificate's examples — with the continuous grid index of Eq. 46,
so the objective relaxes exactly the bound that :func:`flatcli.pacbayes.bound.certify`
computes (with ê_n in place of its Monte-Carlo upper bound).

The 0-1 error has no gradient; L̂ is the bounded cross-entropy of Pérez-Ortiz et al. 2021,

.. math::
    \ell(x, y) = -\ln\max\big(p_y(x),\, p_{min}\big) \,/\, \ln(1/p_{min}) \in [0, 1],

at one reparametrised weight sample w′ = μ + σ ⊙ ξ, ξ ~ N(0, I), per mini-batch. μ starts at
the prior's mean, σ at σ₀ for every weight and λ at σ₀² (the prior N(w₀, λI) then has the
posterior's scale); μ, ς = ln σ and ρ = ½ ln λ are trained with Adam, and λ is projected
onto the grid's range (j ≥ 1) after every step, as in
:func:`flatcli.pacbayes.optimize.optimize_posterior`. A posterior started at a good prior
and charged for every step away from it stays near it: on LeNet-5 and mnist5k its KL was
5.8 where Eq. 46 from the trained weights reached 3,126.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from flatcli.errors import MeasureError
from flatcli.pacbayes.bound import union_term
from flatcli.pacbayes.kl import gaussian_kl_isotropic
from flatcli.pacbayes.optimize import Posterior
from flatcli.progress import ProgressFn, no_progress

__all__ = ["bounded_cross_entropy", "f_quad", "fquad_objective", "optimize_fquad"]


def bounded_cross_entropy(logits: Tensor, y: Tensor, p_min: float) -> Tensor:
    """Mean of −ln max(p_y, p_min)/ln(1/p_min) over the rows (Pérez-Ortiz et al. 2021).

    Each term lies in [0, 1], as the PAC-Bayes-kl bound's loss must; probabilities below
    ``p_min`` are clipped (no gradient there). log-softmax keeps confident rows exact.

    >>> z = torch.tensor([[0.0, 0.0], [0.0, -100.0]])
    >>> [round(float(v), 6) for v in (bounded_cross_entropy(z[:1], torch.tensor([0]), 1e-4),
    ...                               bounded_cross_entropy(z[1:], torch.tensor([1]), 1e-4))]
    [0.075257, 1.0]
    """
    if not 0.0 < p_min < 1.0:
        raise ValueError(f"p_min must be in (0, 1); got {p_min}")
    log_p = F.log_softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    floor = math.log(p_min)
    return (-log_p.clamp_min(floor)).mean() / (-floor)


def f_quad(empirical: Tensor | float, b: Tensor | float) -> Tensor:
    """(√(q + B/2) + √(B/2))² = q + B + √(2qB + B²) ≥ kl⁻¹(q, B) (Pérez-Ortiz et al. 2021).

    >>> round(float(f_quad(0.1, 0.02)), 6)
    0.186332
    """
    q = torch.as_tensor(empirical, dtype=torch.float64)
    half = 0.5 * torch.as_tensor(b, dtype=torch.float64).clamp_min(0.0)
    return (torch.sqrt(q + half) + torch.sqrt(half)).square()


def fquad_objective(
    loss: Tensor,
    mean_dist_sq: Tensor,
    var_sum: Tensor,
    log_var_sum: Tensor,
    rho: Tensor,
    *,
    num_params: int,
    num_train: int,
    delta: float,
    b: float,
    c: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """f_quad(loss, B_RE) with B_RE of Wu et al. 2020, Eq. 45: (objective, KL(Q‖P), B_RE).

    ``mean_dist_sq`` = ‖μ − w₀‖², ``var_sum`` = Σσ², ``log_var_sum`` = Σ ln σ², λ = e^{2ρ};
    the grid index j = b·ln(c/λ) is continuous, clamped at 1 (the first grid point), and
    ``num_train`` is the certificate's m. All in float64, differentiable in every argument.
    """
    lam = torch.exp(2.0 * rho.double())
    kl = gaussian_kl_isotropic(
        mean_dist_sq.double(), var_sum.double(), log_var_sum.double(), num_params, lam
    )
    j = (b * (math.log(c) - 2.0 * rho.double())).clamp_min(1.0)
    bre = (kl + union_term(j, num_train, delta)) / (num_train - 1)
    return f_quad(loss.double(), bre), kl, bre


def optimize_fquad(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    prior_mean: Mapping[str, Tensor],
    *,
    num_train: int,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 250,
    sigma0: float = 0.03,
    p_min: float = 1e-4,
    delta: float = 0.025,
    b: float = 100.0,
    c: float = 0.1,
    seed: int = 0,
    progress: ProgressFn = no_progress,
) -> tuple[Posterior, list[dict]]:
    """Minimise f_quad over Q = N(μ, diag(σ²)) and λ, starting at the prior (Adam).

    Args:
        model: the network (eval mode); its buffers (e.g. BatchNorm statistics from the prior's
            examples) are used in every forward, its parameters never.
        x, y: the examples the posterior is trained on (it may see all of them).
        prior_mean: w₀, keyed like ``model.named_parameters()``; μ starts there.
        num_train: m, the examples of the certificate (B_RE's m).
        epochs, lr, batch_size: Adam's passes over (x, y), its learning rate, the mini-batch.
        sigma0: σ₀, the initial standard deviation of every weight; λ starts at σ₀².
        p_min: the bounded cross-entropy's floor.
        delta, b, c: δ and the prior grid λ_j = c·exp(−j/b) of Eq. 45.
        seed: seeds the batches and the weight noise.
        progress: ``progress(description, done, total)`` per epoch.

    Returns:
        (the posterior, the curve: per epoch the mean objective, bounded cross-entropy, KL,
        B_RE, λ and lr).
    """
    if num_train < 2:
        raise MeasureError(f"the PAC-Bayes bound needs at least 2 examples; got {num_train}")
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    buffers = dict(model.named_buffers())
    device = x.device
    w0 = {k: prior_mean[k].detach().to(device) for k in names}
    mean = {k: w0[k].clone().requires_grad_(True) for k in names}
    log_std = {k: torch.full_like(w0[k], math.log(sigma0)).requires_grad_(True) for k in names}
    rho_max = 0.5 * (math.log(c) - 1.0 / b)  # λ ≤ λ₁ = c·e^(−1/b): the grid's first point
    rho = torch.tensor(min(math.log(sigma0), rho_max), dtype=torch.float64, requires_grad=True)
    params = [*mean.values(), *log_std.values(), rho]
    opt = torch.optim.Adam(params, lr=lr)
    num_params = sum(t.numel() for t in w0.values())
    gen = torch.Generator(device=device).manual_seed(int(seed))
    n = x.shape[0]
    steps = max(1, math.ceil(n / batch_size))
    curve: list[dict] = []
    with torch.enable_grad():
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen, device=device)
            sums = [0.0] * 4
            for step in range(steps):
                idx = perm[step * batch_size : (step + 1) * batch_size]
                sample = {
                    k: mean[k]
                    + torch.exp(log_std[k])
                    * torch.randn(w0[k].shape, generator=gen, device=device, dtype=w0[k].dtype)
                    for k in names
                }
                logits = functional_call(model, {**buffers, **sample}, (x[idx],))
                loss = bounded_cross_entropy(logits, y[idx], p_min)
                mds = sum((mean[k] - w0[k]).square().sum() for k in names)
                vs = sum(torch.exp(2.0 * log_std[k]).sum() for k in names)
                lvs = sum(2.0 * log_std[k].sum() for k in names)
                obj, kl, bre = fquad_objective(
                    loss,
                    mds,
                    vs,
                    lvs,
                    rho,
                    num_params=num_params,
                    num_train=num_train,
                    delta=delta,
                    b=b,
                    c=c,
                )
                if not torch.isfinite(obj):
                    raise MeasureError(
                        f"the f-quad objective became {float(obj)} at epoch {epoch + 1}; lower --lr"
                    )
                opt.zero_grad(set_to_none=True)
                obj.backward()
                opt.step()
                with torch.no_grad():
                    rho.clamp_(max=rho_max)
                for i, v in enumerate((obj, loss, kl, bre)):
                    sums[i] += float(v.detach())
            curve.append(
                {
                    "epoch": epoch + 1,
                    "objective": sums[0] / steps,
                    "cross_entropy": sums[1] / steps,
                    "kl": sums[2] / steps,
                    "b_re": sums[3] / steps,
                    "prior_variance": math.exp(2.0 * float(rho.detach())),
                    "lr": lr,
                }
            )
            progress(f"f-quad epoch {epoch + 1}", epoch + 1, epochs)
    post = Posterior(
        mean={k: v.detach().clone() for k, v in mean.items()},
        log_std={k: v.detach().clone() for k, v in log_std.items()},
        rho=float(rho.detach()),
    )
    return post, curve
