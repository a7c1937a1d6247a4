"""Rank statistics of a measure against the generalization gap over a sweep of trained networks.

Every function takes plain sequences (one entry per checkpoint) and returns plain numbers, or
``None`` together with the reason when a statistic is not defined for the data given (never
NaN). The measure's values are expected *oriented*: multiplied by +1 for a measure whose larger
values mean a sharper minimum (expected to go with a larger gap) and by -1 for one whose larger
values mean a flatter minimum, so that a measure that ranks the sweep the right way round has a
positive Kendall τ and one that ranks it backwards a negative τ.

The protocols:

* Kendall's τ-a as Jiang et al. (2020, "Fantastic generalization measures and where to find
  them") define their Kendall coefficient: the mean over all pairs of sign(Δμ)·sign(Δg), so a
  pair tied in either variable counts 0; τ-b (Kendall 1945) on request.
* The granulated Kendall coefficient of Jiang et al. (2020): ψ_i is the mean τ over the groups
  of checkpoints in which only hyperparameter axis i varies (all other axes fixed) and
  Ψ = mean_i ψ_i. Seed repeats (checkpoints at the same values of every axis) belong to the
  group of their values: they are never groups of their own.
* The conditional-mutual-information score of the NeurIPS 2020 "Predicting Generalization in
  Deep Learning" competition (Jiang et al. 2020, "NeurIPS 2020 Competition: Predicting
  Generalization in Deep Learning"), computed as the competition's scoring program defined it.
* The robust sign-error of Dziugaite et al. (2020, "In search of robust measures of
  generalization"): the worst case, over environments of coupled networks that differ in one
  hyperparameter, of the sign-error weighted by how surely the two gaps differ.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from flatcli.configs.rank import TAU_VARIANTS

__all__ = [
    "TAU_VARIANTS",
    "kendall_tau",
    "spearman",
    "bootstrap_tau_ci",
    "Granulated",
    "granulated_tau",
    "pgdl_cmi",
    "hoeffding_weight",
    "RobustSignError",
    "robust_sign_error",
]

_PAIRWISE_MAX = 2000
"""Up to this many points τ is computed from the dense n×n sign matrix; above, from scipy's
O(n log n) τ-b and the tie counts."""

_BOOTSTRAP_DENSE_MAX = 1500
"""Up to this many points the bootstrap forms all resamples at once as matrix products."""


def _as_float(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _tied_pairs(v: np.ndarray) -> int:
    """Number of unordered pairs (i < j) with v_i == v_j."""
    _, counts = np.unique(v, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def _concordance(x: np.ndarray, y: np.ndarray) -> int:
    """Σ_{i<j} sign(x_i − x_j)·sign(y_i − y_j): concordant minus discordant pairs."""
    n = x.size
    if n < 2:
        return 0
    if n <= _PAIRWISE_MAX:
        sx = np.sign(x[:, None] - x[None, :]).astype(np.int8)  # (n, n)
        sy = np.sign(y[:, None] - y[None, :]).astype(np.int8)
        return int(np.einsum("ij,ij->", sx, sy, dtype=np.int64)) // 2
    from scipy.stats import kendalltau

    n0 = n * (n - 1) // 2
    tx, ty = _tied_pairs(x), _tied_pairs(y)
    if tx == n0 or ty == n0:
        return 0
    tau_b = kendalltau(x, y, variant="b").statistic
    return int(round(float(tau_b) * math.sqrt((n0 - tx) * (n0 - ty))))


def kendall_tau(
    x: Sequence[float], y: Sequence[float], variant: str = "a"
) -> tuple[float | None, str | None]:
    """Kendall's rank correlation of ``x`` and ``y``: τ-a (default) or τ-b.

    τ-a is the Kendall coefficient of Jiang et al. (2020, "Fantastic generalization measures
    and where to find them"): (1 / (n(n−1))) Σ_{i≠j} sign(x_i − x_j)·sign(y_i − y_j), i.e.
    (C − D) / (n(n−1)/2) with C, D the concordant and discordant pairs; a pair tied in x or y
    counts 0, so ties pull τ-a towards 0. τ-b (Kendall 1945) divides C − D by
    sqrt((n0 − t_x)(n0 − t_y)) instead (n0 = n(n−1)/2, t the tied pairs), as
    ``scipy.stats.kendalltau`` does.

    Returns:
        ``(tau, None)``, or ``(None, reason)`` when τ is undefined (fewer than two points; for
        τ-b, x or y constant).

    >>> kendall_tau([1, 2, 3, 3], [1, 2, 2, 3])[0]  # C = 4, D = 0, two tied pairs: 4 / 6
    0.6666666666666666
    >>> round(kendall_tau([1, 2, 3, 3], [1, 2, 2, 3], "b")[0], 6)  # 4 / sqrt(5 * 5)
    0.8
    """
    if variant not in TAU_VARIANTS:
        raise ValueError(f"variant must be 'a' or 'b'. Got {variant!r}.")
    xa, ya = _as_float(x), _as_float(y)
    if xa.size != ya.size:
        raise ValueError(f"x and y must have the same length. Got {xa.size} and {ya.size}.")
    n = xa.size
    if n < 2:
        return None, f"needs at least 2 checkpoints; got {n}"
    n0 = n * (n - 1) // 2
    s = _concordance(xa, ya)
    if variant == "a":
        return s / n0, None
    tx, ty = _tied_pairs(xa), _tied_pairs(ya)
    if tx == n0 or ty == n0:
        which = "the measure" if tx == n0 else "the gap"
        return None, f"τ-b is undefined: {which} has the same value on every checkpoint"
    return s / math.sqrt((n0 - tx) * (n0 - ty)), None


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, str | None]:
    """Spearman's ρ: Pearson's correlation of the ranks (ties get their mean rank).

    Returns:
        ``(rho, None)``, or ``(None, reason)`` for fewer than 3 points or a constant variable.

    >>> spearman([1, 2, 3, 4], [10, 30, 20, 40])[0]
    0.8
    """
    from scipy.stats import rankdata

    xa, ya = _as_float(x), _as_float(y)
    n = xa.size
    if n < 3:
        return None, f"needs at least 3 checkpoints; got {n}"
    rx, ry = rankdata(xa) - (n + 1) / 2, rankdata(ya) - (n + 1) / 2
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if den == 0:
        which = "the measure" if float(rx @ rx) == 0 else "the gap"
        return None, f"undefined: {which} has the same value on every checkpoint"
    return float(rx @ ry) / den, None


def _resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(B, n) multiplicities of n draws with replacement per resample; NumPy PCG64 from ``seed``."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    flat = idx + n * np.arange(resamples)[:, None]
    return (
        np.bincount(flat.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)
    )


def _bootstrap_taus_dense(x: np.ndarray, y: np.ndarray, w: np.ndarray, variant: str) -> np.ndarray:
    """τ of each resample from its multiplicities w (B, n); pairs of copies of a point excluded."""
    s = (np.sign(x[:, None] - x[None, :]) * np.sign(y[:, None] - y[None, :])).astype(np.float64)
    num = 0.5 * np.einsum("bi,bi->b", w @ s, w)  # Σ_{k<l} w_k w_l s_kl
    pairs = 0.5 * (w.sum(1) ** 2 - (w**2).sum(1))  # pairs of distinct original points
    if variant == "a":
        with np.errstate(invalid="ignore", divide="ignore"):  # one distinct point: NaN, dropped
            return num / pairs
    out = []
    for v in (x, y):
        t = (v[:, None] == v[None, :]).astype(np.float64)
        np.fill_diagonal(t, 0.0)
        out.append(0.5 * np.einsum("bi,bi->b", w @ t, w))
    den = np.sqrt((pairs - out[0]) * (pairs - out[1]))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _bootstrap_taus_loop(x: np.ndarray, y: np.ndarray, w: np.ndarray, variant: str) -> np.ndarray:
    """The same as :func:`_bootstrap_taus_dense`, one O(n log n) τ per resample (large n)."""
    taus = np.empty(w.shape[0])
    for b, counts in enumerate(w.astype(np.int64)):
        idx = np.repeat(np.arange(x.size), counts)
        xs, ys = x[idx], y[idx]
        m = idx.size
        self_pairs = int((counts * (counts - 1) // 2).sum())
        pairs = m * (m - 1) // 2 - self_pairs
        s = _concordance(xs, ys)
        if variant == "a":
            taus[b] = s / pairs if pairs else np.nan
            continue
        tx = _tied_pairs(xs) - self_pairs
        ty = _tied_pairs(ys) - self_pairs
        den = (pairs - tx) * (pairs - ty)
        taus[b] = s / math.sqrt(den) if den > 0 else np.nan
    return taus


def bootstrap_tau_ci(
    x: Sequence[float],
    y: Sequence[float],
    *,
    variant: str = "a",
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[list[float] | None, str | None]:
    """Percentile bootstrap interval of Kendall's τ (Efron & Tibshirani 1993, ch. 13).

    Each of ``resamples`` resamples draws n checkpoints with replacement (NumPy's PCG64 seeded
    with ``seed``: the same inputs and seed give the same interval) and computes τ over the
    pairs of *distinct* drawn checkpoints (a checkpoint paired with its own copy is not a pair;
    otherwise the copies, tied in both variables, would pull τ-a towards 0 by about 1/n). The
    interval is the (1 − level)/2 and (1 + level)/2 quantiles (linear interpolation) of the
    resampled τ; resamples where τ-b is undefined (a constant variable) are left out.

    Returns:
        ``([low, high], None)`` or ``(None, reason)``.
    """
    if variant not in TAU_VARIANTS:
        raise ValueError(f"variant must be 'a' or 'b'. Got {variant!r}.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1). Got {level!r}.")
    xa, ya = _as_float(x), _as_float(y)
    n = xa.size
    if n < 3:
        return None, f"the bootstrap needs at least 3 checkpoints; got {n}"
    if resamples < 2:
        return None, f"the bootstrap needs at least 2 resamples; got {resamples}"
    taus_parts = []
    chunk = max(1, min(resamples, 4_000_000 // max(n, 1)))
    w_all = _resample_counts(n, resamples, seed)
    for start in range(0, resamples, chunk):
        w = w_all[start : start + chunk]
        fn = _bootstrap_taus_dense if n <= _BOOTSTRAP_DENSE_MAX else _bootstrap_taus_loop
        taus_parts.append(fn(xa, ya, w, variant))
    taus = np.concatenate(taus_parts)
    taus = taus[np.isfinite(taus)]
    if taus.size == 0:
        return None, "τ is undefined on every bootstrap resample"
    lo, hi = np.quantile(taus, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)], None


def _axis_codes(hparams: Sequence[Mapping[str, Hashable]], axes: Sequence[str]) -> np.ndarray:
    """(n, A) integer codes of each checkpoint's value on each axis."""
    out = np.zeros((len(hparams), len(axes)), dtype=np.int64)
    for j, axis in enumerate(axes):
        index: dict[Hashable, int] = {}
        out[:, j] = [index.setdefault(h[axis], len(index)) for h in hparams]
    return out


def _group_keys(
    hparams: Sequence[Mapping[str, Hashable]], axes: Sequence[str], skip: str | None = None
) -> list[tuple]:
    return [tuple(h[a] for a in axes if a != skip) for h in hparams]


@dataclass
class Granulated:
    """Jiang et al.'s (2020) granulated Kendall coefficient: ψ_i per axis and Ψ = mean_i ψ_i.

    ``groups[axis]`` counts the groups of checkpoints that share every other axis' value (seed
    repeats sit inside their group, see :func:`granulated_tau`): ``total``, ``used`` (at least
    two different values of the axis, so τ is defined) and ``skipped`` (a single checkpoint,
    only one value of the axis, or τ-b undefined).
    """

    psi: float | None
    psi_axes: dict[str, float | None]
    groups: dict[str, dict[str, int]]
    reason: str | None = None
    axis_reasons: dict[str, str] = field(default_factory=dict)


def granulated_tau(
    values: Sequence[float],
    gaps: Sequence[float],
    hparams: Sequence[Mapping[str, Hashable]],
    axes: Sequence[str],
    *,
    variant: str = "a",
) -> Granulated:
    """ψ_i and Ψ of Jiang et al. (2020, "Fantastic generalization measures",
    the granulated Kendall coefficient).

    For axis i, the checkpoints are grouped by the values of every other axis; ψ_i is the mean
    of Kendall's τ (``variant``) over the groups in which axis i takes at least two values,
    i.e. over the sets Θ_1 × … × {θ_i varies} × … × Θ_n of the paper. A group of one checkpoint
    (or one in which axis i does not vary, or τ-b is undefined) is skipped and counted in
    ``groups``. Ψ = (1/n) Σ_i ψ_i is reported only when every axis has a ψ_i: a sweep that is
    not a grid over its axes gives ``psi=None`` with the reason.

    Seed repeats. Jiang et al. condition on the other hyperparameter axes only; the seed (and
    any hyperparameter not in ``axes``) is not an axis and is not conditioned on. A group of
    axis i therefore holds every checkpoint at its values of the other axes: every seed of
    every value of axis i. With axes lr and wd and two seeds per setting, the group of lr at
    wd = w holds both seeds of every lr at w, and τ is taken over all its pairs (the τ of the
    paper's set of models), pairs of two seeds at the same lr included. The repeats never form
    groups of their own, so they add pairs, not groups: ψ_i stays a mean over the settings of
    the other axes (the paper's m_i of them on a full grid), each weighted once however many
    seeds it has. Naming the seed as an axis (``axes`` includes it) conditions on it like any
    other axis and gives it its own ψ.

    Args:
        values: oriented measure values, one per checkpoint.
        gaps: generalization gaps, one per checkpoint.
        hparams: each checkpoint's hyperparameters (hashable values), with every axis present.
        axes: the hyperparameter axes (those varied by the sweep).
        variant: Kendall τ variant, ``"a"`` or ``"b"``.
    """
    v, g = _as_float(values), _as_float(gaps)
    if not axes:
        reason = (
            "no hyperparameter varies across the ranked checkpoints: Ψ needs a sweep over a "
            "grid of hyperparameter values"
        )
        return Granulated(None, {}, {}, reason)
    psi_axes: dict[str, float | None] = {}
    groups: dict[str, dict[str, int]] = {}
    axis_reasons: dict[str, str] = {}
    for axis in axes:
        members: dict[tuple, list[int]] = defaultdict(list)
        for i, key in enumerate(_group_keys(hparams, axes, skip=axis)):
            members[key].append(i)
        taus = []
        for idx in members.values():
            if len({hparams[i][axis] for i in idx}) < 2:
                continue
            tau, _ = kendall_tau(v[idx], g[idx], variant)
            if tau is not None:
                taus.append(tau)
        groups[axis] = {
            "total": len(members),
            "used": len(taus),
            "skipped": len(members) - len(taus),
        }
        if taus:
            psi_axes[axis] = float(np.mean(taus))
        else:
            psi_axes[axis] = None
            axis_reasons[axis] = (
                f"no group of checkpoints in which only {axis} varies (all other axes fixed)"
            )
    missing = [a for a, p in psi_axes.items() if p is None]
    if missing:
        reason = (
            f"Ψ needs a grid: no group in which only {', '.join(missing)} varies "
            "(all other axes fixed)"
        )
        return Granulated(None, psi_axes, groups, reason, axis_reasons)
    psi = float(np.mean([psi_axes[a] for a in axes]))
    return Granulated(psi, psi_axes, groups, None, axis_reasons)


def _entropy2(p: np.ndarray) -> np.ndarray:
    """Base-2 entropy along the last axis of probability vectors (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(-1)


def _cmi_for_pair(
    v: np.ndarray, g: np.ndarray, codes1: np.ndarray, k1: int, codes2: np.ndarray, k2: int
) -> tuple[float | None, str | None]:
    """The competition's normalised conditional MI for one pair of conditioning axes."""
    gap_plus = g[:, None] > g[None, :]  # (n, n) bool: ordered pairs, (i, i) too
    meas_plus = v[:, None] > v[None, :]
    # cell of an ordered pair (a, b): (h1(a), h1(b), h2(a), h2(b))
    cell = ((codes1[:, None] * k1 + codes1[None, :]) * k2 + codes2[:, None]) * k2 + codes2[None, :]
    cells = k1 * k1 * k2 * k2
    flat = (cell * 4 + gap_plus * 2 + meas_plus).ravel()  # int64 cell index, one per pair
    table = np.bincount(flat, minlength=cells * 4).reshape(cells, 2, 2).astype(np.float64)
    totals = table.sum((1, 2))
    if np.any(totals == 0):  # only possible when the grid of the two axes is incomplete
        return None, "empty cell"
    joint = table / totals[:, None, None]  # (cells, gap, measure)
    p_gap, p_meas = joint.sum(2), joint.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = joint / (p_gap[:, :, None] * p_meas[:, None, :])
        mi = np.where(joint > 0, joint * np.log2(np.where(joint > 0, ratio, 1.0)), 0.0).sum((1, 2))
    h_gap = _entropy2(p_gap)
    if h_gap.mean() == 0:
        return None, "the gap's ordering is determined by the two axes (zero entropy)"
    return float(mi.mean() / h_gap.mean()), None


def pgdl_cmi(
    values: Sequence[float],
    gaps: Sequence[float],
    hparams: Sequence[Mapping[str, Hashable]],
    axes: Sequence[str],
) -> tuple[float | None, str | None]:
    """The conditional-mutual-information score of the NeurIPS 2020 PGDL competition.

    As the competition's scoring program defined it (Jiang et al. 2020, "NeurIPS 2020
    Competition: Predicting Generalization in Deep Learning", after the conditional mutual
    information of Jiang et al. 2020, "Fantastic generalization measures"): for every pair of
    distinct hyperparameter axes (h1, h2), all *ordered* pairs of checkpoints (a, b),
    **including a = b**, are sorted into the cells U = (h1(a), h1(b), h2(a), h2(b)) — every
    pair of values of each of the two axes — and, in each cell, into a 2×2 table of
    V_g = [g_a > g_b] and V_μ = [μ_a > μ_b] (strict: a tie, and every (a, a) pair, counts as
    "not greater"). The score of (h1, h2) is mean_U I(V_μ; V_g | U) / mean_U H(V_g | U) in
    bits, the mean over *all* cells; the competition's score is the minimum over the axis
    pairs (its loop runs over ordered pairs (h1, h2) and (h2, h1), which give the same number).

    Properties worth knowing, all the competition's own: mutual information is blind to the
    sign of the relation (a measure that ranks the sweep exactly backwards scores nearly as
    high as one that ranks it right, a little lower only because every (a, a) pair lands in
    (not greater, not greater): read it next to τ); it needs at least two axes and a complete grid
    over every pair of axes (an empty cell made the competition's score NaN; here it is None
    with the reason); ties of the measure are not treated symmetrically.

    Returns:
        ``(score in [0, 1], None)`` or ``(None, reason)``.
    """
    v, g = _as_float(values), _as_float(gaps)
    if len(axes) < 2:
        return None, (
            f"the PGDL score conditions on pairs of hyperparameter axes and needs at least two; "
            f"this sweep has {len(axes)}"
        )
    codes: dict[str, tuple[np.ndarray, int, list]] = {}
    for axis in axes:
        levels = sorted({h[axis] for h in hparams}, key=repr)
        index = {lv: i for i, lv in enumerate(levels)}
        codes[axis] = (
            np.array([index[h[axis]] for h in hparams], dtype=np.int64),
            len(levels),
            levels,
        )
    best: float | None = None
    for a1, a2 in itertools.combinations(axes, 2):
        c1, k1, l1 = codes[a1]
        c2, k2, l2 = codes[a2]
        present = set(zip(c1.tolist(), c2.tolist(), strict=True))
        if len(present) < k1 * k2:
            absent = next((x, y) for x in range(k1) for y in range(k2) if (x, y) not in present)
            return None, (
                f"the PGDL score needs a complete grid: no checkpoint has {a1}={l1[absent[0]]!r} "
                f"and {a2}={l2[absent[1]]!r}"
            )
        score, why = _cmi_for_pair(v, g, c1, k1, c2, k2)
        if score is None:
            return None, f"undefined for axes ({a1}, {a2}): {why}"
        best = score if best is None else min(best, score)
    return best, None


def hoeffding_weight(delta_gap: float | np.ndarray, n: int) -> np.ndarray:
    """Dziugaite et al.'s (2020) Monte-Carlo noise filter: how surely two measured gaps differ.

    With both test errors estimated on n examples, Hoeffding's inequality bounds the chance that
    an observed difference Δ between the gaps is Monte-Carlo noise; the weight is
    max(0, 1 − 2 exp(−2n (Δ/2)²))².
    """
    d = np.abs(np.asarray(delta_gap, dtype=np.float64))
    return np.maximum(0.0, 1.0 - 2.0 * np.exp(-2.0 * n * (d / 2.0) ** 2)) ** 2


@dataclass
class RobustSignError:
    """Dziugaite et al.'s (2020) robust sign-error and what it was computed from.

    ``value`` is the worst (largest) weighted sign-error over the environments kept; ``mean`` the
    mean over them; ``environments`` how many environments (unordered pairs of hyperparameter
    settings that differ in exactly one axis) had checkpoints on both sides, ``kept`` how many
    had enough effective sample size; ``per_axis`` the worst case among environments where that
    axis is the one that changes.
    """

    value: float | None
    mean: float | None
    environments: int
    kept: int
    per_axis: dict[str, float | None]
    noise_filter: bool
    reason: str | None = None


def robust_sign_error(
    values: Sequence[float],
    gaps: Sequence[float],
    hparams: Sequence[Mapping[str, Hashable]],
    axes: Sequence[str],
    *,
    test_size: int | None,
    min_ess: float = 1.0,
) -> RobustSignError:
    """The robust sign-error of Dziugaite et al. (2020, "In search of robust measures of
    generalization", robust sign-error over coupled-network environments).

    An environment is a pair of hyperparameter settings (over ``axes``) that differ in exactly
    one axis; checkpoints with the same setting (other seeds, other non-axis hyperparameters) are
    its repeats. In an environment, every pair (a, b) of checkpoints across the two settings has
    the sign-error ℓ = (1 − sign(μ_a − μ_b)·sign(g_a − g_b)) / 2 (0 when the measure orders the
    pair as the gaps do, 1 when backwards, ½ for a tie) and, when the gaps are accuracy gaps
    measured on ``test_size`` examples, the weight w = (h − ½)₊ with h the Hoeffding weight
    (:func:`hoeffding_weight`), so that pairs whose gaps differ by no more than Monte-Carlo
    noise count nothing; otherwise (``test_size`` None) every weight is 1. The environment's
    sign-error is Σwℓ / Σw, kept when its effective sample size (Σw)² / Σw² is at least
    ``min_ess`` (the paper used 12, with many seeds per setting). The robust sign-error is the
    maximum over the environments kept: the worst case, not the average.
    """
    v, g = _as_float(values), _as_float(gaps)
    noise_filter = test_size is not None
    if not axes:
        return RobustSignError(
            None,
            None,
            0,
            0,
            {},
            noise_filter,
            "no hyperparameter varies across the ranked checkpoints: environments are pairs of "
            "runs that differ in one hyperparameter",
        )
    codes = _axis_codes(hparams, axes)  # (n, A)
    _, setting = np.unique(codes, axis=0, return_inverse=True)
    setting = setting.reshape(-1)
    ia, ib = np.triu_indices(v.size, 1)  # every unordered pair of checkpoints once
    changed = codes[ia] != codes[ib]  # (pairs, A)
    one = changed.sum(1) == 1  # pairs across two settings that differ in exactly one axis
    ia, ib, axis_of = ia[one], ib[one], changed[one].argmax(1)
    s1, s2 = np.minimum(setting[ia], setting[ib]), np.maximum(setting[ia], setting[ib])
    env, inv = np.unique(s1 * (int(setting.max()) + 1) + s2, return_inverse=True)
    environments = int(env.size)
    dv, dg = v[ia] - v[ib], g[ia] - g[ib]
    loss = (1.0 - np.sign(dv) * np.sign(dg)) / 2.0
    if noise_filter:
        w = np.maximum(hoeffding_weight(dg, int(test_size)) - 0.5, 0.0)
    else:
        w = np.ones_like(loss)
    sw = np.bincount(inv, w, minlength=environments)
    sw2 = np.bincount(inv, w**2, minlength=environments)
    swl = np.bincount(inv, w * loss, minlength=environments)
    env_axis = np.zeros(environments, dtype=np.int64)
    env_axis[inv] = axis_of  # every pair of an environment changes the same axis
    with np.errstate(invalid="ignore", divide="ignore"):
        ess = np.where(sw > 0, sw**2 / np.where(sw2 > 0, sw2, 1.0), 0.0)
        env_loss = swl / np.where(sw > 0, sw, 1.0)
    kept = (sw > 0) & (ess >= min_ess - 1e-12)
    losses = env_loss[kept].tolist()
    per_axis: dict[str, list[float]] = {a: [] for a in axes}
    for k, loss_k in zip(env_axis[kept].tolist(), losses, strict=True):
        per_axis[axes[k]].append(loss_k)
    axis_max = {a: (max(ls) if ls else None) for a, ls in per_axis.items()}
    if not losses:
        if environments == 0:
            reason = "no two checkpoints differ in exactly one hyperparameter axis"
        else:
            reason = (
                f"none of the {environments} environments has gaps that differ by more than "
                f"Monte-Carlo noise (effective sample size >= {min_ess:g})"
            )
        return RobustSignError(None, None, environments, 0, axis_max, noise_filter, reason)
    return RobustSignError(
        float(max(losses)),
        float(np.mean(losses)),
        environments,
        len(losses),
        axis_max,
        noise_filter,
    )
