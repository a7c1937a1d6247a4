"""Dense float64 references for the tests: Hessian, GGN, Fisher and per-example gradients.

Two families, both independent of flatcli's curvature code (only ``torch.func`` and, for the
exact head, ``mpmath``):

- Autograd references (``dense_hessian``, ``dense_ggn``, ``dense_exact_fisher``,
  ``dense_mc_fisher``, ``dense_jacobian``) differentiate a given loss head with ``torch.func``.
  They are as exact as that head's autograd derivatives: exact to rounding for ordinary nets.
- Exact-head references (``exact_head`` and the ``exact_*`` functions) take the head's derivatives
  from mpmath at 50 significant digits instead: the per-example loss -ln p_y, the residual
  d loss / dz (label entry -sum_{j != y} p_j) and the output Hessian diag(p) - p p^T (diagonal
  p_c sum_{j != c} p_j), each rounded once to float64. With the logit Jacobians dz/dtheta,
  d^2 z/dtheta^2 and dz/dx from ``torch.func`` in float64 (no cancellation there), they are
  accurate to rounding even when 1 - p_y is far below float64's 1e-16, where any float64
  formulation of softmax(z) - onehot(y) is not.

Parameters are the flat concatenation, in ``model.named_parameters()`` order, of ``names``
(default: every parameter with ``requires_grad``); the model's other parameters and buffers are
held fixed. Everything is float64 and small: these are for tiny models only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mpmath
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacfwd, jacrev, vmap

from flatcli.curvature.losses import cross_entropy

LossFn = Callable[[Tensor, Tensor], Tensor]
F64 = torch.float64

__all__ = [
    "old_cross_entropy",
    "flat_logits",
    "logit_jacobian",
    "logit_hessians",
    "head_hessians",
    "dense_jacobian",
    "dense_hessian",
    "dense_ggn",
    "dense_exact_fisher",
    "dense_mc_fisher",
    "ExactHead",
    "exact_head",
    "exact_gradients",
    "exact_ggn",
    "exact_hessian",
    "exact_exact_fisher",
    "exact_mc_fisher",
    "exact_softmax_input_jacobian",
    "confident_mlp",
    "trained_confident_mlp",
    "rel_err",
    "extreme_eigenvalues",
    "margins",
]


def old_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """flatcli 0.1.0's head: ``F.cross_entropy``, whose gradient is softmax(z) - onehot(y)."""
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def rel_err(a: Tensor, b: Tensor) -> float:
    """Normwise relative error ‖a - b‖ / ‖b‖ (Frobenius / Euclidean over all entries)."""
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def extreme_eigenvalues(lam: Tensor, which: str, k: int) -> Tensor:
    """The ``k`` eigenvalues of ``lam`` a ``which`` search (largest, smallest, magnitude) finds."""
    lam = torch.sort(lam).values
    if which == "largest":
        return lam.flip(0)[:k]
    if which == "smallest":
        return lam[:k]
    return lam[torch.argsort(lam.abs(), descending=True)][:k]


# ---------------------------------------------------------------- autograd references


