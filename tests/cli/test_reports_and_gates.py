"""Reports written as checkpoints finish (and marked when a run stops early), writable ``--json``
checked first, and gates on metrics the run does not compute refused before any work."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from flatcli.cli.app import app
from flatcli.cli.options import Common, add, command
from flatcli.cli.render import analyse
from flatcli.run import Context
from tests.cases import write_cli_problem
from tests.io.test_report import validate_report


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """Three identical tiny checkpoints in a folder, their factory and data."""
    tmp = tmp_path_factory.mktemp("reports")
    ns = write_cli_problem(tmp, 12)
    torch.manual_seed(0)
    state = ns["make"]().state_dict()
    (tmp / "sweep").mkdir()
    for name in "abc":
        torch.save(state, tmp / "sweep" / f"{name}.pt")
    common = ["--model", f"{tmp}/nets.py:make", "--dataset", f"tensors:{tmp}/data.safetensors"]
    return tmp, common


@dataclass(frozen=True)
class _Value:
    value: float

    def metrics(self):
        return {"value": self.value}

    def details(self):
        return {}


class _Crash(BaseException):
    """Something no checkpoint handler catches (a bug, a signal turned into an exception)."""


def _stopping_app(report_path, stop: type[BaseException], seen: list):
    """A command measuring a folder that stops at its third checkpoint, after peeking at the
    report on disk while measuring the second."""
    sub = typer.Typer()

    @sub.callback()
    def _cb() -> None:
        pass

    @command("value", help="A value per checkpoint.")
    def value(checkpoints: list[Path], common: Common) -> None:
        def measure(ctx: Context):
            n = len(seen)
            if n == 1:
                seen.append(json.loads(report_path.read_text()))
            else:
                seen.append(None)
            if n == 2:
                raise stop()
            return _Value(float(n))

        analyse(
            "value",
            checkpoints,
            measure,
            [("value", "value")],
            common=common,
            config={},
            metrics=["value"],
        )

    add(sub, value)
    return sub


@pytest.mark.parametrize("stop, code", [(KeyboardInterrupt, 130), (_Crash, None)])
def test_a_stopped_run_leaves_every_finished_checkpoint_marked_interrupted(problem, stop, code):
    tmp, common = problem
    out = tmp / f"{stop.__name__}.json"
    seen: list = []
    sub = _stopping_app(out, stop, seen)
    args = ["value", str(tmp / "sweep"), *common, "--json", str(out)]
    if code is None:
        with pytest.raises(_Crash):  # a crash stays a crash, after the report is written
            CliRunner().invoke(sub, args)
    else:
        res = CliRunner().invoke(sub, args)
        assert res.exit_code == code and "interrupted" in res.output
        # Ctrl-C shows the table of the finished checkpoints, then one line
        table = res.output.index("flatcli value")
        assert table < res.output.index("error: interrupted")
        assert res.output.count("error:") == 1 and "Traceback" not in res.output
    # while the second checkpoint ran, the report on disk held the first, marked unfinished
    during = seen[1]
    validate_report(during, "value")
    assert during["interrupted"] is True and [r["metrics"] for r in during["results"]] == [
        {"value": 0.0}
    ]
    after = json.loads(out.read_text())
    validate_report(after, "value")
    assert after["interrupted"] is True
    assert [r["metrics"]["value"] for r in after["results"]] == [0.0, 1.0]
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []


def test_a_finished_report_is_not_marked_and_has_world_size(problem):
    tmp, common = problem
    out = tmp / "done.json"
    res = CliRunner().invoke(
        app, ["spectrum", str(tmp / "sweep"), *common, "--top-k", "1", "--json", str(out), "-q"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    validate_report(report, "spectrum")
    assert "interrupted" not in report and len(report["results"]) == 3
    assert report["environment"]["world_size"] == 1


@pytest.mark.parametrize("where", ["under_a_file", "a_directory"])
def test_unwritable_json_path_fails_first_naming_option_and_path(problem, where):
    tmp, common = problem
    blocker = tmp / "blocker"
    blocker.write_text("")
    target = blocker / "r.json" if where == "under_a_file" else tmp / "sweep"
    # the checkpoint does not exist: the --json check must come first (exit 2, not 1)
    res = CliRunner().invoke(
        app, ["gamma", str(tmp / "absent.pt"), *common, "--json", str(target), "-q"]
    )
    assert res.exit_code == 2, res.output
    assert f"--json {target}" in res.output and "Traceback" not in res.output
    assert "not found" not in res.output


def test_train_checks_json_before_training(problem):
    tmp, _ = problem
    blocker = tmp / "blocker2"
    blocker.write_text("")
    out = tmp / "never.safetensors"
    args = ["train", "--model", "mlp", "--dataset", f"tensors:{tmp}/data.safetensors"]
    res = CliRunner().invoke(app, [*args, "-o", str(out), "--json", f"{blocker}/r.json"])
    assert res.exit_code == 2 and "--json" in res.output and not out.exists()


@pytest.mark.parametrize(
    "command, gate, hint",
    [
        ("gamma", ["--fail-above", "nosuch=1"], "no flatcli measure reports it"),
        ("gamma", ["--fail-below", "robustness=0"], "other options of `flatcli gamma`"),
        ("spectrum", ["--fail-above", "trace=1"], "other options of `flatcli spectrum`"),
        ("spectrum", ["--fail-above", "gamma_hat=1"], "`flatcli gamma` reports it"),
        ("sharpness", ["--fail-above", "hessian_trace_stderr=1", "--diag-method", "exact"], ""),
        ("sharpness", ["--measure", "eps_sharpness", "--fail-above", "hessian_trace=1"], ""),
    ],
)
def test_gate_on_a_metric_the_run_does_not_compute_is_usage_error_first(
    problem, command, gate, hint
):
    tmp, common = problem
    res = CliRunner().invoke(app, [command, str(tmp / "absent.pt"), *common, *gate])
    assert res.exit_code == 2, res.output
    metric = gate[gate.index(next(g for g in gate if "=" in g))].split("=")[0]
    assert f"this run does not report {metric}" in res.output and hint in res.output
    assert "not found" not in res.output  # refused before loading anything


def test_gates_on_computed_metrics_still_work(problem):
    tmp, common = problem
    ckpt = str(tmp / "sweep" / "a.pt")
    base = ["spectrum", ckpt, *common, "--top-k", "1", "-q"]
    res = CliRunner().invoke(app, [*base, "--fail-above", "top_eigenvalue=1e9"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, [*base, "--fail-above", "top_eigenvalue=-1e9"])
    assert res.exit_code == 3 and "gate failed" in res.output
    res = CliRunner().invoke(app, [*base, "--trace", "--probes", "6", "--fail-below", "trace=-1"])
    assert res.exit_code == 0, res.output
