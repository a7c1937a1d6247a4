"""Worst-case sharpness: the largest loss increase over a neighbourhood of the weights.

Two neighbourhoods, both maximised by projected sign-/normalised-gradient ascent on the mean loss
over all the examples given (chunked; deterministic: the ascent starts at δ = 0):

- ε-sharpness (Keskar et al., ICLR 2017, Metric 2.1; Tsuzuku et al. 2020, §1, "the maximum
  loss around the minima"): the box ``|δ_k| <= ε (|w_k| + 1)`` and the value
  ``100 · (max L(w + δ) − L(w)) / (1 + L(w))``. Keskar et al. maximise with L-BFGS-B; here every
  step is ``δ <- clip(δ + η · C ⊙ sign(∇L(w + δ)), −C, C)`` with ``C = ε(|w| + 1)`` (the maximum
  of a locally convex loss over a box sits at a corner, which sign steps reach quickly).
- adaptive sharpness (Kwon et al., ASAM, ICML 2021; worst-case form of Andriushchenko et al.,
  ICML 2023): ``max_{‖δ ⊘ |w|‖_p <= ρ} L(w + δ) − L(w)`` for p ∈ {∞, 2}. With δ = |w| ⊙ γ the ascent
  runs in γ: p = ∞ as above with box ρ, p = 2 with steps ``η ρ g/‖g‖`` and projection on the ρ-ball.
  Entries with w = 0 are never perturbed. Because δ scales with |w| elementwise, the maximum (and
  this ascent's path) is unchanged by any positive diagonal rescaling of the weights that leaves
  the network's function unchanged (layer-, neuron- and BN-scaling: flatcli.reparam).

Both report the best loss over the iterates (every iterate is a feasible point, so the value is
a lower bound on the true maximum; more steps can only raise it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flatcli.curvature._functional import FunctionalModel, head_loss
from flatcli.curvature.data import iter_chunks
from flatcli.curvature.losses import sample_loss
from flatcli.curvature.memory import cpu_chunk
from flatcli.curvature.params import select_parameters
from flatcli.errors import UsageError
from flatcli.measures.sharpness._definition import Outcome, Shared

__all__ = ["WorstCaseResult", "eps_sharpness", "adaptive_sharpness", "mean_loss", "outcome"]


@dataclass(frozen=True)
class WorstCaseResult:
    """A worst-case sharpness value.

    Attributes:
        value: the measure (ε-sharpness in percent; adaptive sharpness as a loss difference).
        base_loss: ``L(w)``.
        max_loss: the largest ``L(w + δ)`` found.
        gradient_evals: loss-and-gradient passes over the data.
        settings: the radius, norm, steps and step size used.
        history: ``L(w + δ_t)`` per iterate.
    """

    value: float
    base_loss: float
    max_loss: float
    gradient_evals: int
    settings: dict[str, Any] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)


def mean_loss(
    fm: FunctionalModel,
    params: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor],
    batch_size: int,
    with_grad: bool = True,
) -> tuple[float, dict[str, Tensor] | None]:
    """Mean loss over (x, y) at ``params`` and (optionally) its gradient, chunk by chunk."""
    n = int(x.shape[0])
    total = 0.0
    grads = {k: torch.zeros_like(v) for k, v in params.items()} if with_grad else None
    for chunk in iter_chunks(x, y, batch_size, fm.device, fm.dtype):
        xb, yb = chunk.x, chunk.y
        if with_grad:
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            with torch.enable_grad():
                part = loss(fm(leaves, xb), yb).sum()
                gs = torch.autograd.grad(part, list(leaves.values()), allow_unused=True)
            for (k, _), g in zip(leaves.items(), gs, strict=True):
                if g is not None:
                    grads[k] += g
        else:
            with torch.no_grad():
                part = loss(fm(params, xb), yb).sum()
        total += float(part.detach().double())
    if grads is not None:
        grads = {k: g / n for k, g in grads.items()}
    return total / n, grads


def _ascend(
    fm: FunctionalModel,
    x: Tensor,
    y: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor],
    bs: int,
    scale: dict[str, Tensor],
    rho: float,
    p: float,
    steps: int,
    step_size: float,
) -> tuple[float, float, list[float]]:
    """Projected ascent over ``δ = scale ⊙ γ`` with ``‖γ‖_p <= rho``: (L(w), max L, history)."""
    w = fm.params
    gamma = {k: torch.zeros_like(v) for k, v in w.items()}
    history: list[float] = []
    base = best = math.nan
    for t in range(steps + 1):
        point = {k: w[k] + scale[k] * gamma[k] for k in w}
        value, grads = mean_loss(fm, point, x, y, loss, bs, with_grad=t < steps)
        history.append(value)
        if t == 0:
            base = best = value
        best = max(best, value)
        if t == steps:
            break
        g = {k: scale[k] * grads[k] for k in w}  # gradient wrt γ
        if math.isinf(p):
            gamma = {k: (gamma[k] + step_size * rho * g[k].sign()).clamp(-rho, rho) for k in w}
        else:
            norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in g.values()))
            if norm == 0.0:
                break
            gamma = {k: gamma[k] + step_size * rho * g[k] / norm for k in w}
            gnorm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in gamma.values()))
            if gnorm > rho:
                gamma = {k: v * (rho / gnorm) for k, v in gamma.items()}
    return base, best, history


def _worst_case(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    scale: Callable[[Tensor], Tensor],
    radius: tuple[str, float],
    p: float,
    *,
    steps: int = 20,
    step_size: float = 0.25,
    loss_fn: Callable[..., Tensor] | None = None,
    params: Sequence[str] | str | None = None,
    batch_size: int | None = None,
    head_dtype: torch.dtype | None = None,
) -> tuple[float, float, list[float], dict[str, Any]]:
    """The ascent of both measures over ``δ = scale(w) ⊙ γ``, ``‖γ‖_p <= radius``.

    ``radius`` is ``(its name, its value)``. Returns ``(L(w), max L, history, settings)``, the
    settings holding the radius, steps and step size.
    """
    from flatcli.curvature.losses import cross_entropy

    name, rho = radius
    if not rho > 0 or steps < 0 or not step_size > 0:
        raise UsageError(
            f"{name} and step_size must be > 0 and steps >= 0. Got {rho}, {step_size}, {steps}."
        )
    if int(x.shape[0]) == 0 or int(x.shape[0]) != int(y.shape[0]):
        raise UsageError(
            f"Need matching, non-empty x and y; got {int(x.shape[0])} and {int(y.shape[0])}."
        )
    fm = FunctionalModel(model, select_parameters(model, params))
    if batch_size is None:  # all at once, but in heap-sized chunks on the CPU (cpu_chunk)
        bs = cpu_chunk(model, x) if fm.device.type == "cpu" else int(x.shape[0])
    else:
        bs = int(batch_size)
    if bs < 1:
        raise UsageError(f"batch_size must be a positive integer. Got {batch_size}.")
    loss = head_loss(loss_fn or cross_entropy, head_dtype)
    scales = {k: scale(v) for k, v in fm.params.items()}
    base, best, history = _ascend(fm, x, y, loss, bs, scales, rho, p, steps, step_size)
    return base, best, history, {name: rho, "steps": steps, "step_size": step_size}


def eps_sharpness(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 1e-3, **ascent: Any
) -> WorstCaseResult:
    """Keskar et al.'s ε-sharpness ``100 (max_{|δ| <= ε(|w|+1)} L(w+δ) − L(w)) / (1 + L(w))``.

    Args:
        model: the network (differentiated in its current mode; use eval).
        x, y: the examples the mean loss is taken over.
        eps: the box size ε (Keskar et al. use 1e-3 and 5e-4).
        **ascent: ``steps`` (default 20: ascent steps, each one loss-and-gradient pass over the
            data), ``step_size`` (default 0.25: step as a fraction of each coordinate's box
            half-width), ``loss_fn`` (per-example loss head, default softmax cross-entropy),
            ``params`` (parameter names/patterns to perturb, default all), ``batch_size``
            (examples per chunk, default all at once) and ``head_dtype`` (of the loss head).
    """
    base, best, hist, settings = _worst_case(
        model, x, y, lambda w: w.abs() + 1, ("eps", eps), math.inf, **ascent
    )
    settings |= {
        "box": "eps*(|w|+1)",
        "method": "projected sign-gradient ascent from delta=0, best iterate",
    }
    evals = settings["steps"] + 1
    return WorstCaseResult(100.0 * (best - base) / (1.0 + base), base, best, evals, settings, hist)


def adaptive_sharpness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    rho: float | None = None,
    p: float | str = "inf",
    **ascent: Any,
) -> WorstCaseResult:
    """Worst-case adaptive sharpness ``max_{‖δ ⊘ |w|‖_p <= ρ} L(w + δ) − L(w)``.

    Args:
        rho: radius; default 1e-3 for p = ∞ (Andriushchenko et al.'s ℓ∞ evaluations use 1e-3
            with 20 steps) and 0.1 for p = 2.
        p: ``"inf"`` (or ``math.inf``) or ``2``.
        model, x, y, **ascent: as for :func:`eps_sharpness` (``step_size`` as a fraction of ρ).
    """
    pn = _norm(p)
    rho = (1e-3 if math.isinf(pn) else 0.1) if rho is None else float(rho)
    base, best, hist, ascended = _worst_case(model, x, y, torch.abs, ("rho", rho), pn, **ascent)
    settings = {
        "rho": rho,
        "p": "inf" if math.isinf(pn) else 2,
        "steps": ascended["steps"],
        "step_size": ascended["step_size"],
        "ball": "||delta / |w| ||_p <= rho",
        "method": "projected ascent in delta/|w| from 0, best iterate",
    }
    return WorstCaseResult(best - base, base, best, ascended["steps"] + 1, settings, hist)


def outcome(shared: Shared, ascent: Callable[..., WorstCaseResult], **kwargs: Any) -> Outcome:
    """``ascent`` (:func:`eps_sharpness` or :func:`adaptive_sharpness`) with ``kwargs`` on the
    shared model and examples, with the config's classic loss, batch size, head and step size."""
    config = shared.config
    res = ascent(
        shared.model,
        shared.x,
        shared.y,
        step_size=config.step_size,
        loss_fn=sample_loss(config.loss, shared.y),
        batch_size=config.batch_size,
        head_dtype=config.head,
        **kwargs,
    )
    settings = {
        **res.settings,
        "loss": config.loss,
        "base_loss": res.base_loss,
        "max_loss": res.max_loss,
    }
    return Outcome(value=res.value, settings=settings)


def _norm(p: float | str) -> float:
    if isinstance(p, str):
        p = p.strip().lower()
        if p in ("inf", "linf", "infinity"):
            return math.inf
        try:
            p = float(p)
        except ValueError:
            raise UsageError(f"p must be 'inf' or 2. Got {p!r}.") from None
    if math.isinf(p) or p == 2:
        return float(p)
    raise UsageError(f"p must be 'inf' or 2. Got {p!r}.")