def _names(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    wanted = set(names)
    return [n for n, _ in model.named_parameters() if n in wanted]


def flat_logits(
    model: nn.Module, x: Tensor, names: Sequence[str] | None = None
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``(theta0, logits)``: the flat parameters and the pure function ``theta -> model(x)``."""
    names = _names(model, names)
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    state = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])

    def logits(theta: Tensor) -> Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = s.numel()
            params[n] = theta[i : i + k].view(s)
            i += k
        return functional_call(model, {**state, **params}, (x,))

    return theta0, logits


def logit_jacobian(model: nn.Module, x: Tensor, names: Sequence[str] | None = None) -> Tensor:
    """``dz_n/dtheta``, (N, K, D)."""
    theta0, logits = flat_logits(model, x, names)
    return jacrev(logits)(theta0)


def logit_hessians(model: nn.Module, x: Tensor, names: Sequence[str] | None = None) -> Tensor:
    """``d^2 z_nk / dtheta^2``, (N, K, D, D)."""
    theta0, logits = flat_logits(model, x, names)
    return jacfwd(jacrev(logits))(theta0)


def head_hessians(z: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """(N, K, K): autograd Hessian of each example's loss wrt its logits."""
    return vmap(hessian(lambda zi, yi: loss_fn(zi[None], yi[None]).sum()))(z, y)


def dense_jacobian(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = cross_entropy,
    names: Sequence[str] | None = None,
) -> Tensor:
    """(N, D) per-example gradients by jacrev of the vector of per-example losses.

    The buffers are an argument of the differentiated function, so a BatchNorm in train mode
    may update (copies of) them; its batch statistics couple the examples of ``x``.
    """
    names = _names(model, names)
    params = {k: v.detach() for k, v in model.named_parameters() if k in names}
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in names}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}

    def losses(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_call(model, {**fixed, **p, **b}, (x,)), y)

    J = jacrev(losses)(params, buffers)
    return torch.cat([J[k].reshape(len(x), -1) for k in params], dim=1)


Logits = Callable[[Tensor], Tensor]


def _on_flat_parameters(
    reference: Callable[[Tensor, Logits, Tensor, LossFn], Tensor],
) -> Callable[..., Tensor]:
    """Give ``reference(theta0, logits, y, loss_fn)`` the signature of the autograd references.

    The returned function takes ``(model, x, y, names=None, loss_fn=cross_entropy)`` and calls
    ``reference`` on :func:`flat_logits` of ``model`` at ``x`` (``y`` may be labels (N,) or
    sampled labels (N, S)).
    """

    def dense(
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        names: Sequence[str] | None = None,
        loss_fn: LossFn = cross_entropy,
    ) -> Tensor:
        theta0, logits = flat_logits(model, x, names)
        return reference(theta0, logits, y, loss_fn)

    dense.__name__ = dense.__qualname__ = reference.__name__
    dense.__doc__ = reference.__doc__
    return dense


@_on_flat_parameters
def dense_hessian(theta0: Tensor, logits: Logits, y: Tensor, loss_fn: LossFn) -> Tensor:
    """(D, D) Hessian of the mean loss by ``torch.func.hessian``."""
    return hessian(lambda t: loss_fn(logits(t), y).mean())(theta0)


@_on_flat_parameters
def dense_ggn(theta0: Tensor, logits: Logits, y: Tensor, loss_fn: LossFn) -> Tensor:
    """(D, D) GGN 1/N sum_n J_n^T H_n J_n, H_n the autograd head Hessian wrt the logits."""
    J = jacrev(logits)(theta0)
    M = head_hessians(logits(theta0).detach(), y, loss_fn)
    return torch.einsum("nkd,nkl,nle->de", J, M, J) / len(y)


@_on_flat_parameters
def dense_exact_fisher(theta0: Tensor, logits: Logits, y: Tensor, loss_fn: LossFn) -> Tensor:
    """1/N sum_n sum_c p_c g_c g_c^T, g_c the gradient of loss(x_n, c), p_c = exp(-loss(z_n, c))."""
    z = logits(theta0).detach()
    total = torch.zeros(len(theta0), len(theta0), dtype=theta0.dtype)
    for c in range(z.shape[1]):
        labels = torch.full_like(y, c)
        G = jacrev(lambda t, labels=labels: loss_fn(logits(t), labels))(theta0)  # (N, D)
        p = torch.exp(-loss_fn(z, labels))
        total = total + torch.einsum("n,nd,ne->de", p, G, G)
    return total / len(y)


@_on_flat_parameters
def dense_mc_fisher(theta0: Tensor, logits: Logits, labels: Tensor, loss_fn: LossFn) -> Tensor:
    """1/(N S) sum_{n,s} g g^T, g the gradient of loss(x_n, labels[n, s]); labels (N, S)."""
    N, S = labels.shape
    G = jacrev(lambda t: loss_fn(logits(t).repeat_interleave(S, 0), labels.reshape(-1)))(theta0)
    return G.T @ G / (N * S)


