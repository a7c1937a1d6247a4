"""JSON reports follow the documented shape (docs/index.md, "JSON reports")."""

from __future__ import annotations

import json
import math
import os

import pytest

from flatcli.io.report import (
    REPORT_KEYS,
    RESULT_KEYS,
    build_report,
    environment_info,
    result_entry,
    write_report,
)


def validate_report(report: dict, command: str) -> None:
    """Assert ``report`` has exactly the documented keys and types (shared by the CLI tests).

    A report of a run that did not finish ends with ``"interrupted": true``.
    """
    assert tuple(report) in (REPORT_KEYS, (*REPORT_KEYS, "interrupted"))
    assert report.get("interrupted", True) is True
    assert report["schema"] == "flatcli/report-v1" and report["command"] == command
    assert isinstance(report["config"], dict) and "seed" in report["config"]
    assert {"torch", "device", "dtype", "world_size"} <= set(report["environment"])
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


def test_environment_has_world_size():
    env = environment_info("cpu", "float64")
    assert env["world_size"] == 1 and env["dtype"] == "float64"
    assert environment_info("cpu", "float32", world_size=4)["world_size"] == 4


def test_interrupted_reports_say_so_and_finished_ones_do_not():
    done = build_report("demo", {"seed": 0}, environment_info("cpu", "float32"), [])
    assert "interrupted" not in done
    cut = build_report(
        "demo", {"seed": 0}, environment_info("cpu", "float32"), [], interrupted=True
    )
    assert list(cut)[-1] == "interrupted" and cut["interrupted"] is True
    validate_report(cut, "demo")


def test_write_report_is_atomic_and_keeps_no_temporary_files(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "r.json"
    report = build_report("demo", {"seed": 0}, environment_info("cpu", "float32"), [])
    write_report(report, target)
    assert json.loads(target.read_text()) == report
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would, not mkstemp's 600

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    report2 = {**report, "command": "other"}
    with pytest.raises(OSError, match="disk full"):
        write_report(report2, target)
    assert json.loads(target.read_text()) == report  # the old report is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["r.json"]
