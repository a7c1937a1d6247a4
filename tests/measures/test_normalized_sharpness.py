"""The Eq. 17 solver against brute force, its certified gap, and its handling of zero entries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from flatcli.curvature.losses import normalized_cross_entropy
from flatcli.measures.sharpness._solver import (
    layer_terms,
    lower_bound,
    objective,
    solve_normalized_layer,
)


def _brute(a: np.ndarray, b: np.ndarray, seed: int = 0, starts: int = 4) -> float:
    m, n = a.shape
    rng = np.random.default_rng(seed)

    def f(z: np.ndarray) -> float:
        return objective(a, b, z[:m], z[m:])

    return min(
        minimize(
            f, rng.normal(size=m + n), method="BFGS", options={"gtol": 1e-13, "maxiter": 50_000}
        ).fun
        for _ in range(starts)
    )


@pytest.mark.parametrize("shape", [(1, 2), (3, 4), (6, 5), (10, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_on_positive_entries(shape: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = (
        rng.random(shape) * rng.lognormal(0, 2, shape),
        rng.random(shape) * rng.lognormal(0, 2, shape),
    )
    sol = solve_normalized_layer(a, b)
    best = _brute(a, b, seed)
    assert sol.converged
    assert sol.gap <= 1e-9 * sol.value
    assert abs(sol.value - best) <= 1e-9 * best
    # the returned scales attain the value
    assert objective(a, b, sol.x, sol.y) == pytest.approx(sol.value, rel=1e-12)


def test_one_by_two_against_a_fine_grid() -> None:
    a, b = np.array([[0.7, 2.0]]), np.array([[3.0, 0.2]])
    # f depends on (x + y1, x + y2) only: a 2-D grid over s1 = x + y1, s2 = x + y2
    s = np.linspace(-6, 6, 4001)
    s1, s2 = s[:, None], s[None, :]
    grid = (
        a[0, 0] * np.exp(s1) + b[0, 0] * np.exp(-s1) + a[0, 1] * np.exp(s2) + b[0, 1] * np.exp(-s2)
    )
    sol = solve_normalized_layer(a, b)
    assert sol.value <= grid.min() + 1e-12
    assert sol.value == pytest.approx(grid.min(), rel=1e-5)
    # here each entry has its own free sum, so the minimum is the AM-GM bound
    assert sol.value == pytest.approx(lower_bound(a, b), rel=1e-12)


def test_closed_form_steps_never_increase_the_objective() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.random((7, 9)) ** 3, rng.random((7, 9)) ** 3
    x, y = rng.normal(size=7) * 3, rng.normal(size=9) * 3
    values = [objective(a, b, x, y)]
    for _ in range(30):
        x = 0.5 * (np.log((b * np.exp(-y)).sum(1)) - np.log((a * np.exp(y)).sum(1)))
        values.append(objective(a, b, x, y))
        y = 0.5 * (np.log((b.T * np.exp(-x)).sum(1)) - np.log((a.T * np.exp(x)).sum(1)))
        values.append(objective(a, b, x, y))
    assert all(v1 <= v0 * (1 + 1e-14) for v0, v1 in zip(values, values[1:], strict=False))
    # and the solver's plain alternating path (no Newton) ends no higher than 30 sweeps
    sol = solve_normalized_layer(a, b, newton=False, max_iter=30, check_every=30)
    assert sol.value <= values[-1] * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_gap_is_a_valid_bound(seed: int) -> None:
    """Stopped early, the certified gap still covers the distance to the true minimum."""
    rng = np.random.default_rng(seed)
    a, b = rng.random((8, 6)) ** 2, rng.random((8, 6)) ** 2
    exact = solve_normalized_layer(a, b, rtol=1e-13).value
    for iters in (1, 2, 5):
        early = solve_normalized_layer(
            a, b, newton=False, max_iter=iters, check_every=1, rtol=1e-15
        )
        assert early.value - early.gap <= exact * (1 + 1e-12)
        assert early.value >= exact * (1 - 1e-12)


def test_zero_curvature_row_contributes_nothing() -> None:
    """A row with h = 0 everywhere: σ_i -> ∞ and its W²/σ² terms vanish in the limit."""
    a = np.array([[1.0, 2.0], [0.0, 0.0]])
    b = np.array([[3.0, 1.0], [5.0, 7.0]])
    sol = solve_normalized_layer(a, b)
    only_first = solve_normalized_layer(a[:1], b[:1])
    assert sol.value == pytest.approx(only_first.value, rel=1e-12)
    assert sol.active_rows == 1 and math.isnan(sol.x[1])
    assert sol.vanishing_entries == 2


def test_linked_blocks_need_the_component_analysis() -> None:
    """Two blocks joined by a one-way entry: no row or column is all zero, yet the joining
    term vanishes in the infimum (only the strongly connected analysis finds it)."""
    a = np.array([[1.0, 2.0], [0.0, 3.0]])
    b = np.array([[4.0, 0.0], [0.0, 5.0]])
    sol = solve_normalized_layer(a, b)
    assert sol.value == pytest.approx(2 * math.sqrt(4.0) + 2 * math.sqrt(15.0), rel=1e-12)
    assert sol.vanishing_entries == 1
    # the infimum is approached: along x1 -> -t, y1 -> +t the a_12 term dies, others stay put
    t = 30.0
    x, y = np.array([-t, 0.5 * math.log(5 / 3)]), np.array([t + 0.5 * math.log(4.0), 0.0])
    assert objective(a, b, x, y) == pytest.approx(sol.value, rel=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_sparse_patterns_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(10 + seed)
    a = rng.random((4, 5)) * (rng.random((4, 5)) < 0.4)
    b = rng.random((4, 5)) * (rng.random((4, 5)) < 0.6)
    sol = solve_normalized_layer(a, b)
    best = _brute(a, b, seed)
    assert best >= sol.value - sol.gap - 1e-12  # nothing beats the certified lower bound
    assert best <= sol.value * (1 + 1e-6) + 1e-12  # and the infimum is approached
    # continuity: filling the zeros with δ moves the value by a fractional power of δ
    perturbed = solve_normalized_layer(a + 1e-40 * (a == 0), b + 1e-40 * (b == 0))
    assert perturbed.value == pytest.approx(sol.value, rel=1e-5, abs=1e-9)


def test_all_zero_curvature_gives_zero() -> None:
    sol = solve_normalized_layer(np.zeros((3, 4)), np.ones((3, 4)))
    assert sol.value == 0.0 and sol.gap == 0.0 and sol.converged


def test_weakly_coupled_blocks_converge_with_newton() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random((20, 20)), rng.random((20, 20))
    a[:10, 10:] = a[10:, :10] = 1e-5
    b[:10, 10:] = b[10:, :10] = 0.0
    b[:10, :10] *= 100
    slow = solve_normalized_layer(a, b, newton=False, max_iter=200)
    fast = solve_normalized_layer(a, b)
    assert fast.converged and fast.gap <= 1e-9 * fast.value
    assert not slow.converged and fast.value <= slow.value


def test_extreme_scales() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.random((5, 6)) * 1e-150, rng.random((5, 6)) * 1e150
    sol = solve_normalized_layer(a, b)
    ref = solve_normalized_layer(a * 1e150, b * 1e-150)
    assert sol.converged and sol.value == pytest.approx(ref.value, rel=1e-9)


def test_lambda_scaling_and_conv_layout() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 3, 2, 2))
    h = rng.normal(size=w.shape)
    a, b = layer_terms(w, h, lam=0.5)
    assert a.shape == (4, 3)
    np.testing.assert_allclose(a, np.clip(h, 0, None).sum(axis=(2, 3)))
    np.testing.assert_allclose(b, (w**2).sum(axis=(2, 3)))
    v_half = solve_normalized_layer(a, b).value
    a2, b2 = layer_terms(w, h, lam=2.0)
    assert solve_normalized_layer(a2, b2).value == pytest.approx(
        v_half * math.sqrt(0.5 / 2.0), rel=1e-9
    )
    # groups: block-diagonal (out, in) embedding
    wg, hg = rng.normal(size=(4, 1, 3, 3)), rng.random((4, 1, 3, 3))
    ag, bg = layer_terms(wg, hg, groups=2)
    assert ag.shape == (4, 2) and ag[0, 1] == 0 and ag[3, 0] == 0 and bg[2, 1] > 0


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        solve_normalized_layer(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError):
        solve_normalized_layer(-np.ones((2, 2)), np.ones((2, 2)))


def test_nsce_is_invariant_to_scaling_and_shifting_logits() -> None:
    """§5.4: the surrogate must not change when the outputs are scaled or shifted."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (16,), generator=g)
    base = normalized_cross_entropy(z, y)
    for scale, shift in [(3.0, 0.0), (0.01, 0.0), (1.0, 7.5), (42.0, -3.0)]:
        torch.testing.assert_close(
            normalized_cross_entropy(scale * z + shift, y), base, rtol=1e-12, atol=1e-12
        )
    # per-example scales and shifts too
    s, t = (
        torch.rand(16, 1, generator=g, dtype=torch.float64) + 0.1,
        torch.randn(16, 1, generator=g, dtype=torch.float64),
    )
    torch.testing.assert_close(normalized_cross_entropy(s * z + t, y), base, rtol=1e-12, atol=1e-12)
    # plain cross-entropy is not
    assert not torch.allclose(
        torch.nn.functional.cross_entropy(3 * z, y), torch.nn.functional.cross_entropy(z, y)
    )
