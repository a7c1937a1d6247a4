"""The grid's coordinates and ``basin_width`` on curves whose crossings are known."""

from __future__ import annotations

import math

import pytest

from flatcli.landscape.grid import axis, basin_width, make_grid


def test_axis_is_symmetric_with_exact_ends_and_centre():
    a = axis(21, 1.0)
    assert len(a) == 21 and a[0] == -1.0 and a[-1] == 1.0 and a[10] == 0.0
    assert a == [-v for v in reversed(a)]
    assert a[15] == 0.5
    assert axis(7, 0.3)[-1] == 0.3 and axis(7, 0.3)[3] == 0.0
    assert axis(1, 2.0) == [0.0]
    assert axis(2, 1.0) == [-1.0, 1.0]
    # a line to another checkpoint: 0 and 1 always present, sorted, no duplicates
    assert axis(4, 0.5, include=(0.0, 1.0)) == [-0.5, -0.5 / 3, 0.0, 0.5 / 3, 0.5, 1.0]
    assert axis(3, 1.0, include=(0.0, 1.0)) == [-1.0, 0.0, 1.0]


def test_even_steps_add_the_centre_and_the_line_as_extras():
    g = make_grid(4, 1.0, 2)
    assert g.size == 16 and 0.0 not in g.alphas and 0.0 not in g.betas
    assert g.points[g.center] == (0.0, 0.0) and g.center >= g.size
    assert g.line_alphas() == sorted([*g.alphas, 0.0])
    assert all(g.points[i][1] == 0.0 for i in g.line)
    assert g.blocks[-1] == (16, len(g.points)) and len(g.points) == 16 + 5
    one = make_grid(4, 1.0, 1)
    assert one.size == 4 and len(one.points) == 5 and one.points[one.center] == (0.0, 0.0)
    odd = make_grid(5, 1.0, 2)
    assert len(odd.points) == odd.size == 25 and odd.points[odd.center] == (0.0, 0.0)
    assert odd.line == [2, 7, 12, 17, 22]  # the column β = 0, one per row
    assert odd.blocks == [(5 * i, 5 * i + 5) for i in range(5)]
    line = make_grid(21, 1.0, 1)
    assert line.blocks == [(0, 8), (8, 16), (16, 21)]


def test_basin_width_interpolates_the_crossings_of_a_known_curve():
    alphas = axis(21, 1.0)  # spacing 0.1
    loss = [1.0 + a * a for a in alphas]
    b = basin_width(alphas, loss, 1.0, 0.1)
    # 1 + α² reaches 1.1 between α = 0.3 (1.09) and 0.4 (1.16): at 0.3 + 0.1·(0.01/0.07)
    right = 0.3 + 0.1 * (1.1 - 1.09) / (1.16 - 1.09)
    assert b.right == pytest.approx(right, rel=1e-12) and b.left == pytest.approx(-right)
    assert b.width == pytest.approx(2 * right, rel=1e-12) and b.reason is None
    # an asymmetric curve: 1 + 2α on the right, 1 + 0.25|α| on the left
    loss = [1.0 + (2 * a if a > 0 else -0.25 * a) for a in alphas]
    b = basin_width(alphas, loss, 1.0, 0.1)
    assert b.right == pytest.approx(0.05, rel=1e-12)
    assert b.left == pytest.approx(-0.4, rel=1e-12)
    assert b.width == pytest.approx(0.45, rel=1e-12)


def test_basin_width_is_null_with_a_reason_when_the_loss_never_crosses():
    alphas = axis(5, 1.0)
    b = basin_width(alphas, [1.5, 1.2, 1.0, 1.02, 1.05], 1.0, 0.1)
    assert b.width is None and b.right is None and b.left == pytest.approx(-0.5 * (0.1 / 0.2))
    assert "right" in b.reason and "left" not in b.reason and "--range" in b.reason
    b = basin_width(alphas, [1.05, 1.0, 1.0, 1.0, 1.05], 1.0, 0.1)
    assert b.width is None and "left" in b.reason and "right" in b.reason
    nan = basin_width(alphas, [2.0, 1.0, math.nan, 1.0, 2.0], math.nan, 0.1)
    assert nan.width is None and nan.reason == "the loss at θ* is nan"


def test_a_loss_that_is_not_finite_ends_the_basin_at_the_point_before():
    alphas = axis(5, 1.0)
    b = basin_width(alphas, [math.inf, 1.05, 1.0, 1.05, math.nan], 1.0, 0.1)
    assert b.left == -0.5 and b.right == 0.5 and b.width == 1.0
