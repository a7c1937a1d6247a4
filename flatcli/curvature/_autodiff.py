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

    Memory: beyond what autograd returns, nothing parameter-sized. Zeros are allocated only for
    the inputs the outputs do not reach; one column (``k == 1``) is returned as a view of
    autograd's result (no stacked copy); several unbatched columns are written one by one into
    the result, each column's gradients freed before the next backward.
    """
    k = grad_outputs[0].shape[0]
    keep = [i for i, o in enumerate(outputs) if o is not None and o.requires_grad]
    res: list[Tensor | None] = [None] * len(inputs)
    if keep:
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
            for j in range(k):
                col = torch.autograd.grad(
                    outs,
                    inputs,
                    grad_outputs=[g[j] for g in gos],
                    retain_graph=True,
                    allow_unused=True,
                )
                for i, r in enumerate(col):
                    if r is None:
                        if res[i] is not None:
                            res[i][j].zero_()
                        continue
                    if k == 1:
                        res[i] = r.unsqueeze(0)
                        continue
                    out = res[i]
                    if out is None:  # written row by row; rows an unreached column skips are 0
                        out = res[i] = (
                            r.new_zeros((k, *r.shape)) if j else r.new_empty((k, *r.shape))
                        )
                    out[j] = r
                del col
    return [
        torch.zeros((k, *t.shape), dtype=t.dtype, device=t.device) if r is None else r
        for r, t in zip(res, inputs, strict=True)
    ]
