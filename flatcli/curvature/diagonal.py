"""The diagonal of the Hessian (or of the generalized Gauss-Newton matrix) of the mean loss.

Three methods, all for the mean loss ``L = 1/N Σ_n loss(f(x_n), y_n)`` over the given examples:

- ``"hutchinson"``: ``E[z ⊙ H z]`` over Rademacher probes z with exact Hessian-vector products
  (``flatcli.curvature.operators.make_operator`` + ``trace.hutchinson_diagonal``). The probes are
  split into ``groups`` independently seeded groups so that a nonlinear function of the diagonal
  (normalized sharpness) can get a jackknife standard error. Tsuzuku et al. 2020, Algorithm 1,
  uses Gaussian probes and finite differences of gradients; Rademacher probes have lower variance
  (a probe's entry i has variance ``Σ_{j≠i} H_ij²`` against ``H_ii² + Σ_j H_ij²``) and exact
  products have no step-size bias.
- ``"ggn"``: the exact diagonal of ``G = 1/N Σ_n J_nᵀ Λ_n J_n`` (J_n the per-example Jacobian of the
  logits, Λ_n the Hessian of the loss head wrt the logits, the same matrix as
  ``make_operator("ggn")``). With the eigendecomposition ``Λ_n = Σ_k λ_nk u_nk u_nkᵀ`` (K × K per
  example), ``diag(G) = 1/N Σ_n Σ_k λ_nk (J_nᵀ u_nk)²``: per-example Jacobians by ``vmap(jacrev)``
  over chunks of examples, no loop over parameters. Cost: K backward passes per example, memory
  ``chunk · K · P``.
- ``"exact"``: the exact Hessian diagonal from ``P`` Hessian-vector products with the unit
  vectors (in blocks): for small models and tests. One product is timed first; the estimated
  cost (P products, and P times that product's time) is reported through ``progress`` before the
  rest runs, progress is reported after every block, and an estimate above
  :data:`EXACT_MAX_SECONDS` is refused unless ``force=True``.

Under ``torchrun`` every method is data-parallel like the operators (:mod:`flatcli.distributed`):
each process sums its contiguous shard of the examples and one all-reduce completes the sum.

Every method walks over the examples with :func:`flatcli.curvature.data.iter_chunks`; the
Hessian methods can reuse an operator built once (``operator=``, a
:class:`~flatcli.curvature.operators.CurvatureOperator` or a block of one).

Values are float64 tensors of each parameter's shape, unclipped (consumers clip).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import hessian, vjp, vmap

from flatcli import distributed
from flatcli.configs.sharpness import DiagMethod
from flatcli.curvature._functional import (
    FunctionalModel,
    attention_kernel,
    head_loss,
    quiet_jit_warning,
)
from flatcli.curvature._ggn_capture import captured_ggn_diagonal
from flatcli.curvature.capture import CaptureUnsupported, plan
from flatcli.curvature.data import iter_chunks
from flatcli.curvature.losses import IGNORE_INDEX, output_hessian_sqrt, sample_loss
from flatcli.curvature.memory import ACTIVATION_FACTOR, activation_bytes_per_example, cpu_chunk
from flatcli.curvature.operators import CurvatureOperator, OperatorBlock, make_operator
from flatcli.curvature.params import select_parameters, unflatten
from flatcli.curvature.trace import hutchinson_diagonal
from flatcli.errors import UsageError
from flatcli.progress import ProgressFn, format_seconds, no_progress

__all__ = [
    "DiagMethod",
    "CurvatureDiagonal",
    "curvature_diagonal",
    "exact_diagonal",
    "format_seconds",
    "ggn_diagonal",
    "group_seed",
]

EXACT_MAX_SECONDS = 3600.0
"""``method="exact"`` (one HVP per parameter) refuses an estimated time above this unless forced."""

EXACT_BLOCK = 64
"""Unit vectors per product block of ``method="exact"`` (progress is reported per block)."""

GGN_WORKSPACE_BYTES = 256 * 2**20
"""Memory for one block of per-(example, head row) gradients (rows · P numbers) and their
backward in ``ggn_diagonal``'s fallback."""
CAPTURE_BUDGET = 1 << 30
"""Bytes of activations (one copy of an example per head row) a captured-diagonal block may
use."""
CAPTURE_WORKSPACE = 1 << 24
"""Elements a block of per-(example, logit) weight gradients may hold."""


