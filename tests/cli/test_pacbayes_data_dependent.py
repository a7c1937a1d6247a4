"""``flatcli pacbayes`` with its default data-dependent prior: report keys, BatchNorm, exit 2."""

from __future__ import annotations

import json

import pytest

from tests.cli.helpers import invoke
from tests.io.test_report import validate_report
from tests.pacbayes.problem import REPORT_KEYS, write_batchnorm, write_problem

FAST = ["--epochs", "2", "--prior-epochs", "2", "--mc-samples", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_pacbayes_dd")
    paths = write_problem(folder, steps=100)
    paths["bn"] = write_batchnorm(folder)
    return paths


def test_the_default_prior_is_data_dependent(paths, tmp_path):
    out = tmp_path / "r.json"
    res = invoke("pacbayes", paths["trained"], *FAST, "--json", out)
    assert res.exit_code == 0, res.output
    assert "mean test err" in res.output and "vacuous" in res.output
    report = json.loads(out.read_text())
    validate_report(report, "pacbayes")
    cfg, entry = report["config"], report["results"][0]
    assert cfg["prior"] == "data-dependent" and cfg["method"] == "f-quad"
    assert cfg["prior_fraction"] == 0.5 and cfg["opt_batch_size"] == 250 and cfg["lr"] == 0.001
    m = entry["metrics"]
    assert set(m) == REPORT_KEYS
    assert (m["num_train"], m["prior_examples"], m["bound_examples"]) == (240, 120, 120)
    prior = entry["details"]["prior"]
    assert prior["kind"] == "data-dependent" and prior["fraction"] == 0.5
    assert prior["epochs"] == 2 and prior["seed"] == 0 and prior["start"].startswith("recorded")
    assert len(prior["bound_indices_sha256"]) == 64


def test_prior_init_selects_the_data_free_prior(paths, tmp_path):
    out = tmp_path / "r.json"
    args = ["--prior-init", paths["init_pt"], "--json", out, "-q"]
    res = invoke("pacbayes", paths["noinit"], *FAST, *args)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["config"]["prior"] == "data-free" and report["config"]["method"] == "vanilla"
    m = report["results"][0]["metrics"]
    assert m["prior_examples"] == 0 and m["bound_examples"] == m["num_train"] == 240


def test_a_batchnorm_model_is_certified_by_default_and_refused_data_free(paths, tmp_path):
    out = tmp_path / "r.json"
    res = invoke("pacbayes", paths["bn"], *FAST, "--json", out, "-q")
    assert res.exit_code == 0, res.output
    note = json.loads(out.read_text())["results"][0]["details"]["prior"]["batchnorm"]
    assert "recomputed" in note and "120 prior examples only" in note
    res = invoke("pacbayes", paths["bn"], *FAST, "--prior", "data-free")
    assert res.exit_code == 2, res.output
    assert "BatchNorm" in res.output and "--prior data-dependent" in res.output


@pytest.mark.parametrize(
    ("which", "args", "words"),
    [
        ("trained", ["--prior", "data-dependent", "--prior-init", "INIT"], "cannot be combined"),
        ("trained", ["--prior-fraction", "1.5"], "--prior-fraction"),
        ("trained", ["--prior-fraction", "0.999"], "the bound at least 2"),
        ("noinit", ["--prior-start", "recorded"], "records no initial weights"),
        ("trained", ["--prior", "sometimes"], "sometimes"),
    ],
)
def test_refusals_are_exit_2_before_any_work(paths, tmp_path, which, args, words):
    out = tmp_path / "r.json"
    args = [str(paths["init_pt"]) if a == "INIT" else a for a in args]
    res = invoke("pacbayes", paths[which], *FAST, *args, "--json", out)
    assert res.exit_code == 2, res.output
    assert words in res.output and "Traceback" not in res.output
