"""`flatcli spectrum --plot` and flatcli.io.plot: valid figures, clear errors, report kept."""

from __future__ import annotations

import importlib
import json
import math
import sys

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flatcli.cli.app import app
from flatcli.errors import MeasureError, UsageError
from flatcli.io import plot as plotting
from tests.cases import write_cli_problem


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two checkpoints of one small MLP in ``ckpts/`` and a ``tensors:`` dataset."""
    tmp = tmp_path_factory.mktemp("plot")
    ns = write_cli_problem(tmp, 24)
    (tmp / "ckpts").mkdir()
    for i, scale in enumerate((1.0, 3.0)):
        torch.manual_seed(i)
        model = ns["make"]()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        torch.save(model.state_dict(), tmp / "ckpts" / f"net{i}.pt")
    return tmp


def _invoke(tmp, *args, target=None):
    common = ["--model", f"{tmp}/nets.py:make", "--dataset", f"tensors:{tmp}/data.safetensors"]
    target = str(target or tmp / "ckpts")
    return CliRunner().invoke(app, ["spectrum", target, *common, "--dtype", "float64", *args])


def _check_png(path, min_width=600, min_height=400):
    assert path.exists(), f"{path} was not written"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
        assert width >= min_width and height >= min_height, img.size
        assert width <= 4000 and height <= 2000, img.size
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is None or len(colors) > 20  # not a blank image


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        (["--density", "--top-k", "0", "--lanczos-steps", "30"], "density"),
        (["--per-layer", "--top-k", "1"], "per_layer"),
        (["--top-k", "5"], "eigenvalues"),
    ],
)
def test_plot_written_for_each_mode(setup, tmp_path, args, kind):
    png = tmp_path / "fig" / f"{kind}.png"
    report = tmp_path / "r.json"
    res = _invoke(setup, *args, "--plot", str(png), "--json", str(report), "-q")
    assert res.exit_code == 0, res.output
    _check_png(png)
    saved = json.loads(report.read_text())
    assert saved["config"]["plot"] == str(png)
    assert all(e["details"][kind] for e in saved["results"])


def test_failed_checkpoint_is_left_out_of_the_plot(setup, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("net0.pt", "net1.pt"):
        (folder / name).write_bytes((setup / "ckpts" / name).read_bytes())
    torch.save({"1.weight": torch.zeros(2, 2)}, folder / "broken.pt")  # does not fit the model
    png, report = tmp_path / "mixed.png", tmp_path / "mixed.json"
    res = _invoke(
        setup, "--top-k", "3", "--plot", str(png), "--json", str(report), "-q", target=folder
    )
    assert res.exit_code == 1, res.output
    assert "broken.pt" in res.output
    _check_png(png)
    assert len(json.loads(report.read_text())["results"]) == 3


def test_missing_matplotlib_exits_2_before_measuring(setup, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails

    def boom(*args, **kwargs):
        raise AssertionError("measured although --plot cannot be drawn")

    monkeypatch.setattr(
        importlib.import_module("flatcli.measures.spectrum"), "compute_spectrum", boom
    )
    report = tmp_path / "r.json"
    res = _invoke(setup, "--top-k", "2", "--plot", str(tmp_path / "x.png"), "--json", str(report))
    assert res.exit_code == 2, res.output
    assert "pip install 'flatcli[plot]'" in res.output
    assert "Traceback" not in res.output
    assert [line for line in res.output.splitlines() if line.strip()] == [res.output.strip()]
    assert not report.exists() and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("args", "name", "message"),
    [
        (["--top-k", "0"], "x.png", "--plot needs something to draw"),
        (["--top-k", "2"], "x.jpg", ".png, .pdf or .svg"),
    ],
)
def test_plot_usage_errors_exit_2_before_measuring(
    setup, tmp_path, monkeypatch, args, name, message
):
    spectrum_module = importlib.import_module("flatcli.measures.spectrum")
    monkeypatch.setattr(spectrum_module, "compute_spectrum", None)  # would fail if called
    res = _invoke(setup, *args, "--plot", str(tmp_path / name))
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_plot_failure_keeps_the_report(setup, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    report = tmp_path / "r.json"
    res = _invoke(
        setup,
        "--top-k",
        "2",
        "--plot",
        str(tmp_path / "a_file" / "x.png"),
        "--json",
        str(report),
        "-q",
    )
    assert res.exit_code == 1, res.output
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
    assert "Traceback" not in res.output
    assert len(json.loads(report.read_text())["results"]) == 2


# --- the figures from report entries, without the CLI ---


def _entry(name, **details):
    return {"checkpoint": f"/runs/{name}", "error": None, "details": details}


def test_density_is_clipped_on_a_log_axis():
    grid = [i / 10 for i in range(-20, 101)]
    values = [math.exp(-(t**2) / 0.02) * 3 + math.exp(-((t - 9) ** 2) / 0.02) * 0.01 for t in grid]
    values[5] = None  # a non-finite value, nulled in the report
    density = {"grid": grid, "values": values, "sigma": 0.1, "runs": 2, "mean": 0.1}
    fig = plotting._density([{"density": density}], ["a.pt"], "Hessian", "largest")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    peak = max(v for v in values if v is not None)
    assert low == pytest.approx(plotting.DENSITY_FLOOR * peak / 2) and high > peak
    drawn = ax.lines[0].get_ydata()
    assert min(v for v in drawn if math.isfinite(v)) == pytest.approx(plotting.DENSITY_FLOOR * peak)
    assert "Hessian spectral density" in ax.get_title() and "2 runs" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a.pt"]


def test_per_layer_union_of_layers_and_titles():
    a = _entry(
        "a.pt",
        per_layer=[
            {"name": "fc1", "top_eigenvalue": 2.0, "trace": 5.0},
            {"name": "fc2", "top_eigenvalue": -1.0, "trace": 1.0},
        ],
    )
    b = _entry(
        "b.pt",
        per_layer=[
            {"name": "fc2", "top_eigenvalue": 3.0, "trace": 4.0},
            {"name": "fc3", "top_eigenvalue": None, "trace": 2.0},
        ],
    )
    fig = plotting._per_layer([a["details"], b["details"]], ["a.pt", "b.pt"], "GGN", "smallest")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fc1", "fc2", "fc3"]
    assert ax.get_ylabel() == "λ_min" and ax.get_title().startswith("GGN")
    assert len(ax.patches) == 6  # bars: 3 layers x 2 checkpoints (the line is y = 0)
    many = [{"per_layer": [{"name": f"l{i}", "top_eigenvalue": 1.0 + i} for i in range(30)]}] * 2
    ax = plotting._per_layer(many, ["a", "b"], "Hessian", "largest").axes[0]
    assert len(ax.lines) == 2 and not ax.patches  # too many bars: dots per checkpoint
    no_top = _entry("c.pt", per_layer=[{"name": "fc1", "top_eigenvalue": None, "trace": 5.0}])
    fig = plotting._per_layer([no_top["details"]], ["c.pt"], "Hessian", "largest")
    assert fig.axes[0].get_ylabel() == "trace"


def test_eigenvalues_log_scale_only_when_positive_and_spread():
    fig = plotting._eigenvalues([{"eigenvalues": [900.0, 30.0, 2.0]}], ["a"], "Hessian", "largest")
    assert fig.axes[0].get_yscale() == "log"
    assert fig.axes[0].get_title() == "The 3 largest Hessian eigenvalues (Lanczos)"
    fig = plotting._eigenvalues([{"eigenvalues": [-5.0, -1.0]}], ["a"], "Fisher", "smallest")
    assert fig.axes[0].get_yscale() == "linear"


def test_plot_spectrum_skips_errors_and_same_names(tmp_path):
    ok = _entry("net.pt", eigenvalues=[3.0, 2.0])
    same_name = {**_entry("net.pt", eigenvalues=[4.0, 1.0]), "checkpoint": "/other/net.pt"}
    failed = {"checkpoint": "/runs/bad.pt", "error": {"message": "x"}, "details": None}
    out = plotting.plot_spectrum([ok, failed, same_name], tmp_path / "e.png", "eigenvalues")
    _check_png(out)
    assert plotting._labels(["/runs/net.pt", "/other/net.pt"]) == ["/runs/net.pt", "/other/net.pt"]
    with pytest.raises(MeasureError, match="no checkpoint was measured"):
        plotting.plot_spectrum([failed], tmp_path / "none.png", "eigenvalues")
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("suffix", [".pdf", ".svg"])
def test_other_formats_by_suffix(tmp_path, suffix):
    out = plotting.plot_spectrum(
        [_entry("a.pt", eigenvalues=[1.0])], tmp_path / f"e{suffix}", "eigenvalues"
    )
    head = out.read_bytes()[:200]
    assert head.startswith(b"%PDF") if suffix == ".pdf" else b"<svg" in out.read_bytes()


def test_plot_kind_and_format_rules():
    kind = plotting.spectrum_plot_kind
    assert kind(density=True, per_layer=True, top_k=5, trace=False) == "density"
    assert kind(density=False, per_layer=True, top_k=0, trace=True) == "per_layer"
    assert kind(density=False, per_layer=False, top_k=3, trace=False) == "eigenvalues"
    with pytest.raises(UsageError, match="something to draw"):
        kind(density=False, per_layer=True, top_k=0, trace=False)
    assert plotting.plot_format("a/b") == "png" and plotting.plot_format("x.PNG") == "png"
    with pytest.raises(UsageError):
        plotting.plot_format("x.jpg")


def test_matplotlib_is_imported_only_when_plotting():
    import os
    import subprocess
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    code = "import sys, flatcli.cli.app, flatcli.io.plot; print('matplotlib' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root, env=env
    )
    assert out.stdout.strip() == "False"
