"""``flatcli gamma`` end to end: options reach the measure, numbers match the dense Gram."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flatcli.cli.app import app
from tests.cases import TANH_MLP_FACTORY, write_cli_problem
from tests.cli.helpers import invoke_on_problem, report_of
from tests.curvature.test_gram import dense_jacobian
from tests.io.test_report import validate_report

FACTORY = (
    TANH_MLP_FACTORY
    + """
def tiny():
    return nn.Sequential(nn.Linear(6, 1), nn.Tanh(), nn.Linear(1, 3))
"""
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gamma")
    ns = write_cli_problem(tmp, 16, FACTORY)
    data = load_file(str(tmp / "data.safetensors"))
    x, y = data["x"], data["y"]
    torch.manual_seed(0)
    model = ns["make"]().double().eval()
    torch.save(model.state_dict(), tmp / "m.pt")
    torch.save(ns["tiny"]().double().state_dict(), tmp / "tiny.pt")
    J = dense_jacobian(model, x, y)
    return tmp, J @ J.T


def _invoke(tmp, *args):
    return invoke_on_problem("gamma", tmp, *args)


def test_gamma_of_all_examples_is_the_dense_log_determinant(setup):
    tmp, xi = setup
    args = ["--samples", "16", "--trials", "1", "--baselines", "-q"]
    _, report = report_of("gamma", tmp, tmp / "r.json", *args)
    validate_report(report, "gamma")
    entry = report["results"][0]
    m = entry["metrics"]
    assert set(m) == {
        "gamma_hat",
        "gamma_hat_std",
        "gamma_scaled",
        "fisher_trace",
        "spectral_radius",
        "fisher_frobenius_sq",
        "fisher_frobenius_sq_diag",
        "robustness",
        "samples",
        "trials",
        "num_params",
    }
    assert m["gamma_hat"] == pytest.approx(torch.logdet(xi).item(), rel=1e-10)
    assert m["fisher_trace"] == pytest.approx(xi.trace().item() / 16, rel=1e-12)
    assert m["num_params"] == 53 and m["samples"] == 16 and m["trials"] == 1
    assert entry["details"]["per_trial"]["rank"] == [16]
    cfg = report["config"]
    assert cfg["samples"] == 16 and cfg["trials"] == 1 and cfg["baselines"] is True
    assert cfg["bn_mode"] == "eval" and cfg["method"] == "auto"


def test_options_reach_the_measure_and_the_table(setup):
    tmp, _ = setup
    res = _invoke(
        tmp,
        "--samples",
        "4",
        "--trials",
        "3",
        "--method",
        "materialize",
        "--logit-scale",
        "25",
        "--seed",
        "5",
        "--batch-size",
        "3",
        "--json",
        "-",
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    entry = report["results"][0]
    assert entry["details"]["engine"]["method"] == "materialize"
    assert entry["details"]["logit_scale"] == 25.0
    assert len(entry["details"]["per_trial"]["logdet"]) == 3
    assert report["config"]["seed"] == 5 and report["config"]["batch_size"] == 3
    assert "robustness" not in entry["metrics"]
    table = _invoke(tmp, "--samples", "4", "--trials", "2")
    assert table.exit_code == 0 and "γ̂" in table.output


def test_singular_sample_is_null_with_a_reason(setup):
    tmp, _ = setup
    args = ["--samples", "16", "--trials", "1", "-q"]  # W = 13 parameters < N' = 16
    _, report = report_of(
        "gamma", tmp, tmp / "singular.json", *args, ckpt="tiny.pt", factory="tiny"
    )
    entry = report["results"][0]
    assert entry["metrics"]["gamma_hat"] is None
    assert "exceed W = 13" in entry["details"]["reason"]
    assert entry["details"]["per_trial"]["rank"][0] <= 13


def test_gates_and_bad_values(setup):
    tmp, xi = setup
    value = torch.logdet(xi).item()
    res = _invoke(
        tmp, "--samples", "16", "--trials", "1", "-q", "--fail-above", f"gamma_hat={value - 1}"
    )
    assert res.exit_code == 3, res.output
    res = _invoke(tmp, "--bn-mode", "batch")
    assert res.exit_code == 2
    res = _invoke(tmp, "--head-dtype", "float16")
    assert res.exit_code == 2 and "head dtype" in res.output
    res = _invoke(tmp, "--samples", "17", "--trials", "1", "-q")
    assert res.exit_code == 1 and "exceeds the 16 examples" in res.output


def test_fisher_regulariser_lowers_the_fisher_trace_gamma_measures(tmp_path):
    """§6/Table 2 sanity check: `flatcli train --fisher-reg` (Eq. 6) lowers the trace of the
    Fisher that `flatcli gamma` measures, against the same training without the regulariser."""
    (tmp_path / "nets.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))\n"
    )
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, generator=g, dtype=torch.float64)
    x = torch.randn(128, 8, generator=g, dtype=torch.float64)
    y = (x @ w + 0.5 * torch.randn(128, 3, generator=g, dtype=torch.float64)).argmax(1)
    xt = torch.randn(64, 8, generator=g, dtype=torch.float64)
    data = {"x_train": x, "y_train": y, "x_test": xt, "y_test": (xt @ w).argmax(1)}
    save_file(data, str(tmp_path / "data.safetensors"))
    model = ["--model", f"{tmp_path}/nets.py:make"]
    train = [
        "train",
        *model,
        "--dataset",
        f"tensors:{tmp_path}/data.safetensors",
        "--dtype",
        "float64",
        "--optimizer",
        "sgd",
        "--lr",
        "0.1",
        "--epochs",
        "60",
        "--batch-size",
        "32",
        "--seed",
        "0",
        "-q",
    ]
    runner = CliRunner()
    for name, extra in (("plain", []), ("reg", ["--fisher-reg", "--reg-beta", "200"])):
        res = runner.invoke(app, [*train, "-o", str(tmp_path / f"{name}.safetensors"), *extra])
        assert res.exit_code == 0, res.output
    out = tmp_path / "g.json"
    res = runner.invoke(
        app,
        [
            "gamma",
            str(tmp_path / "plain.safetensors"),
            str(tmp_path / "reg.safetensors"),
            *model,
            "--dtype",
            "float64",
            "--samples",
            "32",
            "--trials",
            "20",
            "--json",
            str(out),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    plain, reg = (r["metrics"] for r in json.loads(out.read_text())["results"])
    assert reg["fisher_trace"] < 0.95 * plain["fisher_trace"]
