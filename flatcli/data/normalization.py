"""Per-channel input normalisation: the usual statistics, and checking a recorded one.

A normalisation is a dict ``{"mean": [m_1..m_C], "std": [s_1..s_C]}`` applied to pixels
scaled to [0, 1]: ``x[:, c] = (pixel[:, c] - mean[c]) / std[c]``. ``flatcli train`` records
the one it used in the checkpoint and the analysis commands pass it back to
:func:`flatcli.data.load_dataset`, so a measure sees the inputs the network was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from flatcli.errors import UsageError

__all__ = ["USUAL_STATS", "apply_normalization", "make_stats", "resolve_normalization"]

#: The mean and standard deviation everyone uses for each set (train split, pixels in [0, 1]).
USUAL_STATS: dict[str, dict[str, list[float]]] = {
    "mnist": {"mean": [0.1307], "std": [0.3081]},
    "fashion-mnist": {"mean": [0.2860], "std": [0.3530]},
    "cifar10": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]},
    "cifar100": {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]},
    "svhn": {"mean": [0.4377, 0.4438, 0.4728], "std": [0.1980, 0.2010, 0.1970]},
}


def make_stats(mean: Sequence[float], std: Sequence[float]) -> dict[str, list[float]]:
    """A normalisation dict with plain-float lists (JSON-ready)."""
    return {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def resolve_normalization(
    normalization: dict | str | None,
    default: dict | None,
    channels: int,
    dataset: str,
) -> dict[str, list[float]] | None:
    """Turn the ``normalization`` argument of ``load_dataset`` into the dict to apply (or None).

    ``"default"`` gives ``default``; None gives None (raw pixels in [0, 1]); a dict is checked:
    exactly the keys ``mean`` and ``std``, each a number or a list of ``channels`` finite
    numbers, every std positive.
    """
    if isinstance(normalization, str):
        if normalization != "default":
            raise UsageError(
                f"normalization must be 'default', None or a dict with 'mean' and 'std'; "
                f"got {normalization!r}"
            )
        return None if default is None else make_stats(default["mean"], default["std"])
    if normalization is None:
        return None
    if not isinstance(normalization, dict):
        raise UsageError(
            f"normalization must be 'default', None or a dict with 'mean' and 'std'; "
            f"got {type(normalization).__name__}"
        )
    keys = set(normalization)
    if keys != {"mean", "std"}:
        raise UsageError(
            f"a normalization dict holds exactly the keys 'mean' and 'std'; got {sorted(keys)}"
        )
    out: dict[str, list[float]] = {}
    for key in ("mean", "std"):
        value = normalization[key]
        values = [value] if isinstance(value, (int, float)) else list(value)
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise UsageError(f"normalization {key} must be numbers; got {value!r}") from None
        if len(values) == 1 and channels > 1:
            values = values * channels
        if len(values) != channels:
            raise UsageError(
                f"normalization {key} has {len(values)} values but dataset '{dataset}' has "
                f"{channels} channel(s)"
            )
        if not all(math.isfinite(v) for v in values):
            raise UsageError(f"normalization {key} must be finite; got {values}")
        out[key] = values
    if any(s <= 0 for s in out["std"]):
        raise UsageError(f"normalization std must be positive; got {out['std']}")
    return out


def apply_normalization(x: Tensor, stats: dict[str, list[float]] | None) -> Tensor:
    """Normalise float images ``x`` (N, C, H, W) in place, channel by channel; returns ``x``."""
    if stats is None:
        return x
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = torch.tensor(stats["mean"], dtype=x.dtype, device=x.device).view(shape)
    std = torch.tensor(stats["std"], dtype=x.dtype, device=x.device).view(shape)
    return x.sub_(mean).div_(std)
