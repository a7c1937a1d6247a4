"""``flatcli sharpness`` and ``flatcli reparam`` end to end on a tiny float64 network."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from flatcli.io.checkpoint import load_checkpoint, save_checkpoint
from flatcli.io.spec import build_model, spec_from_dict
from tests.cases import write_cli_problem
from tests.cli.helpers import invoke, invoke_on_problem, report_of

FACTORY = """
from torch import nn
def make():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)
    )
def make_bn():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)
    )
def make_tanh():
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
"""

AUDIT = ["--invariance", "--diag-method", "exact"]
AUDIT += ["--measure", "normalized_sharpness", "--measure", "hessian_trace"]
"""The invariance audit of normalized sharpness and the Hessian trace."""


@pytest.fixture()
def setup(tmp_path):
    """A folder with ``nets.py`` (FACTORY), 20 examples, ``make`` in m.pt, ``make_tanh`` in t.pt."""
    ns = write_cli_problem(tmp_path, 20, FACTORY)
    torch.manual_seed(0)
    torch.save(ns["make"]().double().state_dict(), tmp_path / "m.pt")
    torch.manual_seed(0)
    torch.save(ns["make_tanh"]().double().state_dict(), tmp_path / "t.pt")
    return tmp_path


def test_sharpness_json_report(setup) -> None:
    tmp = setup
    args = ["--diag-method", "exact", "--eps-steps", "3", "--adaptive-steps", "3", "--quiet"]
    _, report = report_of("sharpness", tmp, tmp / "r.json", *args)
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
    tmp = setup
    args = ["--measure", "normalized_sharpness", "--diag-method", "ggn", "--per-layer"]
    res = invoke_on_problem("sharpness", tmp, *args)
    assert res.exit_code == 0, res.output
    assert "normalized" in res.output and "3.weight" in res.output and "tr(H)" not in res.output
    gated = invoke_on_problem("sharpness", tmp, *args, "--fail-above", "normalized_sharpness=1e-9")
    assert gated.exit_code == 3, gated.output


def test_sharpness_bad_option(setup) -> None:
    res = invoke_on_problem("sharpness", setup, "--quiet", "--measure", "sharpest")
    assert res.exit_code == 2  # checked against the registered definitions, before any work
    assert "Unknown measure 'sharpest'" in res.output and "normalized_sharpness" in res.output


@pytest.mark.parametrize("transform", ["layer-scale", "neuron-scale"])
def test_sharpness_invariance_audit(setup, transform) -> None:
    tmp = setup
    args = [*AUDIT, "--transform", transform, "--alpha", "10", "--quiet"]
    _, report = report_of("sharpness", tmp, tmp / "a.json", *args)
    assert report["command"] == "sharpness" and report["config"]["invariance"]
    entry = report["results"][0]
    rows = {r["measure"]: r for r in entry["details"]["rows"]}
    assert set(rows) == {"normalized_sharpness", "hessian_trace"}
    assert entry["metrics"]["max_logit_difference"] < 1e-10
    assert rows["normalized_sharpness"]["invariant"]
    assert rows["normalized_sharpness"]["rel_change"] < 1e-6
    assert not rows["hessian_trace"]["invariant"]
    assert rows["hessian_trace"]["rel_change"] > 1e-2


def test_sharpness_invariance_table(setup) -> None:
    tmp = setup
    res = invoke_on_problem("sharpness", tmp, *AUDIT, "--json", tmp / "a.json", "--alpha", "5")
    assert res.exit_code == 0, res.output
    for word in ("original", "transformed", "rel. change", "invariant", "yes", "NO"):
        assert word in res.output


def test_transform_without_invariance_is_a_usage_error(setup) -> None:
    for extra in (["--transform", "layer-scale"], ["--alpha", "3"]):
        res = invoke_on_problem("sharpness", setup, "--quiet", *extra)
        assert res.exit_code == 2, res.output
        assert "--invariance" in res.output


def _zoo_checkpoint(tmp):
    """A zoo-spec checkpoint that names its data, so no --model / --dataset is needed."""
    spec = {"arch": "mlp", "kwargs": {"in_features": 6, "hidden": [5, 4], "num_classes": 3}}
    torch.manual_seed(0)
    model = build_model(spec_from_dict(spec, source="test", base_dir=None, trusted=True))
    path = tmp / "z.safetensors"
    meta = {"dataset": f"tensors:{tmp / 'data.safetensors'}"}
    save_checkpoint(path, model.double().state_dict(), spec=spec, meta=meta)
    return path


def _logits(path, x):
    ckpt = load_checkpoint(path)
    model = build_model(spec_from_dict(ckpt.spec, source="t", base_dir=None, trusted=True))
    model = model.double()
    model.load_state_dict(ckpt.state_dict)
    return model.eval()(x)


@pytest.mark.parametrize("transform", ["layer-scale", "neuron-scale"])
def test_reparam_writes_an_equivalent_checkpoint(setup, transform) -> None:
    tmp = setup
    src, dst, out = _zoo_checkpoint(tmp), tmp / "scaled.safetensors", tmp / "r.json"
    args = ["--transform", transform, "--alpha", "7", "-o", dst, "--dtype", "float64", "--quiet"]
    res = invoke("reparam", src, *args, "--json", out)
    assert res.exit_code == 0, res.output
    entry = json.loads(out.read_text())["results"][0]
    assert entry["metrics"]["max_logit_difference"] < 1e-10
    assert entry["metrics"]["num_params"] == 6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3
    assert "normalized_sharpness" not in entry["metrics"]
    saved = load_checkpoint(dst)
    assert saved.meta["reparam"]["transform"] == transform.replace("-", "_")
    assert saved.meta["dataset"] == load_checkpoint(src).meta["dataset"]
    before, after = load_checkpoint(src).state_dict, saved.state_dict
    assert any(not torch.equal(before[k], after[k]) for k in before)
    x = torch.randn(30, 6, dtype=torch.float64)
    assert (_logits(src, x) - _logits(dst, x)).abs().max() < 1e-10
    # the written checkpoint is a normal one: another command reads it with no extra arguments
    args = ["--measure", "hessian_trace", "--diag-method", "exact", "--dtype", "float64"]
    again = invoke("sharpness", dst, *args, "--quiet")
    assert again.exit_code == 0, again.output


def test_reparam_bn_scale_checkpoint(setup) -> None:
    tmp = setup
    torch.manual_seed(1)
    bn = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        bn[2].running_mean.uniform_(-0.5, 0.5)
        bn[2].running_var.uniform_(0.5, 2.0)
    # float32 values: the runner fills a float32 model before casting it to --dtype float64
    bn = bn.double()
    torch.save(bn.state_dict(), tmp / "bn.pt")
    dst = tmp / "bn_scaled.safetensors"
    args = ["--quiet", "--transform", "bn-scale", "--alpha", "3", "-o", dst]
    _, report = report_of("reparam", tmp, tmp / "r.json", *args, ckpt="bn.pt", factory="make_bn")
    assert report["results"][0]["metrics"]["max_logit_difference"] < 1e-10
    other = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)
    ).double()
    other.load_state_dict(load_checkpoint(dst).state_dict)
    assert other[2].eps == bn[2].eps
    x = torch.randn(30, 6, dtype=torch.float64)
    assert (bn.eval()(x) - other.eval()(x)).abs().max() < 1e-10
    args = ["--quiet", "--transform", "bn-scale", "--alpha", "1e-3", "-o", tmp / "neg.safetensors"]
    small = invoke_on_problem("reparam", tmp, *args, ckpt=dst.name, factory="make_bn")
    assert small.exit_code in (1, 2) and "negative" in small.output


def test_reparam_refusals(setup) -> None:
    tmp = setup
    out = tmp / "o.safetensors"
    args = ["--quiet", "--transform", "layer-scale", "-o", out]
    res = invoke_on_problem("reparam", tmp, *args, ckpt="t.pt", factory="make_tanh")
    assert res.exit_code in (1, 2)
    assert "homogeneous" in res.output or "smooth activation" in res.output
    assert len([ln for ln in res.output.splitlines() if "layer_scale" in ln]) == 1
    assert not out.exists()
    bad = invoke_on_problem("reparam", tmp, "--quiet", "--transform", "rotate", "-o", out)
    assert bad.exit_code == 2 and "Unknown transform" in bad.output
    data = ["--dataset", f"tensors:{tmp}/data.safetensors", "--dtype", "float64", "--quiet"]
    missing = invoke("reparam", tmp / "m.pt", "--transform", "layer-scale", *data)
    assert missing.exit_code == 2
