"""Loss heads shared by every measure: outputs and targets in, per-example or mean loss out.

The losses of ``--loss`` (docs, "Your model"): ``ce`` and ``nsce`` on logits (N, K) with int64
labels, ``token-ce`` on token logits (N, T, V) with int64 targets (N, T) (-100 not counted), ``mse``
on (N,) / (N, D) outputs and ``bce`` on (N, D) logits with float targets. :func:`get_loss` gives the
per-example head (a sequence's mean over its counted positions; the mean over a regressor's
outputs), :func:`sample_loss` the head whose mean over the examples is the loss of the sample
(for ``token-ce`` the mean over ALL counted positions), :func:`infer_loss` the default for given
targets, :func:`check_targets` refuses outputs or targets a loss cannot take, and
:func:`output_hessian_factor` is the closed-form square root of each loss's output Hessian.

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

from flatcli.configs.choices import CLASS_LOSSES, LossName
from flatcli.errors import UsageError

LossFn = Callable[[Tensor, Tensor], Tensor]
"""A loss head: ``(logits (N, K), labels (N,)) -> per-example losses (N,)``."""

__all__ = [
    "LossFn",
    "LossName",
    "CLASS_LOSSES",
    "IGNORE_INDEX",
    "token_cross_entropy",
    "token_cross_entropy_terms",
    "mean_squared_error",
    "binary_cross_entropy",
    "sample_loss",
    "infer_loss",
    "check_targets",
    "output_hessian_factor",
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


# --------------------------------------------------------------------------- the other losses

IGNORE_INDEX = -100
"""A ``token-ce`` target equal to this is not counted (``torch.nn.CrossEntropyLoss``'s default)."""


def token_cross_entropy_terms(
    logits: Tensor, targets: Tensor, *, head_dtype: torch.dtype | None = None
) -> Tensor:
    """Cross-entropy of every position, (N, T): the exact form of :func:`cross_entropy` per
    position, 0 where the target is ``IGNORE_INDEX`` (-100; its gradient is 0 too).

    Args:
        logits: (N, T, V) next-token logits.
        targets: (N, T) int64 token ids, -100 where a position is not counted.
        head_dtype: dtype to evaluate the head in.
    """
    counted = targets != IGNORE_INDEX
    safe = torch.where(counted, targets, torch.zeros_like(targets))
    terms = cross_entropy(logits, safe, head_dtype=head_dtype)  # (N, T)
    return torch.where(counted, terms, torch.zeros_like(terms))


def token_cross_entropy(
    logits: Tensor, targets: Tensor, *, head_dtype: torch.dtype | None = None
) -> Tensor:
    """Per-sequence token cross-entropy, (N,): a sequence's mean over its counted positions.

    What the per-example quantities of ``token-ce`` take (docs, "Your model"; 0 for a sequence with
    no counted position). The loss of a sample is the mean over ALL its counted positions instead,
    which :func:`sample_loss` gives. Exact for confident tokens (1 - p below 1e-16): each position
    is :func:`cross_entropy`'s ``softplus(logsumexp_{j != y}(z_j - z_y))``.
    """
    terms = token_cross_entropy_terms(logits, targets, head_dtype=head_dtype)
    count = (targets != IGNORE_INDEX).sum(dim=-1).clamp_min(1)
    return terms.sum(dim=-1) / count.to(terms.dtype)


def _per_example_mean(values: Tensor) -> Tensor:
    """The mean over every dimension after the first, (N,) ((N,) stays as it is)."""
    return values if values.dim() == 1 else values.reshape(values.shape[0], -1).mean(dim=1)


def mean_squared_error(
    outputs: Tensor, targets: Tensor, *, head_dtype: torch.dtype | None = None
) -> Tensor:
    """Per-example squared error averaged over the outputs, (N,): ``1/D sum_d (z_d - y_d)^2``.

    Its mean over the examples is ``torch.nn.MSELoss()`` (mean over examples and outputs).
    Outputs and targets: (N,) or (N, D), same shape.
    """
    if head_dtype is not None:
        outputs = outputs.to(head_dtype)
    return _per_example_mean((outputs - targets.to(outputs.dtype)).square())


def binary_cross_entropy(
    logits: Tensor, targets: Tensor, *, head_dtype: torch.dtype | None = None
) -> Tensor:
    """Per-example binary cross-entropy with logits averaged over the outputs, (N,).

    Its mean over the examples is ``torch.nn.BCEWithLogitsLoss()``. Each output contributes
    ``t softplus(-z) + (1 - t) softplus(z)`` (= ``-t ln sigmoid(z) - (1 - t) ln sigmoid(-z)``),
    with the threshold-free :func:`softplus`: for a confident output (t = 1, z = 40) the loss
    ``ln(1 + e^-40)``, its gradient ``-sigmoid(-z)`` and its second derivative
    ``sigmoid(z) sigmoid(-z)`` are exact, never a difference of nearly equal numbers.

    Args:
        logits: (N, D) (or (N,)) logits.
        targets: float targets in [0, 1] of the same shape.
        head_dtype: dtype to evaluate the head in.
    """
    if head_dtype is not None:
        logits = logits.to(head_dtype)
    t = targets.to(logits.dtype)
    return _per_example_mean(t * softplus(-logits) + (1 - t) * softplus(logits))


_HEADS: dict[str, LossFn] = {
    LossName.CE.value: cross_entropy,
    LossName.NSCE.value: normalized_cross_entropy,
    LossName.TOKEN_CE.value: token_cross_entropy,
    LossName.MSE.value: mean_squared_error,
    LossName.BCE.value: binary_cross_entropy,
}


def get_loss(name: LossName | str) -> LossFn:
    """The per-example loss head of a :class:`LossName`: ``(outputs, targets) -> (N,)``.

    Per example as the per-example quantities take it (docs, "Your model"): ``ce``/``nsce`` the
    example's loss, ``token-ce`` a sequence's mean over its counted positions, ``mse``/``bce`` the
    mean over its outputs. For the loss of a whole sample use :func:`sample_loss`.
    """
    return _HEADS[LossName(name).value]


def sample_loss(name: LossName | str, targets: Tensor) -> LossFn:
    """A head whose MEAN over the N examples of ``targets`` is the sample loss of ``name``.

    For ``token-ce`` the sample loss is the mean over all counted positions of the sample, so
    example n contributes ``N / C * sum_t ce_nt`` (C: the counted positions of all N examples):
    sequences with more counted positions weigh more, as in ``torch.nn.CrossEntropyLoss`` over
    the flattened tokens. For the other losses it is :func:`get_loss` itself. The operators,
    diagonals and ascents take this head, so every curvature is that of the sample loss. The
    ``token-ce`` head carries ``loss_name`` and its weight ``scale`` (N / C) as attributes.

    Raises:
        UsageError: ``token-ce`` targets without a counted position.
    """
    name = LossName(name).value
    if name != LossName.TOKEN_CE.value:
        return get_loss(name)
    n = int(targets.shape[0])
    count = int((targets != IGNORE_INDEX).sum())
    if count == 0:
        raise UsageError("token-ce: every target is -100 (ignored); nothing to measure")
    scale = n / count

    def token_sample(logits: Tensor, labels: Tensor, *, head_dtype: torch.dtype | None = None):
        return token_cross_entropy_terms(logits, labels, head_dtype=head_dtype).sum(-1) * scale

    token_sample.loss_name = name  # type: ignore[attr-defined]
    token_sample.scale = scale  # type: ignore[attr-defined]  # N / C: the closed-form GGN uses it
    return token_sample


def infer_loss(targets: Tensor) -> str:
    """The default loss for ``targets`` (docs, "Your model"): ``token-ce`` for integer targets of
    shape (N, T), ``mse`` for float targets, ``ce`` otherwise."""
    if targets.dtype.is_floating_point:
        return LossName.MSE.value
    if targets.dim() == 2:
        return LossName.TOKEN_CE.value
    return LossName.CE.value


_NEEDS = {
    "ce": "logits (N, K) and int64 labels (N,)",
    "nsce": "logits (N, K) and int64 labels (N,)",
    "token-ce": "logits (N, T, V) and int64 targets (N, T)",
    "mse": "outputs (N,) or (N, D) and float targets of the same shape",
    "bce": "logits (N, D) and float targets in [0, 1] of the same shape",
}


def check_targets(name: LossName | str, outputs: Tensor | None, targets: Tensor) -> None:
    """Refuse outputs or targets the loss ``name`` cannot take (a UsageError naming both).

    ``outputs`` (a model output on a few examples) may be None: only the targets are checked.
    """
    name = LossName(name).value
    floating = targets.dtype.is_floating_point
    tshape, oshape = tuple(targets.shape[1:]), None if outputs is None else tuple(outputs.shape[1:])
    if name in CLASS_LOSSES:
        ok = not floating and not tshape and (oshape is None or len(oshape) == 1)
    elif name == LossName.TOKEN_CE.value:
        ok = not floating and len(tshape) == 1 and (oshape is None or oshape[:-1] == tshape)
    elif name == LossName.MSE.value:
        ok = floating and len(tshape) <= 1 and (oshape is None or oshape == tshape)
    else:
        ok = floating and len(tshape) == 1 and (oshape is None or oshape == tshape)
        ok = ok and bool(((targets >= 0) & (targets <= 1)).all())
    if not ok:
        got = f"{targets.dtype} targets of shape {tuple(targets.shape)}"
        if outputs is not None:
            got = f"outputs of shape {tuple(outputs.shape)} and {got}"
        raise UsageError(f"loss {name} needs {_NEEDS[name]}; got {got} (choose it with --loss)")


def output_hessian_factor(name: LossName | str, z: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    """Closed-form ``Q_n`` (B, R, *out) with ``Q_n^T Q_n`` = the output Hessian of the per-example
    term ``scale_n * loss_n`` (``scale``: (B,) weights, e.g. N / C for ``token-ce``'s sample loss):
    the square root of the output Hessian A_x = Q_x^T Q_x of Wu et al. 2020, Eq. 27, per loss.

    - ``ce``: :func:`output_hessian_sqrt` (``diag(p) - p p^T`` without cancellation), R = K.
    - ``mse`` (mean over D outputs): ``2/D I``, so ``Q = sqrt(2/D) I``, R = D.
    - ``bce`` (mean over D): ``diag(sigmoid(z) sigmoid(-z)) / D``, both factors formed directly
      (never ``p - p^2``), R = D.
    - ``token-ce`` (``sum_t ce_t`` per sequence): block diagonal, one ``diag(p_t) - p_t p_t^T``
      per counted position, R = T * V (row (t, c) lives in position t only).

    ``nsce`` has no closed form here (use autograd). Computed in ``z``'s dtype.
    """
    name = LossName(name).value
    B = z.shape[0]
    w = scale.to(z.dtype).sqrt()
    if name == LossName.CE.value:
        return output_hessian_sqrt(z) * w.view(B, 1, 1)
    if name in (LossName.MSE.value, LossName.BCE.value):
        flat = z.reshape(B, -1)
        d = flat.shape[1]
        if name == LossName.MSE.value:
            diag = torch.full_like(flat, 2.0 / d)
        else:
            diag = torch.sigmoid(flat) * torch.sigmoid(-flat) / d
        q = torch.diag_embed(diag.sqrt() * w.view(B, 1))  # (B, D, D)
        return q.reshape(B, d, *z.shape[1:])
    if name == LossName.TOKEN_CE.value:
        _, T, V = z.shape
        counted = (y != IGNORE_INDEX).to(z.dtype)  # (B, T)
        q = output_hessian_sqrt(z.reshape(B * T, V)).reshape(B, T, V, V)
        q = q * (counted.sqrt() * w.view(B, 1)).view(B, T, 1, 1)
        eye = torch.eye(T, dtype=z.dtype, device=z.device)
        full = q.unsqueeze(3) * eye.view(1, T, 1, T, 1)  # (B, T, V, T, V): row (t, c)
        return full.reshape(B, T * V, T, V)
    raise UsageError(f"loss {name} has no closed-form output Hessian; use autograd")
