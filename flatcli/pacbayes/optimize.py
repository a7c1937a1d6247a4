r"""Optimising the PAC-Bayes objective over a Gaussian posterior (Wu et al. 2020, Algorithm 1).

The objective of Eq. 46 (after Dziugaite & Roy 2017) is

.. math::
    \mathcal L(w') + \sqrt{\tfrac12 B_{RE}(w, s, \lambda; \delta)},\qquad
    w' = w + \mathrm{ToStandard}(\xi \odot e^{\varsigma}),\ \xi \sim N(0, I),

with ℒ the mini-batch cross-entropy at one reparametrised weight sample w′ ~ Q, s = exp(2ς),
λ = exp(2ρ) and B_RE of Eq. 45 written with KL(Q‖P)
(:func:`flatcli.pacbayes.kl.gaussian_kl_isotropic`) and the continuous grid index b·ln(c/λ)
(clamped at 1, the first grid point), with λ projected onto the grid (j ≥ 1) after every
step. Each step's value and gradients, the updates of Algorithm 1, lines 12-14, come from
the pieces of :func:`flatcli.pacbayes.step.objective_and_gradients` (the ς-gradient of the
loss is ToHessian(∇_{w′}ℒ) ⊙ ξ ⊙ exp(ς)), with RMSprop's step in the same elementwise
kernel. ``approx-hessian`` fixes the per-layer K-FAC eigenbasis at the trained weights;
``iterative-hessian`` recomputes it at the current mean every η epochs and carries the
variances over with :func:`flatcli.pacbayes.posterior.project_variances`.

The model's parameters are never changed: every forward is a ``torch.func.functional_call``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flatcli.configs.pacbayes import Method, Schedule
from flatcli.errors import MeasureError
from flatcli.pacbayes.posterior import Basis, project_variances
from flatcli.pacbayes.step import (
    RMSPROP_ALPHA,
    RMSPROP_EPS,
    FlatLayout,
    FlatState,
    Kernels,
    Placement,
    Workspace,
    activation_layers,
    backprop_sample,
    objective_from_terms,
    objective_terms,
    step_scalars,
)
from flatcli.progress import ProgressFn, no_progress

__all__ = ["Method", "Posterior", "Schedule", "optimize_posterior", "pacbayes_objective"]

LOG_STD_FLOOR = 1e-8
"""ς is initialised at ln max(|w|, 1e-8): a weight that is exactly 0 would give ln 0 = −∞."""


@dataclass
class Posterior:
    """Q = N(mean, R diag(exp(2·log_std)) Rᵀ) with R the per-layer ``basis``; λ = exp(2ρ).

    ``mean`` is in the standard basis and keyed like ``model.named_parameters()``;
    ``log_std`` (ς) is in the basis coordinates (same shapes).
    """

    mean: dict[str, Tensor]
    log_std: dict[str, Tensor]
    rho: float
    basis: Basis = field(default_factory=Basis)

    @property
    def prior_variance(self) -> float:
        """The optimised (continuous) λ = exp(2ρ)."""
        return math.exp(2.0 * self.rho)

    def num_params(self) -> int:
        """P, the number of parameters the posterior is over."""
        return sum(t.numel() for t in self.mean.values())

    def kl_terms(self, prior_mean: Mapping[str, Tensor]) -> tuple[float, float, float]:
        """(‖w − w₀‖², Σ s, Σ ln s) in float64: what KL(Q‖P) needs for any λ."""
        mds = sum(
            float((m.double() - prior_mean[k].double().to(m.device)).square().sum())
            for k, m in self.mean.items()
        )
        vs = sum(float(torch.exp(2.0 * s.double()).sum()) for s in self.log_std.values())
        lvs = sum(float(2.0 * s.double().sum()) for s in self.log_std.values())
        return mds, vs, lvs


def pacbayes_objective(
    ce: Tensor,
    mean: Mapping[str, Tensor],
    log_std: Mapping[str, Tensor],
    rho: Tensor,
    prior_mean: Mapping[str, Tensor],
    *,
    num_train: int,
    delta: float,
    b: float,
    c: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 46 of Wu et al. 2020: ce + sqrt(B_RE/2), B_RE of Eq. 45 with KL(Q‖P).

    Returns:
        (objective, kl, b_re), all differentiable in the mean, ς and ρ.
    """
    mds = sum((mean[k] - prior_mean[k]).square().sum() for k in mean)
    vs = sum(torch.exp(2.0 * s).sum() for s in log_std.values())
    lvs = sum(2.0 * s.sum() for s in log_std.values())
    return objective_from_terms(
        ce,
        mds,
        vs,
        lvs,
        rho,
        num_params=sum(t.numel() for t in mean.values()),
        num_train=num_train,
        delta=delta,
        b=b,
        c=c,
    )


