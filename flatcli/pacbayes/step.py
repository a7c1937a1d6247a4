r"""One step of the PAC-Bayes bound optimisation: Eq. 46's value and its gradients, fused.

Wu et al. 2020 (Algorithm 1, lines 11-14, after Dziugaite & Roy 2017) take one weight sample
w′ = w + ToStandard(ξ ⊙ σ), σ = exp(ς), ξ ~ N(0, I), per mini-batch and descend

.. math::
    \mathcal L(w') + \sqrt{\tfrac12 B_{RE}},\qquad
    B_{RE} = \frac{KL(Q\|P) + 2\ln j + \ln\frac{\pi^2 m}{6\delta}}{m - 1},\quad
    KL = \tfrac12\Big(\frac{\sum s + \|w - w_0\|^2}{\lambda} - P + P\ln\lambda - \sum\ln s\Big).

The KL depends on the P-vectors only through three sums (‖w − w₀‖², Σ s, Σ ln s), so its
gradients are closed forms: ∂/∂w = 2a(w − w₀) and ∂/∂ς = 2b·s + 2c with a, b, c the
derivatives of the scalar objective with respect to those sums, themselves closed forms in
float64 (:func:`objective_terms`). The loss term needs one backward to g = ∇_{w′}ℒ:
∂ℒ/∂w = g and ∂ℒ/∂ς = ToHessian(g) ⊙ ξ ⊙ σ. So a step is one normal draw, two elementwise
kernels over the flat vectors (:class:`Kernels`: the draw side, and gradients + RMSprop;
``torch.compile`` can fuse each into one loop) and the network's own forward and backward;
no autograd graph over the KL.

Noise placement, per rotated ``nn.Linear`` layer (W′ = M + U N Vᵀ, N = ξ ⊙ σ of shape m × n):
on the weights (rotate N, 4mn(m + n) flops a step with its backward) or on the activations,
x W′ᵀ = x Mᵀ + ((x V) Nᵀ) Uᵀ (at most 2B(2n² + 3nm + 2m²) flops with its backward, for a
batch of B rows), chosen by which costs less. Both give the same w′ in exact arithmetic;
only the order of the products differs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from flatcli.errors import MeasureError
from flatcli.pacbayes.bound import union_term
from flatcli.pacbayes.kl import gaussian_kl_isotropic
from flatcli.pacbayes.posterior import Basis, LayerBasis

__all__ = [
    "FlatLayout",
    "FlatState",
    "Kernels",
    "ObjectiveTerms",
    "Placement",
    "Sample",
    "StepResult",
    "activation_layers",
    "backprop_sample",
    "objective_and_gradients",
    "objective_from_terms",
    "objective_terms",
    "step_scalars",
    "Workspace",
]

RMSPROP_ALPHA = 0.99
RMSPROP_EPS = 1e-8
"""torch.optim.RMSprop's defaults (smoothing α and ε), which the bound optimisation uses."""

Grads = list[Tensor]  # per-tensor flat gradients, in the layout's order


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
    kl = gaussian_kl_isotropic(mean_dist_sq, var_sum, log_var_sum, num_params, torch.exp(2.0 * rho))
    j_cont = (b * (math.log(c) - 2.0 * rho)).clamp_min(1.0)
    bre = (kl + union_term(j_cont, num_train, delta)) / (num_train - 1)
    return ce + torch.sqrt(0.5 * bre.clamp_min(0.0)), kl, bre


@dataclass(frozen=True)
class ObjectiveTerms:
    """Eq. 46's value and parts, and its derivatives w.r.t. the KL's three sums and ρ."""

    objective: float
    kl: float
    b_re: float
    d_mean_dist_sq: float
    d_var_sum: float
    d_log_var_sum: float
    d_rho: float


