"""The analysis-command framework: loading, errors, exit codes, reports and gates.

A tiny test-only command (mean loss and accuracy) exercises everything the real commands share,
so these tests do not depend on any one measure.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import save_file
from torch.nn import functional as F
from typer.testing import CliRunner

from flatcli.cli.options import Common, add, command
from flatcli.cli.render import analyse
from flatcli.io.checkpoint import save_checkpoint
from flatcli.run import Context
from tests.io.test_report import validate_report

FACTORY = """
from torch import nn
def make(hidden=5):
    return nn.Sequential(nn.Flatten(), nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))
"""


@dataclass(frozen=True)
class _Loss:
    loss: float
    acc: float

    def metrics(self):
        return {"loss": self.loss, "accuracy": self.acc}

    def details(self):
        return {}


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _cb() -> None:
        pass

    @command("loss", help="Mean loss and accuracy.")
    def loss(checkpoints: list[Path], common: Common) -> None:
        def measure(ctx: Context):
            with torch.no_grad():
                out = ctx.model(ctx.x)
            return _Loss(
                F.cross_entropy(out, ctx.y).item(), (out.argmax(1) == ctx.y).float().mean().item()
            )

        columns = [("loss", "loss"), ("accuracy", "acc")]
        analyse("loss", checkpoints, measure, columns, common=common, config={})

    add(app, loss)
    return app


@pytest.fixture()
def setup(tmp_path):
    torch.manual_seed(0)
    (tmp_path / "nets.py").write_text(FACTORY)
    data = tmp_path / "data.safetensors"
    save_file({"x": torch.randn(20, 6), "y": torch.randint(0, 3, (20,))}, str(data))
    exec_ns: dict = {}
    exec(FACTORY, exec_ns)
    model = exec_ns["make"]()
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    return tmp_path, data, model, good


def _run(app, args):
    return CliRunner().invoke(app, args)


def _common(tmp, data):
    return ["--model", f"{tmp}/nets.py:make", "--dataset", f"tensors:{data}"]


def test_measures_and_reports(setup):
    tmp, data, model, good = setup
    out = tmp / "r.json"
    res = _run(_app(), ["loss", str(good), *_common(tmp, data), "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    validate_report(report, "loss")
    assert report["results"][0]["num_params"] == sum(p.numel() for p in model.parameters())
    assert "loss" in res.output


def test_json_to_stdout_is_pure_json(setup):
    tmp, data, _, good = setup
    res = CliRunner().invoke(
        _app(), ["loss", str(good), *_common(tmp, data), "--json", "-", "--quiet"]
    )
    assert res.exit_code == 0
    validate_report(json.loads(res.stdout), "loss")


def test_missing_file_exit_1_no_traceback(setup):
    tmp, data, _, _ = setup
    res = _run(_app(), ["loss", str(tmp / "absent.pt"), *_common(tmp, data)])
    assert res.exit_code == 1
    assert "checkpoint not found" in res.output and "Traceback" not in res.output


def test_corrupt_file(setup):
    tmp, data, _, good = setup
    bad = tmp / "bad.pt"
    bad.write_bytes(good.read_bytes()[:100])
    res = _run(_app(), ["loss", str(bad), *_common(tmp, data)])
    assert (
        res.exit_code == 1
        and "truncated or corrupt" in res.output
        and "Traceback" not in res.output
    )


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["FLATCLI_TEST_MARKER"],))


def test_code_running_pickle_not_run(setup, monkeypatch):
    tmp, data, model, _ = setup
    marker = tmp / "pwned"
    monkeypatch.setenv("FLATCLI_TEST_MARKER", str(marker))
    evil = tmp / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "x": _Evil()}, evil)
    res = _run(_app(), ["loss", str(evil), *_common(tmp, data)])
    assert res.exit_code == 1 and "--unsafe-load" in res.output
    assert not marker.exists()


def test_spec_mismatch_names_keys(setup):
    tmp, data, _, good = setup
    res = _run(
        _app(),
        ["loss", str(good), "--model", f"{tmp}/nets.py:make", "--dataset", f"tensors:{data}"],
    )
    assert res.exit_code == 0
    (tmp / "wide.yaml").write_text("factory: ./nets.py:make\nkwargs: {hidden: 7}\n")
    res = _run(
        _app(),
        ["loss", str(good), "--model", str(tmp / "wide.yaml"), "--dataset", f"tensors:{data}"],
    )
    assert res.exit_code == 1 and "1.weight (5, 6) vs model (7, 6)" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nosuchnet"], "unknown model 'nosuchnet'"),
        (["--dataset", "nosuchdata"], "nosuchdata"),
        (["--dtype", "float16"], "--dtype"),
        (["--device", "cuda:7"], "CUDA"),
        (["--fail-above", "loss"], "METRIC=VALUE"),
    ],
)
def test_usage_errors_exit_2(setup, args, message):
    tmp, data, _, good = setup
    base = {"--model": f"{tmp}/nets.py:make", "--dataset": f"tensors:{data}"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    flat = [v for kv in base.items() for v in kv]
    res = _run(_app(), ["loss", str(good), *flat])
    if args[0] == "--device" and torch.cuda.device_count() > 7:
        pytest.skip("machine has 8 GPUs")
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_input_shape_mismatch(setup):
    tmp, _, model, good = setup
    data = tmp / "wrong.safetensors"
    save_file({"x": torch.randn(4, 9), "y": torch.zeros(4, dtype=torch.int64)}, str(data))
    res = _run(
        _app(),
        ["loss", str(good), "--model", f"{tmp}/nets.py:make", "--dataset", f"tensors:{data}"],
    )
    assert (
        res.exit_code == 1 and "inputs of shape [9]" in res.output and "Traceback" not in res.output
    )


def test_nan_weights(setup):
    tmp, data, model, _ = setup
    sd = model.state_dict()
    sd["1.weight"][0, 0] = float("nan")
    path = tmp / "nan.pt"
    torch.save(sd, path)
    res = _run(_app(), ["loss", str(path), *_common(tmp, data)])
    assert res.exit_code == 1 and "non-finite weights in [1.weight (1)]" in res.output


def test_batch_with_one_bad_checkpoint(setup):
    tmp, data, model, good = setup
    folder = tmp / "sweep"
    folder.mkdir()
    (folder / "a.pt").write_bytes(good.read_bytes())
    (folder / "b.pt").write_bytes(b"not a checkpoint")
    (folder / "c.pt").write_bytes(good.read_bytes())
    out = tmp / "r.json"
    res = _run(_app(), ["loss", str(folder), *_common(tmp, data), "--json", str(out)])
    assert res.exit_code == 1
    report = json.loads(out.read_text())
    validate_report(report, "loss")
    assert [r["error"] is None for r in report["results"]] == [True, False, True]
    assert report["results"][0]["metrics"]["loss"] == report["results"][2]["metrics"]["loss"]


def test_stored_spec_and_dataset_need_no_arguments(setup):
    tmp, data, model, _ = setup
    path = save_checkpoint(
        tmp / "self.safetensors",
        model.state_dict(),
        spec=None,
        meta={"dataset": f"tensors:{data}"},
    )
    (tmp / "self.yaml").write_text("factory: ./nets.py:make\n")
    res = _run(_app(), ["loss", str(path)])
    assert res.exit_code == 0, res.output


def test_gates(setup):
    tmp, data, _, good = setup
    res = _run(_app(), ["loss", str(good), *_common(tmp, data), "--fail-above", "loss=0.0001"])
    assert res.exit_code == 3 and "gate failed" in res.output
    res = _run(
        _app(),
        [
            "loss",
            str(good),
            *_common(tmp, data),
            "--fail-above",
            "loss=1e9",
            "--fail-below",
            "accuracy=-1",
        ],
    )
    assert res.exit_code == 0
    res = _run(_app(), ["loss", str(good), *_common(tmp, data), "--fail-above", "nosuch=1"])
    assert res.exit_code == 2 and "not in this report" in res.output


def test_deterministic(setup):
    tmp, data, _, good = setup
    outs = []
    for i in range(2):
        out = tmp / f"r{i}.json"
        _run(
            _app(),
            [
                "loss",
                str(good),
                *_common(tmp, data),
                "--max-examples",
                "7",
                "--seed",
                "3",
                "--json",
                str(out),
            ],
        )
        outs.append(json.loads(out.read_text())["results"][0]["metrics"])
    assert outs[0] == outs[1]


def test_float64_weights_are_not_rounded_through_float32(setup):
    tmp, data, model, _ = setup
    sd = {k: v.double() + 1e-12 for k, v in model.state_dict().items()}
    path = tmp / "f64.pt"
    torch.save(sd, path)
    seen = {}
    app = typer.Typer()

    @app.callback()
    def _cb() -> None:
        pass

    @command("peek", help="Look at the loaded weights.")
    def peek(checkpoints: list[Path], common: Common) -> None:
        def measure(ctx: Context):
            seen.update({k: v.detach().clone() for k, v in ctx.model.state_dict().items()})
            return _Loss(0.0, 0.0)

        analyse(
            "peek",
            checkpoints,
            measure,
            [("loss", "loss")],
            common=common,
            config={},
        )

    add(app, peek)
    res = _run(app, ["peek", str(path), *_common(tmp, data), "--dtype", "float64", "--quiet"])
    assert res.exit_code == 0, res.output
    assert all(torch.equal(seen[k], v) for k, v in sd.items())
