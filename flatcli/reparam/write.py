"""A reparametrised checkpoint: the same function with other weights, written beside its source.

:func:`write_reparametrised` applies a function-preserving transform (:mod:`flatcli.reparam.
transforms`) to a loaded checkpoint and writes it with the original's spec and record (plus a
``reparam`` entry; for a checkpoint without flatcli's record, the spec and dataset the run used,
so the output needs no ``--model`` or ``--dataset``). :class:`TransformOptions` are the options
that name a transform, shared by ``flatcli reparam`` and ``flatcli sharpness --invariance``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatcli.configs.reparam import TransformOptions
from flatcli.reparam.transforms import apply_transform, max_logit_difference

__all__ = ["TransformOptions", "ReparamResult", "write_reparametrised"]


@dataclass(frozen=True)
class ReparamResult:
    """What ``reparam`` measured on one checkpoint."""

    max_logit_difference: float
    num_params: int
    output: str
    transform: str
    alpha: float

    def metrics(self) -> dict[str, Any]:
        """The largest logit difference and the parameter count."""
        return {"max_logit_difference": self.max_logit_difference, "num_params": self.num_params}

    def details(self) -> dict[str, Any]:
        """Where the checkpoint went, and the transform."""
        return {"output": self.output, "transform": self.transform, "alpha": self.alpha}


def write_reparametrised(run: Any, options: TransformOptions, output: str | Path) -> ReparamResult:
    """Transform ``run``'s model, write it to ``output`` (rank 0 under torchrun) and report the
    largest logit difference between the two networks on the run's examples."""
    from flatcli import distributed
    from flatcli.io.checkpoint import save_checkpoint

    name, alpha = options.name, options.factor
    other = apply_transform(
        run.model, name, alpha, run.seed, layer=options.units, neurons=options.neurons
    )
    diff = max_logit_difference(run.model, other, run.x)
    stored = run.checkpoint.state_dict
    state = {
        k: v.detach().to("cpu", stored[k].dtype if k in stored else v.dtype).contiguous()
        for k, v in other.state_dict().items()
    }
    meta = dict(run.checkpoint.meta or {})
    spec_record = run.spec.to_dict()
    if meta.get("dataset") is None:  # not flatcli's: record what this run used
        meta.update(
            dataset=run.dataset.name,
            normalization=run.dataset.normalization,
            num_classes=run.dataset.num_classes,
            input_shape=list(run.dataset.input_shape),
        )
    spec_record.setdefault("dataset", meta["dataset"])
    meta["reparam"] = {
        "transform": name,
        "alpha": alpha,
        "layer": options.layer,
        "neurons": options.neurons,
        "seed": run.seed,
        "source": str(Path(run.checkpoint.path).resolve()),
        "source_sha256": run.checkpoint.sha256,
        "max_logit_difference": diff,
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
