"""``flatcli measures`` lists every registered measure and metric, as a table and as JSON."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flatcli.cli.app import app
from flatcli.measures.registry import all_measures


def test_json_lists_every_metric_with_direction_source_and_cost():
    res = CliRunner().invoke(app, ["measures", "--json", "-"])
    assert res.exit_code == 0, res.output
    listing = json.loads(res.stdout)
    assert listing["schema"] == "flatcli/measures-v1"
    by_name = {m["name"]: m for m in listing["measures"]}
    assert set(by_name) == {m.name for m in all_measures()}
    for measure in all_measures():
        entry = by_name[measure.name]
        assert entry["command"] == measure.command and entry["cost"] == measure.cost
        assert [k["key"] for k in entry["metrics"]] == list(measure.keys)
        for k in entry["metrics"]:
            assert k["direction"] in ("sharper", "flatter", "neutral") and k["source"]
    gamma = {k["key"]: k for k in by_name["gamma"]["metrics"]}
    assert gamma["gamma_hat"]["direction"] == "sharper"
    assert gamma["gamma_hat"]["source"] == "Jia & Su 2020, Eq. 5"


def test_table_names_every_measure_and_its_metrics():
    res = CliRunner().invoke(app, ["measures"])
    assert res.exit_code == 0, res.output
    for header in ("command", "measure", "metric", "direction", "source", "cost"):
        assert header in res.stdout
    for m in all_measures():
        assert m.name[:20] in res.stdout
    for key in ("gamma_hat", "top_eigenvalue", "hessian_trace", "eps_sharpness", "sharper"):
        assert key in res.stdout


def test_unwritable_json_is_usage_error(tmp_path):
    (tmp_path / "f").write_text("")
    res = CliRunner().invoke(app, ["measures", "--json", str(tmp_path / "f" / "x.json")])
    assert res.exit_code == 2 and "--json" in res.output
