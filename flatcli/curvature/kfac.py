r"""Kronecker factors of the layer-wise Hessian and the structure they explain (Wu et al. 2020).

For a Linear layer ``z = W x + b`` (W of shape m × n, flattened as ``weight.flatten()``, so entry
(i, j) sits at index i·n + j) and one example, the layer's Hessian is exactly
:math:`M_x \otimes x x^\top` (Wu et al. 2020, Eq. 4/16), where :math:`M_x` is the Hessian of the
loss with respect to the layer's output. With the logit Jacobian :math:`G_x = \partial z /
\partial z^{(p)}` and the output Hessian :math:`A_x = \mathrm{diag}(p) - pp^\top` (Eq. 18),
:math:`M_x = G_x^\top A_x G_x` (Eq. 23). The layer-wise Hessian is the mean
:math:`H_{\mathcal L}(w) = \mathbb E[M \otimes xx^\top]` (Eq. 5), and the decoupling conjecture
(Eq. 6) approximates it by :math:`\mathbb E[M] \otimes \mathbb E[xx^\top]`.

How the factors are formed (:func:`kfac_factors`):

- :math:`\mathbb E[M]` exactly: with :math:`Q_x^\top Q_x = A_x` (Eq. 27; the cancellation-free
  square root of :func:`flatcli.curvature.losses.output_hessian_sqrt`), the c rows of :math:`Q_x`
  are backpropagated from the logits to every layer's output at once, in ONE vmapped backward
  per batch (``is_grads_batched``; if an op has no batching rule, one backward of the batch
  repeated c times instead). Row c of the result is :math:`N_x = Q_x G_x` (Eq. 34) and
  :math:`M_x = N_x^\top N_x`. Each row is scaled to unit norm before it enters the network's
  backward and the scale re-applied in float64, so the tiny curvature of confident examples
  neither underflows nor loses digits in a float32 network. All sums are float64.
  ``fisher="mc"``: one sampled label ĉ ~ p per example (or ``mc_samples``), cotangent
  :math:`\nabla_z \ell(z, \hat c)`: an unbiased estimate, since
  :math:`\mathbb E_{\hat c}[r r^\top] = A_x`.
- :math:`\mathbb E[xx^\top]` of the layer inputs.
- Convolutions follow App. A.2: the input is unfolded into X (n = C·K1·K2 rows, P positions;
  Eq. 30); :math:`\tilde M_x = \frac 1P \tilde N_x^\top \tilde N_x` with :math:`\tilde N_x` the
  cP × m reshape of :math:`N_x` (Eq. 35) and :math:`\mathbb E[XX^\top]` SUMMED over the P
  positions (Eq. 37). Libraries differ here by a factor P (some put 1/P on the input factor, some
  sum the output gradients over positions first); with this convention the two factors'
  product is on the scale of the exact block.

One forward and one (vmapped) backward per batch give the factors of all selected layers. The
bias block of a layer is :math:`\mathbb E[(\sum_p n_p)(\sum_p n_p)^\top]`, which for a Linear
layer is :math:`\mathbb E[M]` itself (Eq. 26).

:math:`\mathbb E[M]` here is the Gauss-Newton form of Eq. 23. For piecewise-linear networks
(ReLU, max pooling, eval-mode BatchNorm) it is the exact output Hessian (Eq. 22); with smooth
activations the exact :math:`M_x` has a second term (Eq. 17) which the factors leave out (the
exact layer block, from the Hessian operator, keeps it).

The analysis helpers compare :math:`\mathbb E[M] \otimes \mathbb E[xx^\top]` with the exact block:
its eigenpairs merged from the factors' (App. C: :math:`u_i \otimes v_j` with eigenvalue
:math:`\lambda_i \mu_j`), subspace overlaps (Def. 4.1, Eq. 7), eigenvector correspondence
matrices (Def. 4.2, §4.2), the structure of :math:`\mathbb E[xx^\top]` (Eq. 8), low-rank scores
(§5.2) and a matrix-free decoupling error.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double().eval()
>>> x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 2, (10,))
>>> f = kfac_factors(model, x, y)
>>> list(f), f["0"].shape, tuple(f["0"].em.shape), tuple(f["0"].exx.shape)
(['0', '2'], (3, 4), (3, 3), (4, 4))
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatcli import distributed
from flatcli.configs.kfac import FisherMode
from flatcli.curvature.capture import (
    CaptureUnsupported,
    Recorder,
    Target,
    backward_to_outputs,
    has_batch_statistics,
    layer_tokens,
    output_tokens,
    plan,
    record_forward,
)
from flatcli.curvature.data import move_inputs
from flatcli.curvature.gauss_newton import sample_labels
from flatcli.curvature.losses import (
    IGNORE_INDEX,
    class_residuals,
    output_hessian_factor,
    output_hessian_sqrt,
)
from flatcli.curvature.memory import activation_bytes_per_example
from flatcli.errors import UsageError
from flatcli.progress import ProgressFn, no_progress

__all__ = [
    "FisherMode",
    "LayerFactors",
    "FactorSet",
    "kfac_factors",
    "factored_layers",
    "kron_top",
    "kron_matvec",
    "kron_eigenvectors",
    "overlap_curve",
    "eigenbasis_coefficients",
    "correspondence",
    "rank1_scores",
    "input_structure",
    "outlier_gap",
    "decoupling_error",
]

F64 = torch.float64
CHUNK_BUDGET = 1 << 30
"""Bytes a batch's activations and c output gradients may use when no batch size is given."""
MAX_CHUNK = 1024


