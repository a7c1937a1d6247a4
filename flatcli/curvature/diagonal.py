"""The diagonal of the Hessian (or of the generalized Gauss-Newton matrix) of the mean loss.

Three methods, all for the mean loss ``L = 1/N Σ_n loss(f(x_n), y_n)`` over the given examples:

- ``"hutchinson"``: ``E[z ⊙ H z]`` over Rademacher probes z with exact Hessian-vector products
  (``flatcli.curvature.operators.make_operator`` + ``trace.hutchinson_diagonal``). The probes are
  split into ``groups`` independently seeded groups so that a nonlinear function of the diagonal
  (normalized sharpness) can get a jackknife standard error. normalized-flat-minima.md Algorithm 1
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
  vectors (in blocks): for small models and tests only.

Values are float64 tensors of each parameter's shape, unclipped (consumers clip).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import hessian, jacrev, vmap

from flatcli.curvature._functional import FunctionalModel, head_loss
from flatcli.curvature.losses import get_loss
from flatcli.curvature.operators import make_operator
from flatcli.curvature.params import select_parameters, unflatten
from flatcli.curvature.trace import hutchinson_diagonal
from flatcli.errors import UsageError

__all__ = [
    "DiagMethod",
    "CurvatureDiagonal",
    "curvature_diagonal",
    "exact_diagonal",
    "ggn_diagonal",
    "group_seed",
]

MAX_EXACT_DIM = 50_000
"""Largest parameter count for which ``method="exact"`` (one HVP per parameter) is accepted."""

GGN_WORKSPACE_BYTES = 256 * 2**20
"""Memory for one chunk of per-example Jacobians (chunk · K · P numbers) in ``ggn_diagonal``."""


class DiagMethod(str, Enum):
    """How the curvature diagonal is obtained."""

    HUTCHINSON = "hutchinson"
    GGN = "ggn"
    EXACT = "exact"


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
    """

    values: dict[str, Tensor]
    stderr: dict[str, Tensor] | None
    group_values: Tensor | None
    method: str
    matrix: str
    products: int
    probes: int
    seconds: float

    def describe(self) -> dict[str, Any]:
        """Settings for a report (JSON-ready)."""
        return {
            "method": self.method,
            "matrix": self.matrix,
            "products": self.products,
            "probes": self.probes,
            "groups": 0 if self.group_values is None else int(self.group_values.shape[0]),
            "seconds": self.seconds,
        }


