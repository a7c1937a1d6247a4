"""Rank statistics against hand-computed values on small tables."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from flatcli.rank import stats

# A 2 x 2 grid over axes A and B (one checkpoint per setting):
#   (A0, B0): v=1, g=1   (A1, B0): v=2, g=2   (A0, B1): v=3, g=4   (A1, B1): v=4, g=3
GRID_V = [1.0, 2.0, 3.0, 4.0]
GRID_G = [1.0, 2.0, 4.0, 3.0]
GRID_H = [{"A": 0, "B": 0}, {"A": 1, "B": 0}, {"A": 0, "B": 1}, {"A": 1, "B": 1}]


def test_tau_a_counts_ties_as_zero_and_tau_b_corrects_for_them():
    x, y = [1, 2, 3, 3], [1, 2, 2, 3]
    # pairs: (1,2) + (1,3) + (1,4) + (2,3) tie in y (2,4) + (3,4) tie in x: C - D = 4 of 6
    assert stats.kendall_tau(x, y, "a") == (4 / 6, None)
    tau_b, _ = stats.kendall_tau(x, y, "b")
    assert tau_b == pytest.approx(4 / math.sqrt(5 * 5), abs=1e-15)
    assert tau_b == pytest.approx(kendalltau(x, y).statistic, abs=1e-14)
    assert stats.kendall_tau([1, 2, 3], [3, 2, 1])[0] == -1.0
    assert stats.kendall_tau(GRID_V, GRID_G)[0] == pytest.approx(4 / 6)


def test_tau_undefined_cases_give_a_reason_not_nan():
    assert stats.kendall_tau([1.0], [2.0]) == (None, "needs at least 2 checkpoints; got 1")
    tau, why = stats.kendall_tau([1, 1, 1], [1, 2, 3], "b")
    assert tau is None and "the measure has the same value" in why
    assert stats.kendall_tau([1, 1, 1], [1, 2, 3], "a") == (0.0, None)
    rho, why = stats.spearman([1, 2, 3], [5, 5, 5])
    assert rho is None and "the gap has the same value" in why
    with pytest.raises(ValueError, match="variant"):
        stats.kendall_tau([1, 2], [1, 2], "c")


def test_large_n_tau_from_scipy_matches_the_dense_sign_matrix(monkeypatch):
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(size=300), 1)  # many ties
    y = np.round(x + rng.normal(size=300), 1)
    dense = {v: stats.kendall_tau(x, y, v)[0] for v in "ab"}
    monkeypatch.setattr(stats, "_PAIRWISE_MAX", 10)
    for v in "ab":
        assert stats.kendall_tau(x, y, v)[0] == pytest.approx(dense[v], abs=1e-12)
    assert dense["b"] == pytest.approx(kendalltau(x, y).statistic, abs=1e-12)


def test_spearman_hand_value_and_ties():
    assert stats.spearman([1, 2, 3, 4], [10, 30, 20, 40])[0] == pytest.approx(0.8)
    x, y = [1, 2, 2, 3, 5], [2, 1, 4, 4, 6]
    assert stats.spearman(x, y)[0] == pytest.approx(spearmanr(x, y).statistic, abs=1e-14)


def test_bootstrap_is_seeded_reproducible_and_excludes_self_pairs(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    a = stats.bootstrap_tau_ci(x, y, resamples=300, seed=3)
    assert a == stats.bootstrap_tau_ci(x, y, resamples=300, seed=3)
    assert a != stats.bootstrap_tau_ci(x, y, resamples=300, seed=4)
    lo, hi = a[0]
    assert lo < stats.kendall_tau(x, y)[0] < hi
    # the per-resample loop (large n) draws the same resamples and gives the same interval
    for variant in "ab":
        dense = stats.bootstrap_tau_ci(x, y, variant=variant, resamples=200, seed=1)
        monkeypatch.setattr(stats, "_BOOTSTRAP_DENSE_MAX", 0)
        loop = stats.bootstrap_tau_ci(x, y, variant=variant, resamples=200, seed=1)
        monkeypatch.setattr(stats, "_BOOTSTRAP_DENSE_MAX", 1500)
        assert loop[0] == pytest.approx(dense[0], abs=1e-12)
    # strictly concordant data: every resample's distinct pairs are concordant, so τ-a is 1
    # exactly (a checkpoint and its own copy are no pair; counting them would pull τ-a below 1)
    assert stats.bootstrap_tau_ci(range(10), range(10), resamples=100)[0] == [1.0, 1.0]
    assert stats.bootstrap_tau_ci([1, 2], [1, 2])[0] is None


def test_granulated_psi_on_a_full_grid():
    g = stats.granulated_tau(GRID_V, GRID_G, GRID_H, ["A", "B"])
    # ψ_A: groups by B: B0 {(1,1), (2,2)} τ=1, B1 {(3,4), (4,3)} τ=-1 -> 0
    # ψ_B: groups by A: A0 {(1,1), (3,4)} τ=1, A1 {(2,2), (4,3)} τ=1 -> 1
    assert g.psi_axes == {"A": 0.0, "B": 1.0}
    assert g.psi == 0.5 and g.reason is None
    assert g.groups["A"] == {"total": 2, "used": 2, "skipped": 0}


def test_granulated_skips_and_counts_groups_of_one():
    v = [*GRID_V, 5.0]
    g = [*GRID_G, 5.0]
    h = [*GRID_H, {"A": 0, "B": 2}]  # B2 exists only with A0
    out = stats.granulated_tau(v, g, h, ["A", "B"])
    assert out.groups["A"] == {"total": 3, "used": 2, "skipped": 1}  # the group B2 = {one}
    assert out.psi_axes["A"] == 0.0
    # ψ_B: A0 {(1,1), (3,4), (5,5)} all concordant -> 1; A1 -> 1
    assert out.psi_axes["B"] == 1.0 and out.psi == 0.5


def test_granulated_without_a_grid_says_so():
    # A and B always change together: no group in which only one of them varies
    out = stats.granulated_tau([1, 2], [1, 2], [{"A": 0, "B": 0}, {"A": 1, "B": 1}], ["A", "B"])
    assert out.psi is None and out.psi_axes == {"A": None, "B": None}
    assert "Ψ needs a grid" in out.reason and "A, B" in out.reason
    assert out.groups["A"] == {"total": 2, "used": 0, "skipped": 2}
    none = stats.granulated_tau([1, 2], [1, 2], [{}, {}], [])
    assert none.psi is None and "no hyperparameter varies" in none.reason


def test_granulated_tau_b_within_groups():
    h = [{"A": 0, "B": 0}, {"A": 1, "B": 0}, {"A": 2, "B": 0}]
    # one group; v ties on two of three: τ-a = (1 + 1 + 0)/3, τ-b = 2/sqrt(2*3)
    out_a = stats.granulated_tau([1, 2, 2], [1, 2, 3], h, ["A"])
    out_b = stats.granulated_tau([1, 2, 2], [1, 2, 3], h, ["A"], variant="b")
    assert out_a.psi == pytest.approx(2 / 3) and out_b.psi == pytest.approx(2 / math.sqrt(6))


# 2 axes x 3 values x 2 seeds; the seed is a repeat of each setting, not an axis
REPEATS_H = [{"lr": a, "wd": b, "seed": s} for a in range(3) for b in range(3) for s in range(2)]


def _tau_a_plain(v, g):
    n = len(v)
    s = sum(np.sign(v[i] - v[j]) * np.sign(g[i] - g[j]) for i in range(n) for j in range(i + 1, n))
    return s / (n * (n - 1) / 2)


def _psi_plain(v, g, h, axes, conditioned):
    """Ψ written out: for axis i, one group per value of ``conditioned(i)`` (the keys held
    fixed); ψ_i the mean τ-a over the groups in which axis i varies; Ψ their mean."""
    psi = {}
    for axis in axes:
        groups = defaultdict(list)
        for k, hk in enumerate(h):
            groups[tuple(hk[a] for a in conditioned(axis))].append(k)
        taus = [
            _tau_a_plain([v[k] for k in idx], [g[k] for k in idx])
            for idx in groups.values()
            if len({h[k][axis] for k in idx}) > 1
        ]
        psi[axis] = sum(taus) / len(taus)
    return sum(psi.values()) / len(psi), psi


def test_granulated_pools_seed_repeats_into_the_group_of_their_values():
    """Jiang et al. condition on the other axes; the seed is no axis. A group of lr at wd = w
    holds both seeds of every lr at w, and τ runs over all of its pairs."""
    h = REPEATS_H
    g = [x["lr"] + x["wd"] + 0.1 * x["seed"] for x in h]
    v = [(x["lr"] + x["wd"]) * (1 if x["seed"] == 0 else -1) for x in h]
    # ψ_lr, group wd = b: 6 checkpoints (lr a, seed s), 15 pairs. Seed 0 (v = a + b, rising
    # with g): 3 concordant pairs; seed 1 (v = -(a + b)): 3 discordant. Across seeds (a, 0) vs
    # (a', 1): v0 - v1 = a + a' + 2b > 0 (0 only for a = a' = b = 0), g0 - g1 = a - a' - 0.1:
    # +3 (a > a'), -3 (a < a'), -3 (a = a'; -2 at b = 0, where one of them is a tie). So
    # τ-a = -2/15 at wd = 0 and -3/15 at wd = 1, 2: ψ_lr = -8/45; ψ_wd the same by symmetry.
    out = stats.granulated_tau(v, g, h, ["lr", "wd"])
    assert out.psi_axes["lr"] == pytest.approx(-8 / 45, abs=1e-15)
    assert out.psi_axes["wd"] == pytest.approx(-8 / 45, abs=1e-15)
    assert out.psi == pytest.approx(-8 / 45, abs=1e-15) and out.reason is None
    # the repeats add pairs, not groups: one group per value of the other axis
    assert out.groups == {a: {"total": 3, "used": 3, "skipped": 0} for a in ("lr", "wd")}
    # The other readings give 0 here, not -8/45: one group per seed (τ = +1 for seed 0, -1 for
    # seed 1), seeds averaged before τ (the mean v is 0 everywhere), or only the pairs that
    # differ in the axis (+3 - 3 + 3 - 3).
    per_seed, _ = _psi_plain(v, g, h, ["lr", "wd"], lambda i: [a for a in h[0] if a != i])
    assert per_seed == 0.0
    # naming the seed as an axis conditions on it like any axis: then the groups are per seed,
    # and ψ_seed at (lr a, wd b) compares the two seeds: g0 < g1, v0 > v1 unless a = b = 0
    named = stats.granulated_tau(v, g, h, ["lr", "wd", "seed"])
    assert named.psi_axes == pytest.approx({"lr": 0.0, "wd": 0.0, "seed": -8 / 9}, abs=1e-15)
    assert named.groups["lr"]["total"] == 6


def test_granulated_with_repeats_matches_the_plain_definition():
    rng = np.random.default_rng(5)
    h = REPEATS_H
    g = rng.normal(size=len(h))
    v = g + rng.normal(size=len(h))
    axes = ["lr", "wd"]
    want, want_axes = _psi_plain(v, g, h, axes, lambda i: [a for a in axes if a != i])
    out = stats.granulated_tau(v, g, h, axes)
    assert out.psi_axes == pytest.approx(want_axes, abs=1e-14)
    assert out.psi == pytest.approx(want, abs=1e-14)
    # a convention that made each seed its own group would give another number here
    per_seed, _ = _psi_plain(v, g, h, axes, lambda i: [a for a in h[0] if a != i])
    assert abs(per_seed - want) > 0.02  # 1/30 here; the test compares to 1e-14


def _pgdl_reference(v, g, h, axes):
    """The competition's score written as plainly as possible, from its definition."""
    best = math.inf
    for a1, a2 in itertools.permutations(axes, 2):
        levels = {a: sorted({x[a] for x in h}) for a in (a1, a2)}
        cells = {
            (p, q, r, s): defaultdict(int)
            for p in levels[a1]
            for q in levels[a1]
            for r in levels[a2]
            for s in levels[a2]
        }
        for i in range(len(v)):
            for j in range(len(v)):
                cell = (h[i][a1], h[j][a1], h[i][a2], h[j][a2])
                cells[cell][(g[i] > g[j], v[i] > v[j])] += 1
        mis, hs = [], []
        for table in cells.values():
            total = sum(table.values())
            joint = {k: c / total for k, c in table.items()}
            pg = {a: sum(p for (x, _), p in joint.items() if x == a) for a in (True, False)}
            pm = {b: sum(p for (_, y), p in joint.items() if y == b) for b in (True, False)}
            mis.append(
                sum(p * math.log2(p / (pg[x] * pm[y])) for (x, y), p in joint.items() if p > 0)
            )
            hs.append(-sum(p * math.log2(p) for p in pg.values() if p > 0))
        best = min(best, (sum(mis) / len(mis)) / (sum(hs) / len(hs)))
    return best


