"""Sharpness of a minimum: normalized sharpness and the classic measures, in one call.

``compute_sharpness(model, x, y, config) -> SharpnessResult`` computes any of the definitions,
one module each:

- ``normalized_sharpness`` (:mod:`.normalized`; Tsuzuku et al. 2020, Eq. 17, Algorithm 1), with
  ``normalized_sharpness_gap`` and, with Hutchinson diagonals, ``normalized_sharpness_stderr``;
- ``matrix_normalized_sharpness`` (:mod:`.matrix_normalized`; Tsuzuku et al. 2020, Eq. 13);
- ``hessian_trace`` (:mod:`.hessian_trace`; Tsuzuku et al. 2020, Eq. 5);
- ``eps_sharpness`` (:mod:`.eps`; Keskar et al. 2017, Metric 2.1);
- ``adaptive_sharpness`` (:mod:`.adaptive`; Kwon et al. 2021; Andriushchenko et al. 2023).

A new definition is one new public module here that ends with ``define(Definition(...))``
(:mod:`._definition`): its name, metrics, cost, table header, when its standard error is
reported, what it takes from the shared computation and its ``compute(shared) -> Outcome``.
Importing the package imports every public module (:func:`._definition.discover`) and registers
each definition with :mod:`flatcli.measures.registry`; :data:`ALL_MEASURES` (the names
:class:`SharpnessConfig` accepts), the :class:`SharpnessMeasure` Enum,
:func:`sharpness_metric_keys` and :func:`table_columns` follow.

Which diagonal. The default ``diag_method="ggn"`` is the exact Gauss-Newton diagonal. For
networks that are piecewise linear in each weight (ReLU/LeakyReLU, max/avg pooling, no smooth
activation: every ∂²z/∂w_i² vanishes) it IS the Hessian diagonal, for any loss head. Algorithm
1's stochastic estimate (``"hutchinson"``) is biased upward by the clipping: noise that pushes
an entry below 0 is cut, noise above 0 is kept. On LeNet-5 / 1,000 mnist5k digits, 100
probes gave 360 ± 4 (jackknife stderr) against the exact 208.5, ten times slower than the
exact GGN diagonal (see the project's benchmarks). The jackknife measures the spread over
probes, not this bias. Use ``"exact"`` (one HVP per weight) for the Hessian of a small smooth
network: its estimated cost is reported before it runs, and above an hour it needs
``force=True``.

Which loss. The classic measures (the worst-case ascents, the Hessian trace) use ``config.loss``,
the command's loss (the common ``--loss``; default the run's, else inferred from the targets:
``"ce"`` for class labels, as in §6.2 and the papers that defined them). The two normalized
measures use ``config.normalized_loss``: by default ``"nsce"`` (Tsuzuku et al. 2020, §5.4,
invariant to scaling and shifting the logits) when the loss is ``ce`` or ``nsce``, else the
command's loss (NSCE normalises class logits; the other losses have none).

Which parameters. The normalized measures sum over weight matrices: every parameter with two or
more dimensions (Linear weights; conv kernels as (out, in) with kernel positions sharing σ_iσ'_j;
other >= 2-D tensors as dim 0 x dim 1). One-dimensional parameters (biases, normalisation scales
and shifts) are left out of both: with a scale per row, a vector's every entry has its own
variance, which is naive parameter counting, so the posterior noise is 0 and the KL term a
constant (Tsuzuku et al. 2020, footnote 5). This is also what keeps them exactly invariant: the
Hessian diagonal of a weight matrix transforms as ``h / d²`` when the weights transform as
``d ⊙ W`` with d of rank one (layer, neuron and BN scaling), whatever happens to the biases.
``details()["excluded_params"]`` lists what was left out. The classic measures use all
parameters.

One operator per loss, one diagonal. The Hessian-based measures share one operator per loss
head over all trainable parameters (an :class:`~flatcli.curvature.operators.OperatorCache`; pass
your own to share it with other measures of the same checkpoint): the curvature diagonal, computed
once when a chosen definition needs it, and the per-layer traces use blocks of it
(:meth:`~flatcli.curvature.operators.CurvatureOperator.restrict`), so with
``normalized_loss == loss`` one operator serves every measure.

Every measure differentiates the model in eval mode (restored afterwards).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from flatcli.configs.choices import ALL_LOSSES
from flatcli.measures import registry as _registry
from flatcli.measures.sharpness._compute import (
    SharpnessResult,
    compute_sharpness,
    sharpness_metric_keys,
    table_columns,
    weight_matrices,
)
from flatcli.measures.sharpness._config import SharpnessConfig, SharpnessMeasure, all_measures
from flatcli.measures.sharpness._definition import (
    Definition,
    Outcome,
    Shared,
    define,
    definitions,
    on_define,
)
from flatcli.progress import ProgressFn

__all__ = [
    "SharpnessMeasure",
    "ALL_MEASURES",
    "SharpnessConfig",
    "SharpnessResult",
    "compute_sharpness",
    "weight_matrices",
    "sharpness_metric_keys",
    "table_columns",
    # writing a definition
    "Definition",
    "Outcome",
    "Shared",
    "define",
    "definitions",
]


def __getattr__(name: str) -> Any:
    if name == "ALL_MEASURES":  # every definition's name, in order (follows define())
        return all_measures()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register(definition: Definition) -> None:
    """Register ``definition`` as a measure of ``flatcli sharpness`` (flatcli.measures.registry)."""
    name = definition.name

    def on_run(run: Any, config: SharpnessConfig, progress: ProgressFn) -> SharpnessResult:
        # compute_sharpness of this one measure on a loaded checkpoint (flatcli.load)
        cfg = config if config.measures == (name,) else replace(config, measures=(name,))
        cfg = cfg.resolved(_registry.loss_of(run, config))
        return compute_sharpness(run.model, run.x, run.y, cfg, progress=progress)

    def reports(config: SharpnessConfig) -> list[str]:
        return definition.keys(config) if name in config.measures else []

    _registry.register_measure(
        name,
        SharpnessConfig,
        on_run,
        metrics=definition.metrics,
        cost=definition.cost,
        command="sharpness",
        reports=reports,
        losses=ALL_LOSSES,
    )


for _found in definitions():
    _register(_found)
on_define(_register)
