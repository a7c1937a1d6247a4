"""The Hessian of the mean loss as a :class:`~flatcli.curvature.operators.CurvatureOperator`.

One chunk's contribution to ``H V`` is ``sum_n d^2 loss_n / dtheta^2 V`` over its examples; the
base class adds the chunks and divides by N. Build it with
``flatcli.curvature.operators.make_operator("hessian", ...)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from flatcli.curvature._autodiff import backward_products, column, num_columns, stack_columns
from flatcli.curvature.data import Chunk
from flatcli.curvature.operators import CurvatureOperator, HvpMethod, Params

__all__ = ["HessianOperator"]


class HessianOperator(CurvatureOperator):
    """``H = d^2 L / dtheta^2`` of the mean loss (every term, the residual one included).

    ``hvp_method="auto"`` prefers double backward (the faster on PyTorch 2.x in
    ``benchmarks/bench_hvp.py``); see :mod:`flatcli.curvature.operators`.
    """

    kind: ClassVar[str] = "hessian"
    preferred_methods: ClassVar[tuple[str, str]] = (
        HvpMethod.DOUBLE_BACKWARD.value,
        HvpMethod.FORWARD_OVER_REVERSE.value,
    )

    def _chunk_forward(self, chunk: Chunk, cols: Params, names: list[str], batched: bool) -> Params:
        """``jvp`` of ``grad`` of the chunk's summed loss, one tangent per column."""

        def total(p: Params) -> Tensor:
            return self._loss(self._call(p, chunk.x), chunk.y).sum()

        g = grad(total)
        primal = self._subset(names)

        def one(v: Params) -> Params:
            return jvp(g, (primal,), (v,))[1]

        if batched:
            return vmap(one)(cols)
        return stack_columns([one(column(cols, i)) for i in range(num_columns(cols))])

    def _build_graph(self, chunk: Chunk) -> tuple[Any, ...]:
        """The gradient of the chunk's summed loss with ``create_graph=True``."""
        leaves = self._fm.leaves()
        inputs = list(leaves.values())
        loss = self._loss(self._fm(leaves, chunk.x), chunk.y).sum()
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
        return (inputs, grads)

    def _chunk_double_backward(
        self, graph: tuple[Any, ...], chunk: Chunk, cols: Params, names: list[str], batched: bool
    ) -> Params:
        """``d/dtheta_S <g_S, v>``: one backward pass through the graph per column."""
        inputs, grads = graph
        idx = [self._index[name] for name in names]
        res = backward_products(
            [grads[i] for i in idx], [inputs[i] for i in idx], [cols[n] for n in names], batched
        )
        return dict(zip(names, res, strict=True))
