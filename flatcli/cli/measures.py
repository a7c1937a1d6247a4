"""``flatcli measures``: every registered measure, the metrics it reports, their direction,
source and cost, as a table or as JSON.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from flatcli.cli.errors import handle_errors
from flatcli.cli.output import Output

SCHEMA = "flatcli/measures-v1"
"""``schema`` of the JSON listing."""

COLUMNS = [
    ("command", "command"),
    ("measure", "measure"),
    ("metric", "metric"),
    ("direction", "direction"),
    ("source", "source"),
    ("cost", "cost"),
]


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


def register(app: typer.Typer) -> None:
    """Add ``measures`` to the app."""

    @app.command(
        "measures",
        help="List every measure: its metrics, their direction (sharper: larger means a "
        "sharper minimum), source (paper, equation) and cost.",
    )
    def measures(
        json_out: Annotated[
            str | None,
            typer.Option("--json", help="Write the listing as JSON to PATH ('-' for stdout)."),
        ] = None,
        debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    ) -> None:
        with handle_errors(debug):
            out = Output(json_out)
            out.check()
            data = listing()
            rows = []
            for m in data["measures"]:
                for i, k in enumerate(m["metrics"]):
                    rows.append(
                        {
                            "command": m["command"] if i == 0 else "",
                            "measure": m["name"] if i == 0 else "",
                            "metric": k["key"],
                            "direction": k["direction"],
                            "source": k["source"],
                            "cost": m["cost"] if i == 0 else "",
                        }
                    )
            out.table("flatcli measures", COLUMNS, rows, numeric=False)
            out.report(data)