def objective_terms(
    ce: float,
    mean_dist_sq: float,
    var_sum: float,
    log_var_sum: float,
    rho: float,
    *,
    num_params: int,
    num_train: int,
    delta: float,
    b: float,
    c: float,
) -> ObjectiveTerms:
    r""":func:`objective_from_terms` and its gradient in closed form, in float64 arithmetic.

    With λ = e^{2ρ}, S = ‖w − w₀‖² + Σ s, j = b(ln c − 2ρ) and r = √(B_RE/2):
    ∂/∂B_RE = 1/(4r); ∂KL/∂‖w − w₀‖² = ∂KL/∂Σs = 1/(2λ), ∂KL/∂Σ ln s = −½,
    ∂KL/∂ρ = P − S/λ and ∂(2 ln j)/∂ρ = −4b/j where j > 1 (0 on the clamp, as autograd's
    clamp gives).
    """
    lam = math.exp(2.0 * rho)
    p = float(num_params)
    total = var_sum + mean_dist_sq
    kl = float(gaussian_kl_isotropic(mean_dist_sq, var_sum, log_var_sum, num_params, lam))
    j = b * (math.log(c) - 2.0 * rho)
    j_clamped = max(j, 1.0)
    bre = (kl + union_term(j_clamped, num_train, delta)) / (num_train - 1)
    r = math.sqrt(0.5 * max(bre, 0.0))
    d_bre = 0.25 / r / (num_train - 1) if bre > 0.0 else 0.0  # ∂objective/∂KL
    d_union = -4.0 * b / j if j > 1.0 else 0.0
    return ObjectiveTerms(
        objective=ce + r,
        kl=kl,
        b_re=bre,
        d_mean_dist_sq=d_bre * 0.5 / lam,
        d_var_sum=d_bre * 0.5 / lam,
        d_log_var_sum=-0.5 * d_bre,
        d_rho=d_bre * (p - total / lam + d_union),
    )


@dataclass
class StepResult:
    """One step's objective, its parts, and the gradients of the flat mean, ς and ρ."""

    objective: float
    cross_entropy: float
    kl: float
    b_re: float
    grad_mean: Tensor
    grad_log_std: Tensor
    grad_rho: float


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


@dataclass
class FlatState:
    """What the optimisation carries from step to step, as flat P-vectors: the mean w, ς
    (in the basis coordinates), the prior's centre w₀ (fixed) and RMSprop's square averages
    of the w- and ς-gradients."""

    mean: Tensor
    log_std: Tensor
    prior_mean: Tensor
    sq_mean: Tensor
    sq_log_std: Tensor

    @classmethod
    def start(cls, mean: Tensor, log_std: Tensor, prior_mean: Tensor) -> FlatState:
        """The state before the first step: RMSprop's averages at zero."""
        return cls(mean, log_std, prior_mean, torch.zeros_like(mean), torch.zeros_like(log_std))


@dataclass
class Workspace:
    """Preallocated P-vectors the step's kernels write into.

    A fresh P-sized tensor per operation costs an allocation that zeroes its pages: at
    T-600's P the draw side took 4.9 ms that way and 0.9 ms in place (micro-benchmark).
    ``noise`` and ``w_flat`` are outputs of :meth:`Kernels.prepare`; the rest is scratch of
    the eager kernels.
    """

    noise: Tensor  # ξ ⊙ σ, in the basis coordinates
    w_flat: Tensor  # w′ before the per-layer rotations
    sigma: Tensor
    diff: Tensor
    g: Tensor
    g_basis: Tensor

    @classmethod
    def like(cls, v: Tensor) -> Workspace:
        """Six uninitialised P-vectors with ``v``'s size, dtype and device."""
        return cls(*(torch.empty_like(v) for _ in range(6)))


def _prepare_eager(st: FlatState, xi: Tensor, ws: Workspace) -> Tensor:
    torch.exp(st.log_std, out=ws.sigma)
    torch.mul(xi, ws.sigma, out=ws.noise)
    torch.sub(st.mean, st.prior_mean, out=ws.diff)
    torch.add(st.mean, ws.noise, out=ws.w_flat)
    return torch.stack([ws.diff.dot(ws.diff), ws.sigma.dot(ws.sigma), st.log_std.sum()])


def _gradients_eager(
    grads: Grads, grads_basis: Grads | None, scalars: Tensor, ws: Workspace
) -> tuple[Tensor, Tensor]:
    # σ and w − w₀ are the ones _prepare_eager left in the workspace this step
    g = torch.cat(grads, out=ws.g)
    g_basis = g if grads_basis is None else torch.cat(grads_basis, out=ws.g_basis)
    grad_mean = ws.diff.mul_(scalars[0]).add_(g)
    grad_log_std = ws.noise.mul_(g_basis).add_(ws.sigma.mul_(ws.sigma).mul_(scalars[1]))
    return grad_mean, grad_log_std.add_(scalars[2])


def _rmsprop_eager(param: Tensor, grad: Tensor, sq: Tensor, neg_lr: Tensor, tmp: Tensor) -> None:
    sq.mul_(RMSPROP_ALPHA).addcmul_(grad, grad, value=1.0 - RMSPROP_ALPHA)
    param.add_(grad.mul_(neg_lr).div_(torch.sqrt(sq, out=tmp).add_(RMSPROP_EPS)))


def _update_eager(
    grads: Grads, grads_basis: Grads | None, xi: Tensor, st: FlatState, k: Tensor, ws: Workspace
) -> None:
    grad_mean, grad_log_std = _gradients_eager(grads, grads_basis, k, ws)
    _rmsprop_eager(st.mean, grad_mean, st.sq_mean, k[3], ws.g)
    _rmsprop_eager(st.log_std, grad_log_std, st.sq_log_std, k[3], ws.g)


