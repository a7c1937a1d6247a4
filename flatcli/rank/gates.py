"""CI gates of ``flatcli rank`` relative to a baseline checkpoint (the absolute ones are every
command's: :class:`flatcli.configs.common.Gates`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flatcli.configs.common import check_gate_names, gate_failure

__all__ = ["check_gate_names", "relative_failures"]

Gate = tuple[str, float]


def _value(row: Mapping[str, Any], name: str) -> Any:
    return row.get("gap") if name == "gap" else row["metrics"].get(name)


def relative_failures(
    rows: Sequence[Mapping[str, Any]],
    baseline: Mapping[str, Any],
    above: Sequence[Gate],
    below: Sequence[Gate],
) -> list[str]:
    """Messages for checkpoints more than a fraction above/below the baseline's value.

    ``METRIC=F`` in ``above`` fails a checkpoint whose value v exceeds b + F·|b| (b the
    baseline's value: F = 0.2 is "more than 20 % above the baseline", also for a negative b);
    in ``below``, v < b − F·|b|.
    """
    out = []
    for name, frac, sign in [(n, v, ">") for n, v in above] + [(n, v, "<") for n, v in below]:
        b = _value(baseline, name)
        if b is None:
            out.append(f"baseline gate on {name} cannot be checked: the baseline's value is null")
            continue
        limit = b + frac * abs(b) if sign == ">" else b - frac * abs(b)
        word = "above" if sign == ">" else "below"
        beyond = f"is more than {frac:.0%} {word} the baseline's {b:.6g}"
        found = (
            gate_failure(r, name, sign, limit, f"baseline gate on {name}", beyond)
            for r in rows
            if r.get("error") is None
        )
        out += [m for m in found if m is not None]
    return out
