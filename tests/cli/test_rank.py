"""``flatcli rank`` end to end: report keys, error rows, gates, cache, table, plots."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flatcli.cli.app import app
from flatcli.io.report import REPORT_KEYS, RESULT_KEYS
from tests.rank.helpers import Counter, install, weight_norm, write_checkpoint, write_sweep

STAT_KEYS = {"kendall_tau", "kendall_tau_ci", "spearman", "psi", "psi_axes", "n", "excluded"}


@pytest.fixture()
def toy(monkeypatch, tmp_path):
    monkeypatch.setenv("FLATCLI_CACHE", str(tmp_path / "default-cache"))
    counter = Counter()
    install(monkeypatch, counter)
    return counter


def _rank(*args):
    return CliRunner().invoke(app, ["rank", *map(str, args), "--dtype", "float64"])


def _report(path):
    report = json.loads(path.read_text())
    assert tuple(report)[: len(REPORT_KEYS)] == REPORT_KEYS
    assert report["command"] == "rank"
    for r in report["results"]:
        assert tuple(r) == (*RESULT_KEYS, "gap", "hyperparameters")
    return report


def test_report_keys_table_and_sort(tmp_path, toy):
    paths = write_sweep(tmp_path)
    out = tmp_path / "r.json"
    res = _rank(
        tmp_path,
        "--measures",
        "toy_norm,toy_flat",
        "--json",
        out,
        "--sort",
        "-toy_norm",
        "--bootstrap",
        "100",
    )
    assert res.exit_code == 0, res.output
    report = _report(out)
    assert [r["checkpoint"] for r in report["results"]] == [str(p) for p in paths]
    assert report["results"][0]["hyperparameters"]["hidden"] == [3]
    for key in ("toy_norm", "toy_flat"):
        st = report["statistics"][key]
        assert STAT_KEYS <= set(st)
        assert st["n"] == 4 and st["excluded"] == 0 and len(st["kendall_tau_ci"]) == 2
        assert set(st["psi_axes"]) == {"lr", "hidden"}
    assert report["statistics"]["toy_flat"]["direction"] == "flatter"
    assert report["sweep"]["axes"] == ["lr", "hidden"]
    assert report["config"]["metrics"] == ["toy_norm", "toy_flat"]
    # the table is sorted by toy_norm, largest first
    names = sorted(paths, key=weight_norm, reverse=True)
    positions = [res.output.index(p.name) for p in names]
    assert positions == sorted(positions)
    assert "τ-a" in res.output and "Ψ" in res.output


def test_one_bad_checkpoint_gives_an_error_row_and_exit_1(tmp_path, toy):
    write_sweep(tmp_path)
    (tmp_path / "zz-broken.safetensors").write_bytes(b"garbage")
    out = tmp_path / "r.json"
    res = _rank(tmp_path, "--measures", "toy_norm", "--json", out, "--no-cache")
    assert res.exit_code == 1, res.output
    report = _report(out)
    bad = report["results"][-1]
    assert bad["error"] is not None and bad["metrics"] == {}
    assert report["statistics"]["toy_norm"]["n"] == 4
    assert report["statistics"]["toy_norm"]["excluded"] == 1
    assert "zz-broken" in res.output


def test_absolute_and_baseline_gates(tmp_path, toy):
    paths = write_sweep(tmp_path / "sweep")
    norms = {p: weight_norm(p) for p in paths}
    low, high = min(paths, key=norms.get), max(paths, key=norms.get)

    def gated(*args):  # toy_norm over the sweep, through one cache
        return _rank(
            tmp_path / "sweep", "--measures", "toy_norm", *args, "--cache-dir", tmp_path / "c"
        )

    res = gated("--fail-above", f"toy_norm={norms[high] * 0.99}")
    assert res.exit_code == 3 and "gate failed" in res.output
    res = gated("--fail-below", "gap=0.1")
    assert res.exit_code == 3
    ok = gated("--fail-above", f"toy_norm={norms[high] * 1.01}")
    assert ok.exit_code == 0, ok.output
    # relative: more than 0 % above the baseline fails for the largest as baseline, not otherwise
    res = gated(
        "--baseline", high, "--fail-above-baseline", "toy_norm=0", "--json", tmp_path / "b.json"
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b.json").read_text())["baseline"]["checkpoint"] == str(high)
    frac = norms[high] / norms[low] - 1
    res = gated("--baseline", low, "--fail-above-baseline", f"toy_norm={frac * 0.99}")
    assert res.exit_code == 3 and "above the baseline" in res.output
    res = gated("--baseline", low, "--fail-above-baseline", f"toy_norm={frac * 1.01}")
    assert res.exit_code == 0, res.output
    assert len(toy.calls) == 4  # every run after the first came from the cache


def test_usage_errors_exit_2(tmp_path, toy):
    write_sweep(tmp_path)
    for args, message in [
        (["--measures", "nope"], "unknown metric 'nope'"),
        (["--measures", "toy_norm", "--fail-above", "other=1"], "this run does not report other"),
        (["--measures", "toy_norm", "--fail-above-baseline", "toy_norm=0.2"], "need --baseline"),
        (["--measures", "toy_norm", "--option", "toy-scale"], "MEASURE.FIELD=VALUE"),
        (["--measures", "toy_norm", "--option", "toy.scale=-1"], "scale must be > 0"),
        (["--measures", "toy_norm", "--tau", "c"], "--tau must be a or b"),
        ([], "--measures is required"),
    ]:
        res = _rank(tmp_path, *args, "--no-cache")
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output
    assert toy.calls == []


def test_no_cache_recomputes_and_options_reach_the_measure(tmp_path, toy):
    paths = write_sweep(tmp_path)
    out = tmp_path / "r.json"
    for _ in range(2):
        res = _rank(
            tmp_path,
            "--measures",
            "toy_norm",
            "--no-cache",
            "--option",
            "toy.scale=3",
            "--json",
            out,
        )
        assert res.exit_code == 0, res.output
    assert len(toy.calls) == 8
    report = _report(out)
    assert report["results"][0]["metrics"]["toy_norm"] == pytest.approx(3 * weight_norm(paths[0]))
    assert report["results"][0]["details"]["toy"]["config"]["scale"] == 3


def test_table_for_checkpoints_without_records(tmp_path, toy):
    from tests.rank.helpers import write_data

    ds = write_data(tmp_path)
    rows = []
    for i, (h, lr) in enumerate([(3, 0.1), (3, 0.2), (3, 0.3)]):
        p = write_checkpoint(
            tmp_path / f"n{i}", ds, hidden=h, lr=lr, batch_size=8, seed=0, gap=0.1, record=False
        )
        rows.append(f"{p.name},{0.1 * (i + 1)},{lr}")
    (tmp_path / "runs.csv").write_text("checkpoint,gap,lr\n" + "\n".join(rows) + "\n")
    (tmp_path / "model.yaml").write_text(
        "arch: mlp\nkwargs: {in_features: 6, num_classes: 3, hidden: [3]}\n"
    )
    out = tmp_path / "r.json"
    res = _rank(
        tmp_path,
        "--measures",
        "toy_norm",
        "--table",
        tmp_path / "runs.csv",
        "--dataset",
        ds,
        "--json",
        out,
        "--no-cache",
    )
    assert res.exit_code == 0, res.output
    report = _report(out)
    assert [r["gap"] for r in report["results"]] == pytest.approx([0.1, 0.2, 0.3])
    assert report["results"][2]["hyperparameters"] == {"lr": 0.3}
    st = report["statistics"]["toy_norm"]
    assert st["psi_axes"] == {"lr": st["kendall_tau"]}  # one axis: its one group is everything
    assert st["pgdl_cmi"] is None and "at least two" in st["reasons"]["pgdl_cmi"]
    assert report["sweep"]["noise_filter"].startswith("no test-set size")


def test_checkpoint_missing_from_table_is_a_missing_gap_not_an_error(tmp_path, toy):
    """A checkpoint the --table lacks (or whose gap cell is empty) is measured, shown with
    'no gap (why)' and excluded from the statistics with that reason; no error row, exit 0."""
    from tests.rank.helpers import write_data

    ds = write_data(tmp_path)
    paths = [
        write_checkpoint(
            tmp_path / f"n{i}", ds, hidden=3, lr=lr, batch_size=8, seed=0, gap=0.1, record=False
        )
        for i, lr in enumerate([0.1, 0.2, 0.3, 0.4])
    ]
    rows = [f"{p.name},{0.1 * (i + 1)},{0.1 * (i + 1)}" for i, p in enumerate(paths[:2])]
    rows.append(f"{paths[2].name},,0.3")  # in the table, without a gap
    (tmp_path / "runs.csv").write_text("checkpoint,gap,lr\n" + "\n".join(rows) + "\n")
    (tmp_path / "model.yaml").write_text(
        "arch: mlp\nkwargs: {in_features: 6, num_classes: 3, hidden: [3]}\n"
    )
    out = tmp_path / "r.json"
    args = ["--measures", "toy_norm", "--table", tmp_path / "runs.csv", "--dataset", ds]
    res = _rank(tmp_path, *args, "--json", out, "--no-cache")
    assert res.exit_code == 0, res.output
    assert "no gap (not in --table)" in res.output and "error" not in res.output
    assert "no gap (acc gap empty in --table)" in res.output
    report = _report(out)
    by_name = {r["checkpoint"].rsplit("/", 1)[-1]: r for r in report["results"]}
    missing = by_name[paths[3].name]
    assert missing["error"] is None and missing["gap"] is None
    assert missing["details"]["generalization"]["no_gap"] == "not in --table"
    assert missing["metrics"]["toy_norm"] is not None  # still measured
    st = report["statistics"]["toy_norm"]
    assert st["n"] == 2 and st["excluded"] == 2
    assert st["reasons"]["excluded"] == "2 have no gap (acc gap empty in --table; not in --table)"
    assert report["sweep"]["failed"] == 0


def test_plot_writes_one_png_per_metric(tmp_path, toy):
    pytest.importorskip("matplotlib")
    write_sweep(tmp_path)
    res = _rank(
        tmp_path,
        "--measures",
        "toy_norm,toy_flat",
        "--plot",
        tmp_path / "plots",
        "--color-by",
        "lr",
        "--no-cache",
    )
    assert res.exit_code == 0, res.output
    for key in ("toy_norm", "toy_flat"):
        assert (tmp_path / "plots" / f"{key}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = _rank(
        tmp_path,
        "--measures",
        "toy_norm",
        "--plot",
        tmp_path / "p2",
        "--color-by",
        "width",
        "--no-cache",
    )
    assert res.exit_code == 1 and "--color-by width" in res.output


def test_a_registered_measure_end_to_end(tmp_path, monkeypatch):
    """top_eigenvalue through the real registry: the same number as computing it directly."""
    import flatcli
    from flatcli.measures.registry import compute

    monkeypatch.setenv("FLATCLI_CACHE", str(tmp_path / "cache"))
    paths = write_sweep(tmp_path)
    out = tmp_path / "r.json"
    res = _rank(tmp_path, "--measures", "top_eigenvalue", "--json", out, "-q", "--bootstrap", "50")
    assert res.exit_code == 0, res.output
    report = _report(out)
    run = flatcli.load(paths[2], dtype="float64", device="cpu")
    direct = compute("spectrum", run, top_k=1).metrics()["top_eigenvalue"]
    assert report["results"][2]["metrics"]["top_eigenvalue"] == pytest.approx(direct, rel=1e-10)
    assert report["statistics"]["top_eigenvalue"]["direction"] == "sharper"
    assert report["results"][2]["details"]["spectrum"]["config"]["top_k"] == 1


def test_ctrl_c_writes_the_finished_checkpoints_and_exits_130(tmp_path, toy):
    write_sweep(tmp_path)
    out = tmp_path / "r.json"
    toy.interrupt_after = 2
    res = _rank(tmp_path, "--measures", "toy_norm", "--json", out, "--cache-dir", tmp_path / "c")
    assert res.exit_code == 130, res.output
    report = json.loads(out.read_text())
    assert report["interrupted"] is True and len(report["results"]) == 2
    assert report["statistics"]["toy_norm"]["n"] == 2
    toy.interrupt_after = None
    res = _rank(tmp_path, "--measures", "toy_norm", "--json", out, "--cache-dir", tmp_path / "c")
    assert res.exit_code == 0 and len(toy.calls) == 4
    assert "interrupted" not in json.loads(out.read_text())
