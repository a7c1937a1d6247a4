r"""Per-example-gradient Gram matrices :math:`\xi = J J^\top` and their spectra, in float64.

:math:`J` is the N × W matrix whose row n is the gradient of example n's loss
:math:`\ell(f_w(x_n), y_n)` with respect to the W selected parameters, so
:math:`\xi_{nm} = \nabla\ell_n \cdot \nabla\ell_m` (fisher-gamma-local-minima.md §5.3: the
:math:`\xi^t(w_0)` of Eq. 5 is this matrix for a sample :math:`\mathcal S^t`).

Two exact engines (``method``):

- ``"ghost"`` (:mod:`flatcli.curvature._ghost`): one batched forward and one backward per chunk;
  per layer :math:`\xi` is formed from the layer's inputs and output gradients
  (:math:`(AA^\top)\circ(GG^\top)` for a Linear) or from that layer's per-example weight
  gradients, whichever is cheaper. J is never materialised: peak memory is the chunk's
  activations and output gradients (linear in the examples per chunk times the activations per
  example, about 3x what autograd saves for one backward) plus a bounded workspace; it does not
  follow W.
- ``"materialize"``: ``torch.func.vmap`` of the per-example vjp, J rows kept in the network's dtype
  and their Gram accumulated in float64 over column blocks (no N × W float64 copy).
- ``"auto"`` (default): ghost, unless the model needs the materialised path — a BatchNorm that
  normalises with batch statistics (then example n's loss depends on every example of the batch and
  row n of J is :math:`\partial\ell_n/\partial w` through the batch statistics too, which only the
  materialised path computes: one backward per example, each through the whole batch), a parameter
  shared by two modules, a parameter read outside its own module, a module returning a tuple.
  In flops the ghost path never does more than the materialised one (per layer it takes the
  cheaper form), and its memory grows with N' times the activations per example rather than with
  N'·W; measured on CPU it is 7-28x faster on networks with wide Linear layers, about as fast on
  ResNets, and ~2.7x slower on DenseNet-BC (``benchmarks/bench_gamma.py``,
  ``benchmarks/bench_gram_memory.py``), where ``method="materialize"`` is the faster choice if
  N'·W fits in memory.

Precision. The loss head (logits → loss) runs in ``head_dtype`` (float64 by default): confident
examples have :math:`1 - p(y|x)` below float32's resolution, and only a float64 head keeps their
gradients' relative accuracy (and the head itself is the exact form of
:func:`flatcli.curvature.losses.cross_entropy`). The head gradient of each example is then scaled to
unit norm before it enters the network's backward, and the scale :math:`s_n = \|\partial\ell_n /
\partial z_n\|` is re-applied in float64: a tiny gradient neither underflows nor loses digits in a
float32 backward. Every Gram product is formed in float64.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
>>> x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
>>> xi = per_example_gram(model, x, y)
>>> J = per_example_gradients(model, x, y)
>>> bool(torch.allclose(xi, J @ J.T)), tuple(xi.shape)
(True, (5, 5))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap

from flatcli.configs.gamma import GramMethod
from flatcli.curvature._functional import FunctionalModel, attention_kernel
from flatcli.curvature._ghost import GhostUnsupported, add_row_gram, ghost_grams
from flatcli.curvature.capture import has_batch_statistics, plan
from flatcli.curvature.data import move_inputs
from flatcli.curvature.losses import cross_entropy
from flatcli.curvature.memory import activation_bytes_per_example, cpu_chunk
from flatcli.curvature.params import select_parameters
from flatcli.errors import UsageError
from flatcli.progress import ProgressFn, no_progress

__all__ = [
    "GramMethod",
    "GramEngine",
    "GramSpectrum",
    "per_example_gram",
    "per_example_grams",
    "per_example_gradients",
    "per_example_sq_norms",
    "gram_spectrum",
    "unit_head",
]

F64 = torch.float64
WORKSPACE = 1 << 24
"""Elements (of float64) a layer's temporary blocks may hold: 128 MiB."""
MAX_CHUNK = 1024
"""Examples per forward at most when the caller does not say."""
CHUNK_BUDGET = 2 << 30
"""Bytes a forward chunk may use when the caller does not give ``chunk_size``."""


