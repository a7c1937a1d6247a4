"""``flatcli reparam``: write a checkpoint that computes the same function with other weights.

``flatcli reparam CHECKPOINT --transform KIND [--alpha A] [--layer L] [--neurons N] -o OUT``
applies a function-preserving reparametrisation (layer-scale, neuron-scale or bn-scale, see
:mod:`flatcli.reparam`), writes it with the original's spec and record (plus a ``reparam``
entry; for a checkpoint without flatcli's record, the spec and dataset this run used, so the
output needs no ``--model`` or ``--dataset``), and reports the largest logit difference between
the two networks on the data (round-off level) and the parameter count. The sharpness audit is ``flatcli sharpness --invariance``.

No ``from __future__ import annotations`` here: the option annotations must be objects, since
``analysis_command`` re-evaluates string annotations in its own module's namespace.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from flatcli import distributed
from flatcli.cli.errors import handle_errors
from flatcli.cli.options import analysis_command
from flatcli.cli.runner import AnalysisContext, run_analysis
from flatcli.cli.sharpness import LayerOpt, Neurons, check_alpha, layer_arg, transform_name
from flatcli.errors import UsageError
from flatcli.io.checkpoint import save_checkpoint
from flatcli.reparam import apply_transform, max_logit_difference

TransformReq = Annotated[
    str,
    typer.Option(
        "--transform", help="layer-scale (Dinh et al.), neuron-scale (Eqs. 15-16) or bn-scale."
    ),
]
Alpha = Annotated[float, typer.Option("--alpha", help="The transform's factor α > 0.")]
Output = Annotated[
    Path,
    typer.Option("--output", "-o", help="The transformed checkpoint to write (.safetensors)."),
]


@dataclass(frozen=True)
class ReparamResult:
    """What ``reparam`` measured on one checkpoint."""

    max_logit_difference: float
    num_params: int
    output: str
    transform: str
    alpha: float

    def metrics(self) -> dict[str, Any]:
        return {"max_logit_difference": self.max_logit_difference, "num_params": self.num_params}

    def details(self) -> dict[str, Any]:
        return {"output": self.output, "transform": self.transform, "alpha": self.alpha}


def register(app: typer.Typer) -> None:
    """Add ``reparam`` to the app."""

    @analysis_command(
        app,
        "reparam",
        help="Write a checkpoint computing the same function with rescaled weights "
        "(layer-scale, neuron-scale, bn-scale); report the largest logit difference.",
    )
    def reparam(
        common,
        output: Output,
        transform: TransformReq,
        alpha: Alpha = 10.0,
        layer: LayerOpt = None,
        neurons: Neurons = None,
    ) -> None:
        with handle_errors(common.debug):  # a bad option value: one line, exit 2
            name = transform_name(transform)
            alpha = check_alpha(alpha)
            if len(common.checkpoints) != 1 or Path(common.checkpoints[0]).is_dir():
                raise UsageError("reparam writes one checkpoint: give exactly one checkpoint file")
            if Path(output).suffix != ".safetensors":
                raise UsageError(f"--output must end in .safetensors; got {output}")
            if Path(output).resolve() == Path(common.checkpoints[0]).resolve():
                raise UsageError("--output must differ from the input checkpoint")
            parsed_layer = layer_arg(layer, name)

        def measure_fn(ctx: AnalysisContext) -> ReparamResult:
            other = apply_transform(
                ctx.model, name, alpha, ctx.seed, layer=parsed_layer, neurons=neurons
            )
            diff = max_logit_difference(ctx.model, other, ctx.x)
            stored = ctx.checkpoint.state_dict
            state = {
                k: v.detach().to("cpu", stored[k].dtype if k in stored else v.dtype).contiguous()
                for k, v in other.state_dict().items()
            }
            meta = dict(ctx.checkpoint.meta or {})
            spec_record = ctx.spec.to_dict()
            if meta.get("dataset") is None:  # not flatcli's: record what this run used
                meta.update(
                    dataset=ctx.dataset.name,
                    normalization=ctx.dataset.normalization,
                    num_classes=ctx.dataset.num_classes,
                    input_shape=list(ctx.dataset.input_shape),
                )
            spec_record.setdefault("dataset", meta["dataset"])
            meta = {
                **meta,
                "reparam": {
                    "transform": name,
                    "alpha": alpha,
                    "layer": layer,
                    "neurons": neurons,
                    "seed": ctx.seed,
                    "source": str(Path(ctx.checkpoint.path).resolve()),
                    "source_sha256": ctx.checkpoint.sha256,
                    "max_logit_difference": diff,
                },
            }
            if distributed.is_main():  # under torchrun every rank computes it; rank 0 writes
                save_checkpoint(output, state, spec=spec_record, meta=meta)
            return ReparamResult(
                max_logit_difference=diff,
                num_params=sum(p.numel() for p in other.parameters()),
                output=str(output),
                transform=name,
                alpha=alpha,
            )

        config = {
            "transform": name,
            "alpha": alpha,
            "layer": layer,
            "neurons": neurons,
            "output": str(output),
        }
        run_analysis(
            "reparam",
            common,
            config,
            measure_fn,
            [("max_logit_difference", "max |Δ logit|"), ("num_params", "params")],
        )
