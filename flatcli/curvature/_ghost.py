"""Ghost per-example Gram matrices: ξ = J Jᵀ from layer inputs and output gradients, never J.

For a layer ``out = W a (+ b)`` applied at the T positions ("tokens") of one example (T = 1 for a
Linear on (N, in) inputs, T = the sequence length for (N, T, in) inputs, T = output pixels for a
convolution seen through its unfolded input patches), example n's gradient is

    ∂ℓ_n/∂W = Σ_t g_{n,t} a_{n,t}ᵀ = G_nᵀ A_n,      ∂ℓ_n/∂b = Σ_t g_{n,t}

with A_n (T, in) the layer's inputs and G_n (T, out) the gradients of Σ_m ℓ_m at its output (the
rows of example n depend on example n only, so they are its own output gradients). Hence

    ξ_nm = Σ_{t,s} (a_{n,t}·a_{m,s}) (g_{n,t}·g_{m,s})   (weight)
         + (Σ_t g_{n,t})·(Σ_s g_{m,s})                   (bias).

Per layer the cheaper of two exact forms is used (flop counts in :func:`_token_strategy`):

- ``"ghost"`` (double sum): the (nT × nT) Gram matrices of the rows of A and of G, multiplied entry
  by entry and summed over the T × T blocks; for T = 1 simply (A Aᵀ) ∘ (G Gᵀ);
- ``"materialise"``: the per-example weight gradients G_nᵀ A_n of THIS layer only, in blocks of
  output channels bounded by a workspace, then their Gram.

BatchNorm with running statistics is a fixed affine map per channel: its per-example gradients are
Σ g·x̂ and Σ g over positions (``"direct"``). Other layers with parameters (LayerNorm, GroupNorm,
PReLU, custom modules): per-example gradients of their own parameters by ``vmap`` over examples
of the vjp of that module's forward, with the captured output gradient as cotangent (``"vmap"``;
such layers are small).

Capture (the shared layer capture of :mod:`flatcli.curvature.capture`, which K-FAC uses too):
forward hooks record each parameterised module's inputs and output, one batched forward runs,
the caller's head gives unit-norm per-example logit gradients, and one ``torch.autograd.grad`` of
the logits with respect to the recorded outputs gives every G. No parameter gradient is formed.
A recorded tensor that a later in-place op changes (``ReLU(inplace=True)``, ``out += shortcut``) is
detected by its version counter and the chunk is run again with the recorded tensors cloned.
All products are formed in float64.

Valid only when examples do not interact in the forward (no BatchNorm with batch statistics) and
each parameter is used only inside its own module's forward (a ``TorchFunctionMode`` watches every
torch call of the recorded forward for that): :func:`~flatcli.curvature.capture.plan` and the
capture raise :class:`GhostUnsupported` otherwise, and the caller falls back to the materialised
path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn import functional as F

from flatcli.curvature.capture import (
    CaptureUnsupported,
    Recorder,
    Target,
    backward_to_outputs,
    layer_tokens,
    output_tokens,
    record_forward,
)

__all__ = ["GhostUnsupported", "ghost_grams", "add_row_gram"]

F64 = torch.float64
Head = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``head(logits (c, K), labels (c,)) -> (unit cotangent (c, K), scale (c,) float64)``."""


GhostUnsupported = CaptureUnsupported
"""The ghost path cannot handle the model (the capture's :class:`CaptureUnsupported`)."""


# --------------------------------------------------------------------------- capture


@dataclass
class _Capture:
    """Inputs and output gradients of every target for a set of examples (dim 0)."""

    inputs: dict[int, list[Tensor]] = field(default_factory=dict)  # target -> per call (c, ...)
    grads: dict[int, list[Tensor]] = field(default_factory=dict)  # target -> per call (c, ...)
    dense: dict[int, Tensor] = field(default_factory=dict)  # generic target -> (c, p)
    scale: list[Tensor] = field(default_factory=list)  # (c,) float64 per chunk

    def extend(self, other: _Capture) -> None:
        for d_self, d_other in ((self.inputs, other.inputs), (self.grads, other.grads)):
            for i, calls in d_other.items():
                if i in d_self:
                    d_self[i] = [torch.cat([a, b]) for a, b in zip(d_self[i], calls, strict=True)]
                else:
                    d_self[i] = calls
        for i, rows in other.dense.items():
            self.dense[i] = torch.cat([self.dense[i], rows]) if i in self.dense else rows
        self.scale.extend(other.scale)


