r"""The Fisher-trace regulariser of fisher-gamma-local-minima.md §6 (Eq. 6, Algorithm 1).

Split the mini-batch :math:`\mathcal B` into :math:`M` sub-batches :math:`\mathcal B_i` of equal
size :math:`b`, let :math:`\tilde L_i(w)` be the mean cross-entropy of :math:`\mathcal B_i` on its
one-hot labels :math:`\tilde y` (§3.1: the argmax of the label, i.e. the hard training label, also
when the main loss uses label smoothing), and :math:`g_i = \nabla \tilde L_i(w)` evaluated at the
current weights and then *held constant* (Algorithm 1, line 5: "a copy prevents gradient flow").
Eq. 6 is

.. math::
    R_\alpha(w) = \frac1M \sum_{i=1}^M \big[\tilde L_i(w) - \tilde L_i(w - \alpha g_i)\big],

and training minimises :math:`L(\mathcal B, w) + \beta R_\alpha(w)`, then clips the gradient to
global norm :math:`\tau` and hands it to any optimiser.

What it approximates (derivation; the tests check both statements in float64):

* Value. Taylor-expanding :math:`\tilde L_i` around :math:`w` along :math:`-\alpha g_i`, with
  :math:`H_i = \nabla^2 \tilde L_i(w)`,
  :math:`\tilde L_i(w-\alpha g_i) = \tilde L_i(w) - \alpha\|g_i\|^2
  + \tfrac{\alpha^2}2 g_i^\top H_i g_i + O(\alpha^3)`, so

  .. math::
      R_\alpha(w) = \frac{\alpha}{M}\sum_i \|g_i\|^2
                    - \frac{\alpha^2}{2M}\sum_i g_i^\top H_i g_i + O(\alpha^3),

  the paper's surrogate :math:`\alpha \cdot \frac1M\sum_i\|g_i\|^2` for :math:`\alpha\,\mathrm{tr}\,
  \mathcal I(w)` with a relative error :math:`O(\alpha)`.

* Gradient. With :math:`g_i` a constant,
  :math:`\nabla_w R_\alpha = \frac1M\sum_i[\nabla\tilde L_i(w) - \nabla\tilde L_i(w-\alpha g_i)]`
  and :math:`\nabla\tilde L_i(w-\alpha g_i) = g_i - \alpha H_i g_i + O(\alpha^2)`, so

  .. math:: \nabla_w R_\alpha(w) = \frac{\alpha}{M}\sum_i H_i g_i + O(\alpha^2)
            = \nabla_w\Big[\frac{\alpha}{2M}\sum_i \|g_i(w)\|^2\Big] + O(\alpha^2),

  because :math:`\nabla_w \tfrac12\|g_i(w)\|^2 = H_i g_i`. Holding :math:`g_i` constant therefore
  gives *half* the gradient of the value's leading term :math:`\frac{\alpha}{M}\sum_i\|g_i\|^2`
  (the dropped half is the path through :math:`g_i`); the regulariser descends the Fisher-trace
  surrogate with an effective weight :math:`\beta\alpha/2` and needs no Hessian-vector product:
  one extra gradient pass for the :math:`g_i` and one extra forward/backward at the
  perturbed weights.

Implementation: the :math:`M` sub-batch gradients are one ``torch.func.vmap`` of
``torch.func.grad`` over sub-batches (at detached weights, so no graph reaches them); the
perturbed losses are one ``vmap`` of ``torch.func.functional_call`` over the :math:`M` stacked
weight copies :math:`w - \alpha g_i`, which keep their graph to :math:`w`, so the model's own
parameters are never mutated. No Python loop over examples or sub-batches.

BatchNorm: every sub-batch pass (the :math:`g_i`, :math:`\tilde L_i(w)` and
:math:`\tilde L_i(w-\alpha g_i)`) runs the model in its current mode; in training mode BatchNorm
normalises with the statistics of the sub-batch itself, at the weights of that pass, so the
difference :math:`\tilde L_i(w) - \tilde L_i(w-\alpha g_i)` compares the same function of the
weights and the first-order statements above hold with :math:`H_i` the Hessian of that function.
These passes get throw-away copies of the buffers: the running statistics are updated only by the
main forward of the training step, once per step as without the regulariser.

Dropout (and any other draw from the global RNG): the three sub-batch passes replay the same
random state, so they draw the same masks and :math:`R_\alpha` is the difference of one
stochastic function at two weights; different masks would add noise of order 1 to a quantity of
order :math:`\alpha`. The unperturbed term therefore gets its own pass rather than reusing the
main forward (whose masks differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F


@dataclass(frozen=True)
class FisherPenalty:
    """The regulariser of one mini-batch.

    Attributes:
        value: :math:`R_\\alpha(w)`, a scalar with autograd graph to the model's parameters
            (the :math:`g_i` are constants in it).
        grad_sq_norm: :math:`\\frac1M\\sum_i\\|g_i\\|^2` (detached): the Fisher-trace surrogate
            that ``value / alpha`` approximates.
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
    """:math:`R_\\alpha(w)` of Eq. 6 on the batch ``(x, y)``, split in order into ``subbatches``.

    The batch should already be in random order (``fit`` draws it by a seeded permutation), so
    contiguous sub-batches are a random split. When ``len(x)`` is not a multiple of ``subbatches``
    the last ``len(x) % subbatches`` examples are left out of the regulariser (not of the loss).

    Args:
        model: the network; its trainable parameters (``requires_grad``) are :math:`w`.
        x: (B, ...) inputs.
        y: (B,) int64 labels; used as the one-hot :math:`\\tilde y` of §3.1.
        alpha: step :math:`\\alpha` of the finite difference (the paper uses 1e-4).
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
        return F.cross_entropy(logits, yb)  # mean over the sub-batch, hard labels

    def over_subbatches(fn, params_dim: int | None):  # noqa: ANN001, ANN202
        return vmap(fn, in_dims=(params_dim, 0, 0, 0), randomness="different")

    # The three passes replay one random state, so dropout draws the same masks in each:
    # R compares the same stochastic function at w and at w - alpha g_i.
    rng_devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        # g_i at the current weights, from detached weights: constants for autograd.
        detached = {k: p.detach() for k, p in params.items()}
        g = over_subbatches(grad(sub_loss), None)(detached, _stacked(buffers, m), xs, ys)
    with torch.random.fork_rng(devices=rng_devices):
        loss_here = over_subbatches(sub_loss, None)(params, _stacked(buffers, m), xs, ys)  # (M,)
    perturbed = {k: p.unsqueeze(0) - alpha * g[k] for k, p in params.items()}  # (M, *shape)
    loss_moved = over_subbatches(sub_loss, 0)(perturbed, _stacked(buffers, m), xs, ys)  # (M,)

    grad_sq_norm = torch.stack([v.reshape(m, -1).pow(2).sum(1) for v in g.values()]).sum(0)
    return FisherPenalty(
        value=(loss_here - loss_moved).mean(),
        grad_sq_norm=grad_sq_norm.mean().detach(),
        subbatches=m,
        subbatch_size=b,
    )