def _lr_at(schedule: Schedule, lr: float, epoch: int, epochs: int) -> float:
    if schedule is Schedule.STEP:
        return lr if epoch < math.ceil(0.75 * epochs) else lr * 0.1
    if schedule is Schedule.COSINE:
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return lr


def optimize_posterior(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    prior_mean: Mapping[str, Tensor],
    *,
    method: Method | str = Method.VANILLA,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 256,
    schedule: Schedule | str = Schedule.STEP,
    delta: float = 0.025,
    b: float = 100.0,
    c: float = 0.1,
    eta: int = 10,
    rho_init: float = -3.0,
    seed: int = 0,
    basis_fn: Callable[[Mapping[str, Tensor]], Basis] | None = None,
    compile: bool = False,
    num_train: int | None = None,
    progress: ProgressFn = no_progress,
) -> tuple[Posterior, list[dict]]:
    """Minimise Eq. 46 of Wu et al. 2020 over Q = N(w, R diag(s) Rᵀ) and λ (Algorithm 1).

    Args:
        model: the trained network (its weights initialise the mean w; never mutated).
        x, y: the training set S (m = len(x) enters B_RE).
        prior_mean: w₀, keyed like ``model.named_parameters()``.
        method: vanilla (R = I), approx-hessian or iterative-hessian.
        epochs: passes over S; one weight sample per mini-batch step.
        lr: RMSprop learning rate τ.
        batch_size: mini-batch size.
        schedule: constant, step (÷10 for the last quarter) or cosine.
        delta, b, c: δ and the prior grid λ = c·exp(−j/b) of Eq. 45.
        eta: iterative-hessian: recompute the basis every η epochs.
        rho_init: ρ₀ with λ = exp(2ρ) (Algorithm 1: −3). ρ is projected after every step onto
            λ ≤ c·e^(−1/b), the largest point of the prior grid (j ≥ 1), so the optimised λ
            is one the certificate can use.
        seed: seeds the batches and the weight noise.
        basis_fn: ``basis_fn(mean) -> Basis`` (e.g. the K-FAC eigenbasis at the weights
            ``mean``); needed by the Hessian methods.
        compile: fuse the step's elementwise kernels with ``torch.compile``
            (:class:`flatcli.pacbayes.step.Kernels`); the first step pays for the
            compilation, and the last bits of the numbers may differ from the eager run.
        num_train: the m of B_RE in the objective: the certificate's examples (default:
            len(x); smaller with a data-dependent prior, whose bound uses only part of x).
        progress: ``progress(description, done, total)`` per epoch.

    Returns:
        (the optimised posterior, the curve: one dict per epoch with the mean objective,
        cross-entropy, KL, B_RE and λ over its steps).
    """
    method = Method(method)
    schedule = Schedule(schedule)
    n = x.shape[0]
    m = n if num_train is None else int(num_train)
    if m < 2:
        raise MeasureError(f"the PAC-Bayes bound needs at least 2 training examples; got {m}")
    if method is not Method.VANILLA and basis_fn is None:
        raise ValueError(f"method {method.value} needs basis_fn")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    buffers = dict(model.named_buffers())
    ref = dict(model.named_parameters())
    dtype, device = ref[names[0]].dtype, ref[names[0]].device
    layout = FlatLayout.of({n: ref[n] for n in names})
    w0 = layout.flatten({n: prior_mean[n].detach().to(device=device, dtype=dtype) for n in names})
    mean = layout.flatten({n: ref[n].detach() for n in names})

    def new_basis() -> Basis:
        assert basis_fn is not None
        return basis_fn({k: v.detach().clone() for k, v in layout.views(mean).items()})

    basis = Basis() if method is Method.VANILLA else new_basis()
    work = basis.to(dtype, device)
    on_act = activation_layers(model, work, min(batch_size, n))
    placement = Placement(work, on_act)
    coords = layout.flatten(work.to_hessian(layout.views(mean)))
    log_std = torch.log(coords.abs().clamp_min(LOG_STD_FLOOR))
    # λ ≤ λ₁ = c·e^(−1/b), the grid's largest point: the certificate needs j ≥ 1, and a λ
    # above it would be optimised for but never certified.
    rho_max = 0.5 * (math.log(c) - 1.0 / b)
    rho = min(float(rho_init), rho_max)
    state, sq_rho = FlatState.start(mean, log_std, w0), 0.0
    kernels = Kernels.fused() if compile else Kernels.eager()
    ws = Workspace.like(mean)
    gen = torch.Generator(device=device).manual_seed(seed)
    xi = torch.empty(layout.numel, dtype=dtype, device=device)
    curve: list[dict] = []
    recomputed = 0
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    for epoch in range(epochs):
        lr_now = _lr_at(schedule, lr, epoch, epochs)
        if method is Method.ITERATIVE_HESSIAN and epoch > 0 and epoch % eta == 0:
            fresh = new_basis()
            var = {k: torch.exp(2.0 * v).double() for k, v in layout.views(log_std).items()}
            var = project_variances(
                var, basis.to(torch.float64, device), fresh.to(torch.float64, device)
            )
            log_std.copy_(0.5 * torch.log(layout.flatten(var).clamp_min(LOG_STD_FLOOR**2)))
            basis, placement = fresh, Placement(fresh.to(dtype, device), on_act)
            recomputed += 1
        perm = torch.randperm(n, generator=gen, device=device)
        sums = [0.0, 0.0, 0.0, 0.0]
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size : (step + 1) * batch_size]
            xi.normal_(generator=gen)
            smp = backprop_sample(
                model, buffers, layout, state, xi, x[idx], y[idx], placement, kernels, ws
            )
            terms = objective_terms(
                smp.cross_entropy,
                *smp.sums,
                rho,
                num_params=layout.numel,
                num_train=m,
                delta=delta,
                b=b,
                c=c,
            )
            if not math.isfinite(terms.objective):
                raise MeasureError(
                    f"the PAC-Bayes objective became {terms.objective} at epoch {epoch}; lower --lr"
                )
            scalars = step_scalars(terms, lr_now, dtype, device)
            kernels.update(smp.grads, smp.grads_basis, xi, state, scalars, ws)
            # RMSprop on the scalar ρ (as torch.optim.RMSprop), then λ back onto the grid
            g_rho = terms.d_rho
            sq_rho = RMSPROP_ALPHA * sq_rho + (1.0 - RMSPROP_ALPHA) * (g_rho * g_rho)
            rho = min(rho + (-lr_now * g_rho) / (math.sqrt(sq_rho) + RMSPROP_EPS), rho_max)
            for i, v in enumerate((terms.objective, smp.cross_entropy, terms.kl, terms.b_re)):
                sums[i] += v
        sums = [v / steps_per_epoch for v in sums]
        curve.append(
            {
                "epoch": epoch + 1,
                "objective": sums[0],
                "cross_entropy": sums[1],
                "kl": sums[2],
                "b_re": sums[3],
                "prior_variance": math.exp(2.0 * rho),
                "lr": lr_now,
            }
        )
        progress(f"{method.value} epoch {epoch + 1}", epoch + 1, epochs)
    post = Posterior(
        mean={k: v.clone() for k, v in layout.views(mean).items()},
        log_std={k: v.clone() for k, v in layout.views(log_std).items()},
        rho=rho,
        basis=basis,
    )
    if curve:
        curve[-1]["basis_recomputations"] = recomputed
    return post, curve
