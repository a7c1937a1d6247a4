"""JSON reports follow the CONTRACTS.md shape."""

from __future__ import annotations

import json
import math

from flatcli.io.report import (
    REPORT_KEYS,
    RESULT_KEYS,
    build_report,
    environment_info,
    result_entry,
    write_report,
)


def validate_report(report: dict, command: str) -> None:
    """Assert ``report`` has exactly the documented keys and types (shared by the CLI tests)."""
    assert tuple(report) == REPORT_KEYS
    assert report["schema"] == "flatcli/report-v1" and report["command"] == command
    assert isinstance(report["config"], dict) and "seed" in report["config"]
    assert {"torch", "device", "dtype"} <= set(report["environment"])
    for r in report["results"]:
        assert tuple(r) == RESULT_KEYS
        assert all(v is None or isinstance(v, int | float) for v in r["metrics"].values())
        assert r["error"] is None or set(r["error"]) == {"type", "message"}


def test_report_shape_and_non_finite(tmp_path):
    ok = result_entry(
        "a.pt", sha256="0" * 64, num_params=10, metrics={"x": 1.5, "y": math.inf}, seconds=0.1
    )
    bad = result_entry("b.pt", sha256=None, num_params=None, error=ValueError("boom"))
    report = build_report("demo", {"seed": 0}, environment_info("cpu", "float32"), [ok, bad])
    write_report(report, tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    validate_report(loaded, "demo")
    assert loaded["results"][0]["metrics"] == {"x": 1.5, "y": None}
    assert "y" in loaded["results"][0]["details"]["non_finite"]
    assert (
        loaded["results"][1]["metrics"] == {}
        and loaded["results"][1]["error"]["type"] == "ValueError"
    )
