r"""One step of the PAC-Bayes bound optimisation: Eq. 46's value and its gradients, fused.

Wu et al. 2020 (Algorithm 1, lines 11-14, after Dziugaite & Roy 2017) take one weight sample
w′ = w + ToStandard(ξ ⊙ σ), σ = exp(ς), ξ ~ N(0, I), per mini-batch and descend

.. math::
    \mathcal L(w') + \sqrt{\tfrac12 B_{RE}},\qquad
    B_{RE} = \frac{KL(Q\|P) + 2\ln j + \ln\frac{\pi^2 m}{6\delta}}{m - 1},\quad
    KL = \tfrac12\Big(\frac{\sum s + \|w - w_0\|^2}{\lambda} - P + P\ln\lambda - \sum\ln s\Big).

The KL depends on the P-vectors only through three sums (‖w − w₀‖², Σ s, Σ ln s), so its
gradients are closed forms: ∂/∂w = 2a(w − w₀) and ∂/∂ς = 2b·s + 2c with a, b, c the
derivatives of the scalar objective with respect to those sums (scalar autograd, float64).
The loss term needs one backward to g = ∇_{w′}ℒ: ∂ℒ/∂w = g and ∂ℒ/∂ς = ToHessian(g) ⊙ ξ ⊙ σ.
The parameters live in two flat vectors, so each step is one normal draw, a dozen fused passes
over P numbers and the network's own forward and backward; no autograd graph over the KL.

Noise placement, per rotated ``nn.Linear`` layer (W′ = M + U N Vᵀ, N = ξ ⊙ σ of shape m × n):
on the weights (rotate N, 4mn(m + n) flops a step with its backward) or on the activations,
x W′ᵀ = x Mᵀ + ((x V) Nᵀ) Uᵀ (at most 2B(2n² + 3nm + 2m²) flops with its backward, for a
batch of B rows), chosen by which costs less. Both give the same w′ in exact arithmetic;
only the order of the products differs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from flatcli.pacbayes.bound import union_term
from flatcli.pacbayes.posterior import Basis, LayerBasis

__all__ = [
    "FlatLayout",
    "StepResult",
    "activation_layers",
    "objective_and_gradients",
    "objective_from_terms",
]


@dataclass(frozen=True)
class FlatLayout:
    """Where each named tensor lives in one flat vector: names, shapes and offsets."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, Tensor]) -> FlatLayout:
        """The layout of ``tensors`` in their iteration order."""
        return cls(tuple(tensors), tuple(tuple(t.shape) for t in tensors.values()))

    @property
    def numel(self) -> int:
        """P, the length of the flat vector."""
        return sum(math.prod(s) for s in self.shapes)

    def slices(self) -> Iterator[tuple[str, slice, tuple[int, ...]]]:
        """(name, slice of the flat vector, shape) for every tensor."""
        start = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            stop = start + math.prod(shape)
            yield name, slice(start, stop), shape
            start = stop

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """The named tensors as views into ``flat`` (gradients flow back to it)."""
        return {name: flat[sl].view(shape) for name, sl, shape in self.slices()}

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """One flat vector holding ``tensors`` (a copy), in the layout's order."""
        return torch.cat([tensors[name].reshape(-1) for name in self.names])


