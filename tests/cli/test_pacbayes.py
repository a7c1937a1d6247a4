"""``flatcli pacbayes`` end to end: options reach the measure, report keys, refusal without w₀."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from flatcli.cli.app import app
from tests.io.test_report import validate_report
from tests.pacbayes.problem import REPORT_KEYS, write_problem

FAST = [
    "--prior",
    "data-free",
    "--epochs",
    "3",
    "--lr",
    "0.01",
    "--opt-batch-size",
    "80",
    "--mc-samples",
    "20",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_problem(tmp_path_factory.mktemp("cli_pacbayes"))


def test_report_keys_and_config(paths, tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        app, ["pacbayes", str(paths["trained"]), *FAST, "--delta", "0.05", "--json", str(out), "-q"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    validate_report(report, "pacbayes")
    entry = report["results"][0]
    m = entry["metrics"]
    assert REPORT_KEYS == set(m)
    assert m["delta"] == 0.05 and m["mc_samples"] == 20 and m["num_train"] == 240
    assert m["bound_examples"] == 240 and m["prior_examples"] == 0
    assert entry["details"]["method"] == "vanilla" and len(entry["details"]["curve"]) == 3
    assert entry["details"]["confidence"] == pytest.approx(1 - 0.05 - 0.01)
    cfg = report["config"]
    assert cfg["epochs"] == 3 and cfg["opt_batch_size"] == 80 and cfg["method"] == "vanilla"


def test_table_and_method(paths):
    res = CliRunner().invoke(
        app, ["pacbayes", str(paths["trained"]), *FAST, "--method", "approx-hessian"]
    )
    assert res.exit_code == 0, res.output
    assert "bound" in res.output and "vacuous" in res.output


def test_gate_on_the_bound(paths):
    res = CliRunner().invoke(
        app, ["pacbayes", str(paths["trained"]), *FAST, "-q", "--fail-above", "bound=0.0"]
    )
    assert res.exit_code == 3, res.output


@pytest.mark.parametrize("which", ["noinit", "noinit_pt"])
def test_refusal_without_initial_weights_is_exit_2(paths, which):
    args = ["pacbayes", str(paths[which]), *FAST]
    if which == "noinit_pt":
        args += ["--model", "mlp", "--dataset", f"tensors:{paths['data']}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "initial weights" in res.output and "--prior-init" in res.output


def test_prior_init_option(paths, tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        app,
        [
            "pacbayes",
            str(paths["noinit"]),
            *FAST,
            "--prior-init",
            str(paths["init_pt"]),
            "--json",
            str(out),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    entry = json.loads(out.read_text())["results"][0]
    assert entry["details"]["prior"]["source"].startswith("--prior-init")


def test_bad_option_values_are_exit_2(paths):
    res = CliRunner().invoke(app, ["pacbayes", str(paths["trained"]), *FAST, "--delta", "1.5"])
    assert res.exit_code == 2 and "--delta" in res.output
    res = CliRunner().invoke(app, ["pacbayes", str(paths["trained"]), *FAST, "--method", "nope"])
    assert res.exit_code == 2


def test_an_optimisation_still_falling_is_a_warning_line(paths, tmp_path):
    out = tmp_path / "r.json"
    args = ["pacbayes", str(paths["trained"]), *FAST, "--epochs", "2", "--json", str(out), "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    line = "warning: trained.safetensors: the bound's objective was still falling"
    assert res.output.count(line) == 1, res.output
    notes = json.loads(out.read_text())["results"][0]["details"]["notes"]
    assert sum("more --epochs" in n for n in notes) == 1, notes


def test_compile_gives_the_eager_numbers(paths, tmp_path):
    """--compile fuses the step's kernels; in float32 the bound matches the eager run closely."""
    from tests.pacbayes.test_step import _compiler_works

    if not _compiler_works():
        pytest.skip("torch.compile has no working C++ compiler")
    bounds = []
    for extra in ([], ["--compile"]):
        out = tmp_path / f"r{len(extra)}.json"
        args = ["pacbayes", str(paths["trained"]), *FAST, *extra, "--json", str(out), "-q"]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        report = json.loads(out.read_text())
        bounds.append(report["results"][0]["metrics"]["bound"])
    assert report["config"]["compile"] is True
    # float32 rounding, which RMSprop's per-coordinate normalisation amplifies step by step
    assert bounds[1] == pytest.approx(bounds[0], rel=1e-3)


def test_compile_without_a_compiler_is_one_line(paths, tmp_path):
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # nothing cached to fall back on
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "flatcli", "pacbayes", str(paths["trained"]), *FAST, "--compile"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "torch.compile could not build" in res.stderr and "drop --compile" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_batchnorm_checkpoint_is_exit_2_naming_batchnorm(paths, tmp_path):
    from tests.pacbayes.problem import write_batchnorm

    bn = write_batchnorm(tmp_path)
    res = CliRunner().invoke(app, ["pacbayes", str(bn), *FAST])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert "BatchNorm" in lines[0] and "--prior data-dependent" in lines[0]
    assert "recomputes them on the prior's examples" in lines[0]
    assert "Traceback" not in res.output
    # with other checkpoints too: refused before any of them is measured
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        app, ["pacbayes", str(paths["trained"]), str(bn), *FAST, "--json", str(out)]
    )
    assert res.exit_code == 2 and not out.exists(), res.output


def test_a_trained_prior_is_exit_2_unless_vouched_for(paths, tmp_path):
    from tests.pacbayes.problem import write_trained_prior

    prior = write_trained_prior(tmp_path, paths["noinit"])
    args = ["pacbayes", str(paths["trained"]), *FAST, "--prior-init", str(prior)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "record says it was trained" in res.output and "--prior-is-data-free" in res.output
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, [*args, "--prior-is-data-free", "--json", str(out), "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["results"][0]["details"]["prior"]["source"].startswith("--prior-init")
    assert report["config"]["prior_is_data_free"] is True


def test_a_prior_with_the_trained_weights_is_exit_2(paths):
    args = ["pacbayes", str(paths["trained"]), *FAST, "--prior-init", str(paths["noinit_pt"])]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "weights equal those of trained.safetensors" in res.output
    assert "--prior-is-data-free" in res.output


def test_a_vacuous_bound_says_what_would_make_it_non_vacuous(paths, tmp_path):
    out = tmp_path / "r.json"
    args = ["pacbayes", str(paths["trained"]), *FAST, "--c", "1e-6", "--json", str(out), "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    line = "warning: trained.safetensors: the bound "
    hits = [x for x in res.output.splitlines() if x.startswith(line) and "non-vacuous" in x]
    assert len(hits) == 1, res.output
    assert "data-dependent prior" in hits[0] and "more training examples m" in hits[0]
    details = json.loads(out.read_text())["results"][0]["details"]
    assert sum("non-vacuous" in n for n in details["notes"]) == 1
