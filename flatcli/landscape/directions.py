"""The directions d₁, d₂ of a loss-landscape slice θ(α, β) = θ* + α d₁ + β d₂.

Li et al. 2018 ("Visualizing the Loss Landscape of Neural Nets") plot
f(α, β) = L(θ* + αδ + βη) (§3) along Gaussian directions rescaled filter by filter (§4):

.. math::
    d_{i,j} \\leftarrow \\frac{d_{i,j}}{\\lVert d_{i,j}\\rVert}\\,\\lVert\\theta_{i,j}\\rVert,

d_{i,j} the j-th filter (output unit) of layer i: the dim-0 slice of a weight with at least two
dimensions (a convolution's output channel, a linear layer's row). Parameters with fewer
dimensions (biases, normalisation parameters) get 0, so a slice moves every filter by the same
fraction of its own norm, and a rescaling that leaves the function unchanged (Dinh et al.
2017, §5) leaves the slice unchanged too (:func:`filter_normalize`).

Every Gaussian is drawn in float64 on the CPU from a generator seeded with ``seed`` (d₁ first,
then d₂, parameters in ``model.named_parameters()`` order), so a seed gives the same directions
on every device and dtype, and the d₁ of a 1-D slice is the d₁ of the 2-D one.
:func:`hessian_directions` reuses the curvature core (:func:`~flatcli.curvature.operators.
make_operator` and :func:`~flatcli.curvature.lanczos.lanczos`); :func:`gradient_direction`
sums over this process's share of the examples and all-reduces under ``torchrun``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatcli import distributed
from flatcli.curvature.data import iter_chunks
from flatcli.curvature.lanczos import lanczos
from flatcli.curvature.operators import make_operator
from flatcli.errors import CheckpointError, MeasureError, UsageError
from flatcli.io.checkpoint import _PREFIXES, check_finite, load_checkpoint
from flatcli.progress import ProgressFn

__all__ = [
    "Params",
    "Directions",
    "filter_normalize",
    "gaussian_directions",
    "gradient_direction",
    "hessian_directions",
    "difference_direction",
    "load_other",
    "norm",
]

Params = dict[str, Tensor]
"""``{parameter name: tensor}`` in ``model.named_parameters()`` order."""

F64 = torch.float64


@dataclass
class Directions:
    """d₁ (and d₂ for a plane), each a :data:`Params` in the model's dtype and device.

    ``info`` is what the report's ``details.directions`` holds (kind, normalisation, seed,
    eigenvalues, norms, ...).
    """

    d1: Params
    d2: Params | None
    info: dict[str, Any] = field(default_factory=dict)

    def as_list(self) -> list[Params]:
        """``[d1]`` or ``[d1, d2]``."""
        return [self.d1] if self.d2 is None else [self.d1, self.d2]


def norm(d: Mapping[str, Tensor]) -> float:
    """The Euclidean norm of a direction over all its parameters (in float64)."""
    return math.sqrt(sum(float(t.detach().to(F64).square().sum()) for t in d.values()))


def filter_normalize(d: Tensor, theta: Tensor) -> Tensor:
    """``d`` rescaled filter by filter to ``theta``'s filter norms (Li et al. 2018, §4).

    A filter is a dim-0 slice; each becomes ``d_j / ‖d_j‖ · ‖θ_j‖`` (0 where ``d_j`` is 0). A
    tensor with fewer than two dimensions (a bias, a normalisation parameter) becomes 0.

    >>> theta = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    >>> filter_normalize(torch.tensor([[1.0, 0.0], [2.0, 2.0]]), theta)
    tensor([[5.0000, 0.0000],
            [0.7071, 0.7071]])
    >>> filter_normalize(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    tensor([0., 0.])
    """
    if d.dim() < 2:
        return torch.zeros_like(d)
    dims = tuple(range(1, d.dim()))
    d_norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
    t_norm = torch.linalg.vector_norm(theta.to(d.dtype), dim=dims, keepdim=True)
    scale = torch.where(d_norm > 0, t_norm / d_norm.clamp_min(torch.finfo(d.dtype).tiny), 0.0)
    return d * scale


def gaussian_directions(
    params: Mapping[str, Tensor], count: int, seed: int, normalization: str = "filter"
) -> list[Params]:
    """``count`` Gaussian directions, drawn in float64 on the CPU from ``seed``, normalised.

    Args:
        params: θ*, ``{name: tensor}`` (the directions take each tensor's dtype and device).
        count: how many directions (d₁, then d₂).
        seed: seeds one ``torch.Generator``; every entry of d₁ is drawn before d₂'s.
        normalization: ``"filter"`` (:func:`filter_normalize`, against θ* in float64) or
            ``"none"`` (a standard Gaussian over every parameter).
    """
    gen = torch.Generator().manual_seed(int(seed))
    out: list[Params] = []
    for _ in range(count):
        d: Params = {}
        for name, theta in params.items():
            g = torch.randn(theta.shape, generator=gen, dtype=F64)
            if normalization == "filter":
                g = filter_normalize(g, theta.detach().to("cpu", F64))
            d[name] = g.to(device=theta.device, dtype=theta.dtype)
        out.append(d)
    return out


def difference_direction(params: Mapping[str, Tensor], other: Mapping[str, Tensor]) -> Params:
    """θ_to − θ* for every parameter (computed in float64, then in θ*'s dtype): the line of
    Goodfellow et al. 2015 (Li et al. 2018, §3, "1-dimensional linear interpolation")."""
    return {
        n: (other[n].to("cpu", F64) - t.detach().to("cpu", F64)).to(t.device, t.dtype)
        for n, t in params.items()
    }


def load_other(path: str | Path, model: nn.Module, *, unsafe: bool = False) -> tuple[Params, str]:
    """The parameters of checkpoint ``path`` for ``model``'s architecture, and its SHA-256.

    Wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``) are stripped when that makes the
    names match. Only parameters are read (buffers stay at θ*'s).

    Raises:
        UsageError: ``path`` is missing or unreadable, holds non-finite weights, or does not
            fit the model: the message names the first parameter (in the model's order) that
            is missing or differs in shape, else the first one the model lacks.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--to: no checkpoint file {path}")
    try:
        ckpt = load_checkpoint(path, unsafe=unsafe)
        check_finite(ckpt.state_dict, source=str(path))
    except CheckpointError as e:
        raise UsageError(f"--to {path}: {e}") from e
    named = dict(model.named_parameters())
    state = _strip_prefixes(ckpt.state_dict, named)
    for name, p in named.items():
        t = state.get(name)
        if t is None:
            raise UsageError(
                f"--to {path.name} is not the same architecture: it has no parameter {name} "
                f"{tuple(p.shape)}"
            )
        if tuple(t.shape) != tuple(p.shape):
            raise UsageError(
                f"--to {path.name} is not the same architecture: parameter {name} has shape "
                f"{tuple(t.shape)} there and {tuple(p.shape)} here"
            )
    buffers = {n for n, _ in model.named_buffers()}
    extra = [k for k in state if k not in named and k not in buffers]
    if extra:
        raise UsageError(
            f"--to {path.name} is not the same architecture: it has a parameter {extra[0]} "
            "that the model lacks"
        )
    return {n: state[n] for n in named}, ckpt.sha256


def _strip_prefixes(state: Mapping[str, Tensor], names: Mapping[str, Any]) -> dict[str, Tensor]:
    """``state`` with the wrapper prefixes stripped that make most of its keys ``names``."""
    best, sd = dict(state), dict(state)
    for _ in range(2):  # e.g. "model.module." nests two wrappers
        for prefix in _PREFIXES:
            if any(k.startswith(prefix) for k in sd):
                sd = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}
                if len(set(sd) & set(names)) > len(set(best) & set(names)):
                    best = sd
    return best


def gradient_direction(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch_size: int,
) -> tuple[Params, float]:
    """The unit gradient ∇L(θ*)/‖∇L(θ*)‖ of the mean loss over ``(x, y)`` and ‖∇L(θ*)‖.

    ``loss_fn(outputs, targets)`` gives one value per example whose mean over the N examples
    is the loss L: a per-example loss, or :func:`~flatcli.curvature.losses.sample_loss`'s head
    (``token-ce``: each sequence's summed position losses times N / C, C the counted positions
    of all N examples, so L is the mean over every counted position). Summed in float64 over
    this process's contiguous share of the examples, all-reduced under ``torchrun`` (so uneven
    shards give the single-process gradient); parameters without ``requires_grad`` get 0.

    Raises:
        MeasureError: the gradient is zero or not finite (no direction to follow).
    """
    named = dict(model.named_parameters())
    params = {n: p.detach() for n, p in named.items()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    trainable = [n for n, p in named.items() if p.requires_grad]
    sums = {n: torch.zeros(p.shape, dtype=F64, device=p.device) for n, p in params.items()}
    p0 = next(iter(params.values()))
    start, stop = distributed.shard_bounds(int(x.shape[0]))
    for chunk in iter_chunks(x, y, batch_size, p0.device, p0.dtype, start=start, stop=stop):
        leaves = {n: params[n].clone().requires_grad_(True) for n in trainable}
        with torch.enable_grad():
            out = functional_call(model, ({**params, **leaves}, buffers), (chunk.x,))
            total = loss_fn(out, chunk.y).sum()
            grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
        for n, g in zip(leaves, grads, strict=True):
            if g is not None:
                sums[n] += g.to(F64)
    sums = distributed.all_reduce_sum(sums)
    size = norm(sums)
    if not math.isfinite(size) or size == 0.0:
        raise MeasureError(
            f"the gradient of the loss at θ* has norm {size}: there is no gradient direction; "
            "use --directions random or hessian"
        )
    unit = {n: (g / size).to(dtype=params[n].dtype) for n, g in sums.items()}
    return unit, size / int(x.shape[0])


def hessian_directions(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    k: int,
    *,
    loss: str,
    head_dtype: torch.dtype | None,
    batch_size: int | None,
    seed: int,
    progress: ProgressFn | None = None,
) -> tuple[list[Params], dict[str, Any]]:
    """Unit eigenvectors of the ``k`` largest algebraic eigenvalues of the Hessian of the sample
    loss ``loss`` (a :class:`~flatcli.configs.choices.LossName`: the operator takes
    :func:`~flatcli.curvature.losses.sample_loss`, e.g. ``token-ce``'s mean over every counted
    position) (the curvature core: :func:`~flatcli.curvature.operators.make_operator` and
    :func:`~flatcli.curvature.lanczos.lanczos`), as directions; and their eigenvalues.

    Each eigenvector's sign is fixed so its entry of largest magnitude is positive (same seed,
    same directions). Parameters without ``requires_grad`` get 0.

    Returns:
        ``([d₁, …], info)`` with ``info`` holding ``eigenvalues`` (descending), ``residuals``,
        ``converged`` and ``matvecs``.
    """
    op = make_operator(
        "hessian",
        model,
        x,
        y,
        loss_fn=loss,
        batch_size=batch_size,
        head_dtype=head_dtype,
        seed=seed,
    )
    eig = lanczos(op, k, "largest", seed=seed, return_vectors=True, progress=progress)
    assert eig.eigenvectors is not None
    vectors = eig.eigenvectors.detach().to(F64)
    named = dict(model.named_parameters())
    out: list[Params] = []
    for j in range(k):
        v = vectors[:, j] / torch.linalg.vector_norm(vectors[:, j])
        if v[int(v.abs().argmax())] < 0:
            v = -v
        d = {n: torch.zeros_like(p.detach()) for n, p in named.items()}
        for n, sl in op.slices.items():
            d[n] = v[sl].view(named[n].shape).to(named[n].device, named[n].dtype)
        out.append(d)
    info = {
        "eigenvalues": [float(e) for e in eig.eigenvalues.tolist()],
        "residuals": [float(r) for r in eig.residuals.tolist()],
        "converged": bool(eig.converged),
        "matvecs": int(eig.matvecs),
    }
    return out, info
