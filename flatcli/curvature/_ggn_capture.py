"""The exact GGN diagonal from the shared layer capture: squared per-example gradients, no Jacobian.

``diag(G) = 1/N Σ_n Σ_k λ_nk (J_nᵀ u_nk)²`` (:mod:`flatcli.curvature.diagonal`), where
``Λ_n = Σ_k λ_nk u_nk u_nkᵀ`` is the head Hessian of example n (any weighted factor of it:
:class:`~flatcli.curvature.diagonal._HeadRows`). The batch is repeated R times (R rows of the
factor per block, K at most) and row ``(k, n)`` carries the cotangent ``u_nk``, so ONE backward of
the repeated batch gives, at every layer's output, the gradient of ``u_nkᵀ z_n`` for every pair
(examples do not interact in the forward); a factor of more rows than a block takes (T·V rows of
a token head) is backpropagated block by block through the one retained forward. A layer's
gradient for the pair is then ``G_nkᵀ A_n`` (the token view of
:mod:`flatcli.curvature._ghost`), and what is summed is its square weighted by ``λ_nk``:

- a Linear on (N, in) inputs: ``Σ_{n,k} λ_nk (g_nk ⊙ g_nk)(a_n ⊙ a_n)ᵀ``, one matrix product;
- a convolution or a Linear over positions: the per-pair weight gradients, in blocks of output
  channels bounded by a workspace;
- biases: the per-pair sums of output gradients; BatchNorm and other modules: the Gram engine's
  ``direct`` and ``vmap`` per-example rows.

The cost is K forward and backward passes per example plus those products, against the
Jacobian's ``K · P`` entries per example that ``vmap(jacrev)`` writes (LeNet-5: 13x faster).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from flatcli.curvature._ghost import _batchnorm_grads, _conv_tokens, _linear_tokens, _vmap_grads
from flatcli.curvature.capture import Recorder, Target, backward_to_outputs, record_forward
from flatcli.curvature.data import Chunk

__all__ = ["captured_ggn_diagonal"]

F64 = torch.float64
HeadFactor = Callable[[Tensor, Tensor], Any]
"""``factor(outputs (B, ...) in the head dtype, targets (B, ...))``: the chunk's head Hessians
as weighted rows, with ``count`` and ``block(r0, r1) -> (weights (B, r), rows (B, r, *out))``
(:class:`flatcli.curvature.diagonal._HeadRows`)."""


def captured_ggn_diagonal(
    model: nn.Module,
    targets: list[Target],
    chunks: Iterable[Chunk],
    factor: HeadFactor,
    head_dtype: torch.dtype,
    *,
    rows: int,
    workspace: int,
) -> dict[str, Tensor]:
    """``Σ_n Σ_k λ_nk (∂(u_nkᵀ z_n)/∂θ)²`` over the examples of ``chunks`` (a sum, not a mean).

    Args:
        model: the network in eval mode (no batch statistics: :func:`capture.plan` checked).
        targets: :func:`flatcli.curvature.capture.plan` of the selected parameters.
        chunks: the chunks of examples (:func:`flatcli.curvature.data.iter_chunks`).
        factor: the head Hessians of a chunk's outputs as weighted rows (:data:`HeadFactor`).
        head_dtype: dtype of the head, of the weights λ and of the accumulation.
        rows: factor rows per backward block (the forward holds that many copies of a chunk).
        workspace: elements a block of per-pair weight gradients may hold.

    Returns:
        ``{parameter name: float64 tensor of its shape}`` for every parameter of ``targets``.

    Raises:
        CaptureUnsupported: the model cannot be captured (the caller falls back).
    """
    sums = {
        (i, attr): torch.zeros(p.shape, dtype=head_dtype, device=p.device)
        for i, t in enumerate(targets)
        for attr, p in t.params.items()
    }
    recorder = Recorder(targets)
    try:
        for chunk in chunks:
            args = (chunk.x, chunk.y, rows, factor, head_dtype, sums, workspace)
            _add_chunk(model, recorder, *args)
    finally:
        recorder.remove()
    return {
        f"{targets[i].name}.{attr}" if targets[i].name else attr: v for (i, attr), v in sums.items()
    }


def _add_chunk(
    model: nn.Module,
    recorder: Recorder,
    x: Tensor,
    y: Tensor,
    rows: int,
    factor: HeadFactor,
    hd: torch.dtype,
    sums: dict[tuple[int, str], Tensor],
    workspace: int,
) -> None:
    """Add one chunk's weighted squared per-pair gradients to ``sums``: one forward of ``k``
    copies of the chunk (k = rows, or the factor's count when smaller), then one backward per
    block of k factor rows through it (the last block padded with zero rows)."""
    b = x.shape[0]
    k = rows
    z = record_forward(model, recorder, x.repeat(k, *([1] * (x.dim() - 1))))  # row k·b + n
    head = factor(z[:b].detach().to(hd), y)
    if head.count < k:  # fewer rows than copies: forward again with as many copies as rows
        k = head.count
        z = record_forward(model, recorder, x.repeat(k, *([1] * (x.dim() - 1))))
    starts = range(0, head.count, k)
    for r0 in starts:
        r1 = min(head.count, r0 + k)
        lam, u = head.block(r0, r1)  # (b, r), (b, r, *out)
        if r1 - r0 < k:  # the last block: zero rows of weight 0 fill the copies
            lam = torch.cat([lam, lam.new_zeros((b, k - (r1 - r0)))], dim=1)
            u = torch.cat([u, u.new_zeros((b, k - (r1 - r0), *u.shape[2:]))], dim=1)
        cotangent = u.transpose(0, 1).reshape(k * b, *z.shape[1:]).to(z.dtype)  # row (r, n)
        w = lam.T.reshape(k * b)
        last = r0 == starts[-1]
        grads = backward_to_outputs(z, recorder.targets, cotangent, retain_graph=not last)
        del cotangent, u
        for i, (t, gs) in enumerate(zip(recorder.targets, grads, strict=True)):
            if t.calls:
                _add_target(i, t, gs, w, sums, workspace)
        del grads
    for t in recorder.targets:
        t.calls = []


def _weighted_squares(rows: Tensor, w: Tensor) -> Tensor:
    """``Σ_c w_c rows_c²`` (p,) in w's dtype."""
    return torch.mv(rows.to(w.dtype).square().T, w)


def _add_target(
    i: int,
    t: Target,
    grads: list[Tensor],
    w: Tensor,
    sums: dict[tuple[int, str], Tensor],
    workspace: int,
) -> None:
    if t.kind in ("generic", "batchnorm"):
        rows = _vmap_grads(t, grads) if t.kind == "generic" else _batchnorm_grads(t, grads)
        flat = _weighted_squares(rows, w)
        start = 0
        for attr, p in t.params.items():
            sums[(i, attr)] += flat[start : start + p.numel()].view(p.shape)
            start += p.numel()
        return
    inputs = [args[0].detach() for args, _, _, _ in t.calls]
    make = _linear_tokens if t.kind == "linear" else _conv_tokens
    tok = make(t.module, inputs, grads)
    every = slice(0, tok.examples)
    if "bias" in t.params:
        bias_rows = tok.g(every).sum(dim=3).reshape(tok.examples, -1)
        sums[(i, "bias")] += _weighted_squares(bias_rows, w).view(t.params["bias"].shape)
    if "weight" not in t.params:
        return
    weight = sums[(i, "weight")]
    if tok.T == 1 and tok.groups == 1:  # a Linear on (N, in): one product
        A = tok.a(every)[:, 0, :, 0].to(w.dtype).square()  # (c, din)
        G = tok.g(every)[:, 0, :, 0].to(w.dtype).square()  # (c, dout)
        weight += ((G * w[:, None]).T @ A).view(weight.shape)
        return
    out = weight.view(tok.groups, tok.dout, tok.din)
    c, groups, din = tok.examples, tok.groups, tok.din
    A = tok.a(every) if tok.weight_grads is None else None  # (c, groups, din, T)
    width = max(1, min(tok.dout, workspace // max(1, c * groups * din)))
    for o0 in range(0, tok.dout, width):
        o1 = min(tok.dout, o0 + width)
        if tok.weight_grads is not None:  # groups == 1; columns in weight[o0:o1] order
            rows = tok.weight_grads(every, o0, o1)
        else:
            G = tok.g(every)[:, :, o0:o1]  # (c, groups, w, T)
            rows = torch.bmm(
                G.reshape(c * groups, o1 - o0, tok.T), A.reshape(c * groups, din, tok.T).mT
            ).reshape(c, -1)
        out[:, o0:o1] += _weighted_squares(rows, w).view(groups, o1 - o0, din)
