"""Invariance audit: which sharpness measures a function-preserving reparametrisation changes.

A measure of a minimum's flatness should not change when the network's weights change but its
function does not (Dinh et al. 2017 build such transforms to show that the classic measures can
be made arbitrarily sharp; Tsuzuku et al. 2020, §5, define normalized sharpness to be invariant
to them). :func:`audit_invariance` measures a model and a transformed copy of it
(:func:`flatcli.reparam.apply_transform`: layer, neuron or BatchNorm scaling) with the same
:class:`~flatcli.measures.sharpness.SharpnessConfig`, and reports each measure's relative change
and whether it is within tolerance (or, for stochastic estimates, within a few combined standard
errors), with ``max_logit_difference`` to show that the function was preserved.

``flatcli sharpness --invariance`` is its command line; :func:`compute_invariance` with an
:class:`InvarianceConfig` is its registered form (``flatcli.measures.compute("invariance", run)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flatcli.errors import UsageError
from flatcli.measures._config import require as _require
from flatcli.measures.sharpness import ALL_MEASURES, SharpnessConfig, compute_sharpness
from flatcli.progress import ProgressFn, no_progress
from flatcli.reparam.transforms import Transform, apply_transform, max_logit_difference

__all__ = [
    "AuditRow",
    "InvarianceAudit",
    "InvarianceConfig",
    "audit_invariance",
    "compute_invariance",
    "default_rtol",
]


@dataclass(frozen=True)
class AuditRow:
    """One measure before and after a function-preserving transform.

    Attributes:
        measure: the metric name.
        original, transformed: its values.
        rel_change: ``|transformed − original| / max(|original|, tiny)``.
        invariant: whether the change is within ``threshold``.
        threshold: the rule used, in words (relative tolerance, or k combined standard errors
            for a stochastic estimate).
    """

    measure: str
    original: float
    transformed: float
    rel_change: float
    invariant: bool
    threshold: str

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        return asdict(self)


@dataclass(frozen=True)
class InvarianceAudit:
    """The rows of an invariance audit, and how well the transform preserved the function."""

    transform: str
    alpha: float
    rows: list[AuditRow]
    max_logit_difference: float
    original: Any = field(repr=False, default=None)
    transformed: Any = field(repr=False, default=None)

    def metrics(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"max_logit_difference": self.max_logit_difference}
        for r in self.rows:
            out[f"{r.measure}_rel_change"] = r.rel_change
        return out

    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "transform": self.transform,
            "alpha": self.alpha,
            "rows": [r.to_dict() for r in self.rows],
        }
        for key, res in (("original", self.original), ("transformed", self.transformed)):
            if res is not None:
                out[key] = {
                    "metrics": res.metrics(),
                    "per_layer": res.details().get("per_layer", {}),
                }
        return out


def audit_invariance(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: SharpnessConfig,
    transform: Transform | str | Callable[[nn.Module], nn.Module] = Transform.LAYER_SCALE,
    alpha: float = 10.0,
    seed: int = 0,
    *,
    rtol: float = 1e-6,
    k_stderr: float = 3.0,
    layer: str | int | None = None,
    neurons: Sequence[int] | int | None = None,
    progress: ProgressFn | None = None,
) -> InvarianceAudit:
    """Measure ``model`` and its transform with the same config; which measures stayed put?

    A measure counts as invariant when ``rel_change <= rtol``, or, when both values carry a
    standard error (a stochastic estimate: the transformed model's probes see a different
    matrix), when ``|Δ| <= k_stderr · sqrt(se_a² + se_b²)``.

    Args:
        model, x, y: network (eval mode) and examples.
        config: a :class:`~flatcli.measures.sharpness.SharpnessConfig`.
        transform: "layer_scale", "neuron_scale", "bn_scale" or a callable ``model -> model``.
        alpha: the transform's factor.
        seed: seeds the transform's random choices (neuron_scale).
        rtol, k_stderr: the invariance thresholds.
        layer, neurons: passed to :func:`apply_transform` for a transform given by name.
        progress: optional ``(description, done, total)`` callback (each model's measures).

    Returns:
        An :class:`InvarianceAudit` (``rows``, ``max_logit_difference``).
    """
    progress = progress or no_progress
    other = apply_transform(model, transform, alpha, seed, layer=layer, neurons=neurons)
    diff = max_logit_difference(model, other, x)

    def stage(which: str) -> ProgressFn:
        return lambda what, done, total: progress(f"{which}: {what}", done, total)

    res_a = compute_sharpness(model, x, y, config, progress=stage("original"))
    res_b = compute_sharpness(other, x, y, config, progress=stage("transformed"))
    ma, mb = res_a.metrics(), res_b.metrics()
    rows = []
    for name in res_a.measure_names():
        va, vb = ma.get(name), mb.get(name)
        if va is None or vb is None:
            continue
        rel = abs(vb - va) / max(abs(va), 1e-300)
        sa, sb = ma.get(f"{name}_stderr"), mb.get(f"{name}_stderr")
        if sa is not None and sb is not None and math.isfinite(sa) and math.isfinite(sb):
            bound = k_stderr * math.hypot(sa, sb)
            ok = rel <= rtol or abs(vb - va) <= bound
            rule = f"rel_change <= {rtol:g} or |diff| <= {k_stderr:g} combined stderr ({bound:.3g})"
        else:
            ok = rel <= rtol
            rule = f"rel_change <= {rtol:g}"
        rows.append(AuditRow(name, va, vb, rel, ok, rule))
    if isinstance(transform, str):
        name = str(getattr(transform, "value", transform)).replace("-", "_")
    else:
        name = getattr(transform, "__name__", "custom")
    return InvarianceAudit(name, float(alpha), rows, diff, res_a, res_b)


def default_rtol(model: nn.Module | str) -> float:
    """The relative tolerance of an audit in the model's dtype (or a dtype's name): 1e-6 in
    float64, else 1e-3."""
    if isinstance(model, str):
        return 1e-6 if model == "float64" else 1e-3
    p = next(model.parameters(), None)
    return default_rtol("float64" if p is not None and p.dtype == torch.float64 else "float32")


@dataclass(frozen=True)
class InvarianceConfig:
    """What :func:`compute_invariance` audits, and how.

    Attributes:
        sharpness: the measures and their settings (its ``seed`` and ``batch_size`` are
            replaced by this config's).
        transform: ``"layer_scale"``, ``"neuron_scale"`` or ``"bn_scale"`` (``-`` or ``_``).
        alpha: the transform's factor α > 0.
        layer: neuron_scale: the weight layer (name or index) whose units are rescaled;
            bn_scale: the BatchNorm (default: each one).
        neurons: neuron_scale: how many units (random, seeded; default half).
        rtol: threshold on the relative change (None: :func:`default_rtol` of the model).
        k_stderr: a stochastic estimate counts as unchanged within this many combined stderrs.
        seed: seeds the transform's choice of units and every probe.
        batch_size: examples per chunk (None: chosen to fit memory).
    """

    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig)
    transform: str = Transform.LAYER_SCALE.value
    alpha: float = 10.0
    layer: str | int | None = None
    neurons: int | None = None
    rtol: float | None = None
    k_stderr: float = 3.0
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        name = str(getattr(self.transform, "value", self.transform)).strip().lower()
        name = name.replace("-", "_")
        if name not in {t.value for t in Transform}:
            valid = ", ".join(t.value for t in Transform)
            raise UsageError(f"Unknown transform {self.transform!r}; choose one of {valid}.")
        object.__setattr__(self, "transform", name)
        if not isinstance(self.sharpness, SharpnessConfig):
            raise UsageError("sharpness must be a SharpnessConfig.")
        _require(
            [
                (
                    self.alpha > 0 and math.isfinite(self.alpha),
                    f"alpha must be a finite number > 0. Got {self.alpha}.",
                ),
                (
                    self.neurons is None or self.neurons >= 1,
                    f"neurons must be >= 1. Got {self.neurons}.",
                ),
                (
                    self.rtol is None or self.rtol > 0,
                    f"rtol must be > 0. Got {self.rtol}.",
                ),
                (self.k_stderr > 0, f"k_stderr must be > 0. Got {self.k_stderr}."),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready values."""
        out = asdict(self)
        out["sharpness"] = self.sharpness.to_dict()
        return out


def compute_invariance(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: InvarianceConfig | None = None,
    *,
    progress: ProgressFn | None = None,
) -> InvarianceAudit:
    """:func:`audit_invariance` with the settings of an :class:`InvarianceConfig`."""
    from dataclasses import replace

    config = config or InvarianceConfig()
    sharp = replace(config.sharpness, seed=config.seed, batch_size=config.batch_size)
    return audit_invariance(
        model,
        x,
        y,
        sharp,
        config.transform,
        config.alpha,
        config.seed,
        rtol=default_rtol(model) if config.rtol is None else config.rtol,
        k_stderr=config.k_stderr,
        layer=config.layer,
        neurons=config.neurons,
        progress=progress,
    )


# --- registration (flatcli.measures.registry) -------------------------------------------------
from flatcli.measures import registry as _registry  # noqa: E402 - registers the finished module


def _invariance_reports(config: InvarianceConfig) -> list[str]:
    return ["max_logit_difference", *(f"{m}_rel_change" for m in config.sharpness.measures)]


_AUDIT_SOURCE = "Dinh et al. 2017 (layer scale); Tsuzuku et al. 2020, Eqs. 15-16 (neuron scale)"
_registry.register_measure(
    "invariance",
    InvarianceConfig,
    _registry.on_run(compute_invariance),
    command="sharpness --invariance",
    metrics=(
        _registry.Metric(
            "max_logit_difference",
            _registry.Direction.NEUTRAL,
            "-",
            "max |f(x) − f'(x)| between the model and its reparametrisation (≈ 0: the "
            "function was preserved)",
        ),
        *(
            _registry.Metric(
                f"{m}_rel_change",
                _registry.Direction.NEUTRAL,
                _AUDIT_SOURCE,
                f"|Δ {m}| / |{m}| under the function-preserving transform (0: invariant)",
            )
            for m in ALL_MEASURES
        ),
    ),
    cost="the sharpness measures twice (on the model and on its reparametrisation)",
    reports=_invariance_reports,
)