def test_pgdl_hand_computed_value():
    # grid A x B with two checkpoints p, q at (0, 0) and one at each other setting
    h = [{"A": 0, "B": 0}, {"A": 0, "B": 0}, {"A": 1, "B": 0}, {"A": 0, "B": 1}, {"A": 1, "B": 1}]
    g = [1.0, 2.0, 3.0, 4.0, 5.0]
    v = [2.0, 1.0, 3.0, 4.0, 5.0]  # p and q swapped by the measure
    # Only the cell (0,0,0,0), pairs (p,p) (p,q) (q,p) (q,q), has any entropy: its table is
    # (g-, m-) 2, (g-, m+) 1, (g+, m-) 1 of 4; the other 15 cells are pure.
    mi = 0.5 * math.log2(0.5 / 0.75**2) + 2 * 0.25 * math.log2(0.25 / (0.75 * 0.25))
    h_gap = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    score, why = stats.pgdl_cmi(v, g, h, ["A", "B"])
    assert why is None
    assert score == pytest.approx((mi / 16) / (h_gap / 16), abs=1e-12)
    assert score == pytest.approx(_pgdl_reference(v, g, h, ["A", "B"]), abs=1e-12)


def test_pgdl_matches_the_plain_definition_and_is_blind_to_the_sign():
    rng = np.random.default_rng(2)
    h = [{"A": a, "B": b, "C": c} for a in (0, 1) for b in (0, 1) for c in (0, 1, 2)] * 2
    g = rng.normal(size=len(h))
    v = g + rng.normal(size=len(h))
    score, _ = stats.pgdl_cmi(v, g, h, ["A", "B", "C"])
    assert score == pytest.approx(_pgdl_reference(v, g, h, ["A", "B", "C"]), abs=1e-12)
    assert 0 < score < 1
    assert stats.pgdl_cmi(g, g, h, ["A", "B", "C"])[0] == pytest.approx(1.0)
    # an exactly backwards measure scores high too (mutual information has no sign); not quite
    # 1 only because every (i, i) pair lands in (not greater, not greater) for both
    backwards = stats.pgdl_cmi(-g, g, h, ["A", "B", "C"])[0]
    assert backwards == pytest.approx(_pgdl_reference(-g, g, h, ["A", "B", "C"]), abs=1e-12)
    assert 0.8 < backwards < 1
    assert stats.pgdl_cmi(np.zeros(len(h)), g, h, ["A", "B", "C"])[0] == 0.0