@dataclass
class LayerFactors:
    """The Kronecker factors of one layer's Hessian block (Wu et al. 2020, Eqs. 6, 35, 37).

    Attributes:
        name: module name.
        kind: ``"linear"``, ``"conv1d"`` or ``"conv2d"``.
        shape: ``(m, n)``: output size and input size (n = C·K1·K2 for a convolution); the
            weight flattened as ``weight.flatten()`` is ``Mat⁻¹`` of an m × n matrix.
        positions: P, the positions the layer is applied at (1 for a Linear on (N, n) inputs).
        em: (m, m) float64 :math:`\\mathbb E[M]` (a convolution: :math:`\\mathbb E[\\tilde M]`,
            Eq. 35, with its 1/P).
        exx: (n, n) float64 :math:`\\mathbb E[xx^\\top]` (a convolution: summed over the P
            positions, Eq. 37).
        bias: whether the layer has a bias that was factored with it.
        mean_x: (n,) float64 mean input (a convolution: mean patch over examples and positions).
        bias_block: (m, m) float64 Gauss-Newton bias block :math:`\\mathbb E[(\\sum_p n_p)(\\sum_p
            n_p)^\\top]` (Eq. 26; equals ``em`` for a Linear), or None without a bias.
        examples: N, the examples averaged over.
        fisher: ``"exact"`` or ``"mc"``.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    positions: int
    em: Tensor
    exx: Tensor
    bias: bool
    mean_x: Tensor
    bias_block: Tensor | None
    examples: int
    fisher: str = "exact"

    def eig(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(lam (m,), U (m, m), mu (n,), V (n, n))``: eigenpairs of E[M] and E[xxᵀ], descending.

        Columns of U and V are the eigenvectors; the K-FAC matrix is U diag(λ) Uᵀ ⊗ V diag(μ) Vᵀ,
        and its eigenbasis rotation of a weight W (m, n) is W' = Uᵀ W V.
        """
        lam, U = torch.linalg.eigh(self.em)
        mu, V = torch.linalg.eigh(self.exx)
        return lam.flip(0), U.flip(1), mu.flip(0), V.flip(1)

    def dense(self) -> Tensor:
        """The (mn, mn) Kronecker product E[M] ⊗ E[xxᵀ] (small layers only)."""
        return torch.kron(self.em.contiguous(), self.exx.contiguous())  # kron views its inputs