def group_seed(seed: int, group: int) -> int:
    """An independent seed for probe group ``group`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(group)]).generate_state(1)[0])


def exact_diagonal(op: Any, block: int = 64) -> Tensor:
    """``diag(A)`` of an operator from products with unit vectors, ``block`` columns at a time."""
    out = torch.empty(op.dim, dtype=torch.float64)
    for a in range(0, op.dim, block):
        b = min(op.dim, a + block)
        eye = torch.zeros((op.dim, b - a), dtype=op.dtype, device=op.device)
        idx = torch.arange(a, b, device=op.device)
        eye[idx, idx - a] = 1
        cols = op.matmat(eye)
        out[a:b] = cols[idx, idx - a].double().cpu()
    return out


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
        loss_fn: per-example loss head or its name ("ce", "nsce").
        params: parameter names/patterns (default all with requires_grad).
        batch_size: examples per chunk; default fits ``GGN_WORKSPACE_BYTES`` of Jacobians.
        head_dtype: dtype of the head Hessian and the accumulation (default float64).
    """
    if isinstance(loss_fn, str):
        loss_fn = get_loss(loss_fn)
    names = select_parameters(model, params)
    fm = FunctionalModel(model, names)
    n = int(x.shape[0])
    if n == 0 or n != int(y.shape[0]):
        raise UsageError(f"Need matching, non-empty x and y; got {n} and {int(y.shape[0])}.")
    hd = head_dtype or torch.float64
    loss = head_loss(loss_fn, hd)

    def logits_one(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return fm(p, xi.unsqueeze(0)).squeeze(0)

    def head_one(z: Tensor, yi: Tensor) -> Tensor:
        return loss(z.unsqueeze(0), yi.unsqueeze(0)).squeeze(0)

    jac = vmap(jacrev(logits_one), in_dims=(None, 0))
    head_hess = vmap(hessian(head_one), in_dims=(0, 0))
    dim = sum(p.numel() for p in fm.params.values())
    with torch.no_grad():
        k = int(fm(fm.params, _chunk(x, 0, 1, fm)).shape[1])
    if batch_size is None:
        per = k * dim * torch.empty((), dtype=fm.dtype).element_size()
        batch_size = max(1, min(n, GGN_WORKSPACE_BYTES // max(per, 1)))
    out = {name: torch.zeros(p.shape, dtype=hd, device=fm.device) for name, p in fm.params.items()}
    for a in range(0, n, batch_size):
        xb = _chunk(x, a, a + batch_size, fm)
        yb = y[a : a + batch_size].to(fm.device)
        with torch.no_grad():
            z = fm(fm.params, xb).to(hd)
        lam, u = torch.linalg.eigh(head_hess(z, yb))  # (B, K), (B, K, K): columns u[:, :, k]
        jacs = jac(fm.params, xb)  # {name: (B, K, *shape)}
        for name, jn in jacs.items():
            jn = jn.to(hd).reshape(jn.shape[0], k, -1)  # (B, K, P_name)
            proj = torch.einsum("bck,bcp->bkp", u, jn)  # u_kᵀ J_n
            out[name] += torch.einsum("bk,bkp->p", lam, proj**2).view(out[name].shape)
    return {name: (v / n).double().cpu() for name, v in out.items()}


def _chunk(x: Tensor, a: int, b: int, fm: FunctionalModel) -> Tensor:
    xb = x[a:b].to(fm.device)
    return xb.to(fm.dtype) if xb.is_floating_point() else xb


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
) -> CurvatureDiagonal:
    """The Hessian diagonal (``"hutchinson"``, ``"exact"``) or the GGN diagonal (``"ggn"``).

    Args:
        model, x, y: network (eval mode) and examples of the mean loss.
        method: see the module docstring.
        loss_fn: per-example loss head or its name (default the NSCE surrogate, Eq. 20).
        params: parameter names/patterns (default all with requires_grad).
        probes: Hutchinson probes in total (rounded up to a multiple of ``groups``).
        groups: independently seeded probe groups (Hutchinson), for jackknife errors.
        batch_size: examples per chunk (None: chosen to fit memory).
        head_dtype: dtype of the loss head.
        seed: seeds the probes.

    Raises:
        UsageError: unknown method, or "exact" on more than ``MAX_EXACT_DIM`` parameters.
    """
    try:
        method = DiagMethod(method)
    except ValueError:
        raise UsageError(
            f"Unknown diagonal method {method!r}; choose one of {[m.value for m in DiagMethod]}."
        ) from None
    if isinstance(loss_fn, str):
        loss_fn = get_loss(loss_fn)
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
    op = make_operator(
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
    shapes = op.param_shapes
    if method == DiagMethod.EXACT:
        if op.dim > MAX_EXACT_DIM:
            raise UsageError(
                f"diag method 'exact' needs one Hessian-vector product per parameter; this model "
                f"has {op.dim} (> {MAX_EXACT_DIM}). Use 'hutchinson' or 'ggn'."
            )
        flat = exact_diagonal(op)
        values = {k: v.clone() for k, v in unflatten(flat, shapes).items()}
        return CurvatureDiagonal(
            values, None, None, method.value, "hessian", op.matvecs, 0, time.perf_counter() - start
        )
    if probes < 2 or groups < 1:
        raise UsageError(f"Hutchinson needs probes >= 2 and groups >= 1. Got {probes}, {groups}.")
    groups = max(1, min(groups, probes // 2))
    per = math.ceil(probes / groups)
    means, variances = [], []
    for g in range(groups):
        mean, se = hutchinson_diagonal(op, per, group_seed(seed, g))
        means.append(mean.double().cpu())
        variances.append(se.double().cpu() ** 2)
    stacked = torch.stack(means)
    flat = stacked.mean(dim=0)
    flat_se = torch.stack(variances).sum(dim=0).sqrt() / groups
    values = {k: v.clone() for k, v in unflatten(flat, shapes).items()}
    stderr = {k: v.clone() for k, v in unflatten(flat_se, shapes).items()}
    return CurvatureDiagonal(
        values,
        stderr,
        stacked,
        method.value,
        "hessian",
        op.matvecs,
        per * groups,
        time.perf_counter() - start,
    )