def test_pgdl_needs_two_axes_a_complete_grid_and_entropy():
    score, why = stats.pgdl_cmi([1, 2], [1, 2], [{"A": 0}, {"A": 1}], ["A"])
    assert score is None and "at least two" in why
    h = [{"A": 0, "B": 0}, {"A": 1, "B": 0}, {"A": 0, "B": 1}]  # (A1, B1) missing
    score, why = stats.pgdl_cmi([1, 2, 3], [1, 2, 3], h, ["A", "B"])
    assert score is None and "complete grid" in why and "A=1" in why and "B=1" in why
    score, why = stats.pgdl_cmi(GRID_V, GRID_G, GRID_H, ["A", "B"])  # one run per cell
    assert score is None and "zero entropy" in why


def test_hoeffding_weight_hand_value():
    # n = 100, Δ = 0.2: (1 - 2 exp(-2·100·0.1²))² = (1 - 2e⁻²)²
    assert stats.hoeffding_weight(0.2, 100) == pytest.approx((1 - 2 * math.exp(-2)) ** 2)
    assert stats.hoeffding_weight(0.0, 100) == 0.0


def test_robust_sign_error_hand_values():
    r = stats.robust_sign_error(GRID_V, GRID_G, GRID_H, ["A", "B"], test_size=None)
    # environments: (A0B0, A1B0) ok, (A0B1, A1B1) backwards, (A0B0, A0B1) ok, (A1B0, A1B1) ok
    assert (r.environments, r.kept) == (4, 4)
    assert r.value == 1.0 and r.mean == 0.25
    assert r.per_axis == {"A": 1.0, "B": 0.0}
    tie = stats.robust_sign_error([1, 1], [1, 2], GRID_H[:2], ["A"], test_size=None)
    assert tie.value == 0.5