def unit_head(
    loss_fn: Callable[[Tensor, Tensor], Tensor], head_dtype: torch.dtype | None
) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``head(z (c, ...), y (c, ...)) -> (unit cotangent like z in z's dtype, scale (c,) f64)``.

    Any output shape the loss takes (logits (c, K), token logits (c, T, V), regression outputs);
    the norm is over all of an example's outputs.

    The cotangent of example n is :math:`\\hat g_n = \\nabla_{z_n}\\ell_n / s_n` with
    :math:`s_n = \\|\\nabla_{z_n}\\ell_n\\|` computed in ``head_dtype``; :math:`\\hat g_n = 0` where
    :math:`s_n = 0`. Works inside ``vmap``.
    """

    def total(zz: Tensor, yy: Tensor) -> Tensor:
        losses = loss_fn(zz, yy)
        if losses.shape != yy.shape[:1]:
            raise ValueError(
                f"loss_fn must return per-example losses of shape {tuple(yy.shape[:1])}. "
                f"Got shape {tuple(losses.shape)}."
            )
        return losses.sum()

    def head(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        zz = z.detach().to(head_dtype) if head_dtype is not None else z.detach()
        g = grad(total)(zz, y)  # row n depends on example n only
        s = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=-1)
        safe = torch.where(s > 0, s, torch.ones_like(s)).view(-1, *([1] * (g.dim() - 1)))
        return (g / safe).to(z.dtype), s.to(F64)

    return head


@dataclass
class GramEngine:
    """Per-example-gradient Gram matrices of ``model`` for any examples, by one resolved method.

    Args:
        model: the network, in the mode it should be measured in (the caller sets eval/train).
            Its parameters and buffers are never modified.
        loss_fn: per-example loss head ``(outputs (N, ...), targets (N, ...)) -> (N,)``
            (:func:`flatcli.curvature.losses.get_loss`: for ``token-ce`` a sequence's mean over
            its counted positions, for ``mse``/``bce`` the mean over its outputs).
        head_dtype: dtype of the head (float64 by default; None keeps the logits' dtype).
        method: ``"auto"``, ``"ghost"`` or ``"materialize"`` (see the module docstring).
        chunk_size: examples per forward (ghost, materialised) or per batch of vjps (coupled
            BatchNorm); default: what fits ``CHUNK_BUDGET`` by the measured activation size
            (at most 1024), the same on every run.
        params: parameter names (``model.named_parameters()``); None = all with requires_grad.
        workspace: elements a layer's temporary float64 blocks may hold.

    Attributes:
        method: the method in use (``"ghost"`` or ``"materialize"``); an ``"auto"`` engine may
            switch from ghost to materialize the first time the ghost capture meets an unsupported
            feature, and says why in ``fallback_reason``.
        coupled: True when a BatchNorm uses batch statistics (the examples of one Gram block form
            its batch; materialised path).
        names: the selected parameter names; ``num_params``: W.
    """

    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy
    head_dtype: torch.dtype | None = F64
    method: GramMethod | str = GramMethod.AUTO
    chunk_size: int | None = None
    params: Sequence[str] | None = None
    workspace: int = WORKSPACE

    def __post_init__(self) -> None:
        try:
            requested = GramMethod(self.method)
        except ValueError:
            raise UsageError(
                f"method must be one of {[m.value for m in GramMethod]}. Got {self.method!r}."
            ) from None
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise UsageError(f"chunk_size must be a positive integer. Got {self.chunk_size!r}.")
        self.names = (
            list(self.params) if self.params is not None else select_parameters(self.model, None)
        )
        named = dict(self.model.named_parameters())
        frozen = [n for n in self.names if n in named and not named[n].requires_grad]
        if frozen:
            raise UsageError(f"Parameters {frozen} do not require grad.")
        self.functional = FunctionalModel(self.model, self.names)
        self.num_params = sum(named[n].numel() for n in self.names)
        self.head = unit_head(self.loss_fn, self.head_dtype)
        self.coupled = has_batch_statistics(self.model)
        self.fallback_reason: str | None = None
        self._per_example_bytes: int | None = None
        self._cpu_chunk: int | None = None
        self.targets = None
        self._requested = requested
        if requested is GramMethod.MATERIALIZE:
            self.method = GramMethod.MATERIALIZE
            return
        try:
            self.targets = plan(self.model, self.names)
            self.method = GramMethod.GHOST
        except GhostUnsupported as e:
            if requested is GramMethod.GHOST:
                raise UsageError(
                    f"method 'ghost' cannot handle this model: {e}. Use 'materialize'."
                ) from e
            self.method, self.fallback_reason = GramMethod.MATERIALIZE, str(e)

    # ------------------------------------------------------------------ public

    def grams(
        self, x: Tensor, y: Tensor, block: int | None = None, *, progress: ProgressFn = no_progress
    ) -> Tensor:
        """Gram matrices of consecutive blocks of ``block`` examples, (E/block, block, block) f64.

        Args:
            x: (E, ...) inputs; y: (E,) labels. E must be a multiple of ``block``.
            block: examples per Gram matrix (default: all E, one matrix). With batch statistics
                each block is one batch.
            progress: called as ``progress("gram", blocks done, blocks)``.
        """
        E = int(x.shape[0])
        n = E if block is None else int(block)
        if n < 1 or E % n:
            raise ValueError(f"{E} examples do not split into Gram blocks of {n}.")
        device = self.functional.device
        out = torch.empty((E // n, n, n), dtype=F64, device=device)
        per = max(1, self._chunk(x) // n)  # blocks per pass
        for b0 in range(0, E // n, per):
            b1 = min(E // n, b0 + per)
            sl = slice(b0 * n, b1 * n)
            xb = move_inputs(x[sl], device, self.functional.dtype)
            xi, s = self._unit_grams(xb, y[sl].to(device), n)
            s = s.view(b1 - b0, n)
            out[b0:b1] = xi * s.unsqueeze(2) * s.unsqueeze(1)
            progress("gram", b1, E // n)
        return out

    def gradients(self, x: Tensor, y: Tensor) -> Tensor:
        """The materialised J: (N, W) float64, columns in the order of ``self.names``."""
        device = self.functional.device
        x, y = move_inputs(x, device, self.functional.dtype), y.to(device)
        rows, s = self._rows(x, y, x.shape[0])
        return rows.to(F64) * s.unsqueeze(1)

    def layer_strategies(self) -> dict[str, str]:
        """``{module name: "ghost" | "materialise" | "vmap" | ...}`` of the last ghost call."""
        return {t.name: t.strategy for t in (self.targets or [])}

    # ------------------------------------------------------------------ internals

    def _chunk(self, x: Tensor) -> int:
        """Examples per forward: ``chunk_size``, else what fits CHUNK_BUDGET (a fixed budget, not
        the free memory of the moment, so that repeated runs batch identically)."""
        if self.chunk_size is not None:
            return int(self.chunk_size)
        if self._per_example_bytes is None:
            self._per_example_bytes = activation_bytes_per_example(
                self.model, tuple(x.shape[1:]), x.dtype
            )
        per = 4 * self._per_example_bytes  # activations, recorded layer inputs/outputs, grads
        if self.method is GramMethod.MATERIALIZE:  # plus the chunk's gradient rows
            per += 2 * self.num_params * torch.finfo(self.functional.dtype).bits // 8
        size = max(1, min(MAX_CHUNK, CHUNK_BUDGET // max(1, per)))
        if self.functional.device.type == "cpu":
            if self._cpu_chunk is None:
                self._cpu_chunk = cpu_chunk(self.model, x)
            size = min(size, self._cpu_chunk)
        return size

    def _unit_grams(self, x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
        if self.method is GramMethod.GHOST:
            try:
                return ghost_grams(
                    self.model,
                    self.targets,
                    x,
                    y,
                    n,
                    head=self.head,
                    chunk_size=self._chunk(x),
                    workspace=self.workspace,
                )
            except GhostUnsupported as e:
                if self._requested is GramMethod.GHOST:
                    raise UsageError(
                        f"method 'ghost' cannot handle this model: {e}. Use 'materialize'."
                    ) from e
                self.method, self.fallback_reason = GramMethod.MATERIALIZE, str(e)
        rows, s = self._rows(x, y, n)
        out = torch.zeros((x.shape[0] // n, n, n), dtype=F64, device=x.device)
        add_row_gram(out, rows, n, self.workspace)
        return out, s

    def _rows(self, x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Unit-head gradient rows (E, W) in the network dtype and scales (E,) float64."""
        if self.coupled:
            parts = [
                self._coupled_rows(x[b : b + n], y[b : b + n]) for b in range(0, x.shape[0], n)
            ]
        else:
            c = self._chunk(x)
            parts = [self._vmap_rows(x[b : b + c], y[b : b + c]) for b in range(0, x.shape[0], c)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _flat(self, g: dict[str, Tensor], c: int) -> Tensor:
        return torch.cat([g[k].reshape(c, -1) for k in self.names], dim=1)

    def _vmap_rows(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        fm, head = self.functional, self.head

        def one(xn: Tensor, yn: Tensor) -> tuple[dict[str, Tensor], Tensor]:
            z, pullback = vjp(lambda p: fm(p, xn.unsqueeze(0)), fm.params)
            cot, s = head(z, yn.unsqueeze(0))
            return pullback(cot)[0], s[0]

        with attention_kernel("math"):  # the fused CPU kernels have no batching rule
            g, s = vmap(one)(x, y)
        return self._flat(g, x.shape[0]), s

    def _coupled_rows(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ∂ℓ_n/∂w with the batch statistics of (x, y) as one batch: one vjp per example."""
        fm = self.functional
        leaves = fm.leaves()
        with torch.enable_grad():  # plain autograd: the forward updates (cloned) running stats
            z = fm(leaves, x)
        cot, s = self.head(z, y)
        n = x.shape[0]
        if self.chunk_size is not None:
            c = int(self.chunk_size)
        else:  # each batched cotangent row runs a backward through the whole batch
            if self._per_example_bytes is None:
                self._per_example_bytes = activation_bytes_per_example(
                    self.model, tuple(x.shape[1:]), x.dtype
                )
            row = 4 * n * self._per_example_bytes + 2 * self.num_params * z.element_size()
            c = max(1, min(n, CHUNK_BUDGET // max(1, row)))
        rows = []
        for r0 in range(0, n, c):
            r1 = min(n, r0 + c)
            basis = torch.zeros((r1 - r0, *cot.shape), dtype=cot.dtype, device=cot.device)
            idx = torch.arange(r1 - r0, device=cot.device)
            basis[idx, idx + r0] = cot[r0:r1]  # row n: cotangent of example n's loss only
            g = torch.autograd.grad(
                z,
                list(leaves.values()),
                basis,
                retain_graph=r1 < n,
                is_grads_batched=True,
                allow_unused=True,
            )
            g = {
                k: torch.zeros((r1 - r0, *p.shape), dtype=p.dtype, device=p.device)
                if gi is None
                else gi
                for (k, p), gi in zip(leaves.items(), g, strict=True)
            }
            rows.append(self._flat(g, r1 - r0))
        return torch.cat(rows), s


# ---------------------------------------------------------------------------- functions


def per_example_grams(
    model: nn.Module, x: Tensor, y: Tensor, block: int | None = None, **options: Any
) -> Tensor:
    """Gram matrices of consecutive blocks of ``block`` examples, (E/block, block, block) float64.

    Several Gram matrices share each batched forward (e.g. the T samples of Eq. 5).

    Args:
        model: the network in the mode to measure (eval, or train for batch-statistics BatchNorm).
        x: (N, ...) inputs. y: (N,) labels.
        block: examples per Gram matrix (None: all N, one matrix).
        **options: the :class:`GramEngine`'s ``loss_fn`` (per-example loss head), ``head_dtype``
            (float64 by default), ``method`` (``"auto"``, ``"ghost"`` or ``"materialize"``),
            ``chunk_size`` (examples per forward) and ``params`` (parameter names; None = every
            parameter with requires_grad).
    """
    return GramEngine(model, **options).grams(x, y, block)


def per_example_gram(model: nn.Module, x: Tensor, y: Tensor, **options: Any) -> Tensor:
    """:math:`\\xi = J J^\\top`, (N, N) float64, for the N examples ``(x, y)``.

    ``options``: as for :func:`per_example_grams`.
    """
    return per_example_grams(model, x, y, None, **options)[0]


def per_example_sq_norms(model: nn.Module, x: Tensor, y: Tensor, **options: Any) -> Tensor:
    """:math:`\\|\\nabla_w \\ell_n\\|^2` per example, (N,) float64 (the diagonal of ξ, at its cost).

    Without batch statistics these are Gram blocks of one example each; with batch statistics the
    gradients are coupled and the diagonal of the whole batch's Gram is returned. ``options``: as
    for :func:`per_example_grams`.
    """
    engine = GramEngine(model, **options)
    if engine.coupled:
        return torch.diagonal(engine.grams(x, y)[0]).clone()
    return engine.grams(x, y, 1).reshape(-1)


def per_example_gradients(model: nn.Module, x: Tensor, y: Tensor, **options: Any) -> Tensor:
    """The materialised J: (N, W) float64, row n = :math:`\\nabla_w\\ell_n`, columns in the order
    of ``model.named_parameters()`` (restricted to ``params``). Memory N·W.

    ``options``: as for :func:`per_example_grams`, but ``method`` (always ``"materialize"``).
    """
    return GramEngine(model, method=GramMethod.MATERIALIZE, **options).gradients(x, y)


# ---------------------------------------------------------------------------- spectra


@dataclass(frozen=True)
class GramSpectrum:
    """Log-determinant and spectral summary of a batch of Gram matrices, one entry per matrix.

    Attributes (tensors of shape (B,), float64 unless said):
        logdet: :math:`\\ln|\\xi|`; ``-inf`` where ``singular``.
        trace: :math:`\\mathrm{tr}\\,\\xi`. frobenius_sq: :math:`\\|\\xi\\|_F^2`.
        lam_max: largest eigenvalue. lam_min: smallest eigenvalue (accurate to the relative
            precision of the diagonally scaled matrix when not singular; 0 where singular).
        cond: (a property) :math:`\\lambda_{max}/\\lambda_{min}` (inf where singular).
        rank: (int64) numerical rank: eigenvalues of the scaled matrix C above ``tolerance``.
        singular: (bool) Cholesky of C failed or its smallest eigenvalue is at most the tolerance.
        tolerance: the rank threshold on the eigenvalues of C, per matrix.
    """

    logdet: Tensor
    trace: Tensor
    frobenius_sq: Tensor
    lam_max: Tensor
    lam_min: Tensor
    rank: Tensor
    singular: Tensor
    tolerance: Tensor

    @property
    def cond(self) -> Tensor:
        """:math:`\\lambda_{max}/\\lambda_{min}`, inf where ``singular``."""
        inf = torch.full_like(self.lam_max, math.inf)
        return torch.where(self.singular, inf, self.lam_max / self.lam_min)


def gram_spectrum(xi: Tensor, *, row_eps: float | None = None) -> GramSpectrum:
    """:math:`\\ln|\\xi|` and the spectrum of Gram matrices ``xi`` (B, n, n) or (n, n), in float64.

    Per-example-gradient Gram matrices are *graded*: their diagonal spans many orders of magnitude
    (confident examples have tiny gradients), so λ_max/λ_min may exceed 1e15 while the matrix is far
    from singular. Hence:

    1. D = diag(ξ)^{-1/2} (1 for a zero diagonal entry), C = D ξ D (unit diagonal),
       :math:`\\ln|\\xi| = \\ln|C| - 2\\ln|D| = 2\\sum\\ln L_{ii} + \\sum\\ln\\xi_{ii}`
       with L the float64 Cholesky factor of C. The primary test: C not positive definite in
       float64 ⇒ singular.
    2. Rank tolerance on the eigenvalues μ of C:
       :math:`\\tau = n\\,(\\varepsilon_{64}\\,\\mu_{max} + (10\\,\\varepsilon_{row})^2)`.
       The first term is the float64 backward error of forming and factorising C; the second is
       the noise of the gradient rows themselves: a row of D·J carries relative error about
       ``row_eps`` (the unit roundoff of the network's dtype, 10× for the backward's growth), so
       the singular values of the n row-normalised rows are uncertain by about √n·10·row_eps and
       their squares μ below τ cannot be told from 0. The matrix is singular when μ_min ≤ τ, and
       ``rank`` counts μ > τ.
    3. λ_max = the largest eigenvalue of ξ (eigvalsh: accurate relative to ‖ξ‖); λ_min =
       1/λ_max(D C⁻¹ D) (accurate relative to itself, unlike eigvalsh's smallest eigenvalue of a
       graded matrix).

    Args:
        xi: symmetric positive semi-definite matrices, float64 (other dtypes are cast).
        row_eps: relative precision of the gradient rows (default float64's eps).
    """
    if xi.dim() == 2:
        xi = xi.unsqueeze(0)
    xi = xi.to(F64)
    B, n, _ = xi.shape
    eps = torch.finfo(F64).eps
    row_eps = eps if row_eps is None else float(row_eps)
    d = torch.diagonal(xi, dim1=1, dim2=2)
    positive = d > 0
    dinv = torch.where(positive, d.clamp_min(torch.finfo(F64).tiny).rsqrt(), torch.ones_like(d))
    C = xi * dinv.unsqueeze(2) * dinv.unsqueeze(1)
    C = 0.5 * (C + C.transpose(1, 2))
    mu = torch.linalg.eigvalsh(C)  # ascending
    tol = n * (eps * mu[:, -1] + (10.0 * row_eps) ** 2)
    rank = (mu > tol.unsqueeze(1)).sum(dim=1)
    L, info = torch.linalg.cholesky_ex(C)
    singular = (info != 0) | (mu[:, 0] <= tol) | ~positive.all(dim=1)
    logdiag = torch.log(torch.diagonal(L, dim1=1, dim2=2).abs().clamp_min(torch.finfo(F64).tiny))
    logdet = 2.0 * logdiag.sum(dim=1) + torch.log(d.clamp_min(torch.finfo(F64).tiny)).sum(dim=1)
    logdet = torch.where(singular, torch.full_like(logdet, -math.inf), logdet)
    lam = torch.linalg.eigvalsh(0.5 * (xi + xi.transpose(1, 2)))
    lam_max = lam[:, -1]
    # λ_min(ξ) = 1 / λ_max(ξ⁻¹), ξ⁻¹ = D C⁻¹ D, with C⁻¹ from the Cholesky factor
    eye = torch.eye(n, dtype=F64, device=xi.device).expand(B, n, n)
    safe_L = torch.where(singular.view(B, 1, 1), eye, L)
    Cinv = torch.cholesky_inverse(safe_L)
    inv = Cinv * dinv.unsqueeze(2) * dinv.unsqueeze(1)
    inv_max = torch.linalg.eigvalsh(0.5 * (inv + inv.transpose(1, 2)))[:, -1]
    lam_min = torch.where(singular, torch.zeros_like(lam_max), 1.0 / inv_max)
    return GramSpectrum(
        logdet=logdet,
        trace=d.sum(dim=1),
        frobenius_sq=(xi * xi).sum(dim=(1, 2)),
        lam_max=lam_max,
        lam_min=lam_min,
        rank=rank,
        singular=singular,
        tolerance=tol,
    )
