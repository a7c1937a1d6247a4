"""``TransformOptions``: which function-preserving transform (:mod:`flatcli.reparam.transforms`),
with which factor, on which units; shared by ``flatcli reparam`` and ``flatcli sharpness
--invariance``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flatcli.errors import UsageError
from flatcli.options import choices, option

__all__ = ["Transform", "TransformOptions"]


Transform = choices(
    "Transform",
    "layer_scale neuron_scale bn_scale",
    "The function-preserving transforms, by the names ``apply_transform`` knows them by.",
)


@dataclass(frozen=True)
class TransformOptions:
    """Which function-preserving transform, with which factor, on which units."""

    transform: str | None = option(
        None,
        "--transform",
        "layer-scale (Dinh et al.), neuron-scale (Eqs. 15-16) or bn-scale.",
    )
    alpha: float | None = option(None, "--alpha", "The transform's factor α > 0 (default 10).")
    layer: str | None = option(
        None,
        "--layer",
        "neuron-scale: the weight layer whose units are rescaled; bn-scale: the BatchNorm.",
    )
    neurons: int | None = option(
        None, "--neurons", "neuron-scale: how many units (random, seeded; default half).", min=1
    )

    def given(self) -> list[str]:
        """The flags of the options that were set."""
        flags = ("--transform", "--alpha", "--layer", "--neurons")
        values = (self.transform, self.alpha, self.layer, self.neurons)
        return [f for f, v in zip(flags, values, strict=True) if v is not None]

    @property
    def name(self) -> str:
        """The :class:`Transform` value (``-`` or ``_`` accepted); UsageError if unknown."""
        value = self.transform or "layer-scale"
        name = value.strip().lower().replace("-", "_")
        if name not in {t.value for t in Transform}:
            valid = [t.value.replace("_", "-") for t in Transform]
            raise UsageError(f"Unknown transform {value!r}; choose one of {', '.join(valid)}.")
        return name

    @property
    def factor(self) -> float:
        """α (default 10); UsageError unless a finite number > 0."""
        alpha = 10.0 if self.alpha is None else self.alpha
        if not (alpha > 0 and math.isfinite(alpha)):
            raise UsageError(f"--alpha must be a finite number > 0; got {alpha}")
        return alpha

    @property
    def units(self) -> str | int | None:
        """``--layer`` as given, or its index for neuron-scale when it is all digits."""
        if self.layer is not None and self.layer.isdigit() and self.name == "neuron_scale":
            return int(self.layer)
        return self.layer
