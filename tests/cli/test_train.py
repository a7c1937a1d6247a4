"""``flatcli train`` end to end: the checkpoint records everything an analysis needs."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from flatcli.cli.app import app
from flatcli.io.checkpoint import load_checkpoint
from flatcli.io.spec import build_model, fill_data_kwargs, parse_model_option, spec_from_dict
from tests.io.test_report import validate_report


def _blobs(path, n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.randn(3, 8, generator=g) * 3
    x = centres[y] + 0.3 * torch.randn(n, 8, generator=g)
    save_file(
        {"x_train": x, "y_train": y, "x_test": x[:12].clone(), "y_test": y[:12].clone()}, str(path)
    )


def _train_args(data, out, *args) -> list[str]:
    """``flatcli train`` of the zoo MLP on the tensors file ``data``, written to ``out``."""
    return ["train", "--model", "mlp", "--dataset", f"tensors:{data}", "-o", str(out), *args]


def test_train_writes_self_describing_checkpoint(tmp_path):
    data = tmp_path / "blobs.safetensors"
    _blobs(data)
    out = tmp_path / "m.safetensors"
    report = tmp_path / "r.json"
    args = _train_args(data, out, "--epochs", "5", "--batch-size", "16", "--seed", "3")
    args += ["--random-labels", "0.1", "--json", str(report), "--quiet"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(out)
    assert ck.spec["arch"] == "mlp" and ck.spec["kwargs"]["num_classes"] == 3
    assert ck.meta["dataset"] == f"tensors:{data}"
    assert ck.meta["train"]["random_labels"] == 0.1 and ck.meta["train"]["seed"] == 3
    assert set(ck.meta["results"]) >= {
        "train_acc",
        "test_acc",
        "train_loss",
        "test_loss",
        "gap_acc",
    }
    assert set(ck.init_state_dict) == set(ck.state_dict)
    assert any(not torch.equal(ck.init_state_dict[k], v) for k, v in ck.state_dict.items())
    model = build_model(spec_from_dict(ck.spec, source="t", base_dir=None, trusted=False))
    model.load_state_dict(ck.state_dict)
    validate_report(json.loads(report.read_text()), "train")
    # same seed -> same weights
    out2 = tmp_path / "m2.safetensors"
    args[args.index(str(out))] = str(out2)
    assert CliRunner().invoke(app, args).exit_code == 0
    ck2 = load_checkpoint(out2)
    assert all(torch.equal(ck2.state_dict[k], v) for k, v in ck.state_dict.items())


def test_train_usage_errors(tmp_path):
    res = CliRunner().invoke(
        app, ["train", "--model", "mlp", "--dataset", "nope", "-o", str(tmp_path / "a.safetensors")]
    )
    assert res.exit_code == 2 and "nope" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(
        app, ["train", "--model", "mlp", "--dataset", "mnist5k", "-o", str(tmp_path / "a.pt")]
    )
    assert res.exit_code == 2 and ".safetensors" in res.output
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            "mlp",
            "--dataset",
            "mnist5k",
            "--optimizer",
            "lbfgs",
            "-o",
            str(tmp_path / "a.safetensors"),
        ],
    )
    assert res.exit_code == 2 and "lbfgs" in res.output


def test_fill_data_kwargs_only_fills_what_is_unset():
    spec = fill_data_kwargs(parse_model_option("cnn6"), 2, (1, 28, 28))
    assert spec.kwargs == {"num_classes": 2, "in_channels": 1}
    spec = fill_data_kwargs(parse_model_option("lenet5"), 10, (3, 32, 32))
    assert spec.kwargs == {"num_classes": 10, "in_channels": 3, "input_size": 32}
    user = parse_model_option("mlp")
    user.kwargs = {"num_classes": 4}
    assert fill_data_kwargs(user, 10, (8,)).kwargs == {"num_classes": 4, "input_shape": [8]}
    assert build_model(fill_data_kwargs(parse_model_option("cnn6"), 2, (1, 28, 28)))(
        torch.zeros(1, 1, 28, 28)
    ).shape == (1, 2)


def test_split_trained_rebuilds_the_training_labels(tmp_path):
    """--split trained measures on the subset, random labels and confusion set trained on."""
    from flatcli.data import load_dataset
    from flatcli.io.load import load
    from flatcli.train import TrainConfig, prepare_train_split

    data = tmp_path / "blobs.safetensors"
    _blobs(data, n=90)
    out = tmp_path / "m.safetensors"
    args = _train_args(data, out, "--epochs", "1", "--train-subset", "50", "--confusion-size", "20")
    args += ["--random-labels", "0.5", "--seed", "4", "--quiet"]
    assert CliRunner().invoke(app, args).exit_code == 0
    ctx = load(out, split="trained", device="cpu")
    ds = load_dataset(f"tensors:{data}")
    config = TrainConfig(train_subset=50, confusion_size=20, random_labels=0.5, seed=4)
    expected, _ = prepare_train_split(ds.train, ds.num_classes, config)
    assert torch.equal(ctx.y, expected.y) and torch.equal(ctx.x, expected.x)
    assert not torch.equal(ctx.y[:50], ds.train.y[:50])  # really not the stored labels
    ctx = load(out, split="trained-clean", device="cpu")
    assert torch.equal(ctx.y, expected.y[:50]) and torch.equal(ctx.x, expected.x[:50])
    res = CliRunner().invoke(
        app, ["spectrum", str(out), "--split", "trained", "--top-k", "1", "--quiet"]
    )
    assert res.exit_code == 0, res.output


NETS = """
from torch import nn
def make(hidden=4):
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))
"""


def _train_factory(tmp_path, monkeypatch, out):
    """``flatcli train --model src/nets.py:make`` from ``tmp_path``, written to ``out``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "nets.py").write_text(NETS)
    _blobs(tmp_path / "blobs.safetensors")
    args = ["train", "--model", "src/nets.py:make", "--dataset", "tensors:blobs.safetensors"]
    return CliRunner().invoke(app, [*args, "-o", str(out), "--epochs", "1"])