def test_robust_sign_error_filters_monte_carlo_noise():
    g = [0.10, 0.105, 0.30, 0.50]  # A changes the gap by 0.005 at B0 (noise for n = 1000)
    v = [2.0, 1.0, 3.0, 4.0]  # ... where the measure ranks it backwards
    r = stats.robust_sign_error(v, g, GRID_H, ["A", "B"], test_size=1000)
    assert r.noise_filter and (r.environments, r.kept) == (4, 3)
    assert r.value == 0.0 and r.per_axis["A"] == 0.0
    unfiltered = stats.robust_sign_error(v, g, GRID_H, ["A", "B"], test_size=None)
    assert unfiltered.value == 1.0
    none = stats.robust_sign_error(v, g, GRID_H, ["A", "B"], test_size=10)
    assert none.value is None and "Monte-Carlo noise" in none.reason


def test_robust_sign_error_pools_repeats_and_needs_the_effective_sample_size():
    h = [{"A": 0, "seed": 0}, {"A": 0, "seed": 1}, {"A": 1, "seed": 0}, {"A": 1, "seed": 1}]
    g = [1.0, 2.0, 3.0, 4.0]
    v = [1.0, 3.5, 3.0, 4.0]  # of the 4 pairs across A0/A1, only (seed 1, seed 0) is backwards
    r = stats.robust_sign_error(v, g, h, ["A"], test_size=None)
    assert (r.environments, r.kept, r.value) == (1, 1, 0.25)
    dropped = stats.robust_sign_error(v, g, h, ["A"], test_size=None, min_ess=5)
    assert dropped.value is None and dropped.kept == 0
    assert "effective sample size >= 5" in dropped.reason
