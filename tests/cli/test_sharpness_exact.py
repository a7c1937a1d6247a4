"""``flatcli sharpness --diag-method exact``: refused above the time limit unless ``--force``."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

import flatcli.curvature.diagonal as diagonal
from flatcli.cli.app import app
from tests.cases import write_cli_problem


def _setup(tmp_path):
    nets = write_cli_problem(tmp_path, 16)
    torch.manual_seed(0)
    torch.save(nets["make"]().double().state_dict(), tmp_path / "m.pt")
    return [
        "sharpness",
        str(tmp_path / "m.pt"),
        "--model",
        f"{tmp_path / 'nets.py'}:make",
        "--dataset",
        f"tensors:{tmp_path / 'data.safetensors'}",
        "--dtype",
        "float64",
        "--quiet",
        "--measure",
        "normalized_sharpness",
        "--diag-method",
        "exact",
    ]


def test_exact_refused_without_force(tmp_path, monkeypatch) -> None:
    args = _setup(tmp_path)
    monkeypatch.setattr(diagonal, "EXACT_MAX_SECONDS", 0.0)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, [*args, "--json", str(out)])
    # the refusal is per checkpoint (a UsageError, exit code 2, raised while measuring it); the
    # runner records it as that checkpoint's failure
    assert res.exit_code in (1, 2), res.output
    assert "--force" in res.output and "Traceback" not in res.output
    assert "--force" in json.loads(out.read_text())["results"][0]["error"]["message"]
    res = CliRunner().invoke(app, [*args, "--force", "--json", str(out)])
    assert res.exit_code == 0, res.output
    entry = json.loads(out.read_text())["results"][0]
    assert entry["metrics"]["normalized_sharpness"] > 0
    diag = entry["details"]["diagonal"]
    assert diag["method"] == "exact" and diag["estimated_seconds"] > 0