def _prepare_fused(st: FlatState, xi: Tensor, ws: Workspace) -> Tensor:
    sigma = torch.exp(st.log_std)
    noise = xi * sigma
    diff = st.mean - st.prior_mean
    ws.noise.copy_(noise)
    ws.w_flat.copy_(st.mean + noise)
    return torch.stack([(diff * diff).sum(), (sigma * sigma).sum(), st.log_std.sum()])


def _rmsprop_fused(param: Tensor, grad: Tensor, sq: Tensor, neg_lr: Tensor) -> None:
    new_sq = sq * RMSPROP_ALPHA + (1.0 - RMSPROP_ALPHA) * (grad * grad)
    sq.copy_(new_sq)
    param.add_((grad * neg_lr) / (new_sq.sqrt() + RMSPROP_EPS))


def _update_fused(
    grads: Grads, grads_basis: Grads | None, xi: Tensor, st: FlatState, k: Tensor, ws: Workspace
) -> None:
    # everything recomputed from the inputs: one loop over P reads each vector once
    g = torch.cat(grads)
    g_basis = g if grads_basis is None else torch.cat(grads_basis)
    sigma = torch.exp(st.log_std)
    grad_mean = g + k[0] * (st.mean - st.prior_mean)
    grad_log_std = g_basis * (xi * sigma) + k[1] * (sigma * sigma) + k[2]
    _rmsprop_fused(st.mean, grad_mean, st.sq_mean, k[3])
    _rmsprop_fused(st.log_std, grad_log_std, st.sq_log_std, k[3])


@dataclass(frozen=True)
class Kernels:
    """The step's two elementwise kernels over P-vectors.

    ``prepare(state, xi, ws)`` writes the noise ξ ⊙ σ and w + ξ ⊙ σ into ``ws`` and returns
    the KL's sums (‖w − w₀‖², Σ s, Σ ς); ``update(grads, grads_basis, xi, state, scalars,
    ws)`` forms the gradients of Eq. 46 from the per-tensor ∇_{w′}ℒ (and their ToHessian
    images, None in the standard basis) with the scalars of :func:`step_scalars`, and takes
    one ``torch.optim.RMSprop`` step (α = 0.99, ε = 1e-8) on w and ς of the
    :class:`FlatState` in place.

    :meth:`eager`: in-place PyTorch ops, a dozen passes over memory. :meth:`fused`: the
    same arithmetic through ``torch.compile`` (Inductor), one fused loop per kernel; it may
    round differently in the last bit.
    """

    prepare: Callable[..., Tensor]
    update: Callable[..., None]

    @classmethod
    def eager(cls) -> Kernels:
        """The kernels as in-place PyTorch ops."""
        return cls(_prepare_eager, _update_eager)

    @classmethod
    def fused(cls) -> Kernels:
        """The kernels compiled by ``torch.compile`` (on a CPU this needs a C++ compiler)."""
        return cls(_compiled(_prepare_fused), _compiled(_update_fused))


@cache
def _compiled(fn: Callable) -> Callable:
    # Inductor's C++ build logs "No CUDA runtime is found" on a CPU-only machine: not news
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    compiled = torch.compile(fn, fullgraph=True)  # a second P recompiles with symbolic sizes

    def run(*args: object) -> object:
        try:
            return compiled(*args)
        except Exception as exc:
            from torch._dynamo.exc import TorchDynamoException

            if isinstance(exc, TorchDynamoException) or "InductorError" in type(exc).__name__:
                raise MeasureError(
                    "torch.compile could not build the PAC-Bayes step kernels "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    "on a CPU it needs a working C++ compiler (set CXX), or drop --compile"
                ) from exc
            raise

    return run


@dataclass(frozen=True)
class Placement:
    """Where the posterior's noise goes: the per-layer ``basis`` (in the model's dtype and
    device; empty for the standard basis) and the rotated Linear weights whose noise enters
    on the activations as ((x V) Nᵀ) Uᵀ (:func:`activation_layers`)."""

    basis: Basis
    on_activations: frozenset[str] = frozenset()


@dataclass
class Sample:
    """One weight sample w′ and its backward: what the update side of the step needs."""

    sums: tuple[float, float, float]  # ‖w − w₀‖², Σ s, Σ ln s
    cross_entropy: float  # ℒ(w′) on the mini-batch
    grads: list[Tensor]  # ∇_{w′}ℒ per tensor, standard basis
    grads_basis: list[Tensor] | None  # their ToHessian images (None: the standard basis)