def test_train_from_a_factory_writes_its_spec_beside_the_checkpoint(tmp_path, monkeypatch):
    """A file factory's model: train writes runs/x.yaml (the factory relative to the YAML) that
    builds the checkpoint's model; a rerun keeps it; another model's YAML there is exit 2 before
    training, and nothing is written."""
    from flatcli.io.spec import read_spec_file

    res = _train_factory(tmp_path, monkeypatch, "runs/x.safetensors")
    assert res.exit_code == 0, res.output
    spec_file = tmp_path / "runs" / "x.yaml"
    assert "x.yaml beside it: later commands build the model from it" in res.output
    import yaml

    written = yaml.safe_load(spec_file.read_text())
    assert written["factory"] == "../src/nets.py:make" and written["kwargs"] == {}
    assert written["input_shape"] == [8] and written["dataset"] == "tensors:../blobs.safetensors"
    monkeypatch.chdir(tmp_path / "src")  # resolved against the YAML's folder, not the cwd
    net = build_model(read_spec_file(spec_file))
    net.load_state_dict(load_checkpoint(tmp_path / "runs" / "x.safetensors").state_dict)
    res = _train_factory(tmp_path, monkeypatch, "runs/x.safetensors")  # the same model: kept
    assert res.exit_code == 0 and "kept" in res.output and "x.yaml" in res.output
    (tmp_path / "runs" / "y.yaml").write_text("arch: mlp\n")
    res = _train_factory(tmp_path, monkeypatch, "runs/y.safetensors")
    assert res.exit_code == 2 and "describes another model" in res.output
    assert not (tmp_path / "runs" / "y.safetensors").exists()
    assert (tmp_path / "runs" / "y.yaml").read_text() == "arch: mlp\n"


def test_zoo_model_writes_no_spec_file(tmp_path):
    data = tmp_path / "blobs.safetensors"
    _blobs(data)
    res = CliRunner().invoke(app, _train_args(data, tmp_path / "m.safetensors", "--epochs", "1"))
    assert res.exit_code == 0 and not (tmp_path / "m.yaml").exists()


def test_later_commands_build_a_factory_model_from_the_spec_beside_it(tmp_path, monkeypatch):
    import flatcli

    assert _train_factory(tmp_path, monkeypatch, "runs/x.safetensors").exit_code == 0
    monkeypatch.chdir(tmp_path / "src")
    run = flatcli.load(tmp_path / "runs" / "x.safetensors")  # no --model
    assert run.spec.factory.endswith("nets.py:make")