# ---------------------------------------------------------------- exact head (mpmath)


@dataclass(frozen=True)
class ExactHead:
    """Softmax cross-entropy head at 50 digits, each entry rounded once to float64.

    ``loss`` (N,) -ln p_y; ``probs`` (N, K); ``residual`` (N, K) d loss/dz (label entry
    -sum_{j != y} p_j); ``class_residuals`` (N, K, K): row c the residual for label c;
    ``hessian`` (N, K, K) diag(p) - p p^T.
    """

    loss: Tensor
    probs: Tensor
    residual: Tensor
    class_residuals: Tensor
    hessian: Tensor


def exact_head(logits: Tensor, labels: Tensor, dps: int = 50) -> ExactHead:
    """The softmax cross-entropy head of float64 ``logits`` (N, K) in mpmath (loops: tiny N, K)."""
    z = logits.detach().double().cpu()
    N, K = z.shape
    loss = torch.empty(N, dtype=F64)
    probs = torch.empty(N, K, dtype=F64)
    resid = torch.empty(N, K, K, dtype=F64)
    hess = torch.empty(N, K, K, dtype=F64)
    with mpmath.workdps(dps):
        for n in range(N):
            zn = [mpmath.mpf(float(v)) for v in z[n]]
            top = max(zn)
            e = [mpmath.exp(v - top) for v in zn]
            total = mpmath.fsum(e)
            p = [v / total for v in e]
            rest = [mpmath.fsum(p[j] for j in range(K) if j != c) for c in range(K)]
            yn = int(labels[n])
            loss[n] = float(mpmath.log1p(mpmath.fsum(e[j] for j in range(K) if j != yn) / e[yn]))
            for c in range(K):
                probs[n, c] = float(p[c])
                for k in range(K):
                    resid[n, c, k] = float(-rest[c] if k == c else p[k])
                    hess[n, c, k] = float(p[c] * rest[c] if k == c else -p[c] * p[k])
    residual = resid[torch.arange(N), labels.cpu()]
    return ExactHead(loss, probs, residual, resid, hess)


def _jacobian_and_head(
    model: nn.Module, x: Tensor, y: Tensor, names: Sequence[str] | None
) -> tuple[Tensor, ExactHead]:
    """The logit Jacobian (N, K, D) and the :func:`exact_head` at ``model(x)`` for labels ``y``."""
    J = logit_jacobian(model, x, names)
    with torch.no_grad():
        head = exact_head(model(x), y)
    return J, head


def exact_gradients(
    model: nn.Module, x: Tensor, y: Tensor, names: Sequence[str] | None = None
) -> Tensor:
    """(N, D) per-example gradients J_n^T r_n of the cross-entropy, r_n from :func:`exact_head`."""
    J, head = _jacobian_and_head(model, x, y, names)
    return torch.einsum("nkd,nk->nd", J, head.residual)


def exact_ggn(model: nn.Module, x: Tensor, y: Tensor, names: Sequence[str] | None = None) -> Tensor:
    """(D, D) GGN of the mean cross-entropy, 1/N sum_n J_n^T Lambda_n J_n, Lambda_n exact."""
    J, head = _jacobian_and_head(model, x, y, names)
    return torch.einsum("nkd,nkl,nle->de", J, head.hessian, J) / len(x)


def exact_exact_fisher(
    model: nn.Module, x: Tensor, y: Tensor, names: Sequence[str] | None = None
) -> Tensor:
    """1/N sum_n sum_c p_c g_c g_c^T with exact p_c and residuals (equals :func:`exact_ggn`)."""
    J, head = _jacobian_and_head(model, x, y, names)
    G = torch.einsum("nkd,nck->ncd", J, head.class_residuals)  # (N, K, D)
    return torch.einsum("nc,ncd,nce->de", head.probs, G, G) / len(x)


