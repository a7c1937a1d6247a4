"""The Hessian trace (Tsuzuku et al. 2020, Eq. 5): tr ∇²L of the mean ``config.loss``.

Over all trainable parameters, with a standard error:

- ``trace_method="auto"`` (default): ``"ggn-residual"`` where it reaches the standard error of
  Hutchinson on H in fewer gradient passes, else ``"hutchinson"``
  (:func:`resolve_trace_method`): a classifier with a handful of classes gets the control
  variate; a language model, whose GGN diagonal needs T·V backward rows per sequence, gets
  Hutchinson.
- ``"ggn-residual"``: ``tr H = tr G + tr(H − G)``. The GGN trace is exact
  (the sum of :func:`~flatcli.curvature.diagonal.ggn_diagonal`) and only the residual
  ``H − G = 1/N Σ_n Σ_k r_nk ∇²f_nk`` is estimated, by Hutchinson with Rademacher probes
  (``z ᵀ H z − z ᵀ G z`` from the shared Hessian and GGN operators). G is the control variate:
  on the README's LeNet-5 a probe's standard deviation falls from 3.40 (H) to 1.45 (H − G)
  while a probe costs about 1.6 Hessian-vector products, so equal error costs about 3x fewer
  products. For networks piecewise linear in each weight (ReLU, max pooling) ``diag(H − G) =
  0`` and the residual's expectation is 0.
- ``"hutchinson"`` / ``"hutchpp"``: those estimators on H itself.

With ``diag_method`` "exact" (small models) the exact sum of the exact Hessian diagonal instead,
no standard error (the shared diagonal when it is that diagonal, i.e. of the same loss over all
parameters).
"""

from __future__ import annotations

from flatcli.configs.sharpness import SharpnessConfig, TraceMethod
from flatcli.curvature.diagonal import DiagMethod, curvature_diagonal, ggn_diagonal
from flatcli.curvature.linop import Difference, LinearOperator
from flatcli.curvature.trace import hutchinson, hutchpp
from flatcli.measures.sharpness._cost import GVP_PASSES, HVP_PASSES, ggn_diagonal_passes
from flatcli.measures.sharpness._definition import (
    Definition,
    Outcome,
    Shared,
    define,
    diagonal_computed,
)

NAME = "hessian_trace"

RESIDUAL_VARIANCE_RATIO = (3.40 / 1.45) ** 2
"""Variance of a Hutchinson probe of H over one of H − G, measured on the README's LeNet-5
(per-probe standard deviations 3.40 and 1.45): the control variate's gain that ``auto`` assumes."""


def resolve_trace_method(config: SharpnessConfig, outputs: int) -> tuple[str, str | None]:
    """``(method, why)``: ``config.trace_method``, with ``"auto"`` resolved (``why`` says how).

    With P probes, ``ggn-residual`` costs the GGN diagonal (about 1.5 gradient passes per output,
    0.4 per token logit, ``outputs`` of them per example: :func:`._cost.ggn_diagonal_passes`;
    nothing when the normalized measures compute that diagonal anyway) plus P Hessian- and
    GGN-vector products, for a variance ``σ²(H − G) / P``. Hutchinson on H reaches that variance
    with ``RESIDUAL_VARIANCE_RATIO · P`` HVPs. ``auto`` takes the cheaper of the two.
    """
    if config.trace_method != TraceMethod.AUTO.value:
        return config.trace_method, None
    probes = config.trace_probes
    diag = 0.0 if _diagonal_shared(config) else ggn_diagonal_passes(config.loss, outputs)
    residual = diag + probes * (HVP_PASSES + GVP_PASSES)
    plain = RESIDUAL_VARIANCE_RATIO * probes * HVP_PASSES
    if residual <= plain:
        return TraceMethod.GGN_RESIDUAL.value, None
    why = (
        f"auto: ggn-residual would take about {residual:,.0f} gradient passes (an exact GGN "
        f"trace over {outputs:,} outputs per example), Hutchinson on H about {plain:,.0f} for "
        "the same standard error"
    )
    return TraceMethod.HUTCHINSON.value, why


def _diagonal_shared(config: SharpnessConfig) -> bool:
    """Whether the shared curvature diagonal is the GGN diagonal of ``config.loss`` (so the
    exact GGN trace is its sum, at no further cost)."""
    return (
        config.diag_method == DiagMethod.GGN.value
        and config.normalized_loss == config.loss
        and diagonal_computed(config)
    )


def compute(shared: Shared) -> Outcome:
    """Hutchinson on the full Hessian, or the exact diagonal's sum for ``diag_method="exact"``."""
    config, diag = shared.config, shared.diagonal
    if config.diag_method == DiagMethod.EXACT.value:  # small models: exact, no stderr
        if (
            diag is not None
            and diag.method == DiagMethod.EXACT.value
            and config.normalized_loss == config.loss
            and not shared.excluded
        ):
            full = diag
        else:
            full = curvature_diagonal(
                shared.model,
                shared.x,
                shared.y,
                method="exact",
                loss_fn=config.loss,
                batch_size=config.batch_size,
                head_dtype=config.head,
                operator=shared.hessian(config.loss),
                force=config.force,
                progress=shared.progress,
            )
        return Outcome(
            value=float(sum(float(v.sum()) for v in full.values.values())),
            settings={
                "loss": config.loss,
                "estimator": "exact (sum of the exact diagonal)",
            },
            products=full.products if full is not diag else 0,
        )
    hessian = shared.hessian(config.loss).restrict(None)  # a block: its own count

    def progress(_: str, done: int, total: int) -> None:
        shared.progress("hessian trace probes", done, total)

    method, why = resolve_trace_method(config, shared.outputs)
    residual = method == TraceMethod.GGN_RESIDUAL.value
    if method == TraceMethod.HUTCHPP.value:
        est = hutchpp(
            hessian, config.trace_probes, config.seed, config.trace_rel_stderr, progress=progress
        )
    else:
        exact = _ggn_trace(shared) if residual else 0.0
        op: LinearOperator = hessian
        if residual:
            ggn = shared.operators.get("ggn", loss_fn=config.loss, head_dtype=config.head)
            op = Difference(hessian, ggn.restrict(None))
        est = hutchinson(
            op,
            config.trace_probes,
            config.seed,
            config.trace_rel_stderr,
            offset=exact,
            progress=progress,
        )
    settings = {
        "loss": config.loss,
        "estimator": _ESTIMATORS[method],
        "trace_method": method,
        "probes": est.probes,
        "target_rel_stderr": config.trace_rel_stderr,
        "hvp_method": hessian.hvp_method,
    }
    if why is not None:
        settings["trace_method_reason"] = why
    if residual:
        settings.update(ggn_trace=exact, residual_trace=est.value - exact)
    return Outcome(
        value=est.value,
        settings=settings,
        stderr=est.stderr,
        products=est.matvecs,
    )


def _ggn_trace(shared: Shared) -> float:
    """The exact trace of the GGN of ``loss`` over all trainable parameters (the shared
    diagonal's sum when it is that diagonal)."""
    config, diag = shared.config, shared.diagonal
    if (
        diag is not None
        and diag.method == DiagMethod.GGN.value
        and config.normalized_loss == config.loss
        and not shared.excluded
    ):
        values = diag.values
    else:
        values = ggn_diagonal(
            shared.model,
            shared.x,
            shared.y,
            loss_fn=config.loss,
            batch_size=config.batch_size,
            head_dtype=config.head,
        )
    return float(sum(float(v.sum()) for v in values.values()))


def _passes(config: SharpnessConfig, classes: int) -> float:
    """Gradient passes of the trace (:mod:`~flatcli.measures.sharpness._cost`); the exact GGN
    diagonal's cost is counted with the shared diagonal when that one is computed and is it."""
    if config.diag_method == DiagMethod.EXACT.value:
        return 0.0
    if resolve_trace_method(config, classes)[0] == TraceMethod.GGN_RESIDUAL.value:
        diag = 0.0 if _diagonal_shared(config) else ggn_diagonal_passes(config.loss, classes)
        return diag + config.trace_probes * (HVP_PASSES + GVP_PASSES)
    return config.trace_probes * HVP_PASSES


_ESTIMATORS = {
    TraceMethod.GGN_RESIDUAL.value: "exact GGN trace + Hutchinson (Rademacher) on H - G",
    TraceMethod.HUTCHINSON.value: "hutchinson (Rademacher)",
    TraceMethod.HUTCHPP.value: "hutch++ (Meyer et al. 2021)",
}


define(
    Definition(
        name=NAME,
        order=30,
        header="tr(H)",
        label="Hessian trace",
        source="Tsuzuku et al. 2020, Eq. 5",
        description="trace of the Hessian of the mean loss",
        passes=_passes,
        cost="ggn-residual: a GGN diagonal (K backward passes per example, T·V for tokens) and "
        "--trace-probes Hessian- plus GGN-vector products; hutchinson/hutchpp: --trace-probes "
        "HVPs (exact diagonal: one per weight); auto: the cheaper for the same stderr",
        compute=compute,
        stderr=lambda config: config.diag_method != DiagMethod.EXACT.value,
    )
)
