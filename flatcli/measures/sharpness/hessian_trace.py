"""The Hessian trace (Tsuzuku et al. 2020, Eq. 5): tr ∇²L of the mean ``config.classic_loss``.

A Hutchinson estimate (Rademacher probes) on the shared Hessian operator over all trainable
parameters, with its standard error; with ``diag_method`` "exact" (small models) the exact sum
of the exact Hessian diagonal instead, no standard error (the shared diagonal when it is that
diagonal, i.e. of the same loss over all parameters).
"""

from __future__ import annotations

from flatcli.curvature.diagonal import DiagMethod, curvature_diagonal
from flatcli.curvature.losses import get_loss
from flatcli.curvature.trace import hutchinson
from flatcli.measures.sharpness._definition import Definition, Outcome, Shared, define

NAME = "hessian_trace"


def compute(shared: Shared) -> Outcome:
    """Hutchinson on the full Hessian, or the exact diagonal's sum for ``diag_method="exact"``."""
    config, diag = shared.config, shared.diagonal
    if config.diag_method == DiagMethod.EXACT.value:  # small models: exact, no stderr
        if (
            diag is not None
            and diag.method == DiagMethod.EXACT.value
            and config.loss == config.classic_loss
            and not shared.excluded
        ):
            full = diag
        else:
            full = curvature_diagonal(
                shared.model,
                shared.x,
                shared.y,
                method="exact",
                loss_fn=get_loss(config.classic_loss),
                batch_size=config.batch_size,
                head_dtype=config.head,
                operator=shared.hessian(config.classic_loss),
                force=config.force,
                progress=shared.progress,
            )
        return Outcome(
            value=float(sum(float(v.sum()) for v in full.values.values())),
            settings={
                "loss": config.classic_loss,
                "estimator": "exact (sum of the exact diagonal)",
            },
            products=full.products if full is not diag else 0,
        )
    op = shared.hessian(config.classic_loss).restrict(None)  # a block: its own product count
    est = hutchinson(
        op,
        config.trace_probes,
        config.seed,
        config.trace_rel_stderr,
        progress=lambda _, done, total: shared.progress("hessian trace probes", done, total),
    )
    return Outcome(
        value=est.value,
        settings={
            "loss": config.classic_loss,
            "estimator": "hutchinson (Rademacher)",
            "probes": est.probes,
            "target_rel_stderr": config.trace_rel_stderr,
            "hvp_method": op.hvp_method,
        },
        stderr=est.stderr,
        products=est.matvecs,
    )


define(
    Definition(
        name=NAME,
        order=30,
        header="tr(H)",
        label="Hessian trace",
        source="Tsuzuku et al. 2020, Eq. 5",
        description="trace of the Hessian of the mean loss",
        cost="--trace-probes Hessian-vector products (exact diagonal: one per weight)",
        compute=compute,
        stderr=lambda config: config.diag_method != DiagMethod.EXACT.value,
    )
)