def objective_from_terms(
    ce: Tensor,
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
    """Eq. 46 of Wu et al. 2020 from the KL's three sums: (objective, KL(Q‖P), B_RE).

    ``mean_dist_sq`` = ‖w − w₀‖², ``var_sum`` = Σ s, ``log_var_sum`` = Σ ln s, λ = exp(2ρ);
    B_RE is Eq. 45 with KL(Q‖P) and the continuous grid index j = b·ln(c/λ), clamped at 1.
    """
    lam = torch.exp(2.0 * rho)
    p = float(num_params)
    kl = 0.5 * ((var_sum + mean_dist_sq) / lam - p + p * 2.0 * rho - log_var_sum)
    j_cont = (b * (math.log(c) - 2.0 * rho)).clamp_min(1.0)
    bre = (kl + union_term(j_cont, num_train, delta)) / (num_train - 1)
    return ce + torch.sqrt(0.5 * bre.clamp_min(0.0)), kl, bre


@dataclass
class StepResult:
    """One step's objective, its parts, and the gradients of the flat mean, ς and ρ."""

    objective: Tensor
    cross_entropy: Tensor
    kl: Tensor
    b_re: Tensor
    grad_mean: Tensor
    grad_log_std: Tensor
    grad_rho: Tensor


def activation_layers(model: nn.Module, basis: Basis, rows: int) -> frozenset[str]:
    """The rotated ``nn.Linear`` weights whose noise is cheaper to apply to the activations.

    Weight side: rotating N and its gradient costs 4mn(m + n) flops a step. Activation side:
    (x V) Nᵀ Uᵀ and its backward cost at most 2·rows·(2n² + 3nm + 2m²), ``rows`` the batch
    size (less for a first layer, whose input needs no gradient).
    """
    out = set()
    for key, lb in basis.layers.items():
        if not key.endswith(".weight") or len(lb.shape) != 2:
            continue
        if not isinstance(_owner(model, key), nn.Linear):
            continue
        m, n = lb.shape
        if 2 * rows * (2 * n * n + 3 * n * m + 2 * m * m) < 4 * m * n * (m + n):
            out.add(key)
    return frozenset(out)


def _owner(model: nn.Module, key: str) -> nn.Module:
    """The module holding parameter ``key`` (e.g. ``"fc1.weight"`` -> ``model.fc1``)."""
    return model.get_submodule(key.rpartition(".")[0])


@contextmanager
def _noise_on_activations(
    model: nn.Module, noise: Mapping[str, tuple[LayerBasis, Tensor]]
) -> Iterator[None]:
    """Forward hooks adding ((x V) Nᵀ) Uᵀ to each listed Linear layer's output."""

    def hook_for(lb: LayerBasis, n_mat: Tensor):
        def hook(_module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            return out + ((args[0] @ lb.V) @ n_mat.transpose(0, 1)) @ lb.U.transpose(0, 1)

        return hook

    handles = [
        _owner(model, key).register_forward_hook(hook_for(lb, n_mat))
        for key, (lb, n_mat) in noise.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def objective_and_gradients(
    model: nn.Module,
    buffers: Mapping[str, Tensor],
    layout: FlatLayout,
    mean: Tensor,
    log_std: Tensor,
    rho: Tensor,
    prior_mean: Tensor,
    xi: Tensor,
    x: Tensor,
    y: Tensor,
    *,
    basis: Basis,
    on_activations: frozenset[str] = frozenset(),
    num_train: int,
    delta: float,
    b: float,
    c: float,
) -> StepResult:
    """Eq. 46 at the weight sample w′ = w + ToStandard(ξ ⊙ exp(ς)) and its exact gradients.

    ``mean`` (w), ``log_std`` (ς, in the basis coordinates), ``prior_mean`` (w₀) and ``xi`` (ξ)
    are flat vectors in ``layout``; ``basis`` is already in the model's dtype and device;
    ``on_activations`` names the rotated Linear weights whose noise enters as ((x V) Nᵀ) Uᵀ
    (:func:`activation_layers`). The gradients equal autograd's of Wu et al. 2020, Eq. 46
    (Algorithm 1, lines 12-14) up to rounding.
    """
    sigma = torch.exp(log_std)
    noise = xi * sigma  # ξ ⊙ σ, in the basis coordinates
    rotated = bool(basis.layers)
    act_noise: dict[str, tuple[LayerBasis, Tensor]] = {}
    if rotated:
        noise_std = noise.clone()
        for name, sl, shape in layout.slices():
            lb = basis.layers.get(name)
            if lb is None:
                continue
            if name in on_activations:
                act_noise[name] = (lb, noise[sl].view(shape).detach().requires_grad_(True))
                noise_std[sl] = 0.0
            else:
                noise_std[sl] = lb.to_standard(noise[sl].view(shape)).reshape(-1)
    else:
        noise_std = noise
    # one leaf per tensor: views of a flat leaf would each backpropagate a zero-filled P-vector
    w_prime = {
        k: v.detach().requires_grad_(True) for k, v in layout.views(mean + noise_std).items()
    }
    leaves = [*w_prime.values(), *(n_mat for _, n_mat in act_noise.values())]
    with torch.enable_grad(), _noise_on_activations(model, act_noise):
        logits = functional_call(model, {**buffers, **w_prime}, (x,))
        ce = F.cross_entropy(logits, y)
        grads = torch.autograd.grad(ce, leaves)
    g = torch.cat([t.reshape(-1) for t in grads[: len(w_prime)]])
    if rotated:
        g_basis = g.clone()
        act_grads = dict(zip(act_noise, grads[len(w_prime) :], strict=True))
        for name, sl, shape in layout.slices():
            lb = basis.layers.get(name)
            if lb is None:
                continue
            if name in act_grads:
                g_basis[sl] = act_grads[name].reshape(-1)
            else:
                g_basis[sl] = lb.to_hessian(g[sl].view(shape)).reshape(-1)
    else:
        g_basis = g
    diff = mean - prior_mean
    f64 = torch.float64
    terms = torch.stack(
        [diff.dot(diff).to(f64), sigma.dot(sigma).to(f64), 2.0 * log_std.sum().to(f64)]
    ).detach()
    with torch.enable_grad():
        terms.requires_grad_(True)
        rho_leaf = rho.detach().to(f64).requires_grad_(True)
        obj, kl, bre = objective_from_terms(
            ce.detach().to(f64),
            terms[0],
            terms[1],
            terms[2],
            rho_leaf,
            num_params=layout.numel,
            num_train=num_train,
            delta=delta,
            b=b,
            c=c,
        )
        d_terms, d_rho = torch.autograd.grad(obj, [terms, rho_leaf])
    a_mean, a_var, a_logvar = (float(v) for v in d_terms)
    grad_log_std = (g_basis * noise).addcmul_(sigma, sigma, value=2.0 * a_var)
    grad_log_std.add_(2.0 * a_logvar)
    grad_mean = g.add_(diff, alpha=2.0 * a_mean)
    return StepResult(
        objective=obj.detach(),
        cross_entropy=ce.detach(),
        kl=kl.detach(),
        b_re=bre.detach(),
        grad_mean=grad_mean,
        grad_log_std=grad_log_std,
        grad_rho=d_rho.to(rho.dtype),
    )
