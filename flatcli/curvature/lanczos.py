"""Extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

The Lanczos process builds an orthonormal basis ``V`` of the Krylov space
``span{v, Av, A²v, ...}`` in which ``A`` is tridiagonal: ``A V_m = V_m T_m + β_m v_{m+1} e_mᵀ``.
The eigenpairs ``(θ, y)`` of the small matrix ``T_m`` give Ritz pairs ``(θ, V_m y)`` whose
residual is known without another product: ``||A V_m y − θ V_m y|| = |β_m| |y_m|``
(Golub & Van Loan, *Matrix Computations*, 4th ed., §10.1.4). Extreme eigenvalues converge
first, typically in far fewer products than power iteration needs for one eigenvalue.

Choices made here:

- Full reorthogonalisation: every new vector is orthogonalised against the whole basis twice
  ("twice is enough", Giraud et al. 2005), in batched float64 matrix products. Without it,
  rounding makes converged Ritz values reappear as spurious copies.
- ``T`` is float64, and so is the basis by default; vectors are cast at the operator's
  boundary (:func:`~flatcli.curvature.linop.apply_float64`). A float32 operator on a huge model
  gets a float32 basis instead (``basis_dtype``, :func:`choose_basis_dtype`: when the float64
  basis would exceed :data:`BASIS_MEMORY_BYTES` or the memory budget of
  :func:`~flatcli.curvature.memory.memory_budget`), still fully reorthogonalised: only the
  storage is float32, every coefficient, norm and combination is accumulated in float64 over
  blocks of the vector. Its rows are rounded to float32, as the operator rounds every vector
  it is given, so the basis is orthonormal to float32 rounding (~1e-7), far below the noise
  of a float32 product. At 124M parameters (GPT-2 small) a row costs 0.5 GB instead of 1 GB.
  The basis is allocated
  uninitialised and every row is written before it is read, so a run touches (and keeps
  resident) only the rows it reaches: a few steps on a model of 10⁸ parameters cost one
  float64 vector (0.8 GB per 10⁸ parameters) per step, not the whole capacity. A product is
  cast straight into the next row (as :func:`~flatcli.curvature.linop.apply_float64` would cast
  it) and orthogonalised and normalised in place, so a step holds no float64 vector beyond the
  basis.
- Thick restart (Wu & Simon 2000, *SIAM J. Matrix Anal. Appl.* 22(2)) when the basis reaches
  ``max_basis`` vectors: the wanted Ritz vectors are kept, the projected matrix becomes an
  arrow matrix ``[[diag(θ), s], [sᵀ, α]]`` with ``s = β_m Y[m, kept]``, and the process
  continues. Without a memory limit the Krylov space simply grows.
- Breakdown (``β ≈ 0``: the basis spans an invariant subspace) continues with a fresh random
  vector orthogonal to the basis, so when ``steps >= dim`` the result is exact. A single-vector
  Krylov space holds one copy of each distinct eigenvalue, so what lies beyond an invariant
  subspace is (almost surely) further copies of eigenvalues already found: Lanczos keeps
  exploring, block after block, until a block leaves the wanted values unchanged. This finds
  exactly repeated eigenvalues such as the zeros of a low-rank GGN. A basis that is invariant
  only to tolerance (``β <= tol · |λ_max|``) is treated the same way.

>>> import torch
>>> from flatcli.curvature.linop import DenseOperator
>>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
>>> res = lanczos(DenseOperator(A), k=3, tol=1e-10)
>>> [round(x, 8) for x in res.eigenvalues.tolist()], res.converged
([100.0, 99.0, 98.0], True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from flatcli.configs.spectrum import DEFAULT_TOL, Which
from flatcli.curvature import memory
from flatcli.curvature.linop import LinearOperator, apply_float64, random_vectors, work_device
from flatcli.distributed import broadcast_for
from flatcli.progress import ProgressFn, no_progress

__all__ = [
    "Which",
    "EigenResult",
    "basis_size",
    "choose_basis_dtype",
    "LanczosMemory",
    "lanczos",
    "lanczos_memory",
    "lanczos_quadrature",
]

BASIS_MEMORY_BYTES = 2 * 2**30
"""Default cap on the float64 Krylov basis (rows x dim x 8 bytes) before thick restart kicks in.
A float32 operator whose float64 basis would exceed it anyway (the restart keeps at least
``2k + 10`` rows) gets a float32 basis (:func:`choose_basis_dtype`)."""

BLOCK_BYTES = 32 * 2**20
"""Bytes of float64 workspace a block of a float32 basis is widened into (:class:`_Lanczos`)."""

_BREAKDOWN = 100.0
"""β below this many units of the operator dtype's epsilon times ||A|| counts as breakdown."""


