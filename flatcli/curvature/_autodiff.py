"""Private autograd helpers of the curvature operators: batches of vector-Jacobian products."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FALLBACK_ERRORS = (NotImplementedError, RuntimeError)
"""What an AD method raises when a module or op does not support it (OOM aside: see is_oom)."""


def stack_columns(cols: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """``[{name: t}] * k -> {name: (k, *t.shape)}``."""
    if len(cols) == 1:
        return {n: t.unsqueeze(0) for n, t in cols[0].items()}
    return {n: torch.stack([c[n] for c in cols]) for n in cols[0]}


def column(cols: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    """Column ``i`` of ``{name: (k, *shape)}``."""
    return {n: c[i] for n, c in cols.items()}


def num_columns(cols: dict[str, Tensor]) -> int:
    """k of ``{name: (k, *shape)}``."""
    return int(next(iter(cols.values())).shape[0])


def backward_products(
    outputs: Sequence[Tensor | None],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    batched: bool,
) -> list[Tensor]:
    """``[(k, *input.shape)]``: k vector-Jacobian products of ``outputs`` wrt ``inputs``.

    ``grad_outputs[i]`` has shape ``(k, *outputs[i].shape)``. Outputs that do not depend on the
    inputs (None or no graph) contribute zero. ``batched`` uses ``is_grads_batched`` (vmap).
    """
    k = grad_outputs[0].shape[0]
    keep = [i for i, o in enumerate(outputs) if o is not None and o.requires_grad]
    zeros = [torch.zeros((k, *t.shape), dtype=t.dtype, device=t.device) for t in inputs]
    if not keep:
        return zeros
    outs = [outputs[i] for i in keep]
    gos = [grad_outputs[i].to(outputs[i].dtype) for i in keep]
    if batched:
        res = list(
            torch.autograd.grad(
                outs,
                inputs,
                grad_outputs=gos,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        )
    else:
        per = [
            torch.autograd.grad(
                outs,
                inputs,
                grad_outputs=[g[j] for g in gos],
                retain_graph=True,
                allow_unused=True,
            )
            for j in range(k)
        ]
        res = [
            None if per[0][i] is None else torch.stack([p[i] for p in per])
            for i in range(len(inputs))
        ]
    return [z if r is None else r for r, z in zip(res, zeros, strict=True)]