def _capture(model: nn.Module, recorder: Recorder, x: Tensor, y: Tensor, head: Head) -> _Capture:
    """One batched forward and one backward to the recorded outputs, for the examples x."""
    targets = recorder.targets
    z = record_forward(model, recorder, x)
    cot, scale = head(z.detach(), y)
    # (a parameter read outside its module's forward was refused during the forward)
    grads = backward_to_outputs(z, targets, cot)
    cap = _Capture(scale=[scale])
    for i, (t, gs) in enumerate(zip(targets, grads, strict=True)):
        if t.kind == "generic":
            cap.dense[i] = _vmap_grads(t, gs) if t.calls else _zeros(t, x.shape[0])
        elif t.kind == "batchnorm":
            cap.dense[i] = _batchnorm_grads(t, gs) if t.calls else _zeros(t, x.shape[0])
        else:
            cap.inputs[i] = [args[0].detach() for args, _, _, _ in t.calls]
            cap.grads[i] = gs
        t.calls = []
    return cap


def _zeros(t: Target, c: int) -> Tensor:
    p = next(iter(t.params.values()))
    return torch.zeros((c, t.numel), dtype=p.dtype, device=p.device)


def _batchnorm_grads(target: Target, grads: list[Tensor]) -> Tensor:
    """Per-example gradients (c, p) of an eval-mode BatchNorm's weight and bias.

    With running statistics, out = γ x̂ + β with x̂ = (x − μ)/√(σ² + ε) fixed per channel, so
    ∂ℓ_n/∂γ = Σ_positions g_n x̂_n and ∂ℓ_n/∂β = Σ_positions g_n.
    """
    bn = target.module
    total: dict[str, Tensor] = {}
    for (args, _, _, _), g in zip(target.calls, grads, strict=True):
        x = args[0].detach()
        c = x.shape[0]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xhat = (x - bn.running_mean.view(shape)) * torch.rsqrt(bn.running_var.view(shape) + bn.eps)
        per = {
            "weight": (g * xhat).reshape(c, x.shape[1], -1).sum(dim=2),
            "bias": g.reshape(c, x.shape[1], -1).sum(dim=2),
        }
        for k in target.params:
            total[k] = total[k] + per[k] if k in total else per[k]
    c = grads[0].shape[0]
    return torch.cat([total[k].reshape(c, -1) for k in target.params], dim=1)


def _vmap_grads(target: Target, grads: list[Tensor]) -> Tensor:
    """Per-example gradients (c, p) of a generic module's direct parameters: vmap of its vjp."""
    module = target.module
    params = {k: p.detach() for k, p in target.params.items()}
    total: dict[str, Tensor] | None = None
    for (args, kwargs, _, _), g in zip(target.calls, grads, strict=True):
        if any(isinstance(v, Tensor) for v in kwargs.values()):
            raise GhostUnsupported(f"module {target.name} is called with tensor keyword arguments")
        mask = [isinstance(a, Tensor) for a in args]
        tensors = [a.detach() for a in args if isinstance(a, Tensor)]

        def one(
            ts: list[Tensor], gn: Tensor, args=args, kwargs=kwargs, mask=mask
        ) -> dict[str, Tensor]:
            it = iter(ts)
            full = tuple(next(it).unsqueeze(0) if m else a for m, a in zip(mask, args, strict=True))
            _, pullback = vjp(lambda q: functional_call(module, q, full, kwargs), params)
            return pullback(gn.unsqueeze(0))[0]

        per = vmap(one)(tensors, g)
        total = per if total is None else {k: total[k] + per[k] for k in per}
    assert total is not None
    c = grads[0].shape[0]
    return torch.cat([total[k].reshape(c, -1) for k in params], dim=1)


# --------------------------------------------------------------------------- layers as tokens


@dataclass
class _Tokens:
    """A Linear or convolution seen as ``out_t = W a_t`` over T tokens per example, in groups.

    ``a(sl)`` gives the inputs ``(c, groups, din, T)`` and ``g(sl)`` the output gradients
    ``(c, groups, dout, T)`` of the examples ``sl``, in the network's dtype (views where possible:
    the layout is the one ``F.unfold`` and a conv's output gradient already have).
    """

    examples: int
    T: int
    groups: int
    din: int
    dout: int
    a: Callable[[slice], Tensor]
    g: Callable[[slice], Tensor]
    weight_grads: Callable[[slice, int, int], Tensor] | None = None
    """Optional faster ``(sl, o0, o1) -> (c, w·din)`` per-example gradients of output channels
    o0:o1 (groups == 1), in any fixed column order."""


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _linear_tokens(module: nn.Module, inputs: list[Tensor], grads: list[Tensor]) -> _Tokens:
    c = inputs[0].shape[0]
    A = layer_tokens(module, inputs)  # (c, in, T)
    G = output_tokens(module, grads)  # (c, out, T)
    return _Tokens(
        c,
        A.shape[2],
        1,
        A.shape[1],
        G.shape[1],
        lambda sl: A[sl].unsqueeze(1),
        lambda sl: G[sl].unsqueeze(1),
    )