@dataclass(frozen=True)
class EigenResult:
    """Eigenvalues found by :func:`lanczos`.

    Attributes:
        eigenvalues: ``(k,)`` float64 CPU tensor, ordered as requested: ``largest``
            descending, ``smallest`` ascending, ``magnitude`` by ``|λ|`` descending.
        residuals: ``(k,)`` float64 ``||A x − λ x||`` of each (unit) Ritz vector: from the
            Lanczos relation, or measured with extra products when ``verify=True``.
        eigenvectors: ``(dim, k)`` unit Ritz vectors in the operator's dtype and device, or None.
        matvecs: products this call used (verification included).
        converged: every residual is at most ``tol · |λ_max|``.
        steps: Lanczos steps taken (products without verification).
    """

    eigenvalues: Tensor
    residuals: Tensor
    eigenvectors: Tensor | None
    matvecs: int
    converged: bool
    steps: int


def _order(theta: Tensor, which: Which) -> Tensor:
    """Indices of Ritz values ``theta`` (ascending) in the requested order."""
    if which is Which.LARGEST:
        return torch.flip(torch.arange(len(theta)), (0,))
    if which is Which.SMALLEST:
        return torch.arange(len(theta))
    return torch.argsort(theta.abs(), descending=True, stable=True)


class _Lanczos:
    """Lanczos recurrence with full reorthogonalisation; ``T`` in float64, basis rows in
    ``basis_dtype`` (float64 by default).

    After ``m`` steps, rows ``V[:m]`` are the basis, ``T[:m, :m]`` the projected matrix and
    ``V[m]`` the next basis vector, coupled to the basis by ``beta`` (``A V_mᵀ = V_mᵀ T +
    beta V[m] e_mᵀ``, rows as vectors). A float64 basis is orthogonalised by whole-basis
    matrix-vector products; a narrower one block by block of the dimension, each block widened
    to float64 (:data:`BLOCK_BYTES`), so every coefficient and norm is a float64 sum.
    """

    def __init__(
        self, op: LinearOperator, capacity: int, basis_dtype: torch.dtype = torch.float64
    ) -> None:
        self.op = op
        self.device = work_device(op)
        # uninitialised: rows are written before they are read, so untouched rows cost no memory
        self.V = torch.empty(capacity + 1, op.dim, dtype=basis_dtype, device=self.device)
        self.wide = basis_dtype == torch.float64
        self.T = torch.zeros(capacity + 1, capacity + 1, dtype=torch.float64)
        self.m = 0
        self.beta = 0.0
        self.anorm = 0.0
        self.eps = torch.finfo(op.dtype).eps if op.dtype.is_floating_point else 2.0**-52

    def _width(self, rows: int) -> int:
        """Columns of ``rows`` basis rows widened to float64 at a time."""
        return max(1, BLOCK_BYTES // (8 * max(1, rows)))

    def _norm(self, w: Tensor) -> float:
        """``||w||`` summed in float64."""
        if w.dtype == torch.float64:
            return float(w.norm())
        width = self._width(1)
        total = 0.0
        for a in range(0, w.numel(), width):
            total += float(w[a : a + width].to(torch.float64).square().sum())
        return total**0.5

    def start(self, v: Tensor) -> None:
        row = self.V[0]
        row.copy_(v)
        row.div_(self._norm(v) if v.dtype == torch.float64 else self._norm(row))
        self.m = 0
        self.beta = 0.0

    def _project(self, B: Tensor, w: Tensor) -> Tensor:
        """``B w`` in float64 (``B``: basis rows)."""
        if self.wide and w.dtype == torch.float64:
            return torch.mv(B, w)
        width = self._width(len(B))
        c = torch.zeros(len(B), dtype=torch.float64, device=w.device)
        for a in range(0, w.numel(), width):
            c += torch.mv(B[:, a : a + width].to(torch.float64), w[a : a + width].to(torch.float64))
        return c

    def _subtract(self, B: Tensor, w: Tensor, c: Tensor) -> None:
        """``w -= Bᵀ c`` in place, formed in float64 and rounded once to ``w``'s dtype."""
        if self.wide and w.dtype == torch.float64:
            w.addmv_(B.T, c, alpha=-1.0)
            return
        width = self._width(len(B))
        for a in range(0, w.numel(), width):
            part = w[a : a + width]
            wide = part.to(torch.float64)
            wide.addmv_(B[:, a : a + width].to(torch.float64).T, c, alpha=-1.0)
            part.copy_(wide)

    def _orthogonalise(self, w: Tensor, upto: int) -> tuple[Tensor, Tensor]:
        """``w`` minus its projection on ``V[:upto]``, twice, IN PLACE (``w`` is overwritten,
        unless it lies in those rows); returns it and the (float64) coefficients."""
        B = self.V[:upto]
        start = B.data_ptr()
        if start <= w.data_ptr() < start + B.numel() * B.element_size():
            w = w.clone()
        c = self._project(B, w)
        self._subtract(B, w, c)
        c2 = self._project(B, w)
        self._subtract(B, w, c2)
        return w, c + c2

    def step(self) -> bool:
        """One Lanczos step from ``V[m]``; returns True on breakdown (``beta`` is then 0)."""
        j = self.m
        w = self.V[j + 1]  # the product goes straight into the next row: no temporary vector
        op = self.op
        # (a view, not a copy, when the basis has the operator's dtype and device)
        w.copy_(op.matvec(self.V[j].to(device=op.device, dtype=op.dtype)))  # cast to the basis
        self.anorm = max(self.anorm, self._norm(w))
        w, c = self._orthogonalise(w, j + 1)
        beta = self._norm(w)
        self.T[j, j] = c[j].item()
        breakdown = beta <= _BREAKDOWN * self.eps * self.anorm
        if breakdown:
            beta = 0.0  # V[j + 1] holds a residual that new_direction() replaces
        else:
            w.div_(beta)
        self.T[j, j + 1] = self.T[j + 1, j] = beta
        self.beta = beta
        self.m = j + 1
        return breakdown

    def new_direction(self, generator: torch.Generator) -> bool:
        """After breakdown: a random unit ``V[m]`` orthogonal to the basis; False if none is
        left (the basis spans the whole space)."""
        if self.m >= self.op.dim:
            return False
        r = random_vectors(self.op.dim, 1, generator, "gaussian", self.device)[:, 0]
        r = broadcast_for(self.op, r)
        before = float(r.norm())
        w, _ = self._orthogonalise(r, self.m)  # in place: r is ours
        norm = float(w.norm())
        if norm <= 1e-8 * before:
            return False
        self.V[self.m].copy_(w.div_(norm))
        self.T[self.m - 1, self.m] = self.T[self.m, self.m - 1] = 0.0
        self.beta = 0.0
        return True

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), eigenvectors of ``T`` and residual norms of the pairs."""
        theta, Y = torch.linalg.eigh(self.T[: self.m, : self.m])
        return theta, Y, (self.beta * Y[self.m - 1]).abs()

    def vectors(self, Y: Tensor) -> Tensor:
        """Ritz vectors ``V_mᵀ Y`` as rows ``(k, dim)`` in the basis dtype (combined in
        float64)."""
        B = self.V[: self.m]
        Yt = Y.T.to(device=self.device, dtype=torch.float64)
        if self.wide:
            return Yt @ B
        out = torch.empty(len(Yt), self.op.dim, dtype=B.dtype, device=self.device)
        width = self._width(self.m)
        for a in range(0, self.op.dim, width):
            out[:, a : a + width] = Yt @ B[:, a : a + width].to(torch.float64)
        return out

    def restart(self, theta: Tensor, Y: Tensor, keep: Tensor) -> None:
        """Thick restart keeping Ritz pairs ``keep``: ``T`` becomes an arrow matrix."""
        m, kept = self.m, len(keep)
        s = self.beta * Y[m - 1, keep]
        # V[:kept] = Y_keepᵀ V[:m], block by block in place (kept < m: each block is read whole
        # before it is written), so a restart holds no Ritz vectors beside the basis
        Yt = Y[:, keep].T.to(device=self.device, dtype=torch.float64)
        width = self._width(m)
        for a in range(0, self.op.dim, width):
            block = self.V[:m, a : a + width]
            block[:kept] = Yt @ (block if self.wide else block.to(torch.float64))
        self.V[kept] = self.V[m]
        self.T.zero_()
        self.T[:kept, :kept] = torch.diag(theta[keep])
        self.T[:kept, kept] = s
        self.T[kept, :kept] = s
        self.m = kept


def basis_size(
    dim: int, k: int, steps: int | None = None, max_basis: int | None = None
) -> tuple[int, int, int]:
    """``(steps, capacity, keep)`` of :func:`lanczos` on a ``dim``-dimensional operator: the
    step budget, the basis vectors kept before a thick restart (the float64 basis holds
    ``capacity + 1`` rows of ``dim``) and the Ritz vectors a restart keeps.

    Raises:
        ValueError: ``k``, ``steps`` or ``max_basis`` out of range (see :func:`lanczos`).
    """
    n = dim
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the operator's dimension {n}. Got k={k}.")
    if steps is None:
        steps = min(n, max(20 * k, 100))
    if steps < k:
        raise ValueError(f"steps must be at least k={k}. Got steps={steps}.")
    if max_basis is None:
        max_basis = max(2 * k + 10, BASIS_MEMORY_BYTES // (8 * (n + 1)))
        max_basis = min(max_basis, steps)
    capacity = min(max_basis, n)
    if capacity < min(k + 1, n):
        raise ValueError(f"max_basis must exceed k={k}. Got max_basis={max_basis}.")
    return steps, capacity, min(capacity - 1, k + (capacity - k) // 2)


def choose_basis_dtype(
    op_dtype: torch.dtype,
    dim: int,
    rows: int,
    device: torch.device | str | None = None,
    *,
    budget_bytes: int | None = None,
) -> torch.dtype:
    """The dtype of the Krylov basis ``basis_dtype="auto"`` gives :func:`lanczos`.

    float64, unless the operator is narrower than float64 (float32, bfloat16, float16) AND the
    float64 basis of ``rows`` vectors of ``dim`` numbers would not fit: more than
    :data:`BASIS_MEMORY_BYTES` (the cap thick restart aims at, which the ``2k + 10`` rows it
    keeps may exceed on huge models), or more than ``budget_bytes`` (default
    :func:`~flatcli.curvature.memory.memory_budget` of ``device``; no budget check when both
    are None). Then float32: such an operator rounds every vector it is given to its own
    precision anyway, and the orthogonalisation still sums in float64.

    >>> choose_basis_dtype(torch.float32, 124_439_808, 5)  # GPT-2 small, 4 steps: 5 GB in float64
    torch.float32
    >>> choose_basis_dtype(torch.float32, 61_706, 101), choose_basis_dtype(torch.float64, 10**9, 5)
    (torch.float64, torch.float64)
    """
    if op_dtype == torch.float64 or not op_dtype.is_floating_point:
        return torch.float64
    need = int(rows) * int(dim) * 8
    if need > BASIS_MEMORY_BYTES:
        return torch.float32
    if budget_bytes is None and device is not None:
        budget_bytes = memory.memory_budget(device)
    if budget_bytes is not None and need > budget_bytes:
        return torch.float32
    return torch.float64


def _basis_dtype(
    basis_dtype: torch.dtype | str | None, op: LinearOperator, rows: int, device: torch.device
) -> torch.dtype:
    """``basis_dtype`` resolved: "auto"/None by :func:`choose_basis_dtype`, else float32 or
    float64 (a name or a dtype)."""
    if basis_dtype is None or basis_dtype == "auto":
        return choose_basis_dtype(op.dtype, op.dim, rows, device)
    chosen = getattr(torch, basis_dtype, None) if isinstance(basis_dtype, str) else basis_dtype
    if chosen not in (torch.float32, torch.float64):
        raise ValueError(
            f"basis_dtype must be 'auto', 'float32' or 'float64'. Got {basis_dtype!r}."
        )
    return chosen


def lanczos(
    op: LinearOperator,
    k: int = 1,
    which: Which | str = Which.LARGEST,
    steps: int | None = None,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    return_vectors: bool = False,
    *,
    max_basis: int | None = None,
    verify: bool = False,
    progress: ProgressFn | None = None,
    basis_dtype: torch.dtype | str | None = "auto",
) -> EigenResult:
    """The ``k`` largest, smallest or largest-magnitude eigenvalues of a symmetric operator.

    Runs Lanczos with full reorthogonalisation from a seeded Gaussian start vector until the
    ``k`` wanted Ritz pairs all have residual ``||A x − θ x|| <= tol · |λ_max|`` (``|λ_max|``
    estimated by the largest Ritz value in magnitude) or ``steps`` products are spent.

    Args:
        op: a symmetric :class:`~flatcli.curvature.linop.LinearOperator`.
        k: how many eigenvalues.
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic) or ``"magnitude"``.
        steps: budget of Lanczos steps (one product each); default ``min(dim, max(20k, 100))``.
            With ``steps >= dim`` the answer is exact.
        tol: residual tolerance relative to ``|λ_max|``; the eigenvalue error is at most the
            residual (and about residual² / gap).
        seed: seeds the start vector (and the fresh vectors after a breakdown).
        return_vectors: also return the unit Ritz vectors.
        max_basis: most basis vectors kept before a thick restart; default all ``steps``,
            capped so the float64 basis fits in 2 GiB.
        verify: measure the residuals with ``k`` extra products instead of trusting the
            Lanczos relation (they differ by rounding, and by the noise of a float32 operator).
        progress: called as ``progress("lanczos", steps taken, step budget)`` after each step
            (the budget of :func:`basis_size`; a converged run stops below it).
        basis_dtype: dtype the Krylov basis is stored in: ``"auto"`` (default,
            :func:`choose_basis_dtype`: float64 unless a float32 operator's float64 basis of
            ``capacity + 1`` rows would exceed :data:`BASIS_MEMORY_BYTES` or the memory
            budget), ``"float64"`` or ``"float32"`` (or the torch dtypes). Coefficients and
            norms are float64 sums either way; ``T`` is float64.

    Returns:
        An :class:`EigenResult`.

    Raises:
        ValueError: ``k``, ``steps`` or ``max_basis`` out of range, an unknown ``which`` or
            ``basis_dtype``.
    """
    which = Which(which)
    n = op.dim
    steps, capacity, keep_count = basis_size(n, k, steps, max_basis)

    start_matvecs = op.matvecs
    generator = torch.Generator().manual_seed(seed)
    device = work_device(op)
    proc = _Lanczos(op, capacity, _basis_dtype(basis_dtype, op, capacity + 1, device))
    proc.start(broadcast_for(op, random_vectors(n, 1, generator, "gaussian", proc.device)[:, 0]))
    used = 0
    ok = False
    explored = False  # the basis once spanned an invariant subspace (to tolerance)
    previous: Tensor | None = None
    progress = progress or no_progress
    while True:
        breakdown = proc.step()
        used += 1
        progress("lanczos", used, steps)
        explored = explored or (breakdown and proc.m < k)
        if proc.m >= k:
            theta, Y, res = proc.ritz()
            order = _order(theta, which)
            scale = float(theta.abs().max())
            wanted = theta[order[:k]]
            ok = bool((res[order[:k]] <= tol * scale).all())
            if breakdown or proc.beta <= tol * scale:
                # The basis spans an invariant subspace (to tolerance). Almost surely the rest
                # of the space holds only further copies of eigenvalues already found: keep
                # exploring until a further invariant block leaves the wanted values unchanged.
                if previous is not None and torch.allclose(
                    wanted, previous, rtol=0.0, atol=tol * scale
                ):
                    break
                previous, explored = wanted, True
            elif ok and not explored:
                break
        if used >= steps:
            break
        if proc.m == capacity < n:
            proc.restart(theta, Y, order[:keep_count])
        if breakdown and not proc.new_direction(generator):
            break
    converged = ok

    theta, Y, res = proc.ritz()
    sel = _order(theta, which)[:k]
    eigenvalues, residuals = theta[sel].clone(), res[sel].clone()
    vectors = None
    if return_vectors or verify:
        X = proc.vectors(Y[:, sel]).T  # (dim, k)
        if verify:
            R = apply_float64(op, X) - X * eigenvalues.to(X.device)
            residuals = torch.linalg.vector_norm(R, dim=0).cpu()
            scale = float(theta.abs().max())
            converged = bool((residuals <= tol * scale).all())
        if return_vectors:
            vectors = X.to(device=op.device, dtype=op.dtype)
    return EigenResult(
        eigenvalues=eigenvalues,
        residuals=residuals,
        eigenvectors=vectors,
        matvecs=op.matvecs - start_matvecs,
        converged=converged,
        steps=used,
    )


def lanczos_quadrature(
    op: LinearOperator,
    v: Tensor,
    steps: int,
    *,
    progress: ProgressFn | None = None,
    basis_dtype: torch.dtype | str | None = "auto",
) -> tuple[Tensor, Tensor]:
    """Gauss quadrature of the spectral measure of ``v``: ``m`` Lanczos steps from ``v``.

    With ``A = Σ λ_i u_i u_iᵀ`` and unit ``v``, ``vᵀ f(A) v = Σ_i (u_iᵀ v)² f(λ_i)
    ≈ Σ_j τ_j² f(θ_j)``, where ``θ_j`` are the eigenvalues of the ``m × m`` Lanczos matrix
    ``T`` and ``τ_j`` the first components of its eigenvectors (Golub & Meurant, *Matrices,
    Moments and Quadrature*, 2010, Thm. 6.2). The rule is exact for polynomials of degree
    ``2m − 1``; the weights sum to 1 and ``Σ τ_j² θ_j = vᵀ A v``. A breakdown (``v`` lies in
    an invariant subspace of dimension ``j < m``) ends the run early: the rule is then exact.

    Args:
        op: a symmetric operator.
        v: ``(dim,)`` start vector (normalised here).
        steps: Lanczos steps ``m`` (capped at ``dim``).
        progress: called as ``progress("lanczos", steps taken, m)`` after each step.
        basis_dtype: as for :func:`lanczos` (``"auto"``: :func:`choose_basis_dtype` of
            ``m + 1`` rows).

    Returns:
        ``(nodes, weights)``: float64 CPU tensors of length ``j <= m``.
    """
    m = min(steps, op.dim)
    device = work_device(op)
    proc = _Lanczos(op, m, _basis_dtype(basis_dtype, op, m + 1, device))
    proc.start(v.to(device=proc.device, dtype=torch.float64))
    for j in range(m):
        breakdown = proc.step()
        if progress is not None:
            progress("lanczos", j + 1, m)
        if breakdown:
            break
    theta, Y = torch.linalg.eigh(proc.T[: proc.m, : proc.m])
    return theta, Y[0] ** 2


class LanczosMemory(NamedTuple):
    """What :func:`lanczos_memory` estimates: ``vectors`` of ``dim`` numbers in the basis dtype
    (the Krylov basis and what is formed from it) and in all ``bytes``, with the model's
    copies."""

    vectors: int
    dim: int
    bytes: int


def lanczos_memory(
    dim: int,
    k: int = 0,
    steps: int | None = None,
    *,
    density_steps: int = 0,
    return_vectors: bool = False,
    model_params: int = 0,
    dtype: torch.dtype = torch.float32,
    basis_dtype: torch.dtype | str | None = torch.float64,
    max_basis: int | None = None,
) -> LanczosMemory:
    """Peak bytes of the Lanczos runs of a spectrum on a ``dim``-dimensional curvature matrix,
    before anything is allocated.

    :func:`lanczos` for ``k`` eigenvalues (budget ``steps``) keeps
    ``capacity + 1`` basis vectors (:func:`basis_size`; a thick restart forms its Ritz vectors
    in place), plus the ``k`` eigenvectors it returns; each density run (stochastic Lanczos
    quadrature) keeps ``min(density_steps, dim) + 1``. The runs follow each other, so the
    larger counts. Added:
    :data:`~flatcli.curvature.memory.PARAM_COPIES` copies of the model's ``model_params`` in
    ``dtype`` (a product's parameters, gradient and vectors) and, with ``return_vectors``, the
    eigenvectors in ``dtype``. The activations of a product are not counted (the batch size is
    chosen to fit).
    The basis vectors count 8 bytes each number with ``basis_dtype`` float64 (the default: an
    upper bound), 4 with float32; ``"auto"`` counts what ``lanczos(basis_dtype="auto")`` picks
    for a ``dtype`` operator without knowing the device
    :func:`choose_basis_dtype` without a memory budget: it may
    still pick float32 where the budget is small, so this is an upper bound). ``max_basis`` is
    :func:`lanczos`'s.

    >>> m = lanczos_memory(61_706, k=5000)
    >>> m.vectors, round(m.bytes / 1e9, 1)
    (10011, 4.9)

    Raises:
        ValueError: ``k`` or ``steps`` out of range for :func:`lanczos`.
    """
    eigen = capacity = 0
    if k > 0:
        capacity = basis_size(dim, k, steps, max_basis)[1]
        eigen = capacity + 1 + (k if return_vectors else 0)
    density = min(density_steps, dim) + 1 if density_steps > 0 else 0
    vectors = max(eigen, density)
    if basis_dtype is None or basis_dtype == "auto":
        rows = max(capacity + 1 if k > 0 else 0, density)
        basis_dtype = choose_basis_dtype(dtype, dim, rows)
    elif isinstance(basis_dtype, str):
        basis_dtype = getattr(torch, basis_dtype)
    row = torch.empty((), dtype=basis_dtype).element_size()
    size = torch.empty((), dtype=dtype).element_size()
    extra = memory.PARAM_COPIES * model_params * size + (k * dim * size if return_vectors else 0)
    return LanczosMemory(vectors, dim, vectors * dim * row + extra)
