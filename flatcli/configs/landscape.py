"""``LandscapeConfig``: the options of ``flatcli landscape``
(:func:`flatcli.measures.landscape.compute_landscape`) and their choices.

The slice is θ(α, β) = θ* + α d₁ + β d₂ (Li et al. 2018, "Visualizing the Loss Landscape of
Neural Nets", §3: f(α, β) = L(θ* + αδ + βη)), with filter-normalised random directions by
default (their §4: d_{i,j} ← d_{i,j}/‖d_{i,j}‖ · ‖θ_{i,j}‖).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from flatcli.configs._checks import head_dtype_name, require
from flatcli.configs.choices import LossName
from flatcli.errors import choice
from flatcli.options import choices, option

__all__ = ["DirectionKind", "Normalization", "BASIN_RISE", "LandscapeConfig"]


DirectionKind = choices(
    "DirectionKind",
    "random hessian gradient",
    "How d₁ and d₂ are chosen: Gaussian (normalised), the top Hessian eigenvectors, or the "
    "unit gradient and a normalised Gaussian.",
)


Normalization = choices(
    "Normalization",
    "filter none",
    "How a Gaussian direction is scaled: per filter to θ*'s filter norms (Li et al. 2018, §4), "
    "or not at all.",
)

BASIN_RISE = 0.1
"""``basin_width`` is the width of the α-interval around 0 where the loss stays below
``center_loss + BASIN_RISE`` (docs: the command's page)."""


@dataclass(frozen=True)
class LandscapeConfig:
    """What :func:`flatcli.measures.landscape.compute_landscape` computes.

    Attributes:
        directions: ``"random"`` (Gaussian, normalised by ``normalization``), ``"hessian"``
            (unit eigenvectors of the two largest algebraic Hessian eigenvalues, d₁ ↔ λ₁) or
            ``"gradient"`` (the unit gradient of the mean loss, then a normalised Gaussian).
        to: another checkpoint of the same architecture; d₁ = θ_to − θ* (α = 1 is that
            checkpoint; Goodfellow et al. 2015). d₂, for ``dims=2``, is a normalised Gaussian.
        dims: 1 (a line along d₁) or 2 (a plane spanned by d₁, d₂).
        steps: S points per axis, evenly spaced over [−R, R] (with ``to``: plus 0 and 1).
        range: R, in units of the directions.
        normalization: ``"filter"`` (Li et al. 2018, §4: each output filter of a weight with ≥ 2
            dimensions rescaled to that filter's norm in θ*; parameters with fewer dimensions
            zero) or ``"none"`` (a plain standard Gaussian over every parameter: the slice
            Dinh et al. 2017 warn about, changed by a reparametrisation).
        loss: ``"ce"``, ``"nsce"``, ``"token-ce"``, ``"mse"`` or ``"bce"`` (None: the run's
            loss, the common ``--loss``; in a library call, inferred from the targets).
        head_dtype: dtype the loss head runs in (``"float64"`` keeps confident examples).
        points_per_pass: grid points stacked into one vmapped forward (None: as many as make
            about :data:`flatcli.landscape.evaluate.EXAMPLES_PER_PASS` examples per pass on a
            CPU, or fit the memory budget on a GPU).
        seed: seeds the Gaussian directions (and the Hessian's Lanczos start vector).
        batch_size: examples per forward (None: chosen to fit memory).
    """

    directions: str = option(
        "random",
        "--directions",
        "d₁, d₂: random (Gaussian, filter-normalised), hessian (top-2 eigenvectors) or "
        "gradient (unit gradient, then random).",
        choices=DirectionKind,
    )
    to: str | None = option(
        None,
        "--to",
        "Another checkpoint of the same architecture: d₁ = θ_to − θ*, so α = 1 is that "
        "checkpoint (the alphas always include 0 and 1).",
    )
    dims: int = option(1, "--dims", "1: a line along d₁; 2: the plane of d₁ and d₂.", min=1)
    steps: int = option(21, "--steps", "S points per axis over [-R, R].", min=1)
    range: float = option(1.0, "--range", "R: the grid spans [-R, R] in units of d.")
    normalization: str = option(
        "filter",
        "--normalization",
        "Random directions: filter (Li et al. §4) or none (a plain Gaussian).",
        choices=Normalization,
    )
    loss: str | None = None  # not a flag: the common --loss (None: the run's loss)
    head_dtype: str = option(
        "float64", "--head-dtype", "dtype of the loss head (float64 keeps confident examples)."
    )
    points_per_pass: int | None = option(
        None,
        "--points-per-pass",
        "Grid points per vmapped forward. Default: ~256 examples a pass on a CPU, what fits "
        "memory on a GPU.",
        min=1,
    )
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "directions", choice(DirectionKind, self.directions, "directions"))
        set_(self, "normalization", choice(Normalization, self.normalization, "normalization"))
        if self.loss is not None:
            set_(self, "loss", choice(LossName, self.loss, "loss"))
        set_(self, "head_dtype", head_dtype_name(self.head_dtype))
        if self.to is not None:
            set_(self, "to", str(self.to))
        checks = [
            (self.dims in (1, 2), f"--dims must be 1 or 2. Got {self.dims}."),
            (self.steps >= 1, f"--steps must be >= 1. Got {self.steps}."),
            (
                isinstance(self.range, int | float)
                and math.isfinite(self.range)
                and self.range > 0,
                f"--range must be a positive number. Got {self.range}.",
            ),
            (
                self.to is None or self.directions == "random",
                f"--to sets d₁ (the line to {self.to}); it cannot be combined with "
                f"--directions {self.directions}",
            ),
            (
                self.points_per_pass is None or self.points_per_pass >= 1,
                f"--points-per-pass must be >= 1. Got {self.points_per_pass}.",
            ),
            (
                self.batch_size is None or self.batch_size >= 1,
                f"batch_size must be >= 1. Got {self.batch_size}.",
            ),
        ]
        require(checks)

    @property
    def kind(self) -> str:
        """What d₁ is: ``"to"`` with ``to``, else ``directions``."""
        return "to" if self.to is not None else self.directions

    def to_dict(self) -> dict[str, Any]:
        """Every option, JSON-ready."""
        return asdict(self)
