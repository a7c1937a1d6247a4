"""``flatcli measures``: every registered measure (:func:`flatcli.measures.listing.listing`)
as a table or as JSON."""

from flatcli.cli.options import OutputOptions, command

COLUMNS = [
    ("command", "command"),
    ("measure", "measure"),
    ("metric", "metric"),
    ("direction", "direction"),
    ("source", "source"),
    ("cost", "cost"),
    ("losses", "losses"),
]


@command(
    "measures",
    help="List every measure: its metrics, their direction (sharper: larger means a "
    "sharper minimum), source (paper, equation), cost and the losses it takes.",
)
def measures(output: OutputOptions) -> None:
    """Print the measure registry."""
    from flatcli.cli.output import Output
    from flatcli.measures.listing import listing

    out = Output.of(output)
    data = listing()
    rows = [
        {
            "command": m["command"] if i == 0 else "",
            "measure": m["name"] if i == 0 else "",
            "metric": k["key"],
            "direction": k["direction"],
            "source": k["source"],
            "cost": m["cost"] if i == 0 else "",
            "losses": " ".join(m["losses"]) if i == 0 else "",
        }
        for m in data["measures"]
        for i, k in enumerate(m["metrics"])
    ]
    out.table("flatcli measures", COLUMNS, rows, numeric=False)
    out.report(data)
