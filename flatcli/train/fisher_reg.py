r"""The Fisher-trace regulariser of Jia & Su 2020 (§6, Eq. 6 and Algorithm 1), in its exact
first-order form.

Split the mini-batch :math:`\mathcal B` into :math:`M` sub-batches :math:`\mathcal B_i` of equal
size :math:`b`, let :math:`\tilde L_i(w)` be the mean cross-entropy of :math:`\mathcal B_i` on its
one-hot labels :math:`\tilde y` (Jia & Su 2020, §3.1: the hard training label, also when the main
loss uses label smoothing), and :math:`g_i = \nabla \tilde L_i(w)` at the current weights, *held
constant* (Algorithm 1, line 5: "a copy prevents gradient flow"). Eq. 6 defines

.. math::
    R_\alpha(w) = \frac1M \sum_{i=1}^M \big[\tilde L_i(w) - \tilde L_i(w - \alpha g_i)\big],

and training minimises :math:`L(\mathcal B, w) + \beta R_\alpha(w)`, then clips the gradient to
global norm :math:`\tau` and hands it to any optimiser.

What is computed here, and why not Eq. 6 literally. Eq. 6 is a finite difference whose two
terms agree to about :math:`\alpha\|g_i\|^2 / \tilde L_i`; late in training (training loss
:math:`10^{-3}` and below, where :math:`\|g_i\| \lesssim \tilde L_i`) that ratio falls below
float32's resolution, and the difference is rounding noise (it was exactly 0 at a loss of
:math:`10^{-3}`, and 47 % off with a gradient 3.5x off at :math:`4\cdot10^{-3}`). The paper
itself uses Eq. 6 only as a device for its first-order expansion (§6: "
:math:`\approx \alpha\|g_i\|_2^2`"), with the gradient taken with :math:`g_i` constant. This
module evaluates exactly that first-order form, with no subtraction of nearly equal numbers:

.. math::
    R(w) = \frac{\alpha}{M}\sum_i \big\langle \nabla\tilde L_i(w),\ \mathrm{sg}(g_i)\big\rangle,
    \qquad R = \frac{\alpha}{M}\sum_i \|g_i\|^2, \qquad
    \nabla_w R = \frac{\alpha}{M}\sum_i H_i g_i,

(:math:`\mathrm{sg}` = stop-gradient, :math:`H_i = \nabla^2\tilde L_i(w)`): the value is the
paper's Fisher-trace surrogate :math:`\alpha\cdot\frac1M\sum_i\|g_i\|^2` and the gradient is a
Hessian-vector product by double backpropagation. Both are sums of products that keep float32's
relative precision at any loss scale; the per-example losses come from
:func:`flatcli.curvature.losses.cross_entropy` with a float64 head, so confident examples keep
their gradient (the label entry :math:`-\sum_{j\ne y}p_j`) and their output Hessian.

Truncation error against Eq. 6 (derivation; the tests check both in float64). Expanding
:math:`\tilde L_i(w-\alpha g_i)` about :math:`w`,

.. math::
    R_\alpha^{\mathrm{Eq.6}} = R - \frac{\alpha^2}{2M}\sum_i g_i^\top H_i g_i + O(\alpha^3),
    \qquad
    \nabla R_\alpha^{\mathrm{Eq.6}} = \nabla R
      - \frac{\alpha^2}{2M}\sum_i \nabla^3\tilde L_i[g_i, g_i] + O(\alpha^3),

so the value differs from Eq. 6 by a relative :math:`\alpha\, g_i^\top H_i g_i/(2\|g_i\|^2) \le
\alpha\lambda_{\max}(H_i)/2` (:math:`5\cdot10^{-5}\lambda_{\max}` at the paper's
:math:`\alpha = 10^{-4}`, below 1 % while :math:`\lambda_{\max}(H_i) < 200`), and the gradient by
a relative :math:`O(\alpha)` of the same kind. Both vanish as :math:`\alpha \to 0`, whereas
Eq. 6's float32 rounding error grows as :math:`\alpha \to 0`. :math:`\alpha` only scales
:math:`R`; it is kept so that :math:`\beta` means what it means in the paper.

The gradient is half that of the value as a function of :math:`w`:
:math:`\nabla_w\tfrac{\alpha}{M}\sum_i\|g_i(w)\|^2 = \tfrac{2\alpha}{M}\sum_i H_i g_i`. Holding
:math:`g_i` constant, as Algorithm 1 does, drops the path through :math:`g_i`, so the regulariser
descends the Fisher-trace surrogate with effective weight :math:`\beta\alpha/2`.

Implementation: the :math:`M` sub-batch losses are one ``torch.func.vmap`` of
``functional_call`` over sub-batches, at :math:`M` broadcast views of the model's own parameters
(never mutated); one ``torch.autograd.grad`` with ``create_graph`` gives the :math:`M` gradients
:math:`g_i(w)` with their graph, and the value is their inner product with detached copies.
(Plain autograd rather than ``torch.func.grad`` inside ``vmap``: in torch 2.x the double
backward of ``vmap(grad(f))`` through training-mode BatchNorm gives wrong convolution-weight
gradients; the tests check this path against a loop with dense Hessians.) No Python loop over
examples or sub-batches. Cost: one extra forward/backward with its graph kept, and a double
backward in the main ``backward``.

BatchNorm: the sub-batch pass runs the model in its current mode; in training mode BatchNorm
normalises with the statistics of the sub-batch itself, and :math:`g_i` and :math:`H_i` are the
derivatives of that function of the weights. The pass gets throw-away copies of the buffers: the
running statistics are updated only by the main forward of the training step.

Dropout (and any other draw from the global RNG): :math:`g_i`, the value and :math:`H_i g_i`
come from one pass, so they share one set of masks per sub-batch (drawn independently per
sub-batch, and independently of the main forward's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from flatcli.curvature.losses import cross_entropy


@dataclass(frozen=True)
class FisherPenalty:
    """The regulariser of one mini-batch.

    Attributes:
        value: :math:`R = \\frac{\\alpha}{M}\\sum_i\\|g_i\\|^2`, a float64 scalar whose autograd
            gradient to the model's parameters is :math:`\\frac{\\alpha}{M}\\sum_i H_i g_i`
            (Jia & Su 2020, Eq. 6 to first order in :math:`\\alpha`, :math:`g_i` held constant).
        grad_sq_norm: :math:`\\frac1M\\sum_i\\|g_i\\|^2` (detached, float64): the Fisher-trace
            surrogate; ``value == alpha * grad_sq_norm``.
        subbatches: :math:`M`.
        subbatch_size: :math:`b`; the regulariser uses the first :math:`M b` examples.
    """

    value: Tensor
    grad_sq_norm: Tensor
    subbatches: int
    subbatch_size: int


def _stacked(buffers: dict[str, Tensor], m: int) -> dict[str, Tensor]:
    """M independent copies of every buffer (vmapped in-place BatchNorm updates land there)."""
    return {k: v.detach().unsqueeze(0).expand(m, *v.shape).clone() for k, v in buffers.items()}


def fisher_penalty(
    model: nn.Module, x: Tensor, y: Tensor, *, alpha: float, subbatches: int
) -> FisherPenalty:
    """The Fisher-trace regulariser of Jia & Su 2020 (Eq. 6, Algorithm 1) on the batch ``(x, y)``.

    Returns :math:`R = \\frac{\\alpha}{M}\\sum_i \\|g_i\\|^2` with gradient
    :math:`\\frac{\\alpha}{M}\\sum_i H_i g_i` (:math:`g_i` the gradient of sub-batch i's mean
    hard-label cross-entropy, held constant; :math:`H_i` its Hessian): Eq. 6's finite difference
    to first order in :math:`\\alpha`, evaluated without cancellation, so it stays accurate in
    float32 at any training loss (see the module docstring for the truncation error).

    The batch should already be in random order (``fit`` draws it by a seeded permutation), so
    contiguous sub-batches are a random split. When ``len(x)`` is not a multiple of ``subbatches``
    the last ``len(x) % subbatches`` examples are left out of the regulariser (not of the loss).

    Args:
        model: the network; its trainable parameters (``requires_grad``) are :math:`w`.
        x: (B, ...) inputs.
        y: (B,) int64 labels; used as the one-hot :math:`\\tilde y` of Jia & Su 2020, §3.1.
        alpha: :math:`\\alpha` of Eq. 6 (the paper uses 1e-4); it scales :math:`R`.
        subbatches: :math:`M`, at most ``len(x)``.

    Returns:
        A :class:`FisherPenalty`; backpropagate through ``value``.
    """
    m = int(subbatches)
    if not 1 <= m <= x.shape[0]:
        raise ValueError(f"subbatches must be in [1, batch size {x.shape[0]}]. Got {subbatches}.")
    b = x.shape[0] // m
    n = m * b
    xs = x[:n].reshape(m, b, *x.shape[1:])  # (M, b, ...)
    ys = y[:n].reshape(m, b)  # (M, b)

    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def sub_loss(p: dict[str, Tensor], bufs: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        logits = functional_call(model, ({**p, **frozen}, bufs), (xb,))
        # mean over the sub-batch, hard labels, float64 head (confident examples stay exact)
        return cross_entropy(logits, yb, head_dtype=torch.float64).mean()

    # w broadcast to M copies (a view with its graph to w): the gradient of sum_i L_i with
    # respect to the copies is (g_1(w), ..., g_M(w)), and create_graph keeps its graph to w, so
    # the main backward's double backward gives H_i g_i.
    copies = {k: p.unsqueeze(0).expand(m, *p.shape) for k, p in params.items()}
    losses = vmap(sub_loss, in_dims=(0, 0, 0, 0), randomness="different")(
        copies, _stacked(buffers, m), xs, ys
    )  # (M,)
    g = torch.autograd.grad(
        losses.sum(), list(copies.values()), create_graph=True, materialize_grads=True
    )  # each (M, *shape)
    # <g_i(w), sg(g_i)> summed over parameters, per sub-batch, accumulated in float64
    dots = torch.stack(
        [(v.reshape(m, -1).double() * v.detach().reshape(m, -1).double()).sum(1) for v in g]
    ).sum(0)  # (M,)
    return FisherPenalty(
        value=alpha * dots.mean(),
        grad_sq_norm=dots.detach().mean(),
        subbatches=m,
        subbatch_size=b,
    )
