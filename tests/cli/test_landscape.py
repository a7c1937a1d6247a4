"""``flatcli landscape`` end to end: the report's keys, the figure, the directions file, the
cache a killed run resumes from, gates, and every bad input refused with exit 2."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from flatcli.measures.registry import Direction, find_metric
from tests.cases import write_cli_problem
from tests.cli.helpers import invoke_on_problem, report_of
from tests.io.test_report import validate_report
from tests.landscape.reference import flat, reference_slice


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("landscape")
    ns = write_cli_problem(tmp, 12)
    torch.manual_seed(0)
    model = ns["make"]().double().eval()
    torch.save(model.state_dict(), tmp / "m.pt")
    torch.manual_seed(1)
    torch.save(ns["make"]().double().state_dict(), tmp / "other.pt")
    wide = nn.Sequential(nn.Flatten(), nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    torch.save(wide.state_dict(), tmp / "wide.pt")
    data = load_file(str(tmp / "data.safetensors"))
    return tmp, model, data["x"], data["y"]


def _run(tmp, *args, exit_code=0, name="r.json"):
    return report_of("landscape", tmp, tmp / name, "-q", "--no-cache", *args, exit_code=exit_code)


def test_a_plane_reports_the_documented_keys_and_exact_values(setup):
    tmp, model, x, y = setup
    out = tmp / "dirs.safetensors"
    args = ["--dims", "2", "--steps", "5", "--range", "0.5", "--save-directions", out]
    _, report = _run(tmp, *args)
    validate_report(report, "landscape")
    entry = report["results"][0]
    assert set(entry["metrics"]) == {
        "center_loss",
        "min_loss",
        "max_loss",
        "basin_width",
        "num_params",
    }
    d = entry["details"]
    assert d["alphas"] == d["betas"] == [-0.5, -0.25, 0.0, 0.25, 0.5]
    assert len(d["loss"]) == 5 and all(len(row) == 5 for row in d["loss"])
    assert len(d["accuracy"]) == 5 and all(len(row) == 5 for row in d["accuracy"])
    assert d["directions"]["kind"] == "random" and d["directions"]["normalization"] == "filter"
    assert d["directions"]["seed"] == 0 and d["directions"]["file"] == str(out)
    saved = load_file(str(out))
    names = [n for n, _ in model.named_parameters()]
    assert set(saved) == {f"d{k}.{n}" for k in (1, 2) for n in names}
    assert all(t.dtype == torch.float64 for t in saved.values())
    dirs = [{n: saved[f"d{k}.{n}"] for n in names} for k in (1, 2)]
    points = [(a, b) for a in d["alphas"] for b in d["betas"]]
    loss, acc = reference_slice(model, x, y, dirs, points)
    assert flat(d["loss"]) == pytest.approx(loss, rel=1e-12)
    assert flat(d["accuracy"]) == acc
    assert entry["metrics"]["center_loss"] == pytest.approx(loss[12], rel=1e-12)
    assert entry["metrics"]["max_loss"] == pytest.approx(max(loss), rel=1e-12)
    config = report["config"]
    assert config["dims"] == 2 and config["steps"] == 5 and config["range"] == 0.5
    assert config["directions"] == "random" and config["to"] is None


def test_basin_width_is_reported_or_null_with_a_reason(setup):
    tmp, *_ = setup
    _, report = _run(tmp, "--steps", "9", "--range", "0.05")
    entry = report["results"][0]
    assert entry["metrics"]["basin_width"] is None
    assert "widen --range" in entry["details"]["reasons"]["basin_width"]
    _, report = _run(tmp, "--steps", "41", "--range", "40", "--normalization", "none")
    width = report["results"][0]["metrics"]["basin_width"]
    assert width is not None and 0 < width < 80
    basin = report["results"][0]["details"]["basin"]
    assert basin["right"] - basin["left"] == pytest.approx(width)
    assert basin["threshold"] == pytest.approx(report["results"][0]["metrics"]["center_loss"] + 0.1)


def test_the_line_to_another_checkpoint(setup):
    tmp, *_ = setup
    _, report = _run(tmp, "--to", tmp / "other.pt", "--steps", "4", "--range", "0.5")
    d = report["results"][0]["details"]
    assert 0.0 in d["alphas"] and 1.0 in d["alphas"] and len(d["alphas"]) == 6
    assert d["directions"]["kind"] == "to" and d["directions"]["to"] == str(tmp / "other.pt")
    _, other = report_of(
        "landscape", tmp, tmp / "o.json", "-q", "--no-cache", "--steps", "1", ckpt="other.pt"
    )
    at_one = d["loss"][d["alphas"].index(1.0)]
    assert at_one == pytest.approx(other["results"][0]["metrics"]["center_loss"], rel=1e-12)


def test_a_killed_run_resumes_from_the_cache_with_identical_numbers(setup, tmp_path):
    tmp, *_ = setup
    cache = tmp_path / "cache"
    args = ["-q", "--cache-dir", cache, "--dims", "2", "--steps", "3"]
    _, first = report_of("landscape", tmp, tmp_path / "a.json", *args)
    entries = sorted(cache.rglob("landscape-*.json"))
    assert len(entries) == 3  # one per row
    entries[1].unlink()  # as if the run had been killed before its second row was stored
    _, second = report_of("landscape", tmp, tmp_path / "b.json", *args)
    d1, d2 = first["results"][0]["details"], second["results"][0]["details"]
    assert d2["loss"] == d1["loss"] and d2["accuracy"] == d1["accuracy"]
    assert d1["evaluation"]["cached_points"] == 0 and d2["evaluation"]["cached_points"] == 6
    assert second["config"]["cache_dir"] == str(cache)


@pytest.mark.parametrize("dims", ["1", "2"])
def test_plot_writes_a_png(setup, tmp_path, dims):
    pytest.importorskip("matplotlib")
    tmp, *_ = setup
    png = tmp_path / f"plane{dims}.png"
    _run(tmp, "--dims", dims, "--steps", "3", "--plot", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gates_on_basin_width(setup):
    tmp, *_ = setup
    args = ["--steps", "41", "--range", "40", "--normalization", "none", "--fail-below"]
    res = invoke_on_problem("landscape", tmp, "-q", "--no-cache", *args, "basin_width=1000")
    assert res.exit_code == 3 and "basin_width" in res.output
    measure, metric = find_metric("basin_width")
    assert measure.name == "landscape" and metric.direction is Direction.FLATTER
    assert "Li et al. 2018" in metric.source


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "Invalid value for '--steps'"),
        (["--dims", "3"], "--dims must be 1 or 2"),
        (["--range", "0"], "--range must be a positive number"),
        (["--to", "{tmp}/wide.pt"], "parameter 1.weight has shape (7, 6) there and (5, 6) here"),
        (["--to", "{tmp}/missing.pt"], "no checkpoint file"),
        (["--to", "{tmp}/other.pt", "--directions", "hessian"], "cannot be combined"),
        (["--dims", "2", "--steps", "3000000"], "lower --steps"),
        (["--save-directions", "{tmp}/d.pt"], "must end in .safetensors"),
        (["--plot", "{tmp}/x.gif"], ".png, .pdf or .svg"),
        (["--directions", "nope"], "nope"),
    ],
)
def test_bad_input_is_refused_before_any_work(setup, args, message):
    tmp, *_ = setup
    args = [a.format(tmp=tmp) for a in args]
    res = invoke_on_problem("landscape", tmp, "-q", "--no-cache", *args)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())


def test_plot_without_matplotlib_exits_2_naming_the_extra(setup, monkeypatch):
    tmp, *_ = setup
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    res = invoke_on_problem("landscape", tmp, "-q", "--no-cache", "--plot", tmp / "p.png")
    assert res.exit_code == 2 and "pip install 'flatcli[plot]'" in res.output
    assert not (tmp / "p.png").exists()


def test_json_to_stdout_and_the_table(setup):
    tmp, *_ = setup
    res = invoke_on_problem("landscape", tmp, "--no-cache", "--steps", "3", "--json", "-")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["results"][0]["details"]["evaluation"]["points"] == 3
    table = invoke_on_problem("landscape", tmp, "--no-cache", "--steps", "3")
    assert table.exit_code == 0 and "basin width" in table.output
