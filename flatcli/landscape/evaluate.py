"""Loss and accuracy of a model at many points θ* + α d₁ + β d₂ at once.

:func:`evaluate_points` walks the examples once per block of points: each batch of examples is
evaluated at every point of the block, G points per forward. For G > 1 the parameter sets of
the G points are stacked (a leading dimension of size G) and the model is called through
``torch.func.functional_call`` under ``torch.func.vmap``: one forward computes G networks on
the same batch. Buffers (BatchNorm running statistics) are passed unstacked, so every point
uses θ*'s; the model runs in eval mode, where they are only read.

How many points per forward (:func:`plan`): on a CPU, about :data:`EXAMPLES_PER_PASS` examples
a pass (G·B: beyond that, fresh large activations cost page faults rather than arithmetic, and
vmap's batched kernels gain nothing on a core that a single forward already keeps busy); on a
GPU, where one small forward leaves the device idle, as many points as the memory budget holds
(up to :data:`GPU_EXAMPLES_PER_PASS` examples a pass).

The input layer (a ``Linear`` or a convolution applied to the input) is linear in its own
weights, so its output at every point of a block is a combination of its outputs for θ* and for
each direction, computed once per batch (:mod:`flatcli.landscape.first_layer`).

Sums are accumulated in float64: the loss head runs in ``head_dtype`` and each point's sum
over a batch is added up in float64, the correct predictions as integers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from flatcli.curvature.memory import activation_bytes_per_example, available_memory
from flatcli.landscape.first_layer import FirstLayer

__all__ = [
    "EXAMPLES_PER_PASS",
    "GPU_EXAMPLES_PER_PASS",
    "Plan",
    "plan",
    "point_params",
    "evaluate_points",
]

EXAMPLES_PER_PASS = 256
"""Examples a forward takes on a CPU (G points × B examples): near the fastest batch size of
a plain forward (see the module docstring)."""

GPU_EXAMPLES_PER_PASS = 16384
"""At most this many examples a forward takes on a GPU (G points × B examples)."""

BUDGET_FRACTION = 0.25
"""The fraction of free device memory the stacked parameters and activations may take."""


@dataclass(frozen=True)
class Plan:
    """``batch_size`` examples per batch and ``points_per_pass`` points per forward."""

    batch_size: int
    points_per_pass: int


def plan(
    model: nn.Module,
    x: Tensor,
    batch_size: int | None,
    points_per_pass: int | None,
    block: int,
) -> Plan:
    """Examples per batch and points per forward for ``model`` on ``x`` (see the module
    docstring); a value given is kept (points per forward at most ``block``), and the other
    chosen so that a forward takes about the target number of examples."""
    n = max(1, int(x.shape[0]))
    p0 = next(iter(model.parameters()))
    device = p0.device
    gpu = device.type == "cuda"
    target = GPU_EXAMPLES_PER_PASS if gpu else EXAMPLES_PER_PASS
    if points_per_pass is not None:
        g = max(1, min(int(points_per_pass), block))
        bs = int(batch_size) if batch_size is not None else max(1, min(n, target // g))
        return Plan(bs, g)
    bs = int(batch_size) if batch_size is not None else min(n, target)
    g = max(1, target // bs)
    if g > 1:
        size = sum(p.numel() for p in model.parameters()) * p0.element_size()
        act = activation_bytes_per_example(model, tuple(x.shape[1:]))
        budget = BUDGET_FRACTION * available_memory(device)
        g = max(1, min(g, int(budget // max(1, size + bs * act))))
    return Plan(bs, max(1, min(g, block)))


def point_params(
    theta: Mapping[str, Tensor],
    directions: Sequence[Mapping[str, Tensor]],
    coords: Tensor,
) -> dict[str, Tensor]:
    """θ* + Σ_k coords[:, k] · d_k for G points, stacked: ``{name: (G, *shape)}``.

    ``coords`` is (G, K) in the parameters' dtype (K directions). Every point uses the same
    expression, whether it is evaluated alone or with others.
    """
    g = coords.shape[0]
    out = {}
    for name, t in theta.items():
        view = (g,) + (1,) * t.dim()
        value = t.unsqueeze(0)
        for k, d in enumerate(directions):
            value = value + coords[:, k].view(view) * d[name].unsqueeze(0)
        out[name] = value
    return out


def evaluate_points(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    theta: Mapping[str, Tensor],
    directions: Sequence[Mapping[str, Tensor]],
    coords: Sequence[Sequence[float]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    batch_size: int,
    points_per_pass: int,
    head_dtype: torch.dtype | None = None,
    first: FirstLayer | None = None,
    progress: Callable[[float], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed loss and number of correct predictions over ``(x, y)`` at each point.

    Args:
        model: the network in eval mode (only its structure and buffers are used).
        x, y: the examples and their labels (int64 class labels).
        theta: θ*, ``{name: tensor}`` for every parameter.
        directions: d₁ (and d₂), each ``{name: tensor}`` like ``theta``.
        coords: one row of coefficients (α, β, …) per point, one per direction.
        loss_fn: per-example losses of ``(logits, labels)``.
        batch_size: examples per batch.
        points_per_pass: points per forward (G; 1 calls the model without vmap).
        head_dtype: dtype of the loss head (None: the logits' dtype).
        first: the model's input layer (:func:`~flatcli.landscape.first_layer.find_first_layer`):
            when there are more points than directions + 1, its output is computed once per
            batch for θ* and each direction and combined per point (exact: it is linear in its
            weights).
        progress: called with the fraction of the work done (0 to 1).

    Returns:
        ``(loss_sums, correct)``: float64 and int64 tensors of one entry per point, on the CPU.
    """
    p0 = next(iter(theta.values()))
    device, dtype = p0.device, p0.dtype
    coef = torch.tensor([list(c)[: len(directions)] for c in coords], dtype=dtype)
    coef = coef.reshape(len(coords), len(directions)).to(device)
    m = len(coords)
    loss_sums = torch.zeros(m, dtype=torch.float64, device=device)
    correct = torch.zeros(m, dtype=torch.int64, device=device)
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    factored = first if first is not None and m > len(directions) + 1 else None
    slot: dict[str, Tensor] = {}
    combined: dict[Any, Tensor] = {}  # the input layer's outputs, reused (_combine)

    def forward(params: dict[str, Tensor], xb: Tensor, z: Tensor | None = None) -> Tensor:
        if z is not None:
            slot["z"] = z  # what the replaced input layer returns
        return functional_call(model, (params, buffers), (xb,))

    batched = vmap(forward, in_dims=(0, None, 0 if factored else None))
    n = int(x.shape[0])
    chunks = [(a, min(a + points_per_pass, m)) for a in range(0, m, points_per_pass)]
    steps, done = max(1, len(chunks) * -(-n // batch_size)), 0
    replaced = factored.replaced(slot) if factored else contextlib.nullcontext()
    with torch.no_grad(), replaced:
        for start in range(0, n, batch_size):
            xb = x[start : start + batch_size].to(device, dtype)
            yb = y[start : start + batch_size].to(device)
            zs = None
            if factored is not None:  # W* u + b*, then D_k u + d_k: (B, ...) each
                u = factored.capture(model, {**theta, **buffers}, xb)
                zs = factored.outputs(u, theta, directions)
                combined.pop("rest", None)
            for a, b in chunks:
                stacked = point_params(theta, directions, coef[a:b])
                z = None if zs is None else _combine(zs, coef[a:b], combined)
                if b - a == 1:
                    one = {k: v[0] for k, v in stacked.items()}
                    out = forward(one, xb, None if z is None else z[0]).unsqueeze(0)
                else:
                    out = batched(stacked, xb, z)
                g, bs = out.shape[0], out.shape[1]
                flat = out.reshape(g * bs, -1)
                head = flat if head_dtype is None else flat.to(head_dtype)
                losses = loss_fn(head, yb.repeat(g)).reshape(g, bs)
                loss_sums[a:b] += losses.to(torch.float64).sum(dim=1)
                correct[a:b] += (out.argmax(dim=-1) == yb).sum(dim=1)
                done += 1
                if progress is not None:
                    progress(done / steps)
    return loss_sums.cpu(), correct.cpu()


def _combine(zs: list[Tensor], coords: Tensor, buffers: dict[Any, Tensor]) -> Tensor:
    """z₀ + Σ_k coords[:, k] · z_k for G points: (G, B, ...) from ``zs`` (1 + K tensors (B, ...)).

    Written into a buffer kept in ``buffers`` and reused from chunk to chunk (the combination
    is memory-bound, and a fresh tensor of this size costs its page faults): for one point
    elementwise, in the memory order of the z_k; for several, one ``addmm``.
    """
    g, k = coords.shape
    if g == 1:
        out = buffers.get("one")
        if out is None or out.shape != zs[0].shape:
            out = buffers["one"] = torch.empty_like(zs[0])
        c = coords[0].tolist()
        torch.mul(zs[1], c[0], out=out)
        out.add_(zs[0])
        for j in range(1, k):
            out.add_(zs[j + 1], alpha=c[j])
        return out.unsqueeze(0)
    shape = (g, *zs[0].shape)
    out = buffers.get(shape)
    if out is None:
        out = buffers[shape] = torch.empty(shape, dtype=zs[0].dtype, device=zs[0].device)
    rest = buffers.get("rest")  # the z_k of this batch, stacked once (dropped per batch)
    if rest is None:
        rest = buffers["rest"] = torch.stack([z.contiguous() for z in zs[1:]]).reshape(k, -1)
    torch.addmm(zs[0].contiguous().reshape(1, -1), coords, rest, out=out.view(g, -1))
    return out