def _kind_name(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    return "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"


def factored_layers(model: nn.Module, layers: Sequence[str] | str | None = None) -> list[str]:
    """Names of the Linear/Conv1d/Conv2d modules (groups = 1) with a trainable weight.

    Args:
        model: the network.
        layers: module names or shell globs (``"fc*"``); None = every such module.

    Raises:
        UsageError: a pattern matches no factorable module (the message lists them).
    """
    from flatcli.curvature.capture import layer_kind

    found = [
        name
        for name, m in model.named_modules()
        if layer_kind(m) in ("linear", "conv")
        and not isinstance(m, nn.Conv3d)
        and getattr(m, "groups", 1) == 1
        and m.weight.requires_grad
    ]
    if layers is None:
        return found
    if isinstance(layers, str):
        layers = [layers]
    chosen: set[str] = set()
    for pattern in layers:
        hit = [n for n in found if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            raise UsageError(
                f"layer {pattern!r} matches no Linear or Conv2d layer; layers: {', '.join(found)}"
            )
        chosen.update(hit)
    return [n for n in found if n in chosen]


def _chunk_size(model: nn.Module, x: Tensor, rows: int) -> int:
    per = activation_bytes_per_example(model, tuple(x.shape[1:]), x.dtype)
    return max(1, min(MAX_CHUNK, CHUNK_BUDGET // max(1, per * (rows + 2))))


def _cotangents(
    z: Tensor,
    y: Tensor,
    fisher: FisherMode,
    mc_samples: int,
    seed: int,
    start: int,
    loss: str = "ce",
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Unit cotangents (B, c, K) in z's dtype and their float64 scales (B, c).

    Exact: row k of example n is Q_n[k] (so Σ_k rows ⊗ rows = A_n, Eq. 27); for ``loss``
    ``mse``, ``bce`` or ``token-ce`` the closed-form square root of
    :func:`flatcli.curvature.losses.output_hessian_factor` (weighted by ``scale``: N / C for
    ``token-ce``, so the factors are those of the sample loss); MC: the residual of
    a label drawn from p(·|x_n), divided by sqrt(mc_samples). The labels of example n (global
    index ``start`` + row) depend on ``(seed, n)`` only, not on the chunking or the number of
    processes (:func:`flatcli.curvature.gauss_newton.sample_labels`).
    """
    z64 = z.detach().to(F64)
    if loss != "ce":  # closed-form output-Hessian square root of the sample loss's term
        w = torch.full((z.shape[0],), float(scale), dtype=F64, device=z.device)
        rows = output_hessian_factor(loss, z64, y, w).transpose(0, 1)  # (R, c, *out)
        s = torch.linalg.vector_norm(rows.flatten(2), dim=-1)  # (R, c)
        safe = torch.where(s > 0, s, torch.ones_like(s)).view(*s.shape, *([1] * (z.dim() - 1)))
        return (rows / safe).to(z.dtype), s
    if fisher is FisherMode.EXACT:
        rows = output_hessian_sqrt(z64).transpose(0, 1)  # (K, c, K)
    else:
        p = torch.softmax(z64, dim=-1)
        labels = sample_labels(p, mc_samples, seed, start=start)
        labels = labels.to(z.device).T  # (S, c)
        R = class_residuals(z64)  # (c, K, K): row j = residual for label j
        idx = labels.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, 1, R.shape[-1])
        rows = R.unsqueeze(0).expand(mc_samples, -1, -1, -1).gather(2, idx).squeeze(2)
        rows = rows / math.sqrt(mc_samples)
    s = torch.linalg.vector_norm(rows, dim=-1)
    unit = rows / torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)
    return unit.to(z.dtype), s


class _Accumulator:
    """Float64 running sums of one layer's factors."""

    def __init__(self, target: Target, device: torch.device) -> None:
        w = target.module.weight
        self.m, self.n = w.shape[0], w[0].numel()
        self.em = torch.zeros((self.m, self.m), dtype=F64, device=device)
        self.exx = torch.zeros((self.n, self.n), dtype=F64, device=device)
        self.mean = torch.zeros(self.n, dtype=F64, device=device)
        self.bias = torch.zeros((self.m, self.m), dtype=F64, device=device)
        self.P = 0

    def add(self, module: nn.Module, inputs: list[Tensor], grads: list[Tensor], s: Tensor) -> None:
        A = layer_tokens(module, inputs)  # (c, n, P), network dtype
        G = output_tokens(module, grads, batch_dims=1)  # (B, c, m, P): unit-cotangent rows
        P = A.shape[-1]
        self.P = P
        B, c = G.shape[:2]
        # N_x = Q_x G_x (Eq. 34) is s · G row by row: the scales enter in float64
        s = s.reshape(B * c)
        self.em += _gram_sum(G.reshape(B * c, self.m, P), s) / P  # Ñᵀ Ñ / P (Eq. 35)
        self.exx += _gram_sum(A)  # E[XXᵀ] summed over the P positions (Eq. 37)
        self.mean += A.sum(dim=(0, 2), dtype=F64)
        Gb = G.sum(dim=-1).reshape(-1, self.m).to(F64) * s.unsqueeze(1)  # (B·c, m): Σ_p n_p
        self.bias += Gb.T @ Gb


def _gram_sum(T: Tensor, scale: Tensor | None = None) -> Tensor:
    """``Σ_n s_n² T_n T_nᵀ`` (d, d) float64 for T (N, d, P), by whichever form copies least.

    Products over the P positions of one row may run in T's dtype (each is one short inner
    product); the weights s_n² (float64, any magnitude) and the sum over rows are float64.
    """
    N, d, P = T.shape
    if P == 1 or d > P:  # one float64 product (d, N·P) @ (N·P, d)
        X = T.to(F64)
        if scale is not None:
            X = X * scale.view(N, 1, 1)
        X = X.reshape(N, d) if P == 1 else X.transpose(1, 2).reshape(N * P, d)
        return X.T @ X
    out = torch.zeros((d, d), dtype=F64, device=T.device)
    step = max(1, (1 << 22) // max(1, d * d))
    for i in range(0, N, step):  # workspace-bounded blocks of rows, not one row at a time
        t = T[i : i + step]
        g = torch.bmm(t, t.mT).to(F64)  # (rows, d, d): batched products of the (d, P) slices
        if scale is not None:
            g = g * scale[i : i + step].square().view(-1, 1, 1)
        out += g.sum(0)
    return out


def kfac_factors(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    layers: Sequence[str] | str | None = None,
    fisher: FisherMode | str = "exact",
    batch_size: int | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    mc_samples: int = 1,
    loss: str = "ce",
) -> FactorSet:
    """E[M] and E[xxᵀ] of every selected Linear/Conv layer, in one pass over the examples.

    Wu et al. 2020, Eqs. 5-6 (Linear), Eqs. 30-37 (convolution: Ẽ[M] with 1/P, Eq. 35; E[XXᵀ]
    summed over positions, Eq. 37). E[M] = E[Gᵀ A G] (Eq. 23) is exact (all c rows of the
    output-Hessian square root Q, Eq. 27, backpropagated in one batched backward) or, with
    ``fisher="mc"``, a Monte-Carlo estimate from sampled labels.

    Args:
        model: the network, in eval mode (BatchNorm with running statistics: a fixed affine map;
            batch statistics would couple the examples). Its parameters are not changed.
        x: inputs (N, ...); y: targets (N, ...) (ce: int64 labels, unused by ``"exact"``;
            mse and bce need none of them; token-ce counts the positions not -100).
        layers: module names or globs (None: every Linear/Conv1d/Conv2d with a trainable weight).
        fisher: ``"exact"`` or ``"mc"``.
        batch_size: examples per forward (None: what fits a fixed 1 GiB budget, at most 1024).
        seed: seeds the sampled labels of ``"mc"``.
        progress: ``progress("kfac factors", examples done, N)``.
        mc_samples: labels drawn per example for ``"mc"``.
        loss: ``"ce"`` (default), ``"mse"``, ``"bce"`` or ``"token-ce"``: E[M] from the loss's
            closed-form output Hessian (mse: 2/D I; bce: diag(σ(z) σ(-z)) / D; token-ce: one
            diag(p) - p pᵀ per counted position, weighted N / C so that E[M] is that of the
            sample loss, the mean over all C counted positions). ``"mc"`` needs ``"ce"``.

    Returns:
        ``{module name: LayerFactors}`` in model order (a :class:`FactorSet`), and in its
        ``skipped`` the layers it cannot follow, with why: a weight tied to another module's, a
        weight read outside the layer's own forward (``nn.MultiheadAttention`` reads its
        ``out_proj`` weight in its own forward), a layer the forward never calls. Sequence
        models: the positions of a sequence play the role of a convolution's positions (Wu et
        al. 2020, App. A.2: E[xxᵀ] summed over positions, Ẽ[M] with 1/P).

    Raises:
        UsageError: a BatchNorm in training mode, a layer pattern that matches nothing, a bad
            option, or a model the capture cannot follow (a parameter shared by two modules,
            a module returning a tuple, outputs that are not (N, K) logits).
    """
    try:
        fisher = FisherMode(fisher)
    except ValueError:
        raise UsageError(f"fisher must be 'exact' or 'mc'. Got {fisher!r}.") from None
    if mc_samples < 1:
        raise UsageError(f"mc_samples must be >= 1. Got {mc_samples}.")
    if loss not in ("ce", "mse", "bce", "token-ce"):
        raise UsageError(
            f"K-FAC needs a closed-form output Hessian: loss ce, mse, bce or token-ce; got {loss}"
        )
    if loss != "ce" and fisher is not FisherMode.EXACT:
        raise UsageError(f"fisher='mc' samples class labels (loss ce); loss {loss} needs 'exact'")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch_size must be >= 1. Got {batch_size}.")
    if has_batch_statistics(model):
        raise UsageError(
            "a BatchNorm uses batch statistics (training mode): K-FAC factors need the model in "
            "eval mode (running statistics fixed, as Wu et al. 2020 do); call model.eval()"
        )
    progress = progress or no_progress
    names = factored_layers(model, layers)
    if not names:
        raise UsageError("the model has no Linear or Conv2d layer with a trainable weight")
    modules = dict(model.named_modules())
    skipped = _tied_layers(model, names)
    names = [n for n in names if n not in skipped]
    params = [f"{n}.weight" if n else "weight" for n in names]
    try:
        targets = [t for t in plan(model, params) if t.name in set(names)]
    except CaptureUnsupported as e:
        raise UsageError(f"K-FAC cannot follow this model: {e}") from e
    p0 = next(iter(model.parameters()))
    device, dtype = p0.device, p0.dtype
    N = int(x.shape[0])
    if N == 0 or y.shape[0] != N:
        raise UsageError(
            f"x and y must hold the same positive number of examples. Got {N} and {y.shape[0]}."
        )
    skipped.update(_unfollowed_layers(model, targets, move_inputs(x[:2], device, dtype)))
    targets = [t for t in targets if t.name not in skipped]
    if not targets:
        reasons = "; ".join(f"{n}: {why}" for n, why in skipped.items())
        raise UsageError(f"K-FAC can follow no layer of this model ({reasons})")
    if batch_size is None:
        with torch.no_grad():
            z1 = model(move_inputs(x[:1], device, dtype))
            K = int(z1.shape[-1] if loss == "ce" else z1[0].numel())
        batch_size = _chunk_size(model, x[:1], K if fisher is FisherMode.EXACT else mc_samples)
    scale = 1.0
    if loss == "token-ce":  # example n's term is N / C Σ_t ce_nt: the sample loss's weights
        scale = N / max(1, int((y != IGNORE_INDEX).sum()))
    acc = {t.name: _Accumulator(t, device) for t in targets}
    stacked = False
    recorder = Recorder(targets)
    # under torchrun each process sums its contiguous shard; one all-reduce completes the sums
    first, last = distributed.shard_bounds(N)
    try:
        done = first
        while done < last:
            stop = min(last, done + batch_size)
            xb = move_inputs(x[done:stop], device, dtype)
            yb = y[done:stop].to(device)
            try:
                grads, inputs, s = _one_batch(
                    model,
                    recorder,
                    targets,
                    xb,
                    yb,
                    fisher,
                    mc_samples,
                    seed,
                    done,
                    stacked,
                    (loss, scale),
                )
            except CaptureUnsupported as e:
                raise UsageError(f"K-FAC cannot follow this model: {e}") from e
            except RuntimeError as e:
                message = str(e).lower()
                if stacked or ("batch" not in message and "vmap" not in message):
                    raise
                stacked = True  # an op without a vmap rule: one backward of the stacked batch
                continue
            for t, gs, ins in zip(targets, grads, inputs, strict=True):
                if ins:
                    acc[t.name].add(t.module, ins, gs, s)
            done += xb.shape[0]
            progress("kfac factors", done - first, last - first)
    finally:
        recorder.remove()
    if distributed.active():
        sums = [t for a in acc.values() for t in (a.em, a.exx, a.mean, a.bias)]
        reduced = iter(distributed.all_reduce_sum(sums))  # one collective for every layer
        for a in acc.values():
            a.em, a.exx, a.mean, a.bias = (next(reduced) for _ in range(4))
            a.P = int(distributed.all_reduce_max(a.P))  # 0 on a process with no examples
    out = FactorSet(skipped=skipped)
    for t in targets:
        a = acc[t.name]
        P = max(a.P, 1)
        has_bias = getattr(t.module, "bias", None) is not None
        out[t.name] = LayerFactors(
            name=t.name,
            kind=_kind_name(modules[t.name]),
            shape=(a.m, a.n),
            positions=P,
            em=a.em / N,
            exx=a.exx / N,
            bias=has_bias,
            mean_x=a.mean / (N * P),
            bias_block=a.bias / N if has_bias else None,
            examples=N,
            fisher=fisher.value,
        )
    return out


class FactorSet(dict):
    """``{layer name: LayerFactors}`` with ``skipped``: ``{layer name: why it is not factored}``."""

    def __init__(self, *args: object, skipped: dict[str, str] | None = None) -> None:
        super().__init__(*args)
        self.skipped: dict[str, str] = dict(skipped or {})


def _tied_layers(model: nn.Module, names: list[str]) -> dict[str, str]:
    """The layers of ``names`` whose weight another module also holds (tied weights)."""
    holders: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append(f"{mod_name}.{attr}" if mod_name else attr)
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        own = f"{name}.weight" if name else "weight"
        others = [h for h in holders[id(modules[name].weight)] if h != own]
        if others:
            out[name] = f"its weight is tied to {others[0]}"
    return out


def _unfollowed_layers(model: nn.Module, targets: list[Target], x: Tensor) -> dict[str, str]:
    """One recorded forward of ``x`` that does not stop at a weight read outside its layer's
    forward: those layers and the never-called ones, with why."""
    recorder = Recorder(targets, strict=False)
    try:
        record_forward(model, recorder, x)
    except CaptureUnsupported as e:
        raise UsageError(f"K-FAC cannot follow this model: {e}") from e
    finally:
        recorder.remove()
    out = {}
    modules = dict(model.named_modules())
    for name, why in recorder.misused.items():
        parent = modules.get(name.rpartition(".")[0]) if "." in name else None
        if isinstance(parent, nn.MultiheadAttention):
            why += " (nn.MultiheadAttention reads out_proj.weight in its own forward)"
        out[name] = why
    for t in targets:
        if not t.calls and t.name not in out:
            out[t.name] = "the forward never calls it"
        t.calls = []
    return out


def _one_batch(
    model: nn.Module,
    recorder: Recorder,
    targets: list[Target],
    x: Tensor,
    y: Tensor,
    fisher: FisherMode,
    mc_samples: int,
    seed: int,
    start: int,
    stacked: bool,
    head: tuple[str, float] = ("ce", 1.0),
) -> tuple[list[list[Tensor]], list[list[Tensor]], Tensor]:
    """Output gradients (B, c, ...) and inputs (c, ...) of every target, and the scales (B, c)."""
    c = x.shape[0]
    if not stacked:
        z = record_forward(model, recorder, x)
        cot, s = _cotangents(z, y, fisher, mc_samples, seed, start, *head)
        grads = backward_to_outputs(z, targets, cot, batched=True)
        inputs = [[args[0].detach() for args, _, _, _ in t.calls] for t in targets]
    else:
        # the batch repeated B times, one backward: row b of example n is example b·c + n
        with torch.no_grad():
            z0 = model(x)
        cot, s = _cotangents(z0, y, fisher, mc_samples, seed, start, *head)
        B = cot.shape[0]
        z = record_forward(model, recorder, x.repeat(B, *([1] * (x.dim() - 1))))
        flat = backward_to_outputs(z, targets, cot.reshape(B * c, *z0.shape[1:]))
        grads = [[g.reshape(B, c, *g.shape[1:]) for g in gs] for gs in flat]
        inputs = [[args[0].detach()[:c] for args, _, _, _ in t.calls] for t in targets]
    for t in targets:
        t.calls = []
    return grads, inputs, s


# --------------------------------------------------------------------------- analysis


def kron_top(lam: Tensor, mu: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k eigenvalues of E[M] ⊗ E[xxᵀ] merged from the factors' (Wu et al. 2020, App. C).

    The eigenpairs of A ⊗ B are (λ_i μ_j, u_i ⊗ v_j). Returns ``(values (k,), i (k,), j (k,))``
    in descending order of λ_i μ_j (ties by index order, stable).
    """
    prod = (lam.unsqueeze(1) * mu.unsqueeze(0)).reshape(-1)
    k = min(k, prod.numel())
    order = torch.argsort(prod, descending=True, stable=True)[:k]
    return prod[order], order // mu.numel(), order % mu.numel()


def kron_eigenvectors(U: Tensor, V: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """(mn, k) columns ``u_{i_r} ⊗ v_{j_r}`` = ``(u v^T).flatten()`` (small layers only)."""
    return (U[:, i].T.unsqueeze(2) * V[:, j].T.unsqueeze(1)).reshape(len(i), -1).T


def kron_matvec(em: Tensor, exx: Tensor, v: Tensor) -> Tensor:
    """``(E[M] ⊗ E[xxᵀ]) v`` for columns v (mn, k): ``vec(E[M] Mat(v) E[xxᵀ]ᵀ)`` per column."""
    m, n = em.shape[0], exx.shape[0]
    Vm = v.T.reshape(-1, m, n)
    return (em @ Vm @ exx.T).reshape(-1, m * n).T


def overlap_curve(gram: Tensor) -> Tensor:
    """Overlap(U_k, V_k) = ‖U_kᵀ V_k‖_F² / k for k = 1..K (Wu et al. 2020, Def. 4.1, Eq. 7).

    Args:
        gram: (K, K) inner products ``U^T V`` of two orthonormal sets of K vectors, each
            ordered by its eigenvalues (descending).

    Returns:
        (K,) float64: entry k−1 the overlap of the two top-k subspaces.
    """
    sq = gram.to(F64) ** 2
    prefix = sq.cumsum(0).cumsum(1)
    K = min(gram.shape)
    ks = torch.arange(1, K + 1, dtype=F64, device=gram.device)
    return prefix.diagonal()[:K] / ks


def eigenbasis_coefficients(H: Tensor, U: Tensor, V: Tensor, shape: tuple[int, int]) -> Tensor:
    """``C[l] = Uᵀ Mat(h_l) V`` (K, m, n) for the columns h_l of H (mn, K).

    Mat(h) is the m × n matricisation of Wu et al. 2020, Def. 4.2, with index (i−1)n + j (the
    order of ``weight.flatten()``). ``C[l, a, b] = ⟨h_l, u_a ⊗ v_b⟩``.
    """
    m, n = shape
    mats = H.T.to(F64).reshape(-1, m, n)
    return U.T @ mats @ V


def correspondence(coeff: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvector correspondence matrices (Wu et al. 2020, §4.2, Fig. 3).

    From ``coeff = eigenbasis_coefficients(H, U, V)`` (complete orthonormal U, V):
    ``corr_u[i, l] = ‖Mat(h_l)ᵀ u_i‖²`` and ``corr_v[i, l] = ‖Mat(h_l) v_i‖²``.

    Returns:
        ``(corr_u (m, K), corr_v (n, K))``.
    """
    sq = coeff**2
    return sq.sum(dim=2).T, sq.sum(dim=1).T


def rank1_scores(H: Tensor, shape: tuple[int, int]) -> Tensor:
    """σ₁(Mat(h_l)) / ‖Mat(h_l)‖_F for the columns h_l of H (Wu et al. 2020, §5.2, Fig. 6)."""
    m, n = shape
    mats = H.T.to(F64).reshape(-1, m, n)
    sv = torch.linalg.svdvals(mats)
    return sv[:, 0] / torch.linalg.matrix_norm(mats).clamp_min(torch.finfo(F64).tiny)


def input_structure(f: LayerFactors) -> tuple[float, float]:
    """``(‖E[x]E[x]ᵀ‖ / ‖Σ_x‖, |⟨Ê[x], v₁⟩|)``: Wu et al. 2020, Eq. 8 (Table 6) and Table 7.

    Spectral norms; Σ_x = E[xxᵀ] − E[x]E[x]ᵀ. For a convolution x is the unfolded patch at a
    uniformly drawn position (E[xxᵀ] = E[XXᵀ]/P); v₁ is E[xxᵀ]'s top eigenvector. An infinite
    ratio (Σ_x = 0) is returned as ``inf``.
    """
    mu = f.mean_x
    exx = f.exx / f.positions
    sigma = exx - torch.outer(mu, mu)
    top_sigma = float(torch.linalg.eigvalsh(sigma)[-1])
    mean_sq = float(mu @ mu)
    ratio = mean_sq / top_sigma if top_sigma > 0 else math.inf
    v1 = torch.linalg.eigh(f.exx)[1][:, -1]
    norm = math.sqrt(mean_sq)
    align = abs(float(mu @ v1)) / norm if norm > 0 else 0.0
    return ratio, align


def outlier_gap(values: Tensor, rel_floor: float = 1e-12) -> int | None:
    """Where a descending spectrum has its largest gap: i maximising λ_i / λ_{i+1} (1-based i).

    The number of outliers above the bulk (about c, Wu et al. 2020, §4.4). Values below
    ``rel_floor · λ_1`` count as that floor. None for fewer than two positive values.
    """
    v = values.to(F64)
    if v.numel() < 2 or float(v[0]) <= 0:
        return None
    v = v.clamp_min(float(v[0]) * rel_floor)
    ratio = v[:-1] / v[1:]
    return int(torch.argmax(ratio)) + 1


def decoupling_error(
    block: object, f: LayerFactors, probes: int = 20, seed: int = 0
) -> tuple[float, float, int]:
    """‖H − E[M] ⊗ E[xxᵀ]‖_F / ‖H‖_F matrix-free, with a standard error.

    Hutchinson-style with Rademacher probes v: ‖A‖_F² = E‖Av‖² for A = H − K and A = H, where
    Hv is one product of the exact layer block ``block`` (a curvature operator restricted to the
    layer's weight) and Kv = vec(E[M] Mat(v) E[xxᵀ]) (no mn × mn matrix). The ratio of the two
    means, then its square root; the standard error by the delta method over the probes. Not in
    Wu et al. 2020: it summarises how well their Eq. 6 holds.

    Returns:
        ``(error, stderr, probes)``.
    """
    m, n = f.shape
    g = torch.Generator().manual_seed(seed)
    V = (torch.randint(0, 2, (m * n, probes), generator=g, dtype=F64) * 2 - 1).to(f.em.device)
    HV = block.matmat(V.to(dtype=block.dtype, device=block.device)).to(F64)  # type: ignore[attr-defined]
    KV = kron_matvec(f.em, f.exx, V)
    d = ((HV - KV) ** 2).sum(0)
    h = (HV**2).sum(0)
    md, mh = float(d.mean()), float(h.mean())
    if mh <= 0:
        return math.nan, math.nan, probes
    ratio = md / mh
    if probes > 1:
        vd, vh = float(d.var()), float(h.var())
        cov = float(((d - md) * (h - mh)).sum()) / (probes - 1)
        var = (vd / mh**2 - 2 * md * cov / mh**3 + md**2 * vh / mh**4) / probes
        se_ratio = math.sqrt(max(var, 0.0))
    else:
        se_ratio = math.nan
    err = math.sqrt(ratio)
    se = se_ratio / (2 * err) if err > 0 else se_ratio
    return err, se, probes