@dataclass(frozen=True)
class CurvatureDiagonal:
    """A curvature diagonal per parameter.

    Attributes:
        values: ``{name: float64 tensor of the parameter's shape}`` (the estimate).
        stderr: per-entry standard errors (Hutchinson) or None (exact methods).
        group_values: Hutchinson only: ``(groups, dim)`` float64, the mean of each probe group
            (flat, in ``values`` order), for jackknife errors of nonlinear functions.
        method: "hutchinson", "ggn" or "exact".
        matrix: "hessian" or "ggn".
        products: curvature-vector products spent (0 for "ggn").
        probes: Hutchinson probes (0 otherwise).
        seconds: wall time.
        estimated_seconds: "exact" only: the time estimated up front from one timed product.
    """

    values: dict[str, Tensor]
    stderr: dict[str, Tensor] | None
    group_values: Tensor | None
    method: str
    matrix: str
    products: int
    probes: int
    seconds: float
    estimated_seconds: float | None = None

    def describe(self) -> dict[str, Any]:
        """Settings for a report (JSON-ready)."""
        out = {
            "method": self.method,
            "matrix": self.matrix,
            "products": self.products,
            "probes": self.probes,
            "groups": 0 if self.group_values is None else int(self.group_values.shape[0]),
            "seconds": self.seconds,
        }
        if self.estimated_seconds is not None:
            out["estimated_seconds"] = self.estimated_seconds
        return out


