"""Loss heads shared by every measure: logits and labels in, per-example or mean loss out.

The head (logits -> softmax cross-entropy) may be evaluated in float64 while the network runs
in float32: confident examples have 1 - p(y|x) below float32's resolution, so their gradients
round to garbage unless the head is computed in double precision.

Trained networks are more confident still: 1 - p(y|x) far below float64's 1e-16 is common.
The textbook residual softmax(z) - onehot(y) then rounds its label entry p_y - 1 to 0, and the
output Hessian diag(p) - p p^T loses its label entry p_y (1 - p_y). Every quantity here is
written so that no entry is a difference of nearly equal numbers: with

    t_c = logsumexp_{j != c} (z_j - z_c),    s_c = sum_{j != c} p_j = sigmoid(t_c),
    p_c = sigmoid(-t_c),

the loss is l(z, y) = -ln p_y = softplus(t_y), the residual's label entry is -s_y, and the output
Hessian's diagonal is p_c s_c. :func:`cross_entropy` is written in that form, so autograd's first
and second derivatives of it are accurate to rounding for every example; the closed forms below
(:func:`class_residuals`, :func:`output_hessian`, ...) serve the code that needs them explicitly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flatcli.configs.choices import LossName

LossFn = Callable[[Tensor, Tensor], Tensor]
"""A loss head: ``(logits (N, K), labels (N,)) -> per-example losses (N,)``."""

__all__ = [
    "LossFn",
    "LossName",
    "cross_entropy",
    "normalized_cross_entropy",
    "normalized_logits",
    "NSCE_MIN_RELATIVE_STD",
    "get_loss",
    "softplus",
    "others_logsumexp",
    "softmax_probs",
    "class_residuals",
    "cross_entropy_residual",
    "output_hessian",
    "output_hessian_sqrt",
    "output_hessian_matvec",
]


def softplus(t: Tensor) -> Tensor:
    """``ln(1 + e^t)`` with no threshold, accurate (with its derivatives) for every ``t``.

    ``torch.nn.functional.softplus`` returns ``t`` itself above ``t = 20``, so its derivative
    there is exactly 1 instead of ``sigmoid(t) = 1 - e^{-t}``. Both branches here are evaluated on
    clamped inputs so that neither overflows and the unselected branch passes a zero, not a NaN,
    gradient.
    """
    pos = t.clamp(min=0)
    neg = t.clamp(max=0)
    return torch.where(t > 0, pos + torch.log1p(torch.exp(-pos)), torch.log1p(torch.exp(neg)))


def _label_mask(labels: Tensor, num_classes: int) -> Tensor:
    """(N, K) bool, True at each example's label (vmap-safe, unlike ``F.one_hot``)."""
    return torch.arange(num_classes, device=labels.device) == labels.unsqueeze(-1)


def cross_entropy(
    logits: Tensor, labels: Tensor, *, head_dtype: torch.dtype | None = None
) -> Tensor:
    """Per-example softmax cross-entropy ``-ln softmax(logits)[y]``, shape (N,).

    Computed as ``softplus(logsumexp_{j != y}(z_j - z_y))`` (the same number), whose autograd
    derivatives are exact for confident examples: the gradient's label entry is
    ``-sigmoid(t_y) = -sum_{j != y} p_j`` rather than ``p_y - 1``, and the Hessian's label entry is
    ``p_y sum_{j != y} p_j`` rather than ``p_y (1 - p_y)``.

    Args:
        logits: (N, K) network outputs (K >= 2).
        labels: (N,) int64 class indices.
        head_dtype: dtype to evaluate the head in (e.g. ``torch.float64``); the result is
            returned in that dtype so gradients flowing back keep its precision until the cast.

    >>> z = torch.tensor([[40.0, 0.0, 0.0]], dtype=torch.float64)
    >>> z.requires_grad_(True)  # doctest: +ELLIPSIS
    tensor(...)
    >>> (g,) = torch.autograd.grad(cross_entropy(z, torch.tensor([0])).sum(), z)
    >>> f"{-float(g[0, 0]):.6e}"  # 1 - p_y = 2 e^-40, which softmax - onehot rounds to 0
    '8.496709e-18'
    """
    if head_dtype is not None:
        logits = logits.to(head_dtype)
    mask = _label_mask(labels, logits.shape[-1])
    zy = logits.gather(-1, labels.unsqueeze(-1))
    t = torch.logsumexp((logits - zy).masked_fill(mask, float("-inf")), dim=-1)
    return softplus(t)


def others_logsumexp(logits: Tensor) -> Tensor:
    """``t[n, c] = ln sum_{j != c} exp(z_nj - z_nc)``, shape (N, K): ``-ln p_c = softplus(t_c)``."""
    k = logits.shape[-1]
    diff = logits.unsqueeze(-2) - logits.unsqueeze(-1)  # (N, K, K): [c, j] = z_j - z_c
    eye = torch.eye(k, dtype=torch.bool, device=logits.device)
    return torch.logsumexp(diff.masked_fill(eye, float("-inf")), dim=-1)


