"""The measure registry as JSON: every measure, the metrics it reports, their direction,
source and cost (what ``flatcli measures`` prints)."""

from __future__ import annotations

from typing import Any

SCHEMA = "flatcli/measures-v1"
"""``schema`` of the JSON listing."""


def listing() -> dict[str, Any]:
    """The registry as JSON: one entry per measure with its metrics, grouped by command."""
    from flatcli.measures.registry import all_measures

    return {
        "schema": SCHEMA,
        "measures": [
            {
                "name": m.name,
                "command": m.command,
                "cost": m.cost,
                "losses": list(m.losses),
                "metrics": [
                    {
                        "key": k.key,
                        "direction": k.direction.value,
                        "source": k.source,
                        "description": k.description,
                    }
                    for k in m.metrics
                ],
            }
            for m in sorted(all_measures(), key=lambda m: m.command)
        ],
    }
