"""CI gates of ``flatcli rank`` relative to a baseline checkpoint (the absolute ones are every
command's: :class:`flatcli.run.Gates`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flatcli.errors import UsageError
from flatcli.run import gate_failure

__all__ = ["check_gate_names", "relative_failures"]

Gate = tuple[str, float]


def check_gate_names(gates: Iterable[tuple[str, Gate]], known: Sequence[str]) -> None:
    """Raise a UsageError for a gate on a metric the run does not report (before any work).

    ``gates`` holds (option name, (metric, value)) pairs; ``known`` the metric keys (and
    ``gap``) the run reports.
    """
    for flag, (name, _) in gates:
        if name not in known:
            raise UsageError(
                f"{flag} {name}: not a metric of this run; metrics: {', '.join(known)}"
            )


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