def _probs_and_rest(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``p_c`` and ``s_c = sum_{j != c} p_j = 1 - p_c``, (N, K) each, accurate relative to each."""
    t = others_logsumexp(logits)
    return torch.sigmoid(-t), torch.sigmoid(t)


def softmax_probs(logits: Tensor) -> Tensor:
    """``softmax(z)``, (N, K)."""
    return torch.softmax(logits, dim=-1)


def class_residuals(logits: Tensor) -> Tensor:
    """``R[n, c] = d l(z_n, c) / dz`` for every class c, (N, K, K), with exact label entries.

    Row c is ``p - e_c`` with its c-th entry ``-sum_{j != c} p_j``.
    ``sum_c p_c R[n, c] R[n, c]^T`` is the exact Fisher of the head, ``diag(p) - p p^T``.
    """
    p, rest = _probs_and_rest(logits)
    k = logits.shape[-1]
    eye = torch.eye(k, dtype=torch.bool, device=logits.device)
    rows = p.unsqueeze(-2).expand(*p.shape[:-1], k, k)
    return torch.where(eye, -rest.unsqueeze(-1), rows)


def cross_entropy_residual(logits: Tensor, labels: Tensor) -> Tensor:
    """``d l(z_n, y_n) / dz_n``, (N, K): ``p`` with the label entry ``-sum_{j != y} p_j``, exact."""
    mask = _label_mask(labels, logits.shape[-1])
    zy = logits.gather(-1, labels.unsqueeze(-1))
    d = (logits - zy).masked_fill(mask, float("-inf"))
    t = torch.logsumexp(d, dim=-1, keepdim=True)
    p = torch.exp(d - softplus(t))  # p_j = e^{z_j - z_y} p_y, j != y; 0 at the label
    return torch.where(mask, -torch.sigmoid(t), p)


def output_hessian(logits: Tensor) -> Tensor:
    """``Lambda = diag(p) - p p^T``, (N, K, K), the Hessian of the cross-entropy wrt the logits.

    Its diagonal is formed as ``p_c sum_{j != c} p_j`` (never ``p_c - p_c^2``); off-diagonal entries
    ``-p_c p_j`` involve no cancellation. The same for every label.
    """
    p, rest = _probs_and_rest(logits)
    k = logits.shape[-1]
    eye = torch.eye(k, dtype=torch.bool, device=logits.device)
    outer = -p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.where(eye, (p * rest).unsqueeze(-1), outer)


def output_hessian_sqrt(logits: Tensor) -> Tensor:
    """``Q`` (N, K, K) with ``Q^T Q = diag(p) - p p^T`` exactly: row c is ``sqrt(p_c) R[n, c]``.

    (``R`` from :func:`class_residuals`.) Backpropagating the K rows of ``Q`` gives the exact
    output Hessian of any layer, ``G^T Lambda G = (Q G)^T (Q G)``.
    """
    p, _ = _probs_and_rest(logits)
    return p.sqrt().unsqueeze(-1) * class_residuals(logits)


def output_hessian_matvec(logits: Tensor, u: Tensor) -> Tensor:
    """``Lambda_n u_n`` for ``u`` of shape (..., N, K) (leading dims broadcast), exact entries."""
    return torch.einsum("nck,...nk->...nc", output_hessian(logits), u.to(logits.dtype))


NSCE_MIN_RELATIVE_STD = 1e-6
"""Floor of the per-example logit standard deviation in :func:`normalized_logits`, relative to the
logits' scale max_i |z_i|: a spread below a millionth of the scale is within a few float32
rounding units of the logits (which a float32 network produces), so it carries no class
information; dividing by it would make the loss and its gradient arbitrarily large."""


def normalized_logits(logits: Tensor, eps: float = 0.0) -> Tensor:
    """Logits divided by their per-example standard deviation over classes.

    Tsuzuku et al. 2020, Eqs. 21-22: f'(z) = f(z) / sqrt(mean_i (f(z)[i] - mu)^2 + eps).
    (Subtracting mu as well would change nothing after the softmax.)

    The divisor is floored at ``NSCE_MIN_RELATIVE_STD * max_i |z_i|`` (1e-6 of the logits'
    scale). Above the floor (every ordinary network) the result is Eq. 22 exactly, and stays
    invariant to scaling and shifting the logits; below it (logits equal to ~16 float32 ulps)
    the spread is treated as rounding noise: the normalized logits are at most ~1e-6 apart
    relative to each other's spread, the softmax is close to uniform, the loss close to ln K and
    its gradient bounded by about sqrt(2) / (1e-6 * max_i |z_i|), never NaN or unbounded.
    Logits that are all exactly 0 give normalized logits 0 (loss ln K) and a zero gradient.
    """
    mu = logits.mean(dim=-1, keepdim=True)
    var = ((logits - mu) ** 2).mean(dim=-1, keepdim=True).add(eps)
    scale = logits.abs().amax(dim=-1, keepdim=True)
    # floor inside the square root (no infinite sqrt derivative at zero spread), and a positive
    # argument even for all-zero logits, whose branch torch.where then discards
    floor = (NSCE_MIN_RELATIVE_STD * scale) ** 2
    std = torch.maximum(var, floor).clamp_min(torch.finfo(logits.dtype).tiny).sqrt()
    return torch.where(var + floor > 0, logits / std, torch.zeros_like(logits))


def normalized_cross_entropy(
    logits: Tensor, labels: Tensor, *, head_dtype: torch.dtype | None = None
) -> Tensor:
    """Per-example normalized-softmax-cross-entropy (NSCE), Tsuzuku et al. 2020, Eq. 20.

    The exact cross-entropy of :func:`cross_entropy` applied to :func:`normalized_logits`.
    Invariant to scaling and shifting the logits of each example (their §5.4).
    """
    if head_dtype is not None:
        logits = logits.to(head_dtype)
    return cross_entropy(normalized_logits(logits), labels)


def get_loss(name: LossName | str) -> LossFn:
    """The per-example loss head for a :class:`LossName`."""
    name = LossName(name)
    return {LossName.CE: cross_entropy, LossName.NSCE: normalized_cross_entropy}[name]
