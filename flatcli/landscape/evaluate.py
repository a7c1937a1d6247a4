"""Loss and accuracy of a model at many points θ* + α d₁ + β d₂ at once (the slices of Li et al.
2018, "Visualizing the Loss Landscape of Neural Nets", §3).

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

Any output and target shape the losses take (docs: "Your model", Losses): the outputs of G points,
(G, B, ...), are passed to the loss head as (G·B, ...) with the targets repeated G times, so a
head sees per-example outputs of the shape the model returns (class logits (B, K), token logits
(B, T, V), regression outputs (B,) or (B, D)); integer inputs (token ids) are passed as they are,
floating-point ones cast to the parameters' dtype. What is summed per example is up to the
caller: ``loss_fn`` and ``correct_fn`` return one value per example (e.g. a sequence's summed
token losses and its correctly predicted positions), and the caller divides the sums by what
its loss averages over (examples, counted positions, outputs).

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

from flatcli.curvature.data import move_inputs
from flatcli.curvature.memory import activation_bytes_per_example, available_memory
from flatcli.landscape.first_layer import FirstLayer

__all__ = [
    "EXAMPLES_PER_PASS",
    "GPU_EXAMPLES_PER_PASS",
    "Plan",
    "plan",
    "point_params",
    "argmax_correct",
    "evaluate_points",
]

HEAD_COPIES = 6
"""Copies of one example's outputs, in the head's dtype, that the loss head holds at once (the
cast logits, their differences, the mask, the exponentials): its memory in :func:`plan`."""

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
    head_dtype: torch.dtype | None = None,
) -> Plan:
    """Examples per batch and points per forward for ``model`` on ``x`` (see the module
    docstring); a value given is kept (points per forward at most ``block``), and the other
    chosen so that a forward takes about the target number of examples.

    An example's memory is its activations (:func:`~flatcli.curvature.memory.
    activation_bytes_per_example`) and :data:`HEAD_COPIES` copies of its outputs in
    ``head_dtype`` (a sequence's token logits, T × V per example, dominate a language model's):
    a batch size not given, and the points per forward, keep G·B examples within
    :data:`BUDGET_FRACTION` of the free memory.
    """
    n = max(1, int(x.shape[0]))
    p0 = next(iter(model.parameters()))
    device = p0.device
    gpu = device.type == "cuda"
    target = GPU_EXAMPLES_PER_PASS if gpu else EXAMPLES_PER_PASS
    if points_per_pass is not None:
        g = max(1, min(int(points_per_pass), block))
        bs = int(batch_size) if batch_size is not None else max(1, min(n, target // g))
        return Plan(bs, g)
    size = sum(p.numel() for p in model.parameters()) * p0.element_size()
    budget = BUDGET_FRACTION * available_memory(device)
    per_example = _example_bytes(model, x, head_dtype)
    if batch_size is not None:
        bs = int(batch_size)
    else:
        bs = max(1, min(n, target, int((budget - size) // per_example)))
    g = max(1, target // bs)
    if g > 1:
        g = max(1, min(g, int(budget // max(1, size + bs * per_example))))
    return Plan(bs, max(1, min(g, block)))


def _example_bytes(model: nn.Module, x: Tensor, head_dtype: torch.dtype | None) -> int:
    """One example's activations and :data:`HEAD_COPIES` copies of its outputs in the head's
    dtype, in bytes (at least 1)."""
    shape = tuple(x.shape[1:])
    act = activation_bytes_per_example(model, shape, x.dtype)
    p0 = next(iter(model.parameters()))
    state = {n: p.detach() for n, p in model.named_parameters()}
    state.update({n: b.detach().clone() for n, b in model.named_buffers()})  # left untouched
    with torch.no_grad():
        out = functional_call(model, state, (move_inputs(x[:1], p0.device, p0.dtype),))
    itemsize = torch.empty((), dtype=head_dtype or out.dtype).element_size()
    return max(1, act + HEAD_COPIES * out[:1].numel() * itemsize)


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


def argmax_correct(outputs: Tensor, labels: Tensor) -> Tensor:
    """Per example, 1 where the argmax of the class logits ``outputs`` (N, K) is ``labels`` (N,)
    (the accuracy of ``ce`` and ``nsce``), else 0: (N,) int64."""
    return (outputs.argmax(dim=-1) == labels).to(torch.int64)


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
    correct_fn: Callable[[Tensor, Tensor], Tensor] | None = argmax_correct,
    first: FirstLayer | None = None,
    progress: Callable[[float], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed loss and summed correct predictions over ``(x, y)`` at each point.

    Args:
        model: the network in eval mode (only its structure and buffers are used).
        x, y: the examples (floating-point inputs are cast to θ*'s dtype, integer ones such as
            token ids kept) and their targets, of any shape a loss takes (class labels (N,),
            token targets (N, T), float targets (N,) or (N, D)).
        theta: θ*, ``{name: tensor}`` for every parameter.
        directions: d₁ (and d₂), each ``{name: tensor}`` like ``theta``.
        coords: one row of coefficients (α, β, …) per point, one per direction.
        loss_fn: ``(outputs (M, ...), targets (M, ...)) -> (M,)``, one value per example,
            whose sum over the examples the point's entry of ``loss_sums`` is (e.g. a per-example
            loss, or :func:`~flatcli.curvature.losses.sample_loss`'s head).
        batch_size: examples per batch.
        points_per_pass: points per forward (G; 1 calls the model without vmap).
        head_dtype: dtype of the loss head (None: the outputs' dtype).
        correct_fn: ``(outputs, targets) -> (M,)`` integer counts of correct predictions per
            example (default :func:`argmax_correct`; a sequence's correctly predicted positions
            for token targets), computed on the outputs in the model's dtype; None: no
            accuracy (``correct`` is all zeros).
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
            xb = move_inputs(x[start : start + batch_size], device, dtype)
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
                flat = out.reshape(g * bs, *out.shape[2:])  # (G·B, ...): point-major
                targets = yb.repeat(g, *([1] * (yb.dim() - 1)))
                head = flat if head_dtype is None else flat.to(head_dtype)
                losses = loss_fn(head, targets).reshape(g, bs)
                loss_sums[a:b] += losses.to(torch.float64).sum(dim=1)
                if correct_fn is not None:
                    hits = correct_fn(flat, targets).reshape(g, bs)
                    correct[a:b] += hits.to(torch.int64).sum(dim=1)
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
