"""``flatcli sharpness`` and ``flatcli reparam`` end to end on a tiny float64 network."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from flatcli.cli.app import app
from flatcli.io.checkpoint import load_checkpoint

FACTORY = """
from torch import nn
def make():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)
    )
def make_tanh():
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
"""


@pytest.fixture()
def setup(tmp_path):
    (tmp_path / "nets.py").write_text(FACTORY)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    save_file({"x": x, "y": y}, str(tmp_path / "data.safetensors"))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)
    )
    torch.save(model.double().state_dict(), tmp_path / "m.pt")
    torch.manual_seed(0)
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    torch.save(tanh.double().state_dict(), tmp_path / "t.pt")
    common = [
        "--dataset",
        f"tensors:{tmp_path / 'data.safetensors'}",
        "--dtype",
        "float64",
        "--quiet",
    ]
    return tmp_path, common


def _run(args):
    return CliRunner().invoke(app, args)


def test_sharpness_json_report(setup) -> None:
    tmp, common = setup
    out = tmp / "r.json"
    res = _run(
        [
            "sharpness",
            str(tmp / "m.pt"),
            "--model",
            f"{tmp / 'nets.py'}:make",
            *common,
            "--diag-method",
            "exact",
            "--eps-steps",
            "3",
            "--adaptive-steps",
            "3",
            "--json",
            str(out),
        ]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["command"] == "sharpness"
    entry = report["results"][0]
    assert entry["error"] is None
    m = entry["metrics"]
    assert {
        "normalized_sharpness",
        "normalized_sharpness_gap",
        "matrix_normalized_sharpness",
        "hessian_trace",
        "eps_sharpness",
        "adaptive_sharpness",
    } <= set(m)
    assert m["normalized_sharpness"] > 0 and m["normalized_sharpness_gap"] >= 0
    assert set(entry["details"]["per_layer"]["normalized_sharpness"]) == {
        "1.weight",
        "3.weight",
        "5.weight",
    }
    assert (
        report["config"]["diag_method"] == "exact"
        and report["config"]["measures"][0] == "normalized_sharpness"
    )


def test_sharpness_measure_choice_table_and_gate(setup) -> None:
    tmp, common = setup
    common = [c for c in common if c != "--quiet"]
    args = [
        "sharpness",
        str(tmp / "m.pt"),
        "--model",
        f"{tmp / 'nets.py'}:make",
        *common,
        "--measure",
        "normalized_sharpness",
        "--diag-method",
        "ggn",
        "--per-layer",
    ]
    res = _run(args)
    assert res.exit_code == 0, res.output
    assert "normalized" in res.output and "3.weight" in res.output and "tr(H)" not in res.output
    gated = _run([*args, "--fail-above", "normalized_sharpness=1e-9"])
    assert gated.exit_code == 3, gated.output


def test_sharpness_bad_option(setup) -> None:
    tmp, common = setup
    res = _run(
        [
            "sharpness",
            str(tmp / "m.pt"),
            "--model",
            f"{tmp / 'nets.py'}:make",
            *common,
            "--measure",
            "sharpest",
        ]
    )
    assert res.exit_code == 2
    assert "Unknown measure" in res.output


def test_reparam_audit_and_output(setup) -> None:
    tmp, common = setup
    out, ckpt = tmp / "a.json", tmp / "scaled.safetensors"
    res = _run(
        [
            "reparam",
            str(tmp / "m.pt"),
            "--model",
            f"{tmp / 'nets.py'}:make",
            *common,
            "--transform",
            "neuron-scale",
            "--alpha",
            "10",
            "--diag-method",
            "exact",
            "--eps-steps",
            "3",
            "--adaptive-steps",
            "3",
            "--json",
            str(out),
            "-o",
            str(ckpt),
        ]
    )
    assert res.exit_code == 0, res.output
    entry = json.loads(out.read_text())["results"][0]
    rows = {r["measure"]: r for r in entry["details"]["rows"]}
    assert entry["metrics"]["max_logit_difference"] < 1e-10
    assert rows["normalized_sharpness"]["invariant"] and rows["adaptive_sharpness"]["invariant"]
    assert (
        not rows["matrix_normalized_sharpness"]["invariant"]
        and not rows["hessian_trace"]["invariant"]
    )
    saved = load_checkpoint(ckpt)
    assert saved.meta["reparam"]["transform"] == "neuron_scale"
    torch.manual_seed(0)
    original = torch.load(tmp / "m.pt")
    assert not torch.equal(saved.state_dict["1.weight"], original["1.weight"])


def test_reparam_refuses_tanh(setup) -> None:
    tmp, common = setup
    res = _run(
        [
            "reparam",
            str(tmp / "t.pt"),
            "--model",
            f"{tmp / 'nets.py'}:make_tanh",
            *common,
            "--transform",
            "layer-scale",
            "--measure",
            "hessian_trace",
        ]
    )
    assert res.exit_code == 1  # the checkpoint cannot be measured this way
    assert "homogeneous" in res.output or "smooth activation" in res.output
    bad = _run(
        [
            "reparam",
            str(tmp / "m.pt"),
            "--model",
            f"{tmp / 'nets.py'}:make",
            *common,
            "--transform",
            "rotate",
        ]
    )
    assert bad.exit_code == 2 and "Unknown transform" in bad.output
