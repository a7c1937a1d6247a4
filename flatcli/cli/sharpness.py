"""``flatcli sharpness``: normalized sharpness and the classic sharpness measures, and the
``--invariance`` audit of each under a function-preserving reparametrisation."""

from dataclasses import dataclass
from typing import Any

from flatcli.cli.options import Common, Paths, command
from flatcli.configs.reparam import TransformOptions
from flatcli.configs.sharpness import SharpnessConfig
from flatcli.errors import UsageError
from flatcli.options import option

AUDIT_COLUMNS = [
    ("original", "original"),
    ("transformed", "transformed"),
    ("rel_change", "rel. change"),
    ("invariant", "invariant"),
    ("max_logit_difference", "max |Δ logit|"),
]


@dataclass(frozen=True)
class SharpnessView:
    """What ``sharpness`` shows besides the measures: per-layer rows or the invariance audit."""

    per_layer: bool = option(
        False, "--per-layer", "Also a row per weight matrix (its term of each sum)."
    )
    invariance: bool = option(
        False,
        "--invariance",
        "Audit: each measure on the checkpoint and on a function-preserving "
        "reparametrisation of it (--transform, --alpha), with the relative change.",
    )
    rtol: float | None = option(
        None,
        "--rtol",
        "--invariance: threshold on the relative change "
        "(default 1e-6 in float64, 1e-3 in float32).",
    )


def layer_rows(name: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The checkpoint's row, then one row per weight matrix with its term of each measure."""
    layers = entry["details"].get("per_layer") or {}
    names = list(dict.fromkeys(k for terms in layers.values() for k in terms))
    return [{"checkpoint": name, **entry["metrics"]}] + [
        {"checkpoint": f"  {layer}", **{m: t.get(layer) for m, t in layers.items()}}
        for layer in names
    ]


def audit_rows(name: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The checkpoint's logit difference, then one row per audited measure."""
    head = {
        "checkpoint": name,
        "max_logit_difference": entry["metrics"].get("max_logit_difference"),
    }
    return [head] + [
        {"checkpoint": f"  {r['measure']}", **r, "invariant": "yes" if r["invariant"] else "NO"}
        for r in entry["details"].get("rows", [])
    ]


def _definitions() -> None:
    """Import the sharpness definitions, which SharpnessConfig checks --measure against."""
    import flatcli.measures.sharpness  # noqa: F401


@command(
    "sharpness",
    help="Normalized sharpness (scale-invariant, Tsuzuku et al.) and the classic sharpness measures.",
    prepare=_definitions,
)
def sharpness(
    checkpoints: Paths,
    config: SharpnessConfig,
    view: SharpnessView,
    transform: TransformOptions,
    common: Common,
) -> None:
    """Measure the sharpness of every checkpoint, or audit it under a reparametrisation."""
    from flatcli.cli.render import analyse
    from flatcli.measures.invariance import InvarianceConfig, default_rtol
    from flatcli.measures.registry import get_measure
    from flatcli.measures.sharpness import compute_sharpness, sharpness_metric_keys, table_columns
    from flatcli.run import Context, registered

    given = transform.given() + (["--rtol"] if view.rtol is not None else [])
    if given and not view.invariance:
        raise UsageError(
            f"{', '.join(given)} only apply with --invariance "
            "(to write a reparametrised checkpoint, use `flatcli reparam`)"
        )
    if not view.invariance:

        def measure(ctx: Context) -> Any:
            return compute_sharpness(ctx.model, ctx.x, ctx.y, config, progress=ctx.progress)

        analyse(
            "sharpness",
            checkpoints,
            measure,
            table_columns(config),
            config=config.to_dict(),
            metrics=sharpness_metric_keys(config),
            rows=layer_rows if view.per_layer else None,
            common=common,
        )
    if view.per_layer:
        raise UsageError("--per-layer does not combine with --invariance")
    rtol = view.rtol if view.rtol is not None else default_rtol(common.dtype)
    audit = InvarianceConfig(
        sharpness=config,
        transform=transform.name,
        alpha=transform.factor,
        layer=transform.units,
        neurons=transform.neurons,
        rtol=rtol,
        seed=common.seed,
        batch_size=common.batch_size,
    )
    extra = {
        "invariance": True,
        "transform": audit.transform,
        "alpha": audit.alpha,
        "layer": transform.layer,
        "neurons": transform.neurons,
        "rtol": rtol,
    }
    analyse(
        "sharpness",
        checkpoints,
        registered(get_measure("invariance"), audit),
        AUDIT_COLUMNS,
        config={**config.to_dict(), **extra},
        metrics=["max_logit_difference", *(f"{m}_rel_change" for m in config.measures)],
        rows=audit_rows,
        common=common,
    )
