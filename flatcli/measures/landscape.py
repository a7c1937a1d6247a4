r"""Loss-landscape slices around a minimum and ``basin_width`` (Li et al. 2018, "Visualizing the
Loss Landscape of Neural Nets").

A slice is the loss (and, where the loss has one, the accuracy) of the model at

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

The loss at a point is the sample loss of ``config.loss`` (docs: "Your model", Losses; every other
command's loss, :func:`flatcli.curvature.losses.sample_loss`): for ``ce`` and ``nsce`` the mean
over the examples, for ``token-ce`` the mean over ALL counted positions of the sample (targets
-100 not counted; a sequence weighs by its counted positions, not the mean of per-sequence means),
for ``mse`` and ``bce`` the mean over examples and outputs. The accuracy (:func:`scoring`): the
argmax's for ``ce``/``nsce``, the token accuracy over counted positions for ``token-ce``, the
fraction of outputs on the target's side of logit 0 for ``bce`` with every target 0 or 1 (the
convention of ``flatcli train``; None otherwise), none for ``mse``. The directions ``gradient``
and ``hessian`` are those of the same sample loss.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flatcli.configs.choices import ALL_LOSSES
from flatcli.configs.landscape import BASIN_RISE, LandscapeConfig
from flatcli.curvature.lanczos import lanczos_memory
from flatcli.curvature.losses import IGNORE_INDEX, infer_loss, sample_loss
from flatcli.curvature.memory import available_memory
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
from flatcli.landscape.evaluate import argmax_correct, evaluate_points, plan
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
    "Scoring",
    "scoring",
    "check_landscape",
    "compute_landscape",
    "save_directions",
]

CLASSIFICATION = ("ce", "nsce")
"""Losses whose targets are classes: their slices report the argmax's accuracy."""


@dataclass(frozen=True)
class Scoring:
    """How a slice of ``loss`` is scored at each point (:func:`scoring`).

    Attributes:
        loss: the loss's name.
        loss_fn: ``(outputs, targets) -> (M,)`` in the head's dtype, whose mean over the N
            examples is the sample loss (:func:`flatcli.curvature.losses.sample_loss`).
        correct_fn: ``(outputs, targets) -> (M,)`` correct predictions per example, or None
            (no accuracy).
        counted: what the accuracy divides the correct predictions by (examples, counted
            positions or outputs); None without an accuracy.
        accuracy: what the accuracy is, in words (the report's ``details.evaluation.accuracy``).
        positions: the counted positions of ``token-ce`` targets (None for other losses).
        reason: why there is no accuracy (None when there is one).
    """

    loss: str
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    correct_fn: Callable[[Tensor, Tensor], Tensor] | None
    counted: int | None
    accuracy: str | None
    positions: int | None = None
    reason: str | None = None


def _token_correct(outputs: Tensor, targets: Tensor) -> Tensor:
    """Counted positions (target != -100) whose argmax is the target, per sequence: (M,)."""
    counted = targets != IGNORE_INDEX
    return ((outputs.argmax(dim=-1) == targets) & counted).sum(dim=-1)


def _sign_correct(outputs: Tensor, targets: Tensor) -> Tensor:
    """Outputs with logit > 0 exactly where the target is 1, per example: (M,)."""
    hits = (outputs > 0) == (targets > 0.5)
    return hits.reshape(hits.shape[0], -1).sum(dim=1)


def scoring(loss: str, y: Tensor, head_dtype: torch.dtype | None = None) -> Scoring:
    """The loss head and the accuracy of a slice of ``loss`` on the targets ``y`` (all of the
    sample's targets: ``token-ce`` weighs each position by 1/(counted positions of the sample)).

    - ``ce``, ``nsce``: the mean loss over the examples; accuracy of the argmax.
    - ``token-ce``: the mean over every counted position of the sample; the token accuracy,
      the fraction of counted positions whose argmax is the target.
    - ``mse``: the mean over examples and outputs; no accuracy.
    - ``bce``: the mean over examples and outputs; when every target is 0 or 1, the fraction of
      outputs whose logit is > 0 exactly where the target is 1 (as ``flatcli train`` reports
      it), else no accuracy.

    Raises:
        UsageError: ``token-ce`` targets with no counted position.
    """
    head = _head(sample_loss(loss, y), head_dtype)
    n = int(y.shape[0])
    if loss in CLASSIFICATION:
        return Scoring(loss, head, argmax_correct, n, "argmax (fraction of examples)")
    if loss == "token-ce":
        count = int((y != IGNORE_INDEX).sum())
        return Scoring(
            loss, head, _token_correct, count, "token (fraction of counted positions)", count
        )
    if loss == "bce" and bool(((y == 0) | (y == 1)).all()):
        return Scoring(loss, head, _sign_correct, int(y.numel()), "logit > 0 iff target 1")
    reason = (
        "mse has no accuracy"
        if loss == "mse"
        else "bce has an accuracy only when every target is 0 or 1"
    )
    return Scoring(loss, head, None, None, None, reason=reason)


