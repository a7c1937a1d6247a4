"""``compute_sharpness``: the shared curvature computed once, then each chosen definition."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flatcli.curvature.data import iter_chunks
from flatcli.curvature.diagonal import curvature_diagonal
from flatcli.curvature.losses import infer_loss
from flatcli.curvature.operators import OperatorCache, eval_mode
from flatcli.errors import MeasureError
from flatcli.measures._config import finite_or_none
from flatcli.measures.sharpness._config import SharpnessConfig
from flatcli.measures.sharpness._cost import diagonal_passes, warn_cost
from flatcli.measures.sharpness._definition import Definition, Shared, definitions
from flatcli.progress import ProgressFn, no_progress

__all__ = [
    "SharpnessResult",
    "compute_sharpness",
    "weight_matrices",
    "sharpness_metric_keys",
    "table_columns",
]


@dataclass(frozen=True)
class SharpnessResult:
    """The measures of one model.

    Attributes:
        values: ``{measure: value}``.
        stderrs: ``{measure: standard error}`` for stochastic estimates.
        extras: ``{measure: {metric key: value}}``, further metrics of a measure (e.g.
            ``normalized_sharpness_gap``, the certified optimality gap summed over layers).
        per_layer: ``{measure: {parameter name: term}}`` for the per-layer sums.
        settings: ``{measure: settings used}``.
        info: solver statistics, costs, timings and what was excluded.
    """

    values: dict[str, float]
    stderrs: dict[str, float] = field(default_factory=dict)
    extras: dict[str, dict[str, float]] = field(default_factory=dict)
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def measure_names(self) -> list[str]:
        return list(self.values)

    def metrics(self) -> dict[str, float | None]:
        """Flat numbers: each measure, ``<measure>_stderr`` where stochastic, then its extras."""
        out: dict[str, float | None] = {}
        for name, value in self.values.items():
            out[name] = finite_or_none(float(value))
            if name in self.stderrs:
                out[f"{name}_stderr"] = finite_or_none(float(self.stderrs[name]))
            for key, extra in self.extras.get(name, {}).items():
                out[key] = finite_or_none(float(extra))
        return out

    def details(self) -> dict[str, Any]:
        """Per-layer terms, settings, solver statistics, costs and timings (JSON-ready)."""
        non_finite = {
            k: "not finite (NaN or infinite)"
            for k, v in {
                **self.values,
                **{f"{k}_stderr": s for k, s in self.stderrs.items()},
            }.items()
            if not math.isfinite(v)
        }
        out = {"per_layer": self.per_layer, "settings": self.settings, **self.info}
        if non_finite:
            out["non_finite"] = non_finite
        return out


def weight_matrices(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names of parameters with >= 2 dims, names of the others), among those requiring grad."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if p.dim() >= 2], [n for n, p in named if p.dim() < 2]


def _where(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _chosen(config: SharpnessConfig) -> list[Definition]:
    """The definitions ``config`` names, in ``config.measures`` order."""
    by_name = {d.name: d for d in definitions()}
    return [by_name[m] for m in config.measures]


def sharpness_metric_keys(config: SharpnessConfig) -> list[str]:
    """The metric keys :func:`compute_sharpness` reports for ``config`` (stderrs where possible)."""
    return [key for d in _chosen(config) for key in d.keys(config)]


def table_columns(config: SharpnessConfig) -> list[tuple[str, str]]:
    """Table columns ``(metric key, header)``: each measure, its stderr where it is stochastic,
    and its extras (the solver gap after normalized sharpness)."""
    return [col for d in _chosen(config) for col in d.columns(config)]


def compute_sharpness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: SharpnessConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    operators: OperatorCache | None = None,
) -> SharpnessResult:
    """Compute the configured sharpness measures of ``model`` on the examples ``(x, y)``.

    Args:
        model: the network (its modules are put in eval mode for the computation and restored).
        x: inputs (N, ...); y: int64 labels (N,).
        config: a :class:`SharpnessConfig` (default: every measure with default settings).
        progress: optional ``(description, done, total)`` callback.
        operators: an :class:`~flatcli.curvature.operators.OperatorCache` of ``(model, x, y)``
            (built in eval mode, with this config's batch size and seed) to take the Hessian
            operators from; default a new one, so that each matrix is built once per call.

    Returns:
        A :class:`SharpnessResult`; ``metrics()`` is keyed by the measure names, with
        ``<name>_stderr`` for stochastic estimates and ``normalized_sharpness_gap``.

    Raises:
        UsageError: bad configuration; MeasureError: a model without weight matrices.
    """
    config = (config or SharpnessConfig()).resolved(infer_loss(y))
    progress = progress or no_progress
    with eval_mode(model):
        ops = (
            operators
            if operators is not None
            else OperatorCache(model, x, y, batch_size=config.batch_size, seed=config.seed)
        )
        return _compute(model, x, y, config, progress, ops)


def _compute(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: SharpnessConfig,
    progress: ProgressFn,
    ops: OperatorCache,
) -> SharpnessResult:
    """The shared parts once (weight matrices, curvature diagonal), then each definition in
    ``order``; the values come back in ``config.measures`` order."""
    chosen = sorted(_chosen(config), key=lambda d: d.order)
    seconds: dict[str, float] = {}
    products: dict[str, int] = {}
    info: dict[str, Any] = {"seconds": seconds, "products": products}
    total = len(chosen)
    names, excluded = weight_matrices(model)
    with torch.no_grad():
        first = next(iter_chunks(x, None, 1, *_where(model)))
        classes = int(model(first.x)[0].numel())  # outputs per example
    shared = Shared(model, x, y, config, progress, ops, names, excluded, outputs=classes)
    if any(d.weight_matrices for d in chosen):
        if not names:
            raise MeasureError(
                "The model has no weight matrices (parameters with >= 2 dimensions)."
            )
        info["excluded_params"] = excluded
    passes = [d.passes(config, classes) for d in chosen if d.passes is not None]
    diagonal = 0.0
    if any(d.needs_diagonal(config) for d in chosen):
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        diagonal = diagonal_passes(config, classes, params)
        passes.append(diagonal)
    info["estimated_seconds"] = warn_cost(model, x, y, config, passes, classes, diagonal)
    if any(d.needs_diagonal(config) for d in chosen):
        progress("curvature diagonal", 0, total)
        diag = curvature_diagonal(
            model,
            x,
            y,
            method=config.diag_method,
            loss_fn=config.normalized_loss,
            params=names,
            probes=config.probes,
            groups=config.probe_groups,
            batch_size=config.batch_size,
            head_dtype=config.head,
            seed=config.seed,
            operator=None
            if config.diag_method == "ggn"
            else shared.hessian(config.normalized_loss),
            force=config.force,
            progress=progress,
        )
        seconds["diagonal"] = diag.seconds
        products["diagonal"] = diag.products
        info["diagonal"] = diag.describe()
        shared.diagonal = diag

    result = SharpnessResult({})
    for done, d in enumerate(chosen):
        progress(d.label, done, total)
        start = time.perf_counter()
        out = d.compute(shared)
        result.values[d.name] = out.value
        if out.stderr is not None:
            result.stderrs[d.name] = out.stderr
        if out.extras:
            result.extras[d.name] = out.extras
        if out.per_layer is not None:
            result.per_layer[d.name] = out.per_layer
        result.settings[d.name] = out.settings
        if out.products is not None:
            products[d.name] = out.products
        info.update(out.info)
        seconds.update(
            out.seconds if out.seconds is not None else {d.name: time.perf_counter() - start}
        )
    progress("done", total, total)
    ordered = {m: result.values[m] for m in config.measures}
    return SharpnessResult(
        ordered, result.stderrs, result.extras, result.per_layer, result.settings, info
    )