def backprop_sample(
    model: nn.Module,
    buffers: Mapping[str, Tensor],
    layout: FlatLayout,
    state: FlatState,
    xi: Tensor,
    x: Tensor,
    y: Tensor,
    placement: Placement,
    kernels: Kernels,
    ws: Workspace,
) -> Sample:
    """The mini-batch cross-entropy at w′ = w + ToStandard(ξ ⊙ exp(ς)) and its gradient.

    ``state`` and ``xi`` (ξ) are flat vectors in ``layout``; ``kernels.prepare`` fills ``ws``.
    """
    sums = kernels.prepare(state, xi, ws)
    basis, on_activations = placement.basis, placement.on_activations
    mean, noise, w_flat = state.mean, ws.noise, ws.w_flat
    act_noise: dict[str, tuple[LayerBasis, Tensor]] = {}
    for name, sl, shape in layout.slices() if basis.layers else ():
        lb = basis.layers.get(name)
        if lb is None:
            continue
        if name in on_activations:
            act_noise[name] = (lb, noise[sl].view(shape).detach().requires_grad_(True))
            w_flat[sl] = mean[sl]
        else:
            w_flat[sl] = (mean[sl].view(shape) + lb.to_standard(noise[sl].view(shape))).view(-1)
    # one leaf per tensor: views of a flat leaf would each backpropagate a zero-filled P-vector
    w_prime = {k: v.detach().requires_grad_(True) for k, v in layout.views(w_flat).items()}
    leaves = [*w_prime.values(), *(n_mat for _, n_mat in act_noise.values())]
    with torch.enable_grad(), _noise_on_activations(model, act_noise):
        logits = functional_call(model, {**buffers, **w_prime}, (x,))
        ce = F.cross_entropy(logits, y)
        all_grads = torch.autograd.grad(ce, leaves)
    grads = [t.reshape(-1) for t in all_grads[: len(w_prime)]]
    grads_basis = None
    if basis.layers:
        act_grads = dict(zip(act_noise, all_grads[len(w_prime) :], strict=True))
        grads_basis = []
        for (name, _, shape), g in zip(layout.slices(), grads, strict=True):
            lb = basis.layers.get(name)
            if name in act_grads:
                g = act_grads[name].reshape(-1)
            elif lb is not None:
                g = lb.to_hessian(g.view(shape)).reshape(-1)
            grads_basis.append(g)
    mds, var_sum, log_std_sum = sums.tolist()
    return Sample((mds, var_sum, 2.0 * log_std_sum), float(ce.detach()), grads, grads_basis)


def objective_and_gradients(
    model: nn.Module,
    buffers: Mapping[str, Tensor],
    layout: FlatLayout,
    mean: Tensor,
    log_std: Tensor,
    rho: Tensor | float,
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

    Arguments as :func:`backprop_sample`, with ρ (λ = e^{2ρ}) and the bound's constants. The
    gradients equal autograd's of Wu et al. 2020, Eq. 46 (Algorithm 1, lines 12-14) up to
    rounding; the optimisation loop applies the same pieces with RMSprop fused in.
    """
    ws = Workspace.like(mean)
    state = FlatState.start(mean, log_std, prior_mean)
    placement = Placement(basis, on_activations)
    smp = backprop_sample(model, buffers, layout, state, xi, x, y, placement, Kernels.eager(), ws)
    terms = objective_terms(
        smp.cross_entropy,
        *smp.sums,
        float(rho),
        num_params=layout.numel,
        num_train=num_train,
        delta=delta,
        b=b,
        c=c,
    )
    grad_mean, grad_log_std = _gradients_eager(
        smp.grads, smp.grads_basis, step_scalars(terms, 0.0, mean.dtype, mean.device), ws
    )
    return StepResult(
        objective=terms.objective,
        cross_entropy=smp.cross_entropy,
        kl=terms.kl,
        b_re=terms.b_re,
        grad_mean=grad_mean,
        grad_log_std=grad_log_std,
        grad_rho=terms.d_rho,
    )


def step_scalars(
    terms: ObjectiveTerms, lr: float, dtype: torch.dtype, device: torch.device | str | None
) -> Tensor:
    """(2a, 2b, 2c, −lr): what :class:`Kernels` ``update`` multiplies the P-vectors by.

    a, b, c are the objective's derivatives w.r.t. ‖w − w₀‖², Σ s and Σ ln s. In the
    P-vectors' own ``dtype``: a float64 scalar against float32 vectors would send every
    elementwise op down PyTorch's slow casting loop.
    """
    return torch.tensor(
        [2.0 * terms.d_mean_dist_sq, 2.0 * terms.d_var_sum, 2.0 * terms.d_log_var_sum, -lr],
        dtype=dtype,
        device=device,
    )
