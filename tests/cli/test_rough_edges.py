"""Rough edges a new user hit: moved checkpoints, reparam outputs, broken files, exit codes,
a slow ``--help``, and Fashion-MNIST from the system's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from flatcli.cli.app import COMMANDS, app, available_commands
from flatcli.data.idx import FASHION_MNIST_SYSTEM_DIR, find_idx_files
from flatcli.io.checkpoint import load_checkpoint

GAMMA_FAST = ["--samples", "4", "--trials", "2", "--quiet"]
ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _blobs(path: Path, n: int = 30) -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = torch.randn(3, 6, generator=g)[y] * 3 + 0.3 * torch.randn(n, 6, generator=g)
    save_file(
        {"x_train": x, "y_train": y, "x_test": x[:9].clone(), "y_test": y[:9].clone()}, str(path)
    )


def _gamma_json(*args: str) -> dict:
    res = _run("gamma", *args, *GAMMA_FAST, "--json", "-")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


# ---- paths: a checkpoint folder can be moved and opened from anywhere ----------------------


@pytest.mark.parametrize("how", ["--dataset", "yaml"])
def test_trained_checkpoint_survives_a_move_and_another_cwd(tmp_path, monkeypatch, how):
    project = tmp_path / "project"
    (project / "specs").mkdir(parents=True)
    _blobs(project / "data.safetensors")
    (project / "specs" / "net.yaml").write_text("arch: mlp\ndataset: tensors:../data.safetensors\n")
    monkeypatch.chdir(project)
    model = ["--model", "mlp", "--dataset", "tensors:data.safetensors"]
    if how == "yaml":  # the YAML's dataset path is relative to the YAML's folder
        model = ["--model", "specs/net.yaml"]
    res = _run("train", *model, "--epochs", "1", "-o", "runs/a.safetensors", "--quiet")
    assert res.exit_code == 0, res.output
    before = _gamma_json("runs/a.safetensors")["results"][0]["metrics"]

    # the runs folder alone moved: the recorded absolute path still finds the data
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    (tmp_path / "runs-only").mkdir()
    (project / "runs").rename(tmp_path / "runs-only" / "runs")
    stray = tmp_path / "runs-only" / "runs" / "a.safetensors"
    assert load_checkpoint(stray).meta["dataset"] == f"tensors:{project / 'data.safetensors'}"
    assert _gamma_json(str(stray))["results"][0]["metrics"] == before
    (tmp_path / "runs-only" / "runs").rename(project / "runs")

    # the whole project moved: the path relative to the checkpoint finds the data
    moved = tmp_path / "somewhere" / "else"
    moved.parent.mkdir()
    project.rename(moved)
    ckpt = moved / "runs" / "a.safetensors"
    assert load_checkpoint(ckpt).meta["dataset"] == f"tensors:{moved / 'data.safetensors'}"
    assert _gamma_json(str(ckpt))["results"][0]["metrics"] == before


# ---- reparam of a checkpoint that is not flatcli's ------------------------------------------


def test_reparam_output_carries_spec_and_dataset(tmp_path, monkeypatch):
    import model_zoo

    monkeypatch.chdir(tmp_path)
    _blobs(tmp_path / "data.safetensors")
    torch.manual_seed(0)
    net = model_zoo.get_model("mlp", num_classes=3, input_shape=[6])
    torch.save({"state_dict": net.state_dict(), "epoch": 7}, tmp_path / "foreign.pt")
    given = ["--model", "mlp", "--dataset", "tensors:data.safetensors"]
    res = _run(
        "reparam", "foreign.pt", *given, "--transform", "layer-scale", "-o", "out/r.safetensors"
    )
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(tmp_path / "out" / "r.safetensors")
    assert ck.spec["arch"] == "mlp"
    assert ck.meta["dataset"] == f"tensors:{tmp_path / 'data.safetensors'}"
    # no --model, no --dataset, from another directory
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    alone = _gamma_json(str(tmp_path / "out" / "r.safetensors"))
    assert alone["results"][0]["error"] is None
    monkeypatch.chdir(tmp_path)
    with_args = _gamma_json("out/r.safetensors", *given)
    assert alone["results"][0]["metrics"] == with_args["results"][0]["metrics"]


# ---- broken files: corrupt is corrupt, --unsafe-load only for a refused valid pickle ---------


class _Custom:
    """A class of this test module: its pickle is valid, and weights_only refuses it."""


def _tiny_problem(tmp_path: Path) -> list[str]:
    _blobs(tmp_path / "data.safetensors")
    return ["--model", "mlp", "--dataset", f"tensors:{tmp_path / 'data.safetensors'}"]


def test_random_bytes_are_corrupt_not_unsafe(tmp_path):
    common = _tiny_problem(tmp_path)
    bad = tmp_path / "random.pt"
    bad.write_bytes(os.urandom(5000))
    res = _run("gamma", str(bad), *common, *GAMMA_FAST)
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "corrupt" in errors[0]
    assert "--unsafe-load" not in res.output and "Traceback" not in res.output


def test_valid_pickle_with_objects_suggests_unsafe_load(tmp_path):
    import model_zoo

    common = _tiny_problem(tmp_path)
    net = model_zoo.get_model("mlp", num_classes=3, input_shape=[6])
    path = tmp_path / "objects.pt"
    torch.save({"state_dict": net.state_dict(), "extra": _Custom()}, path)
    res = _run("gamma", str(path), *common, *GAMMA_FAST)
    assert res.exit_code == 1 and "--unsafe-load" in res.output and "_Custom" in res.output
    assert _run("gamma", str(path), *common, *GAMMA_FAST, "--unsafe-load").exit_code == 0


# ---- exit codes: a bad spec is bad usage however it is given --------------------------------

FACTORY = "from torch import nn\ndef make():\n    return nn.Linear(6, 3)\n"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("torchvision:no_such_net", "unknown torchvision model 'no_such_net'"),
        ("./absent.py:make", "factory file not found"),
        ("./nets.py:no_such_fn", "'no_such_fn' is not a callable"),
    ],
)
@pytest.mark.parametrize("where", ["--model", "beside"])
def test_bad_specs_exit_2(tmp_path, monkeypatch, spec, message, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(FACTORY)
    _blobs(tmp_path / "data.safetensors")
    torch.save(torch.nn.Linear(6, 3).state_dict(), tmp_path / "c.pt")
    data = ["--dataset", "tensors:data.safetensors"]
    if where == "--model":
        res = _run("gamma", "c.pt", "--model", spec, *data, *GAMMA_FAST)
    else:
        key = "arch" if spec.startswith("torchvision:") else "factory"
        (tmp_path / "c.yaml").write_text(f"{key}: {spec}\n")
        res = _run("gamma", "c.pt", *data, *GAMMA_FAST)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_unparseable_yaml_beside_the_checkpoint_exits_2(tmp_path):
    _blobs(tmp_path / "data.safetensors")
    torch.save(torch.nn.Linear(6, 3).state_dict(), tmp_path / "c.pt")
    (tmp_path / "c.yaml").write_text("arch: [mlp\n")
    res = _run("gamma", str(tmp_path / "c.pt"), "--dataset", f"tensors:{tmp_path}/data.safetensors")
    assert res.exit_code == 2, res.output
    assert "cannot read spec" in res.output and "Traceback" not in res.output


def _one_error_line(res) -> str:
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def test_labels_beyond_the_model_outputs_exit_2(tmp_path, monkeypatch):
    # before: exit 1 (a CheckpointError), though the data or the spec is what must change
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(
        "from torch import nn\ndef make():\n    return nn.Linear(6, 10)\n"
    )
    x = torch.randn(26, 6, generator=torch.Generator().manual_seed(0))
    save_file({"x": x, "y": torch.arange(26) % 13}, str(tmp_path / "data.safetensors"))
    torch.save(torch.nn.Linear(6, 10).state_dict(), tmp_path / "c.pt")
    model = ["--model", "./nets.py:make", "--dataset", "tensors:data.safetensors"]
    res = _run("gamma", "c.pt", *model, *GAMMA_FAST)
    assert res.exit_code == 2, res.output
    line = _one_error_line(res)
    assert "has 10 outputs" in line and "13 classes" in line and "num_classes" in line


def test_a_state_dict_without_a_spec_exits_2(tmp_path, monkeypatch):
    # before: exit 1 (a CheckpointError), though CONTRACTS.md and the README say 2
    monkeypatch.chdir(tmp_path)
    _blobs(tmp_path / "data.safetensors")
    torch.save(torch.nn.Linear(6, 3).state_dict(), tmp_path / "c.pt")
    res = _run("gamma", "c.pt", "--dataset", "tensors:data.safetensors", *GAMMA_FAST)
    assert res.exit_code == 2, res.output
    line = _one_error_line(res)
    assert "no model spec" in line and "--model" in line and "c.yaml" in line


# ---- --help and --version without torch ------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_torch(flag):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['flatcli', {flag!r}]\n"
        "try:\n"
        "    runpy.run_module('flatcli', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'torchvision') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout
    if flag == "--version":
        assert out.stdout.startswith("flatcli ")


def test_root_help_lists_every_command_from_the_table():
    res = _run("--help")
    assert res.exit_code == 0
    available = available_commands()
    assert set(available) >= {"train", "spectrum", "sharpness", "reparam", "gamma"}
    for name in available:
        assert name in res.output
        assert COMMANDS[name].split()[0] in res.output


def test_every_command_has_working_help():
    for name in available_commands():
        res = _run(name, "--help")
        assert res.exit_code == 0, (name, res.output)
        assert f"flatcli {name}" in res.output or "Usage" in res.output


def test_a_missing_command_module_breaks_nothing(monkeypatch):
    monkeypatch.setitem(COMMANDS, "ghost", "Not written yet.")  # no flatcli/cli/ghost.py
    res = _run("--help")
    assert res.exit_code == 0 and "ghost" not in res.output and "gamma" in res.output
    assert _run("gamma", "--help").exit_code == 0
    res = _run("ghost")
    assert res.exit_code == 2 and "No such command" in res.output


# ---- Fashion-MNIST from Debian's files, measured with no extra arguments --------------------


@pytest.mark.skipif(
    find_idx_files(FASHION_MNIST_SYSTEM_DIR) is None,
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_checkpoint_from_the_system_files_needs_no_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATCLI_DATA", str(tmp_path / "empty-data-dir"))
    monkeypatch.delenv("FLATCLI_FASHION_MNIST_DIR", raising=False)
    out = tmp_path / "x" / "f.safetensors"
    res = _run(
        "train", "--model", "mlp", "--dataset", "fashion-mnist", "--epochs", "1",
        "--train-subset", "1000", "-o", str(out), "--quiet",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = _gamma_json(str(out), "--max-examples", "200")
    result = report["results"][0]
    assert result["error"] is None and report["config"]["dataset"] in (None, "fashion-mnist")
    assert load_checkpoint(out).meta["dataset"] == "fashion-mnist"
    assert result["metrics"]["gamma_hat"] is not None
