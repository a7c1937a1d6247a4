"""Loss-landscape slices θ(α, β) = θ* + α d₁ + β d₂ (Li et al. 2018, "Visualizing the Loss
Landscape of Neural Nets", §3), evaluated exactly and many points per pass.

- :mod:`flatcli.landscape.directions`: filter-normalised Gaussian directions (Li et al. 2018,
  §4), the unit gradient, the top Hessian eigenvectors (the curvature core's Lanczos), and the
  line to another checkpoint.
- :mod:`flatcli.landscape.grid`: the coordinates, the blocks, ``basin_width``.
- :mod:`flatcli.landscape.evaluate`: loss and accuracy at many points per forward
  (``torch.func.vmap`` over stacked parameter sets).
- :mod:`flatcli.landscape.first_layer`: the input layer's output computed once per batch and
  combined per point (it is linear in its weights).
- :mod:`flatcli.landscape.blocks`: blocks read from a store, shared over ``torchrun``, stored.

The measure that composes them is :func:`flatcli.measures.landscape.compute_landscape`
(``flatcli landscape``). This package imports no measure.
"""

from __future__ import annotations

from flatcli.landscape.blocks import BlockStore, run_blocks
from flatcli.landscape.directions import (
    Directions,
    difference_direction,
    filter_normalize,
    gaussian_directions,
    gradient_direction,
    hessian_directions,
    load_other,
)
from flatcli.landscape.evaluate import evaluate_points, plan, point_params
from flatcli.landscape.first_layer import FirstLayer, find_first_layer
from flatcli.landscape.grid import Basin, Grid, axis, basin_width, make_grid

__all__ = [
    "Directions",
    "filter_normalize",
    "gaussian_directions",
    "gradient_direction",
    "hessian_directions",
    "difference_direction",
    "load_other",
    "Grid",
    "axis",
    "make_grid",
    "Basin",
    "basin_width",
    "plan",
    "point_params",
    "evaluate_points",
    "FirstLayer",
    "find_first_layer",
    "BlockStore",
    "run_blocks",
]
