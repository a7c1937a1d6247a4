"""Normalized sharpness (Tsuzuku et al. 2020, Eq. 17) and its convex per-layer solver.

For one weight matrix ``W`` (m rows = output units, n columns = input units) with Hessian
diagonal ``h`` (negative entries clipped to 0, Algorithm 1), normalized sharpness is

    min_{σ, σ' > 0}  Σ_ij h_ij (σ_i σ'_j)² + W_ij² / (2λ (σ_i σ'_j)²)           (Eq. 17)

and the measure sums these minima over the weight matrices (λ = 1/2 as in §5.3, so the second
term is ``W_ij² / (σ_i σ'_j)²``). Conv kernels ``(out, in/groups, *k)``: rows are output channels,
columns input channels, and the kernel positions of a pair (i, j) share ``σ_i σ'_j`` (§5.3), so
``a_ij = Σ_k h_ijk`` and ``b_ij = Σ_k W_ijk² / (2λ)``; a grouped conv gives a block-diagonal
(out, in) problem whose cross-group entries are 0.

Solver. With ``x_i = ln σ_i²`` and ``y_j = ln σ'_j²`` the objective

    f(x, y) = Σ_ij a_ij e^{x_i + y_j} + b_ij e^{-(x_i + y_j)},   a, b >= 0

is convex (Appendix B). Exact alternating minimisation: with y fixed, each x_i has the closed
form ``x_i = ½ ln(B_i / A_i)``, ``A_i = Σ_j a_ij e^{y_j}``, ``B_i = Σ_j b_ij e^{-y_j}``, where row
i's terms reach their minimum ``2 sqrt(A_i B_i)``; the same holds for y with x fixed. No step can
increase f. Alternating minimisation converges linearly, slowly when blocks of the matrix are
weakly coupled; each gap evaluation (below) computes the Newton step anyway, and it is taken when
it lowers f (halving up to three times), so the last digits come at Newton's quadratic rate.

Zero entries (clipped curvature, or zero weights). The minimum need not be attained: a row whose
curvature is all zero lets σ_i -> ∞ and its terms vanish in the limit, and so on. Exactly: write
an edge row i -> column j when a_ij > 0 and column j -> row i when b_ij > 0. A term can be driven to
0 (all others held bounded) iff its edge joins two different strongly connected components of this
graph (order the components topologically and shift x, y along that order); inside a component
every edge lies on a cycle and the terms stay bounded below. So the infimum equals the minimum of
the problem restricted to the entries inside strongly connected components, which is attained
(coercive up to the shift x + c, y - c), and the other entries contribute exactly 0. Row-only
pruning (drop rows whose a or b is all zero) is not enough: two blocks joined by a one-way edge need
the component analysis.

Optimality gap (a certified bound, not a heuristic). By Fenchel-Young, for any ν >= 0 on the
entries with Σ_j ν^a_ij - ν^b_ij = 0 for every row i and Σ_i ν^a_ij - ν^b_ij = 0 for every column j,

    D(ν) = Σ ν^a (1 - ln(ν^a / a)) + Σ ν^b (1 - ln(ν^b / b)) <= inf f        (GP duality)

The candidate ν^a = T^a (1 + s), ν^b = T^b (1 - s), with T the current terms and
s_ij = p_i + q_j from the Newton system of f (Hessian of Appendix B, Eqs. 53-55) solved for -∇f,
satisfies both margin conditions exactly; it is a valid dual point when |s| <= 1. Then
``gap = f - max(D, Σ 2 sqrt(a_ij b_ij))`` (the second term, entry-wise AM-GM, is always a valid
lower bound) bounds the distance of the reported value to the true minimum; at the optimum s = 0
and ν is the optimal dual point, so the gap goes to 0. The solver stops when gap <= rtol * f.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.special import logsumexp

__all__ = [
    "LayerSolution",
    "layer_terms",
    "solve_normalized_layer",
    "objective",
    "lower_bound",
]


@dataclass(frozen=True)
class LayerSolution:
    """The minimum of Eq. 17 for one weight matrix.

    Attributes:
        value: objective at the returned point (an upper bound on the minimum, within ``gap``).
        gap: certified bound on ``value - minimum`` (GP duality, see the module docstring).
        lower: the certified lower bound ``value - gap``.
        iterations: alternating-minimisation sweeps (one x-step and one y-step each).
        newton_steps: accepted safeguarded Newton steps (see ``newton``).
        converged: whether ``gap <= rtol * value + atol`` was reached within ``max_iter``.
        x, y: ``ln σ²`` per row and ``ln σ'²`` per column; NaN where no σ attains the infimum
            (rows or columns outside every strongly connected block: σ -> 0 or ∞ in the limit).
        active_rows, active_cols: how many rows/columns take part in the attained problem.
        vanishing_entries: entries with a or b > 0 whose terms vanish in the limit.
    """

    value: float
    gap: float
    lower: float
    iterations: int
    newton_steps: int
    converged: bool
    x: np.ndarray
    y: np.ndarray
    active_rows: int
    active_cols: int
    vanishing_entries: int


def layer_terms(
    weight: np.ndarray, hdiag: np.ndarray, lam: float = 0.5, groups: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The (out, in) coefficient matrices ``a`` (curvature) and ``b`` (weights) of Eq. 17.

    Args:
        weight: a Linear weight ``(out, in)`` or conv kernel ``(out, in/groups, *kernel)``.
        hdiag: its Hessian diagonal, same shape (negative entries are clipped to 0 here).
        lam: λ of Eq. 17 (the paper's §5.3 uses 1/2).
        groups: conv groups; output channel i sees input channels of its group only.

    Returns:
        ``a[i, j] = Σ_k max(h_ijk, 0)``, ``b[i, j] = Σ_k W_ijk² / (2λ)`` as float64 ``(out, in)``.
    """
    w = np.asarray(weight, dtype=np.float64)
    h = np.clip(np.asarray(hdiag, dtype=np.float64), 0.0, None)
    if w.shape != h.shape or w.ndim < 2:
        raise ValueError(
            f"Expected a weight of >= 2 dims and a diagonal of its shape. Got {w.shape}, {h.shape}."
        )
    out, cin = w.shape[:2]
    a = h.reshape(out, cin, -1).sum(axis=2)
    b = (w.reshape(out, cin, -1) ** 2).sum(axis=2) / (2.0 * lam)
    if groups == 1:
        return a, b
    if out % groups:
        raise ValueError(f"out channels {out} not divisible by groups {groups}.")
    per = out // groups
    full_a = np.zeros((out, cin * groups))
    full_b = np.zeros_like(full_a)
    for g in range(groups):  # a handful of groups: block-diagonal embedding
        rows, cols = slice(g * per, (g + 1) * per), slice(g * cin, (g + 1) * cin)
        full_a[rows, cols] = a[rows]
        full_b[rows, cols] = b[rows]
    return full_a, full_b