def group_seed(seed: int, group: int) -> int:
    """An independent seed for probe group ``group`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(group)]).generate_state(1)[0])


def exact_diagonal(
    op: Any,
    block: int = EXACT_BLOCK,
    *,
    progress: ProgressFn | None = None,
    max_seconds: float | None = None,
) -> Tensor:
    """``diag(A)`` of an operator from products with unit vectors, ``block`` columns at a time.

    The first product (with ``e_0``, and a second with ``e_1``: the first may build a cached
    graph) is timed alone, and ``dim`` times that time is the estimated cost. It is reported as
    ``progress("exact diagonal: P products ..., about T", done, P)`` before the rest runs, and
    after every block.

    Args:
        op: any ``LinearOperator`` (``dim``, ``dtype``, ``device``, ``matmat``).
        block: unit vectors per product block.
        progress: optional ``(description, done, total)`` callback, counted in products.
        max_seconds: refuse (UsageError) when the estimated time exceeds this (None: never).

    Returns:
        The float64 diagonal, shape ``(dim,)``, on the CPU.
    """
    return _exact_diagonal(op, block, progress or no_progress, max_seconds)[0]


def _exact_diagonal(
    op: Any, block: int, progress: ProgressFn, max_seconds: float | None
) -> tuple[Tensor, float]:
    """:func:`exact_diagonal` and its estimated seconds."""
    dim = int(op.dim)
    out = torch.empty(dim, dtype=torch.float64)

    def run(a: int, b: int) -> float:
        start = time.perf_counter()
        eye = torch.zeros((dim, b - a), dtype=op.dtype, device=op.device)
        idx = torch.arange(a, b, device=op.device)
        eye[idx, idx - a] = 1
        cols = op.matmat(eye)
        out[a:b] = cols[idx, idx - a].double().cpu()
        return time.perf_counter() - start

    timed = min(dim, 2)
    per_product = min(run(i, i + 1) for i in range(timed))
    if getattr(op, "data_parallel", False):  # every process must take the same decision
        per_product = distributed.all_reduce_max(per_product)
    estimate = per_product * dim
    if max_seconds is not None and estimate > max_seconds:
        raise UsageError(
            f"The exact Hessian diagonal needs one Hessian-vector product per parameter: "
            f"{dim:,} products at {per_product:.3g} s each (one timed), about "
            f"{format_seconds(estimate)}. Pass --force (force=True in Python) to run it "
            "anyway, or use diag method 'ggn' (exact for piecewise-linear networks) or "
            "'hutchinson'."
        )
    description = (
        f"exact diagonal: {dim:,} products (one per parameter), about {format_seconds(estimate)}"
    )
    progress(description, timed, dim)
    for a in range(timed, dim, max(1, int(block))):
        b = min(dim, a + max(1, int(block)))
        run(a, b)
        progress(description, b, dim)
    return out, estimate


def ggn_diagonal(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: Callable[..., Tensor] | str = "ce",
    params: Sequence[str] | str | None = None,
    batch_size: int | None = None,
    head_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Exact diagonal of the GGN ``1/N Σ_n J_nᵀ Λ_n J_n`` of the mean loss (float64 per parameter).

    Args:
        model: the network (evaluated in its current mode; per-example vmap needs eval-mode
            BatchNorm).
        x, y: examples and int64 labels.
        loss_fn: per-example loss head or a loss name ("ce", "nsce", "token-ce", "mse",
            "bce"; a name is :func:`flatcli.curvature.losses.sample_loss`: the sample loss).
        params: parameter names/patterns (default all with requires_grad).
        batch_size: rows per forward (each example is forwarded once per row of its head
            factor: K rows, T·V for token logits); default fits ``CAPTURE_BUDGET`` bytes of
            activations (``GGN_WORKSPACE_BYTES`` of per-row gradients on the fallback path,
            where ``batch_size`` is the examples per chunk).
        head_dtype: dtype of the head Hessian and the accumulation (default float64).

    The head Hessian of example n is factored as ``Λ_n = Σ_r w_nr q_nr q_nrᵀ`` (:class:`_HeadRows`):
    by ``eigh`` of the K × K matrix from autograd for a general head, and in closed form for the
    ``token-ce`` sample loss, whose head Hessian is block diagonal over the T positions (one
    ``diag(p_t) − p_t p_tᵀ`` each, :func:`~flatcli.curvature.losses.output_hessian_sqrt`): its
    T·V rows are formed a block at a time, never the (T·V)² matrix. The rows are
    backpropagated in blocks whose memory is bounded (the activations of a block of copies,
    or a block of per-row gradients), so memory does not grow with T·V; the work does (T·V
    backward rows per sequence, as the exact diagonal needs).

    The layer capture (:mod:`flatcli.curvature._ggn_capture`) forms squared per-example
    gradients layer by layer; a model it cannot capture (a parameter used outside its module's
    forward, batch statistics) falls back to per-example gradients of the head rows by
    ``vmap`` of a ``vjp``.
    """
    if isinstance(loss_fn, str):
        loss_fn = sample_loss(loss_fn, y)
    names = select_parameters(model, params)
    fm = FunctionalModel(model, names)
    n = int(x.shape[0])
    if n == 0 or n != int(y.shape[0]):
        raise UsageError(f"Need matching, non-empty x and y; got {n} and {int(y.shape[0])}.")
    hd = head_dtype or torch.float64
    with torch.no_grad():
        first = next(iter_chunks(x, None, 1, fm.device, fm.dtype))
        k = int(fm(fm.params, first.x)[0].numel())  # K outputs (T * V for token logits)
    a, b = distributed.shard_bounds(n)  # (0, n) in one process; this rank's share under torchrun
    factor = _head_factor(loss_fn, hd, k)

    try:
        targets = plan(model, names)
        size, rows = _capture_blocks(model, x, k, batch_size)
        chunks = iter_chunks(x, y, size, fm.device, fm.dtype, start=a, stop=b)
        out = captured_ggn_diagonal(
            model, targets, chunks, factor, hd, rows=rows, workspace=CAPTURE_WORKSPACE
        )
    except CaptureUnsupported:  # e.g. a parameter used outside its module: per-example rows
        out = _jacobian_ggn_diagonal(fm, x, y, factor, hd, k, batch_size, a, b)
    out = distributed.all_reduce_sum(out)  # one collective; the identity in one process
    return {name: (out[name] / n).double().cpu() for name in fm.params}