def _conv_tokens(
    module: nn.Conv1d | nn.Conv2d, inputs: list[Tensor], grads: list[Tensor]
) -> _Tokens:
    c = inputs[0].shape[0]
    groups = module.groups
    din = module.weight[0].numel()  # C_in / groups · kernel
    dout = module.out_channels // groups
    P = sum(g[0].numel() // module.out_channels for g in grads)

    def a(sl: slice) -> Tensor:
        cols = layer_tokens(module, [x[sl] for x in inputs])  # (c, C_in k, P)
        return cols.view(cols.shape[0], groups, din, P)

    def g(sl: slice) -> Tensor:
        gs = output_tokens(module, [gr[sl] for gr in grads])  # (c, out, P)
        return gs.view(gs.shape[0], groups, dout, P)

    def weight_grads(sl: slice, o0: int, o1: int) -> Tensor:
        pairs = zip(inputs, grads, strict=True)
        return sum(_conv_weight_grads(module, x[sl], gr[sl, o0:o1]) for x, gr in pairs)

    k = din // module.in_channels
    # The grouped-convolution form beats unfold + bmm when the output map is large or the layer
    # is narrow (measured on CPU: LeNet-5 convs 4-7x, WRN 64->64 at 32x32 1.7x; 256->256 at 8x8
    # and 1x1 convs are faster by unfold + bmm).
    # float64 convolutions have no fast CPU kernel (mkldnn is float32-only): unfold + bmm there.
    fast_conv = inputs[0].dtype != torch.float64
    trick = fast_conv and groups == 1 and k > 1 and (P >= 512 or din * dout <= 16384)
    return _Tokens(c, P, groups, din, dout, a, g, weight_grads if trick else None)


def _conv_weight_grads(module: nn.Conv1d | nn.Conv2d, x: Tensor, g: Tensor) -> Tensor:
    """Per-example weight gradients (c, w·C_in·k) of a groups=1 convolution for its output
    channels ``g`` (c, w, *out), by one convolution with c groups: example n's input channels
    correlated with its own output gradients (stride and dilation swap roles)."""
    c, w = g.shape[:2]
    zero_pad = module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if not zero_pad:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    padding = module.padding if zero_pad else 0
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    kernel = g.reshape(c * w, 1, *g.shape[2:])
    out = conv(x.transpose(0, 1), kernel, None, module.dilation, padding, module.stride, c)
    out = out[(..., *(slice(0, k) for k in module.kernel_size))]  # (C_in, c·w, *kernel)
    out = out.reshape(x.shape[1], c, w, -1).permute(1, 2, 0, 3)  # (c, w, C_in, k)
    return out.reshape(c, -1)


def _token_strategy(tok: _Tokens, n: int, workspace: int) -> str:
    """``"ghost"`` or ``"materialise"``, whichever needs fewer flops (per token layer).

    With E examples in Gram blocks of n, T tokens, ``din``/``dout`` per group:
    ghost = E·n·T²·(din + dout) (two nT × nT Gram matrices per block); materialise =
    E·T·din·dout (the per-example weight gradients) + E·n·din·dout (their Gram). The ghost form
    also needs its (nT)² block to fit the workspace.
    """
    E, T, din, dout = tok.examples, tok.T, tok.din, tok.dout
    ghost = E * n * T * T * (din + dout)
    mat = E * T * din * dout + E * n * din * dout
    if ghost <= mat and 2 * (n * T) ** 2 <= workspace:
        return "ghost"
    return "materialise"


def _token_rows(t: Tensor, k: int, n: int) -> Tensor:
    """(k·n, groups, d, T) -> (k·groups, n·T, d) float64: the token rows of each Gram block."""
    _, groups, d, T = t.shape
    t = t.reshape(k, n, groups, d, T).permute(0, 2, 1, 4, 3)  # (k, groups, n, T, d)
    return t.reshape(k * groups, n * T, d).to(F64)


def _add_ghost(out: Tensor, tok: _Tokens, n: int, workspace: int) -> None:
    """out[b] += Σ_{t,s} (A_t A_sᵀ) ∘ (G_t G_sᵀ) per Gram block b of n examples (double sum)."""
    blocks, T, groups = out.shape[0], tok.T, tok.groups
    per = max(1, workspace // max(1, 2 * (n * T) ** 2 * groups))
    for b0 in range(0, blocks, per):
        b1 = min(blocks, b0 + per)
        sl, k = slice(b0 * n, b1 * n), b1 - b0
        A = _token_rows(tok.a(sl), k, n)
        G = _token_rows(tok.g(sl), k, n)
        prod = torch.bmm(A, A.transpose(1, 2)).mul_(torch.bmm(G, G.transpose(1, 2)))
        if T > 1:
            prod = prod.view(k * groups, n, T, n, T).sum(dim=(2, 4))
        out[b0:b1] += prod.view(k, groups, n, n).sum(dim=1)


def _add_materialised(out: Tensor, tok: _Tokens, n: int, workspace: int) -> None:
    """out += Gram of the per-example weight gradients G_n A_nᵀ, in blocks of output channels."""
    E, T, groups, din, dout = tok.examples, tok.T, tok.groups, tok.din, tok.dout
    width = max(1, min(dout, workspace // max(1, 3 * E * groups * din)))  # channels per block
    chunk = max(1, min(E, workspace // max(1, T * groups * (din + dout) + groups * width * din)))
    cached = None
    if tok.weight_grads is None and E * T * groups * din <= workspace:
        cached = tok.a(slice(0, E))
    for o0 in range(0, dout, width):
        o1 = min(dout, o0 + width)
        rows = []
        for e0 in range(0, E, chunk):
            sl = slice(e0, min(E, e0 + chunk))
            if tok.weight_grads is not None:
                rows.append(tok.weight_grads(sl, o0, o1))
                continue
            A = cached[sl] if cached is not None else tok.a(sl)  # (c, groups, din, T)
            G = tok.g(sl)[:, :, o0:o1]  # (c, groups, w, T)
            c = A.shape[0]
            M = torch.bmm(G.reshape(c * groups, o1 - o0, T), A.reshape(c * groups, din, T).mT)
            rows.append(M.reshape(c, -1))  # (c, groups·w·din)
        add_row_gram(out, _cat(rows, 0), n, workspace)


def add_row_gram(out: Tensor, rows: Tensor, n: int, workspace: int) -> None:
    """``out[b] += R_b R_bᵀ`` for the Gram blocks of n consecutive rows, in float64 column blocks.

    Args:
        out: (E/n, n, n) float64 accumulator.
        rows: (E, p) per-example gradient rows in any dtype.
        n: rows per Gram block.
        workspace: elements a float64 column block may hold.
    """
    E, p = rows.shape
    if p == 0:
        return
    step = max(1, workspace // max(1, E))
    for c0 in range(0, p, step):
        r = rows[:, c0 : c0 + step].to(F64).reshape(E // n, n, -1)
        out.baddbmm_(r, r.transpose(1, 2))


# --------------------------------------------------------------------------- the Gram blocks


def ghost_grams(
    model: nn.Module,
    targets: list[Target],
    x: Tensor,
    y: Tensor,
    n: int,
    *,
    head: Head,
    chunk_size: int,
    workspace: int,
) -> tuple[Tensor, Tensor]:
    """Unit-head Gram blocks ξ̂ (E/n, n, n) float64 and the head scales s (E,) float64.

    ξ_b = diag(s_b) ξ̂_b diag(s_b) is the per-example-gradient Gram matrix of the b-th block of n
    consecutive examples of ``x`` (E, ...). The examples are forwarded ``chunk_size`` at a time.
    """
    E = x.shape[0]
    if E % n:
        raise ValueError(f"{E} examples do not split into Gram blocks of {n}.")
    recorder = Recorder(targets)
    try:
        cap = _Capture()
        for e0 in range(0, E, chunk_size):
            cap.extend(
                _capture(model, recorder, x[e0 : e0 + chunk_size], y[e0 : e0 + chunk_size], head)
            )
    finally:
        recorder.remove()
    out = torch.zeros((E // n, n, n), dtype=F64, device=x.device)
    dense: list[Tensor] = []
    for i, t in enumerate(targets):
        if t.kind in ("generic", "batchnorm"):
            dense.append(cap.dense[i])
            t.strategy = "vmap" if t.kind == "generic" else "direct"
            continue
        inputs, grads = cap.inputs.pop(i), cap.grads.pop(i)  # freed once this layer is done
        if not inputs:  # never called: no gradient
            t.strategy = "unused"
            continue
        if t.kind == "linear":
            tok = _linear_tokens(t.module, inputs, grads)
        else:
            tok = _conv_tokens(t.module, inputs, grads)
        if "bias" in t.params:
            dense.append(tok.g(slice(0, E)).sum(dim=3).reshape(E, -1))
        if "weight" in t.params:
            t.strategy = _token_strategy(tok, n, workspace)
            if t.strategy == "ghost":
                _add_ghost(out, tok, n, workspace)
            else:
                _add_materialised(out, tok, n, workspace)
        else:
            t.strategy = "bias"
    if dense:
        add_row_gram(out, torch.cat(dense, dim=1), n, workspace)
    return out, torch.cat(cap.scale)