def objective(a: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """``Σ_ij a_ij e^{x_i+y_j} + b_ij e^{-(x_i+y_j)}`` (0 · e^{±∞} counts as 0)."""
    s = x[:, None] + y[None, :]
    with np.errstate(over="ignore", invalid="ignore"):
        ta = np.where(a > 0, a * np.exp(np.where(a > 0, s, 0.0)), 0.0)
        tb = np.where(b > 0, b * np.exp(np.where(b > 0, -s, 0.0)), 0.0)
    return float(ta.sum() + tb.sum())


def lower_bound(a: np.ndarray, b: np.ndarray) -> float:
    """``Σ_ij 2 sqrt(a_ij b_ij)``: each term's own minimum, a lower bound on Eq. 17 (AM-GM)."""
    return float(2.0 * np.sqrt(a * b).sum())


def _strong_blocks(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask of entries (i, j) whose row and column lie in one strongly connected component,
    and the component label of every node (rows first, then columns)."""
    m, n = a.shape
    ia, ja = np.nonzero(a > 0)
    ib, jb = np.nonzero(b > 0)
    src = np.concatenate([ia, m + jb])  # a: row -> column; b: column -> row
    dst = np.concatenate([m + ja, ib])
    graph = coo_matrix((np.ones(src.size), (src, dst)), shape=(m + n, m + n)).tocsr()
    _, labels = connected_components(graph, directed=True, connection="strong")
    return labels[:m, None] == labels[None, m:], labels


def _log_matvec(mat: np.ndarray, logmat: np.ndarray, v: np.ndarray, axis: int) -> np.ndarray:
    """``ln Σ mat * e^v`` along ``axis`` (1: rows, v over columns; 0: columns, v over rows).

    A matrix product after a global max shift; entries that underflow fall back to logsumexp.
    """
    vmax = float(v.max())
    e = np.exp(v - vmax)
    sums = mat @ e if axis == 1 else e @ mat
    with np.errstate(divide="ignore"):
        out = np.log(sums) + vmax
    bad = ~(sums > 1e-280)
    if np.any(bad):
        vv = v[None, :] if axis == 1 else v[:, None]
        full = logsumexp(logmat + vv, axis=axis)
        out[bad] = full[bad]
    return out


def _log(v: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(v)


def _newton_certificate(
    la: np.ndarray,
    lb: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    row_blocks: np.ndarray,
    col_blocks: np.ndarray,
) -> tuple[float, np.ndarray, np.ndarray, float | None]:
    """Objective, Newton direction (p, q) and the dual value at (x, y) (None when |s| > 1)."""
    s0 = x[:, None] + y[None, :]
    ta = np.exp(la + s0)  # exp(-inf) = 0 off the support
    tb = np.exp(lb - s0)
    value = float(ta.sum() + tb.sum())
    gam = ta + tb
    d = ta - tb
    r, c = d.sum(axis=1), d.sum(axis=0)
    rr, cc = gam.sum(axis=1), gam.sum(axis=0)
    m, n = la.shape
    # Newton system [[diag(rr), G], [G^T, diag(cc)]] [p; q] = -[r; c] (Appendix B's Hessian);
    # Schur complement on the smaller side. Its null space is the shift x + t, y - t of each
    # block (indicator vectors of the blocks on that side), and the right-hand side is
    # orthogonal to it, so adding those rank-one terms gives the minimum-norm solution.
    if m >= n:
        g_over = gam / rr[:, None]
        q = _psd_solve(np.diag(cc) - gam.T @ g_over, -c + g_over.T @ r, cc, col_blocks)
        p = -(r + gam @ q) / rr
    else:
        g_over = gam / cc[None, :]
        p = _psd_solve(np.diag(rr) - g_over @ gam.T, -r + g_over @ c, rr, row_blocks)
        q = -(c + gam.T @ p) / cc
    s = p[:, None] + q[None, :]
    on_a, on_b = ta > 0, tb > 0
    if np.any(np.abs(s[on_a | on_b]) > 1.0):
        return value, p, q, None
    na = ta * (1.0 + s)
    nb = tb * (1.0 - s)
    with np.errstate(divide="ignore", invalid="ignore"):
        ea = np.where(na > 0, na * (1.0 - np.log1p(np.where(on_a, s, 0.0))), 0.0)
        eb = np.where(nb > 0, nb * (1.0 - np.log1p(np.where(on_b, -s, 0.0))), 0.0)
    dn = na - nb  # its margins are 0 up to rounding; keep their exact contribution
    dual = float(ea.sum() + eb.sum() - x @ dn.sum(axis=1) - y @ dn.sum(axis=0))
    return value, p, q, dual


def _value(la: np.ndarray, lb: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    s0 = x[:, None] + y[None, :]
    with np.errstate(over="ignore"):
        return float(np.exp(la + s0).sum() + np.exp(lb - s0).sum())


def _psd_solve(
    mat: np.ndarray, rhs: np.ndarray, scale: np.ndarray, blocks: np.ndarray
) -> np.ndarray:
    """Solve ``mat q = rhs`` for a PSD ``mat`` whose null space is spanned by block indicators."""
    d = 1.0 / np.sqrt(scale)
    ms = mat * d[:, None] * d[None, :]
    ms = 0.5 * (ms + ms.T)
    _, inverse = np.unique(blocks, return_inverse=True)
    ind = np.zeros((ms.shape[0], int(inverse.max()) + 1))
    ind[np.arange(ms.shape[0]), inverse] = np.sqrt(scale)  # D^(1/2) 1_block
    ind /= np.linalg.norm(ind, axis=0, keepdims=True)
    try:
        factor = cho_factor(ms + ind @ ind.T)
        return d * cho_solve(factor, d * rhs)
    except np.linalg.LinAlgError:  # numerically singular: fall back to a pseudo-inverse
        evals, evecs = np.linalg.eigh(ms)
        cutoff = 1e-11 * max(float(evals[-1]), 1e-300)
        inv = np.where(evals > cutoff, 1.0 / np.where(evals > cutoff, evals, 1.0), 0.0)
        return d * (evecs @ (inv * (evecs.T @ (d * rhs))))


def solve_normalized_layer(
    a: np.ndarray,
    b: np.ndarray,
    *,
    rtol: float = 1e-9,
    atol: float = 0.0,
    max_iter: int = 20000,
    check_every: int = 10,
    newton: bool = True,
    y0: np.ndarray | None = None,
) -> LayerSolution:
    """Minimise ``Σ a_ij e^{x_i+y_j} + b_ij e^{-(x_i+y_j)}`` by exact alternating minimisation.

    Args:
        a: ``(m, n)`` non-negative curvature coefficients (clipped Hessian diagonal).
        b: ``(m, n)`` non-negative weight coefficients ``W² / (2λ)``.
        rtol, atol: stop when the certified gap is ``<= rtol * value + atol``.
        max_iter: most alternating sweeps.
        check_every: sweeps between two gap evaluations (each costs an eigendecomposition of
            ``min(m, n)`` squared).
        newton: after each gap evaluation, also try the Newton step that the certificate
            computes anyway, kept only if it lowers the objective (weakly coupled blocks make
            plain alternating minimisation linear-rate slow).
        y0: optional warm start, ``ln σ'²`` per column (NaN entries start at 0); each sweep
            begins with the exact x-step, so no x is needed. A warm start is checked after the
            first sweep already.

    Returns:
        A :class:`LayerSolution`; ``value`` is the minimum of Eq. 17 within ``gap``.

    >>> import numpy as np
    >>> sol = solve_normalized_layer(np.array([[1.0, 2.0]]), np.array([[4.0, 1.0]]))
    >>> round(sol.value, 8), sol.gap < 1e-8  # one row: each entry's AM-GM, 2·√4 + 2·√2
    (6.82842712, True)
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"a and b must be matrices of one shape. Got {a.shape} and {b.shape}.")
    if np.any(a < 0) or np.any(b < 0) or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("a and b must be finite and non-negative.")
    m, n = a.shape
    keep, labels = _strong_blocks(a, b)
    a_k, b_k = np.where(keep, a, 0.0), np.where(keep, b, 0.0)
    vanishing = int(np.count_nonzero(((a > 0) | (b > 0)) & ~keep))
    rows = np.nonzero(a_k.sum(axis=1) > 0)[0]
    cols = np.nonzero(a_k.sum(axis=0) > 0)[0]
    # Rows/columns outside every block have no attained σ (their terms vanish in the limit): NaN.
    x_full = np.full(m, np.nan)
    y_full = np.full(n, np.nan)
    if rows.size == 0:
        return LayerSolution(0.0, 0.0, 0.0, 0, 0, True, x_full, y_full, 0, 0, vanishing)
    a_r, b_r = a_k[np.ix_(rows, cols)], b_k[np.ix_(rows, cols)]
    la, lb = _log(a_r), _log(b_r)
    floor = lower_bound(a_k, b_k)
    row_blocks, col_blocks = labels[rows], labels[m + cols]
    y = np.zeros(cols.size) if y0 is None else np.nan_to_num(np.asarray(y0, dtype=np.float64)[cols])
    x = np.zeros(rows.size)
    warm = y0 is not None
    value, gap, it, converged, newton_steps = math.inf, math.inf, 0, False, 0
    for it in range(1, max_iter + 1):
        x = 0.5 * (_log_matvec(b_r, lb, -y, 1) - _log_matvec(a_r, la, y, 1))
        y = 0.5 * (_log_matvec(b_r, lb, -x, 0) - _log_matvec(a_r, la, x, 0))
        shift = 0.5 * (x.mean() - y.mean())  # the objective is unchanged by x - t, y + t
        x, y = x - shift, y + shift
        if it % check_every and it != max_iter and not (warm and it == 1):
            continue
        value, p, q, dual = _newton_certificate(la, lb, x, y, row_blocks, col_blocks)
        gap = max(0.0, value - (floor if dual is None else max(dual, floor)))
        if gap <= rtol * value + atol:
            converged = True
            break
        if (
            newton and it < max_iter
        ):  # safeguarded Newton step: taken only if it lowers the objective
            for t in (1.0, 0.5, 0.25, 0.125):
                if _value(la, lb, x + t * p, y + t * q) < value:
                    x, y, newton_steps = x + t * p, y + t * q, newton_steps + 1
                    break
    x_full[rows] = x
    y_full[cols] = y
    return LayerSolution(
        value=value,
        gap=gap,
        lower=value - gap,
        iterations=it,
        newton_steps=newton_steps,
        converged=converged,
        x=x_full,
        y=y_full,
        active_rows=int(rows.size),
        active_cols=int(cols.size),
        vanishing_entries=vanishing,
    )
