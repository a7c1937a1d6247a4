"""``flatcli reparam``: write a checkpoint that computes the same function with other weights
(:mod:`flatcli.reparam.write`); the sharpness audit is ``flatcli sharpness --invariance``."""

from dataclasses import dataclass
from pathlib import Path

from flatcli.cli.options import Common, Paths, command
from flatcli.configs.reparam import TransformOptions
from flatcli.errors import UsageError
from flatcli.options import option


@dataclass(frozen=True)
class Destination:
    """Where ``reparam`` writes."""

    output: Path | None = option(
        None, "--output", "The transformed checkpoint to write (.safetensors).", short="-o"
    )


@command(
    "reparam",
    help="Write a checkpoint computing the same function with rescaled weights "
    "(layer-scale, neuron-scale, bn-scale); report the largest logit difference.",
)
def reparam(
    checkpoints: Paths, transform: TransformOptions, destination: Destination, common: Common
) -> None:
    """Write the reparametrised checkpoint and report how far its logits moved."""
    out = destination.output
    if transform.transform is None or out is None:
        raise UsageError("reparam needs --transform KIND and --output OUT.safetensors")
    name, alpha = transform.name, transform.factor
    if len(checkpoints) != 1 or Path(checkpoints[0]).is_dir():
        raise UsageError("reparam writes one checkpoint: give exactly one checkpoint file")
    if out.suffix != ".safetensors":
        raise UsageError(f"--output must end in .safetensors; got {out}")
    if out.resolve() == Path(checkpoints[0]).resolve():
        raise UsageError("--output must differ from the input checkpoint")
    from flatcli.cli.render import analyse
    from flatcli.reparam.write import write_reparametrised

    analyse(
        "reparam",
        checkpoints,
        lambda ctx: write_reparametrised(ctx, transform, out),
        [("max_logit_difference", "max |Δ logit|"), ("num_params", "params")],
        common=common,
        metrics=["max_logit_difference", "num_params"],
        config={
            "transform": name,
            "alpha": alpha,
            "layer": transform.layer,
            "neurons": transform.neurons,
            "output": str(out),
        },
    )