class _HeadRows:
    """A chunk's head Hessians as weighted rows: ``Λ_n = Σ_r w_nr q_nr q_nrᵀ``, r < ``count``.

    :meth:`block` gives rows ``r0:r1`` of every example: weights (B, r) and rows
    (B, r, *out) in the head dtype. The general form is the ``eigh`` of each example's K × K
    head Hessian (weights the eigenvalues); :class:`_TokenRows` is the closed form of
    ``token-ce``.
    """

    def __init__(self, lam: Tensor, u: Tensor, out_shape: tuple[int, ...]) -> None:
        self.lam, self.u, self.out_shape = lam, u, out_shape  # (B, K), (B, K, K): u[:, :, r]
        self.count = int(lam.shape[1])

    def block(self, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        """Weights (B, r1 - r0) and rows (B, r1 - r0, *out) ``r0:r1``."""
        rows = self.u[:, :, r0:r1].transpose(1, 2)
        return self.lam[:, r0:r1], rows.reshape(rows.shape[0], r1 - r0, *self.out_shape)


class _TokenRows(_HeadRows):
    """The ``token-ce`` sample loss's head Hessian in closed form, T·V rows per sequence.

    Example n's term is ``s Σ_t counted_nt ce(z_nt, y_nt)`` (``s = N / C``), whose Hessian is
    block diagonal: ``s counted_nt (diag(p_nt) − p_nt p_ntᵀ)`` at position t. Row ``(t, c)``
    (r = t·V + c) lives at position t only: ``sqrt(s counted_nt) Q_nt[c]`` with ``Q`` of
    :func:`~flatcli.curvature.losses.output_hessian_sqrt` (exact for confident tokens), weight
    1. A block forms the rows of its positions only.
    """

    def __init__(self, z: Tensor, y: Tensor, scale: float) -> None:
        b, self.T, self.V = z.shape
        self.z = z
        self.out_shape = (self.T, self.V)
        self.count = self.T * self.V
        counted = (y != IGNORE_INDEX).to(z.dtype)
        self.weight = (counted * scale).sqrt()  # (B, T)

    def block(self, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        """Weights (B, r1 - r0) and rows (B, r1 - r0, T, V) ``r0:r1``."""
        V, z = self.V, self.z
        t0, t1 = r0 // V, (r1 - 1) // V + 1
        q = output_hessian_sqrt(z[:, t0:t1].reshape(-1, V))  # (B (t1 - t0), V, V)
        q = q.reshape(z.shape[0], (t1 - t0) * V, V)[:, r0 - t0 * V : r1 - t0 * V]
        pos = torch.arange(r0, r1, device=z.device) // V  # each row's position
        q = q * self.weight[:, pos].unsqueeze(-1)
        rows = z.new_zeros((z.shape[0], r1 - r0, self.T, V))
        rows[:, torch.arange(r1 - r0, device=z.device), pos] = q
        return z.new_ones((z.shape[0], r1 - r0)), rows


HeadFactor = Callable[[Tensor, Tensor], _HeadRows]
"""``factor(outputs (B, ...) in the head dtype, targets) -> _HeadRows`` of the chunk."""


def _head_factor(loss_fn: Callable[..., Tensor], hd: torch.dtype, k: int) -> HeadFactor:
    """How a chunk's head Hessians are factored into rows: in closed form for the ``token-ce``
    sample loss (:func:`~flatcli.curvature.losses.sample_loss` carries its weight), else by
    ``eigh`` of the K × K head Hessian from autograd."""
    scale = getattr(loss_fn, "scale", None)
    if getattr(loss_fn, "loss_name", None) == "token-ce" and scale is not None:
        return lambda z, y: _TokenRows(z, y, float(scale))
    loss = head_loss(loss_fn, hd)

    def head_one(z: Tensor, yi: Tensor) -> Tensor:
        return loss(z.unsqueeze(0), yi.unsqueeze(0)).squeeze(0)

    head_hess = vmap(hessian(head_one), in_dims=(0, 0))

    def factor(z: Tensor, y: Tensor) -> _HeadRows:
        with quiet_jit_warning():  # the head Hessian's first forward-mode AD call
            lam, u = torch.linalg.eigh(head_hess(z, y).reshape(z.shape[0], k, k))
        return _HeadRows(lam, u, tuple(z.shape[1:]))

    return factor


def _capture_blocks(model: nn.Module, x: Tensor, k: int, batch_size: int | None) -> tuple[int, int]:
    """``(examples per chunk, head rows per block)`` of the captured diagonal, whose forward
    holds one copy of each example per row: ``batch_size`` copies when given, else copies that
    fit ``CAPTURE_BUDGET`` (and, on the CPU, :func:`~flatcli.curvature.memory.cpu_chunk`
    copies, unless one example's K rows fit the budget: then K). All K rows of an example
    when they fit (several examples per chunk), else one example per chunk and its rows in
    blocks."""
    if batch_size:
        copies = int(batch_size)
    else:
        per = 4 * activation_bytes_per_example(model, tuple(x.shape[1:]), x.dtype)
        copies = max(1, CAPTURE_BUDGET // max(1, per))
        if x.device.type == "cpu" and next(model.parameters()).device.type == "cpu":
            copies = min(copies, max(cpu_chunk(model, x), min(k, copies)))
    if copies >= k:
        return max(1, min(int(x.shape[0]), copies // k)), k
    return 1, max(1, copies)


def _jacobian_ggn_diagonal(
    fm: FunctionalModel,
    x: Tensor,
    y: Tensor,
    factor: HeadFactor,
    hd: torch.dtype,
    k: int,
    batch_size: int | None,
    a: int,
    b: int,
) -> dict[str, Tensor]:
    """``Σ_n Σ_r w_nr (J_nᵀ q_nr)²`` over examples a:b: per-example gradients of a block of head
    rows at a time (``vmap`` over the examples of a ``vmap`` over rows of one ``vjp``), never
    the (K, P) Jacobian. A block's rows and examples hold at most ``GGN_WORKSPACE_BYTES`` of
    gradients and their backward."""

    def rows_one(p: dict[str, Tensor], xi: Tensor, qi: Tensor) -> dict[str, Tensor]:
        _, pull = vjp(lambda q: fm(q, xi.unsqueeze(0)).squeeze(0), p)
        return vmap(lambda u: pull(u)[0])(qi)  # {name: (rows, *shape)}

    grads = vmap(rows_one, in_dims=(None, 0, 0))
    dim = sum(p.numel() for p in fm.params.values())
    size = torch.empty((), dtype=fm.dtype).element_size()
    act = activation_bytes_per_example(fm.model, tuple(x.shape[1:]), x.dtype)
    per_row = dim * size + ACTIVATION_FACTOR * act  # a row's gradient and its backward
    fit = max(1, int(GGN_WORKSPACE_BYTES // max(per_row, 1)))
    if batch_size is None:
        batch_size = max(1, min(b - a, fit // k))
    rows = max(1, min(k, fit // int(batch_size)))
    out = {name: torch.zeros(p.shape, dtype=hd, device=fm.device) for name, p in fm.params.items()}
    for chunk in iter_chunks(x, y, batch_size, fm.device, fm.dtype, start=a, stop=b):
        with torch.no_grad():
            z = fm(fm.params, chunk.x).to(hd)
        head = factor(z, chunk.y)
        for r0 in range(0, head.count, rows):
            w, q = head.block(r0, min(head.count, r0 + rows))  # (B, r), (B, r, *out)
            # the math attention kernel has batching rules (the fused ones loop under vmap)
            with attention_kernel("math"):
                per = grads(fm.params, chunk.x, q.to(fm.dtype))  # {name: (B, r, *shape)}
            weights = w.reshape(-1).to(fm.dtype)
            for name in list(per):
                g = per.pop(name).reshape(weights.numel(), -1)  # (B r, P_name)
                # squares in the model's dtype (a float64 copy of every row cost more than
                # the backward), their weighted sum over the block's rows added in ``hd``
                out[name] += torch.mv((g * g).T, weights).to(hd).view(out[name].shape)
    return out


def curvature_diagonal(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    method: DiagMethod | str = DiagMethod.HUTCHINSON,
    loss_fn: Callable[..., Tensor] | str = "nsce",
    params: Sequence[str] | str | None = None,
    probes: int = 100,
    groups: int = 10,
    batch_size: int | None = None,
    head_dtype: torch.dtype | None = None,
    seed: int = 0,
    operator: CurvatureOperator | OperatorBlock | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> CurvatureDiagonal:
    """The Hessian diagonal (``"hutchinson"``, ``"exact"``) or the GGN diagonal (``"ggn"``).

    Args:
        model, x, y: network (eval mode) and examples of the mean loss.
        method: see the module docstring.
        loss_fn: per-example loss head or its name (default the NSCE surrogate, Tsuzuku et al.
            2020, Eq. 20).
        params: parameter names/patterns (default all with requires_grad).
        probes: Hutchinson probes in total (rounded up to a multiple of ``groups``).
        groups: independently seeded probe groups (Hutchinson), for jackknife errors.
        batch_size: examples per chunk (None: chosen to fit memory).
        head_dtype: dtype of the loss head.
        seed: seeds the probes.
        operator: for "hutchinson" and "exact", an operator already built on ``(x, y)`` (its
            loss, chunking and head dtype are used; restricted to ``params`` when given) instead
            of building one. ``products`` counts only the products spent here.
        force: run "exact" even when its estimated time exceeds :data:`EXACT_MAX_SECONDS`.
        progress: optional ``(description, done, total)`` callback, counted in products
            ("exact": per product block, the first call saying the estimated cost;
            "hutchinson": per probe block, out of all groups' probes).

    Raises:
        UsageError: unknown method, or "exact" estimated above :data:`EXACT_MAX_SECONDS`
            without ``force``.
    """
    try:
        method = DiagMethod(method)
    except ValueError:
        raise UsageError(
            f"Unknown diagonal method {method!r}; choose one of {[m.value for m in DiagMethod]}."
        ) from None
    if isinstance(loss_fn, str):
        loss_fn = sample_loss(loss_fn, y)
    start = time.perf_counter()
    if method == DiagMethod.GGN:
        values = ggn_diagonal(
            model,
            x,
            y,
            loss_fn=loss_fn,
            params=params,
            batch_size=batch_size,
            head_dtype=head_dtype,
        )
        return CurvatureDiagonal(
            values, None, None, method.value, "ggn", 0, 0, time.perf_counter() - start
        )
    if method == DiagMethod.HUTCHINSON and (probes < 2 or groups < 1):
        raise UsageError(f"Hutchinson needs probes >= 2 and groups >= 1. Got {probes}, {groups}.")
    if operator is None:
        op: CurvatureOperator | OperatorBlock = make_operator(
            "hessian",
            model,
            x,
            y,
            loss_fn=loss_fn,
            params=params,
            batch_size=batch_size,
            head_dtype=head_dtype,
            seed=seed,
        )
    else:
        op = operator.restrict(params)
    before = op.matvecs
    flat_se = stacked = estimate = None
    if method == DiagMethod.EXACT:
        flat, estimate = _exact_diagonal(
            op,
            EXACT_BLOCK,
            progress or no_progress,
            None if force else EXACT_MAX_SECONDS,
        )
        used = 0
    else:
        groups = max(1, min(groups, probes // 2))
        per = math.ceil(probes / groups)
        means, variances = [], []
        report = progress or no_progress
        report("hutchinson diagonal", 0, per * groups)
        for g in range(groups):
            mean, se = hutchinson_diagonal(
                op,
                per,
                group_seed(seed, g),
                progress=lambda _, done, _p, g=g: report(
                    "hutchinson diagonal", g * per + done, per * groups
                ),
            )
            means.append(mean.double().cpu())
            variances.append(se.double().cpu() ** 2)
        stacked = torch.stack(means)
        flat = stacked.mean(dim=0)
        flat_se = torch.stack(variances).sum(dim=0).sqrt() / groups
        used = per * groups

    def per_parameter(v: Tensor) -> dict[str, Tensor]:
        return {k: t.clone() for k, t in unflatten(v, op.param_shapes).items()}

    return CurvatureDiagonal(
        per_parameter(flat),
        None if flat_se is None else per_parameter(flat_se),
        stacked,
        method.value,
        op.kind,
        op.matvecs - before,
        used,
        time.perf_counter() - start,
        estimate,
    )