@dataclass(frozen=True)
class LandscapeResult:
    """What :func:`compute_landscape` measured.

    ``loss`` and ``accuracy`` have one entry per alpha (a line) or one row per alpha, one entry
    per beta (a plane); NaN where the loss is not finite. ``accuracy`` is None for a loss
    without one (``mse``; ``bce`` on targets not all 0 or 1), ``accuracy_reason`` says why;
    ``accuracy_kind`` says what it is and ``positions`` counts ``token-ce``'s counted positions
    (:class:`Scoring`). ``directions`` holds d₁ (and d₂) for :func:`save_directions`;
    ``first_layer`` names the input layer whose output was computed once per batch and combined
    per point (None: every point computed it).
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
    accuracy_kind: str | None = "argmax (fraction of examples)"
    accuracy_reason: str | None = None
    positions: int | None = None

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
        else:  # mse, or bce on soft targets: null, with the reason
            out["accuracy"] = out["center_accuracy"] = None
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
        if self.accuracy is None and self.accuracy_reason is not None:
            reasons["accuracy"] = self.accuracy_reason
        bad = sum(math.isnan(v) for v in self.loss[: self.grid.size])
        if bad:
            reasons["loss"] = f"{bad} grid point(s) have a loss that is not finite (null)"
            if bad == self.grid.size:
                reasons["min_loss"] = reasons["max_loss"] = "no grid point has a finite loss"
        if reasons:
            out["reasons"] = reasons
        out["evaluation"] = {
            "loss": self.config.loss,
            "accuracy": self.accuracy_kind,
            "examples": self.num_examples,
            "points": len(self.grid.points),
            "extra_points": len(self.grid.points) - self.grid.size,
            "cached_points": self.cached_points,
            "batch_size": self.batch_size,
            "points_per_pass": self.points_per_pass,
            "first_layer": self.first_layer,
            "mode": "eval",
        }
        if self.positions is not None:
            out["evaluation"]["positions"] = self.positions
        return out


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def check_landscape(
    model: nn.Module,
    config: LandscapeConfig,
    *,
    unsafe: bool = False,
    y: Tensor | None = None,
) -> None:
    """Refuse, before any work, a slice that cannot be computed on ``model`` (and targets ``y``,
    when given).

    Raises:
        UsageError: a ``to`` checkpoint that is missing or not of the model's architecture
            (naming the first parameter that differs), a model with fewer parameters than
            Hessian directions asked for, ``token-ce`` targets with no counted position, or a
            grid (results, directions, Lanczos basis) whose memory estimate exceeds the memory
            available.
    """
    if y is not None and config.loss is not None:
        sample_loss(config.loss, y)  # token-ce: refuses targets that are all -100
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
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    unsafe: bool = False,
) -> Directions:
    """d₁ (and d₂) of ``config`` with the ``info`` the report shows; ``gradient`` and
    ``hessian`` of the sample loss of ``config.loss`` (``loss_fn``: its head, whose mean over
    the examples is that loss)."""
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
        unit, gnorm = gradient_direction(model, x, y, loss_fn, batch_size)
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


def _head(loss_fn: Any, head_dtype: torch.dtype | None) -> Any:
    """``loss_fn`` on outputs cast to ``head_dtype`` (None: as they are)."""

    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        return loss_fn(logits if head_dtype is None else logits.to(head_dtype), labels)

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
    """Loss (and accuracy) over a slice θ* + α d₁ + β d₂ of the landscape around ``model``
    (Li et al. 2018, §3-4), the loss being the sample loss of ``config.loss`` (:func:`scoring`).

    Args:
        model: the network at θ*; evaluated in eval mode (its mode is restored afterwards).
        x: inputs (N, ...), on the model's device: floating-point ones in its dtype, token ids
            (N, T) as integers.
        y: targets of ``config.loss`` (docs: "Your model", Losses): int64 labels (N,) for ``ce`` and
            ``nsce``, int64 tokens (N, T) with -100 not counted for ``token-ce``, float targets
            (N,) or (N, D) for ``mse``, in [0, 1] for ``bce``.
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
    check_landscape(model, config, unsafe=unsafe, y=y)
    grid = make_grid(config.steps, config.range, config.dims, (0.0, 1.0) if config.to else ())
    head_dtype = DTYPES[config.head_dtype]
    score = scoring(str(config.loss), y, head_dtype)
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
        how = plan(model, x, config.batch_size, config.points_per_pass, longest, head_dtype)
        dirs = _directions(
            model, x, y, config, theta, budget, head_dtype, how.batch_size, score.loss_fn, unsafe
        )

        def evaluate(start: int, stop: int, fraction: Any) -> dict[str, list]:
            sums, correct = evaluate_points(
                model,
                x,
                y,
                theta,
                dirs.as_list(),
                grid.points[start:stop],
                score.loss_fn,
                batch_size=how.batch_size,
                points_per_pass=how.points_per_pass,
                correct_fn=score.correct_fn,
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
    counted = score.counted
    accuracy = None if counted is None else [c / max(counted, 1) for c in values["correct"]]
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
        accuracy_kind=score.accuracy,
        accuracy_reason=score.reason,
        positions=score.positions,
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
    check=lambda run, config: check_landscape(
        run.model, dataclasses.replace(config, loss=_registry.loss_of(run, config)), y=run.y
    ),
    losses=ALL_LOSSES,
    needs="a loss flatcli knows (ce, nsce, token-ce, mse, bce)",
)