def exact_mc_fisher(
    model: nn.Module, x: Tensor, labels: Tensor, names: Sequence[str] | None = None
) -> Tensor:
    """1/(N S) sum_{n,s} g g^T for the given sampled labels (N, S), exact residuals."""
    N, S = labels.shape
    J, head = _jacobian_and_head(model, x, labels[:, 0], names)
    rows = head.class_residuals[torch.arange(N).unsqueeze(1), labels]  # (N, S, K)
    G = torch.einsum("nkd,nsk->nsd", J, rows).reshape(N * S, -1)
    return G.T @ G / (N * S)


def exact_hessian(
    model: nn.Module, x: Tensor, y: Tensor, names: Sequence[str] | None = None
) -> Tensor:
    """(D, D) Hessian of the mean cross-entropy: GGN + 1/N sum_n sum_k r_nk d^2 z_nk/dtheta^2."""
    Hz = logit_hessians(model, x, names)
    with torch.no_grad():
        head = exact_head(model(x), y)
    return exact_ggn(model, x, y, names) + torch.einsum("nk,nkde->de", head.residual, Hz) / len(x)


def exact_softmax_input_jacobian(
    model: nn.Module, x: Tensor, transform: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """(N, K, d) d softmax(transform(model(x_n))) / dx_n = Lambda_n dz_n/dx_n, Lambda_n exact."""
    transform = transform or (lambda z: z)

    def one(xi: Tensor) -> Tensor:
        return transform(model(xi[None]))[0]

    Jz = vmap(jacrev(one))(x).reshape(len(x), -1, x[0].numel())
    with torch.no_grad():
        z = transform(model(x))
    lam = exact_head(z, z.argmax(dim=1)).hessian
    return (lam @ Jz).detach()


# ---------------------------------------------------------------- confident nets


def confident_mlp(margin: float, n: int = 8, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 6-10-3 tanh MLP whose label logit leads the others by about ``margin``.

    The last layer is solved (minimum-norm least squares, exact since n <= 11 unknowns) so that
    example n's logits are ``margin`` at its label and 0.3·N(0, 1) elsewhere: 1 - p_y is about
    2 e^-margin (4e-9 at 20, 6e-20 at 45).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    x = torch.randn(n, 6, generator=g, dtype=F64)
    y = torch.arange(n) % 3
    target = 0.3 * torch.randn(n, 3, generator=g, dtype=F64)
    target[torch.arange(n), y] = float(margin)
    with torch.no_grad():
        h = torch.cat([model[1](model[0](x)), torch.ones(n, 1, dtype=F64)], dim=1)
        sol = torch.linalg.pinv(h) @ target  # (11, 3)
        model[2].weight.copy_(sol[:-1].T)
        model[2].bias.copy_(sol[-1])
        assert torch.allclose(model(x), target, atol=1e-9)
    model.eval()
    return model, x, y


def trained_confident_mlp(
    n: int = 12, steps: int = 400, lr: float = 0.3, seed: int = 0
) -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 6-8-3 tanh MLP trained to 100% on n random examples (random labels), then on.

    Full-batch normalized gradient descent (step ``lr`` along -g/‖g‖) on the mean cross-entropy:
    unlike Adam, whose step shrinks with the vanishing gradient, it keeps growing the margins,
    which end spread over about 36-43 (1 - p_y between 3e-16 and 4e-19), as on a net trained
    for hundreds of epochs.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(n, 6, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    params = list(model.parameters())
    for _ in range(steps):
        grads = torch.autograd.grad(cross_entropy(model(x), y).mean(), params)
        norm = torch.sqrt(sum((gr**2).sum() for gr in grads))
        with torch.no_grad():
            for p, gr in zip(params, grads, strict=True):
                p -= lr * gr / norm
    model.eval()
    return model, x, y


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """z_y - max_{j != y} z_j per example."""
    mask = torch.arange(logits.shape[1]) == labels.unsqueeze(1)
    zy = logits.gather(1, labels.unsqueeze(1))[:, 0]
    return zy - logits.masked_fill(mask, float("-inf")).max(dim=1).values


def peak_cpu_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensors allocated during ``fn()`` and alive at once: the allocations
    and frees the torch profiler attributes to each op itself, in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak
