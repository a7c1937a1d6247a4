"""Matrix-normalized sharpness (Tsuzuku et al. 2020, Eq. 13).

``Σ_i sqrt(‖W_i‖_F² · H_i)`` over the weight matrices W_i, H_i the trace of W_i's block of the
Hessian of ``config.normalized_loss`` (clipped at 0). With ``diag_method`` "exact" or "ggn" the
traces are
exact block sums of the shared curvature diagonal; with "hutchinson" each is a Hutchinson
estimate on the shared operator restricted to the layer, and the standard error follows from
theirs by the delta method.
"""

from __future__ import annotations

import math

from flatcli.curvature.diagonal import DiagMethod, group_seed
from flatcli.curvature.trace import hutchinson
from flatcli.measures.sharpness._definition import (
    Definition,
    Outcome,
    Shared,
    define,
    hutchinson_diagonal,
)

NAME = "matrix_normalized_sharpness"
SOURCE = "Tsuzuku et al. 2020, Eq. 13"


def compute(shared: Shared) -> Outcome:
    """Eq. 13 from per-layer Hessian-block traces: exact block sums of an exact (Hessian or GGN)
    diagonal when there is one, else Hutchinson on the blocks ``hessian.restrict([layer])``."""
    model, names, config, diag = shared.model, shared.names, shared.config, shared.diagonal
    params = dict(model.named_parameters())
    fro2 = {k: float(params[k].detach().double().pow(2).sum()) for k in names}
    traces: dict[str, float] = {}
    ses: dict[str, float] = {}
    used = 0
    if diag is not None and diag.method != DiagMethod.HUTCHINSON.value:
        traces = {k: float(diag.values[k].sum()) for k in names}
        how = f"block sums of the {diag.method} diagonal"
    else:
        hessian = shared.hessian(config.normalized_loss)
        for i, k in enumerate(names):
            est = hutchinson(
                hessian.restrict([k]),
                config.trace_probes,
                group_seed(config.seed, 1000 + i),
                config.trace_rel_stderr,
            )
            traces[k], ses[k] = est.value, est.stderr
            used += est.matvecs
        how = "hutchinson on each layer's Hessian block"
    terms = {k: math.sqrt(fro2[k] * max(traces[k], 0.0)) for k in names}
    se = None
    if ses:
        var = sum(fro2[k] * ses[k] ** 2 / (4 * traces[k]) for k in names if traces[k] > 0)
        se = math.sqrt(var)
    settings = {
        "loss": config.normalized_loss,
        "block_trace": how,
        "trace_clip": "H_i <- max(H_i, 0)",
        "traces": traces,
        "one_dim_params": "excluded (footnote 5)",
    }
    if ses:
        settings["trace_stderrs"] = ses
        settings["stderr"] = "delta method from the per-layer trace stderrs"
    return Outcome(
        value=float(sum(terms.values())),
        settings=settings,
        stderr=se,
        per_layer=terms,
        products=used,
    )


define(
    Definition(
        name=NAME,
        order=20,
        header="matrix-norm.",
        label="matrix-normalized sharpness",
        source=SOURCE,
        description="Σ_i sqrt(‖W_i‖_F² · tr H_i) over weight matrices",
        cost="block sums of the curvature diagonal; hutchinson: --trace-probes Hessian-vector "
        "products per weight matrix",
        compute=compute,
        stderr=hutchinson_diagonal,
        weight_matrices=True,
        diagonal=lambda config: not hutchinson_diagonal(config),
    )
)
