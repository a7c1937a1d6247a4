r"""Loss-landscape slices around a minimum and ``basin_width`` (Li et al. 2018, "Visualizing the
Loss Landscape of Neural Nets").

A slice is the loss (and, for a classification loss, the accuracy) of the model at

.. math::
    \theta(\alpha, \beta) = \theta^* + \alpha d_1 + \beta d_2

over a grid of (α, β) (their §3: f(α, β) = L(θ* + αδ + βη); a line for one direction), in eval
mode, BatchNorm running statistics kept at θ*'s values. The directions
(:mod:`flatcli.landscape.directions`) are, by ``config.directions``:

- ``random``: Gaussian, filter-normalised (their §4: d_{i,j} ← d_{i,j}/‖d_{i,j}‖ · ‖θ_{i,j}‖ for
  each output filter j of weight i; parameters with fewer than 2 dimensions 0), or with
  ``normalization="none"`` a plain standard Gaussian (the slice a reparametrisation distorts:
  Dinh et al. 2017, §5; filter normalisation is Li et al.'s answer);
- ``hessian``: the unit eigenvectors of the two largest algebraic Hessian eigenvalues (d₁ ↔ λ₁);
- ``gradient``: the unit gradient of the mean loss, then a filter-normalised Gaussian;
- with ``to``: d₁ = θ_to − θ* (the line of Goodfellow et al. 2015; α = 1 is the other
  checkpoint), d₂ a filter-normalised Gaussian.

``basin_width`` is the width of the α-interval around 0 along d₁ (β = 0) where the loss stays
below ``center_loss + 0.1``, each crossing located by linear interpolation between grid points
(:func:`flatcli.landscape.grid.basin_width`): larger is flatter, for filter-normalised
directions (with unnormalised ones it follows the scale of the weights instead).

Many points per pass (:mod:`flatcli.landscape.evaluate`): stacked parameter sets under
``torch.func.vmap``; blocks of points shared over ``torchrun`` processes and, given a
:class:`~flatcli.landscape.blocks.BlockStore`, resumed from the finished ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flatcli.configs.landscape import BASIN_RISE, LandscapeConfig
from flatcli.curvature.losses import get_loss, infer_loss
from flatcli.curvature.memory import available_memory, lanczos_memory
from flatcli.curvature.operators import eval_mode
from flatcli.dtypes import DTYPES
from flatcli.errors import UsageError
from flatcli.landscape.blocks import BlockStore, run_blocks
from flatcli.landscape.directions import (
    Directions,
    difference_direction,
    gaussian_directions,
    gradient_direction,
    hessian_directions,
    load_other,
    norm,
)
from flatcli.landscape.evaluate import evaluate_points, plan
from flatcli.landscape.first_layer import find_first_layer
from flatcli.landscape.grid import (
    Basin,
    Grid,
    basin_width,
    count_points,
    grid_memory,
    make_grid,
)
from flatcli.measures.registry import torch_warnings_silenced
from flatcli.progress import Budget, ProgressFn

__all__ = [
    "LandscapeConfig",
    "LandscapeResult",
    "check_landscape",
    "compute_landscape",
    "save_directions",
]

CLASSIFICATION = ("ce", "nsce")
"""Losses whose targets are classes: their slices also report the accuracy."""


@dataclass(frozen=True)
class LandscapeResult:
    """What :func:`compute_landscape` measured.

    ``loss`` and ``accuracy`` have one entry per alpha (a line) or one row per alpha, one entry
    per beta (a plane); NaN where the loss is not finite. ``directions`` holds d₁ (and d₂) for
    :func:`save_directions`; ``first_layer`` names the input layer whose output was computed
    once per batch and combined per point (None: every point computed it).
    """

    config: LandscapeConfig
    grid: Grid
    loss: list[float]
    accuracy: list[float] | None
    basin: Basin
    num_params: int
    num_examples: int
    batch_size: int
    points_per_pass: int
    cached_points: int
    directions: Directions = field(repr=False)
    directions_file: str | None = None
    first_layer: str | None = None

    def _rows(self, values: list[float]) -> list[Any]:
        if self.grid.betas is None:
            return values[: self.grid.size]
        s = len(self.grid.betas)
        return [values[i * s : (i + 1) * s] for i in range(len(self.grid.alphas))]

    @property
    def center_loss(self) -> float:
        """L(θ*)."""
        return self.loss[self.grid.center]

    def metrics(self) -> dict[str, float | int | None]:
        """``{center_loss, min_loss, max_loss, basin_width, num_params}``."""
        finite = [v for v in self.loss[: self.grid.size] if not math.isnan(v)]
        return {
            "center_loss": self.center_loss,
            "min_loss": min(finite) if finite else None,
            "max_loss": max(finite) if finite else None,
            "basin_width": self.basin.width,
            "num_params": self.num_params,
        }

    def details(self) -> dict[str, Any]:
        """Coordinates, the loss (and accuracy) grids, the directions and how they were made."""
        out: dict[str, Any] = {"alphas": list(self.grid.alphas)}
        if self.grid.betas is not None:
            out["betas"] = list(self.grid.betas)
        out["loss"] = self._rows(self.loss)
        if self.accuracy is not None:
            out["accuracy"] = self._rows(self.accuracy)
            out["center_accuracy"] = self.accuracy[self.grid.center]
        out["directions"] = dict(self.directions.info)
        if self.directions_file is not None:
            out["directions"]["file"] = self.directions_file
        out["basin"] = {
            "rise": BASIN_RISE,
            "threshold": self.basin.threshold,
            "left": self.basin.left,
            "right": self.basin.right,
            "line": {
                "alphas": self.grid.line_alphas(),
                "loss": [self.loss[i] for i in self.grid.line],
            },
        }
        reasons = {}
        if self.basin.reason is not None:
            reasons["basin_width"] = self.basin.reason
        bad = sum(math.isnan(v) for v in self.loss[: self.grid.size])
        if bad:
            reasons["loss"] = f"{bad} grid point(s) have a loss that is not finite (null)"
            if bad == self.grid.size:
                reasons["min_loss"] = reasons["max_loss"] = "no grid point has a finite loss"
        if reasons:
            out["reasons"] = reasons
        out["evaluation"] = {
            "loss": self.config.loss,
            "examples": self.num_examples,
            "points": len(self.grid.points),
            "extra_points": len(self.grid.points) - self.grid.size,
            "cached_points": self.cached_points,
            "batch_size": self.batch_size,
            "points_per_pass": self.points_per_pass,
            "first_layer": self.first_layer,
            "mode": "eval",
        }
        return out


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def check_landscape(model: nn.Module, config: LandscapeConfig, *, unsafe: bool = False) -> None:
    """Refuse, before any work, a slice that cannot be computed on ``model``.

    Raises:
        UsageError: a ``to`` checkpoint that is missing or not of the model's architecture
            (naming the first parameter that differs), a model with fewer parameters than
            Hessian directions asked for, or a grid (results, directions, Lanczos basis) whose
            memory estimate exceeds the memory available.
    """
    if config.to is not None:
        load_other(config.to, model, unsafe=unsafe)
    p0 = next(iter(model.parameters()), None)
    if p0 is None:
        raise UsageError("the model has no parameters: there is no landscape to slice")
    total = sum(p.numel() for p in model.parameters())
    dim = _num_params(model)
    if config.directions == "hessian" and dim < config.dims:
        raise UsageError(
            f"--directions hessian needs {config.dims} eigenvectors but the model has {dim} "
            "trainable parameters"
        )
    points = count_points(config.steps, config.dims, 2 if config.to else 0)
    need = grid_memory(points, total, p0.element_size(), config.dims)
    if config.directions == "hessian":
        need += lanczos_memory(dim, config.dims, return_vectors=True).bytes
    free = available_memory(p0.device if p0.device.type == "cuda" else "cpu")
    if need > free:
        shape = "×".join([str(config.steps)] * config.dims)
        raise UsageError(
            f"a {shape} grid ({points:,} points) needs about {_size(need)} for its "
            f"results and directions, more than the {_size(free)} available; lower --steps"
            + (" or use --dims 1" if config.dims == 2 else "")
        )


def _directions(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: LandscapeConfig,
    theta: dict[str, Tensor],
    budget: Budget,
    head_dtype: torch.dtype,
    batch_size: int,
    unsafe: bool = False,
) -> Directions:
    """d₁ (and d₂) of ``config`` with the ``info`` the report shows."""
    k = config.dims
    info: dict[str, Any] = {"kind": config.kind, "seed": config.seed}
    if config.to is not None:
        other, sha = load_other(config.to, model, unsafe=unsafe)
        dirs = [difference_direction(theta, other)]
        dirs += gaussian_directions(theta, k - 1, config.seed, config.normalization)
        info.update(to=str(config.to), to_sha256=sha, normalization={"d1": "none"})
        if k == 2:
            info["normalization"]["d2"] = config.normalization
    elif config.directions == "random":
        dirs = gaussian_directions(theta, k, config.seed, config.normalization)
        info["normalization"] = config.normalization
    elif config.directions == "gradient":
        loss = _head(get_loss(config.loss), head_dtype)
        unit, gnorm = gradient_direction(model, x, y, loss, batch_size)
        dirs = [unit, *gaussian_directions(theta, k - 1, config.seed, config.normalization)]
        info.update(gradient_norm=gnorm, normalization={"d1": "unit"})
        if k == 2:
            info["normalization"]["d2"] = config.normalization
    else:
        with torch_warnings_silenced():
            dirs, eig = hessian_directions(
                model,
                x,
                y,
                k,
                loss=config.loss,
                head_dtype=head_dtype,
                batch_size=config.batch_size,
                seed=config.seed,
                progress=budget.stage("Hessian eigenvectors", _lanczos_steps(model, k)),
            )
        info.update(normalization="unit eigenvectors", **eig)
    info["norms"] = [norm(d) for d in dirs]
    return Directions(dirs[0], dirs[1] if k == 2 else None, info)


def _lanczos_steps(model: nn.Module, k: int) -> int:
    from flatcli.curvature.lanczos import basis_size

    return basis_size(_num_params(model), k)[0]


def _head(loss_fn: Any, head_dtype: torch.dtype) -> Any:
    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        return loss_fn(logits.to(head_dtype), labels)

    return loss


def compute_landscape(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: LandscapeConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    store: BlockStore | None = None,
    unsafe: bool = False,
) -> LandscapeResult:
    """Loss (and accuracy) over a slice θ* + α d₁ + β d₂ of the landscape around ``model``.

    Args:
        model: the network at θ*; evaluated in eval mode (its mode is restored afterwards).
        x: inputs (N, ...), on the model's device and dtype.
        y: int64 labels (N,).
        config: what to compute (default :class:`LandscapeConfig()`: a 21-point line along a
            filter-normalised random direction, over [−1, 1]).
        progress: ``progress(description, done, total)``, counted in grid points (with
            ``hessian``: Lanczos steps first); an estimate above 10 s is said in a warning.
        store: finished blocks of points from earlier runs of the same slice (None: none).
        unsafe: read a ``to`` checkpoint that needs unpickling (``--unsafe-load``).

    Raises:
        UsageError: what :func:`check_landscape` refuses.
        MeasureError: a gradient direction at a point where the gradient is 0.
    """
    config = config or LandscapeConfig()
    if config.loss is None:  # a library call without a loss: inferred from the targets
        config = dataclasses.replace(config, loss=infer_loss(y))
    check_landscape(model, config, unsafe=unsafe)
    grid = make_grid(config.steps, config.range, config.dims, (0.0, 1.0) if config.to else ())
    head_dtype = DTYPES[config.head_dtype]
    loss_fn = _head(get_loss(config.loss), head_dtype)
    classification = config.loss in CLASSIFICATION
    n = int(x.shape[0])
    steps = _lanczos_steps(model, config.dims) if config.directions == "hessian" else 0
    budget = Budget(
        progress,
        "landscape",
        steps + len(grid.points),
        unit="grid points" if not steps else "Hessian-vector products and grid points",
        cheaper="fewer --steps, --dims 1 or --max-examples",
    )
    with eval_mode(model):
        theta = {name: p.detach() for name, p in model.named_parameters()}
        longest = max(b - a for a, b in grid.blocks)
        first = find_first_layer(model, x)
        how = plan(model, x, config.batch_size, config.points_per_pass, longest)
        dirs = _directions(model, x, y, config, theta, budget, head_dtype, how.batch_size, unsafe)

        def evaluate(start: int, stop: int, fraction: Any) -> dict[str, list]:
            sums, correct = evaluate_points(
                model,
                x,
                y,
                theta,
                dirs.as_list(),
                grid.points[start:stop],
                loss_fn,
                batch_size=how.batch_size,
                points_per_pass=how.points_per_pass,
                first=first,
                progress=fraction,
            )
            return {"loss": (sums / max(n, 1)).tolist(), "correct": correct.tolist()}

        step = budget.stage("grid", len(grid.points))
        key = {"to_sha256": dirs.info.get("to_sha256"), "examples": n}
        values, cached = run_blocks(
            grid.blocks,
            evaluate,
            key=key,
            store=store,
            progress=lambda done: step("grid", done, len(grid.points)),
        )
    budget.finish()
    loss = [math.nan if v is None else float(v) for v in values["loss"]]
    accuracy = [c / max(n, 1) for c in values["correct"]] if classification else None
    line = [loss[i] for i in grid.line]
    basin = basin_width(grid.line_alphas(), line, loss[grid.center], BASIN_RISE)
    return LandscapeResult(
        config=config,
        grid=grid,
        loss=loss,
        accuracy=accuracy,
        basin=basin,
        num_params=_num_params(model),
        num_examples=n,
        batch_size=how.batch_size,
        points_per_pass=how.points_per_pass,
        cached_points=cached,
        directions=dirs,
        first_layer=None if first is None else first.name,
    )


def save_directions(result: LandscapeResult, path: str | Path) -> str:
    """Write d₁ (and d₂) to ``path`` (``.safetensors``): keys ``d1.<parameter name>`` and
    ``d2.<parameter name>`` in the run's dtype, the directions' description as metadata
    (``flatcli.directions``, JSON). Returns the path."""
    import json

    from safetensors.torch import save_file

    from flatcli.io.atomic import atomic_path

    tensors = {}
    for k, d in enumerate(result.directions.as_list(), start=1):
        tensors.update({f"d{k}.{n}": t.detach().contiguous().cpu() for n, t in d.items()})
    meta = {"flatcli.directions": json.dumps(result.directions.info)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return str(path)


# --- registration (flatcli.measures.registry) -------------------------------------------------
from flatcli.measures import registry as _registry  # noqa: E402 - registers the finished module

_LI = "Li et al. 2018, §3-4 (filter-normalised slice)"
_registry.register_measure(
    "landscape",
    LandscapeConfig,
    _registry.on_run(compute_landscape),
    metrics=(
        _registry.Metric(
            "center_loss", _registry.Direction.NEUTRAL, _LI, "the loss at θ* (α = β = 0)"
        ),
        _registry.Metric(
            "min_loss", _registry.Direction.NEUTRAL, _LI, "the smallest loss on the grid"
        ),
        _registry.Metric(
            "max_loss",
            _registry.Direction.SHARPER,
            _LI,
            "the largest loss on the grid: a sharper minimum rises higher within the same "
            "filter-normalised radius",
        ),
        _registry.Metric(
            "basin_width",
            _registry.Direction.FLATTER,
            f"{_LI}; width of the α-interval where L < L(θ*) + {BASIN_RISE}",
            "width of the interval around α = 0 along d₁ where the loss stays below "
            f"center_loss + {BASIN_RISE} (crossings interpolated linearly)",
        ),
        _registry.NUM_PARAMS,
    ),
    cost="S (1-D) or S² (2-D) grid points, one forward pass over the examples each (several "
    "points per vmapped forward); hessian: + Lanczos Hessian-vector products; gradient: + one "
    "backward pass",
    check=lambda run, config: check_landscape(run.model, config),
)
