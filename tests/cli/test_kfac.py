"""``flatcli kfac`` end to end: options reach the measure, report keys, --compare, --plot, gates."""

from __future__ import annotations

import pytest
import torch

from tests.cases import write_cli_problem
from tests.cli.helpers import invoke_on_problem, report_of
from tests.io.test_report import validate_report


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kfac")
    ns = write_cli_problem(tmp, 30)
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = ns["make"]().double().eval()
        torch.save(model.state_dict(), tmp / f"m{seed}.pt")
    return tmp


def _invoke(tmp, *args):
    return invoke_on_problem("kfac", tmp, *args, ckpt="m0.pt")


def test_report_keys_compare_and_plot(setup):
    tmp = setup
    plots = tmp / "plots"
    args = ["--top-k", "4", "--probes", "6", "--compare", tmp / "m1.pt", "--plot", plots]
    res, report = report_of("kfac", tmp, tmp / "r.json", *args, ckpt="m0.pt")
    validate_report(report, "kfac")
    entry = report["results"][0]
    assert entry["error"] is None
    assert set(entry["metrics"]) >= {
        "kfac_layers",
        "decoupling_error_max",
        "overlap_at_10_min",
        "spectral_ratio_min",
        "compare_overlap_at_m_min",
    }
    layers = entry["details"]["layers"]
    assert [e["name"] for e in layers] == ["1", "3"]
    assert layers[0]["shape"] == [5, 6] and layers[0]["positions"] == 1
    assert len(layers[0]["overlap"]) == 4 and len(layers[1]["exact_eigenvalues"]) == 4
    assert layers[0]["compare"]["predicted_overlap_at_m"] == pytest.approx(1.0)  # same inputs
    assert report["config"]["top_k"] == 4 and report["config"]["compare"].endswith("m1.pt")
    assert "Eq. 37" in entry["details"]["conventions"]["conv"]
    names = sorted(p.name for p in plots.iterdir())
    assert "m0.1.overlap.png" in names and "m0.3.correspondence.png" in names
    assert len(names) == 6
    assert "decoupling" in res.output


def test_compare_says_why_overlap_at_m_is_missing(setup):
    """Layer 1 has m = 5 outputs, layer 3 m = 3: with --top-k 4 the first has no overlap at
    k = m; its table cell says why instead of a bare '-', its details name --top-k and m."""
    tmp = setup
    args = ["--top-k", "4", "--probes", "4", "--compare", tmp / "m1.pt"]
    res, report = report_of("kfac", tmp, tmp / "c.json", *args, ckpt="m0.pt")
    layers = report["results"][0]["details"]["layers"]
    assert layers[0]["compare"]["exact_overlap_at_m"] is None
    assert "--top-k 5 or more" in layers[0]["compare"]["reasons"]["exact_overlap_at_m"]
    assert layers[1]["compare"]["exact_overlap_at_m"] is not None
    assert "n/a (m > top-k)" in res.output


def test_layer_option_mc_fisher_and_gate(setup):
    tmp = setup
    args = ["--layer", "3", "--fisher", "mc", "--mc-samples", "50", "--top-k", "2", "--probes", "4"]
    args += ["--fail-above", "decoupling_error_max=0", "--quiet"]
    _, report = report_of("kfac", tmp, tmp / "g.json", *args, exit_code=3, ckpt="m0.pt")
    assert [e["name"] for e in report["results"][0]["details"]["layers"]] == ["3"]
    assert report["results"][0]["details"]["fisher"] == "mc"


def test_bad_layer_and_bad_option(setup):
    tmp = setup
    res = _invoke(tmp, "--layer", "nope", "--quiet")
    # found while measuring: that checkpoint fails (exit 1), or the run stops as a usage error
    assert res.exit_code in (1, 2)
    assert "matches no" in res.output
    res = _invoke(tmp, "--fisher", "sometimes")
    assert res.exit_code == 2
    res = _invoke(tmp, "--compare", str(tmp / "missing.pt"))
    assert res.exit_code == 2 and "missing.pt" in res.output
