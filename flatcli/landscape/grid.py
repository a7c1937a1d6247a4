"""The grid of a slice: its coordinates, its blocks (the unit of caching and sharding) and
``basin_width``.

A 1-D slice evaluates L(θ* + α d₁) at the alphas, a 2-D one L(θ* + α d₁ + β d₂) at every
(αᵢ, βⱼ), row i at αᵢ (Li et al. 2018, §3). ``--steps S`` gives S evenly spaced points per axis
over [−R, R] (:func:`axis`; the middle one exactly 0 for odd S); a line to another checkpoint
always includes 0 and 1. Points the metrics need that the grid lacks are evaluated as extras:
the centre θ* for even S, and, in 2-D with even S, the line β = 0 that ``basin_width`` reads.

>>> axis(5, 1.0)
[-1.0, -0.5, 0.0, 0.5, 1.0]
>>> axis(4, 1.5, include=(0.0, 1.0))
[-1.5, -0.5, 0.0, 0.5, 1.0, 1.5]
>>> b = basin_width([-1.0, 0.0, 1.0], [1.2, 1.0, 1.4], center=1.0, rise=0.1)
>>> round(b.left, 6), round(b.right, 6), round(b.width, 6)
(-0.5, 0.25, 0.75)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "BLOCK_1D",
    "axis",
    "Grid",
    "make_grid",
    "Basin",
    "basin_width",
    "BYTES_PER_POINT",
    "count_points",
    "grid_memory",
]

BLOCK_1D = 8
"""Points per block of a line (a 2-D grid's block is one row): what one cache entry holds."""

BYTES_PER_POINT = 160
"""Memory one grid point's results take until the report is written: the float64 sums, the
Python floats of the report's lists and their JSON text (loss and accuracy), with headroom."""


def axis(steps: int, radius: float, include: Sequence[float] = ()) -> list[float]:
    """``steps`` evenly spaced points over [−radius, radius] (``[0.0]`` for one step), with the
    values of ``include`` added; sorted, without duplicates.

    Point i is ``radius · (2i − (S − 1))/(S − 1)``: exactly symmetric, the ends exactly ±radius
    and, for odd S, the middle exactly 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1. Got {steps}.")
    if steps == 1:
        values = [0.0]
    else:
        values = [radius * ((2 * i - (steps - 1)) / (steps - 1)) for i in range(steps)]
    return sorted({*values, *(float(v) for v in include)})


@dataclass(frozen=True)
class Grid:
    """The points of a slice, in evaluation order: the grid (row-major), then the extras.

    Attributes:
        alphas: the α coordinates (rows).
        betas: the β coordinates (columns), or None for a line.
        points: (α, β) of every point to evaluate (β = 0 on a line).
        size: how many of ``points`` form the grid (the rest are extras).
        center: the index of θ* (α = β = 0) in ``points``.
        line: the indices (in ``points``) of the line β = 0 along d₁, ascending in α, with the
            centre: what ``basin_width`` reads.
        blocks: ``[start, stop)`` ranges of ``points``: rows (2-D), runs of :data:`BLOCK_1D`
            points (1-D), then one block of extras.
    """

    alphas: list[float]
    betas: list[float] | None
    points: list[tuple[float, float]]
    size: int
    center: int
    line: list[int]
    blocks: list[tuple[int, int]]

    def line_alphas(self) -> list[float]:
        """The α of each point of :attr:`line`."""
        return [self.points[i][0] for i in self.line]


def make_grid(steps: int, radius: float, dims: int, include: Sequence[float] = ()) -> Grid:
    """The grid of ``steps`` points per axis over [−radius, radius] in ``dims`` (1 or 2)
    dimensions; ``include`` adds alphas (0 and 1 for a line to another checkpoint)."""
    alphas = axis(steps, radius, include)
    betas = axis(steps, radius) if dims == 2 else None
    if betas is None:
        points = [(a, 0.0) for a in alphas]
        blocks = [(i, min(i + BLOCK_1D, len(points))) for i in range(0, len(points), BLOCK_1D)]
    else:
        points = [(a, b) for a in alphas for b in betas]
        blocks = [(i * len(betas), (i + 1) * len(betas)) for i in range(len(alphas))]
    size = len(points)
    index = {p: i for i, p in enumerate(points)}
    extras: list[tuple[float, float]] = []
    if (0.0, 0.0) not in index:
        extras.append((0.0, 0.0))
    if betas is not None and 0.0 not in betas:
        extras += [(a, 0.0) for a in alphas if a != 0.0]
    for p in extras:
        index[p] = len(points)
        points.append(p)
    if extras:
        blocks.append((size, len(points)))
    line_alphas = sorted({a for a in alphas} | {0.0})
    line = [index[(a, 0.0)] for a in line_alphas]
    return Grid(alphas, betas, points, size, index[(0.0, 0.0)], line, blocks)


def count_points(steps: int, dims: int, include: int = 0) -> int:
    """At most how many points :func:`make_grid` makes (without making them): the grid, with
    ``include`` added alphas, and the extras.

    >>> count_points(21, 2), count_points(4, 2), count_points(21, 1, include=2)
    (463, 21, 24)
    """
    alphas = steps + include
    return alphas * (steps if dims == 2 else 1) + 1 + (alphas if dims == 2 else 0)


def grid_memory(points: int, num_params: int, itemsize: int, dims: int) -> int:
    """Bytes a slice needs beside the model and the data: θ*, the directions and one stacked
    copy of the parameters in the run's dtype, the float64 draws of a direction, and
    :data:`BYTES_PER_POINT` per point."""
    return (2 + dims) * num_params * itemsize + 2 * num_params * 8 + points * BYTES_PER_POINT


@dataclass(frozen=True)
class Basin:
    """Where the loss along d₁ first reaches ``threshold`` on each side of α = 0.

    ``width`` = ``right − left``, or None with ``reason`` when a side never reaches it within
    the range (or the centre's loss is not finite).
    """

    threshold: float
    left: float | None
    right: float | None
    width: float | None
    reason: str | None = None


def basin_width(
    alphas: Sequence[float], losses: Sequence[float], center: float, rise: float
) -> Basin:
    """The width of the α-interval around 0 where the loss stays below ``center + rise``.

    Walking out from α = 0 on each side, the first grid point whose loss is at least the
    threshold ends the interval; the crossing is located by linear interpolation between it
    and the point before. A loss that is not finite counts as above the threshold (and its
    crossing lies at the point before it).

    Args:
        alphas: ascending coordinates along d₁, containing 0.0.
        losses: the loss at each (``losses[alphas.index(0.0)]`` is the centre's).
        center: the loss at α = 0.
        rise: how far above ``center`` the threshold lies (0.1 for ``basin_width``).
    """
    threshold = center + rise
    if not math.isfinite(center):
        return Basin(threshold, None, None, None, f"the loss at θ* is {center}")
    c = list(alphas).index(0.0)

    def crossing(order: range) -> float | None:
        prev = c
        for i in order:
            value = losses[i]
            if not math.isfinite(value) or value >= threshold:
                if not math.isfinite(value):
                    return alphas[prev]
                frac = (threshold - losses[prev]) / (value - losses[prev])
                return alphas[prev] + frac * (alphas[i] - alphas[prev])
            prev = i
        return None

    right = crossing(range(c + 1, len(alphas)))
    left = crossing(range(c - 1, -1, -1))
    if left is None or right is None:
        sides = [
            f"{name} (up to α = {alphas[end]:g})"
            for name, value, end in (("left", left, 0), ("right", right, -1))
            if value is None
        ]
        reason = (
            f"the loss stays below center_loss + {rise:g} = {threshold:.6g} on the "
            f"{' and '.join(sides)}: no crossing within the range; widen --range"
        )
        return Basin(threshold, left, right, None, reason)
    return Basin(threshold, left, right, right - left)
