"""Model specs: parsing, resolution order, factories and their safety rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from flatcli.errors import CheckpointError, SpecError, UsageError
from flatcli.io.spec import build_model, parse_model_option, read_spec_file, resolve_spec

FACTORY = """
from torch import nn
def make(width=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))
"""


def test_zoo_name_and_unknown():
    spec = parse_model_option("mlp")
    assert spec.arch == "mlp"
    with pytest.raises(UsageError, match="unknown model 'nosuch'.*zoo names: .*lenet5"):
        parse_model_option("nosuch")


def test_file_factory_with_kwargs_from_yaml(tmp_path):
    (tmp_path / "nets.py").write_text(FACTORY)
    (tmp_path / "model.yaml").write_text(
        "factory: ./nets.py:make\nkwargs: {width: 7}\ninput_shape: [4]\n"
    )
    spec = read_spec_file(tmp_path / "model.yaml")
    model = build_model(spec)
    assert isinstance(model, nn.Module) and model[1].out_features == 7
    assert spec.input_shape == (4,)


def test_module_factory(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(parse_model_option("mynets:make"))
    assert model[1].out_features == 3


def test_torchvision_model():
    model = build_model(
        parse_model_option("torchvision:resnet18").__class__(
            arch="torchvision:resnet18", kwargs={"num_classes": 5}
        )
    )
    assert model.fc.out_features == 5


def test_unknown_yaml_key_and_unreadable(tmp_path):
    (tmp_path / "bad.yaml").write_text("arch: mlp\nlayers: 3\n")
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['layers'\]"):
        read_spec_file(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("arch: [mlp\n")
    with pytest.raises(SpecError, match="cannot read spec"):
        read_spec_file(tmp_path / "broken.yaml")
    with pytest.raises(SpecError, match="not found"):
        parse_model_option(str(tmp_path / "absent.yaml"))


def test_bad_kwargs_named():
    spec = parse_model_option("mlp")
    spec.kwargs = {"no_such_kwarg": 1}
    with pytest.raises(SpecError, match="no_such_kwarg"):
        build_model(spec)


def test_resolution_order(tmp_path):
    ckpt = tmp_path / "run1.pt"
    with pytest.raises(SpecError, match=r"no model spec .*--model.*run1\.yaml"):
        resolve_spec(ckpt, None, None)  # a SpecError: bad usage, exit 2
    (tmp_path / "model.yaml").write_text("arch: lenet5\n")
    assert resolve_spec(ckpt, None, None).arch == "lenet5"
    (tmp_path / "run1.yaml").write_text("arch: mlp\n")
    assert resolve_spec(ckpt, None, None).arch == "mlp"
    assert resolve_spec(ckpt, None, {"arch": "cnn6"}).arch == "cnn6"
    assert resolve_spec(ckpt, parse_model_option("resnet20"), {"arch": "cnn6"}).arch == "resnet20"


def test_factory_stored_in_checkpoint_is_not_imported(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\ndef make():\n    pass\n"
    )
    spec = resolve_spec(tmp_path / "c.safetensors", None, {"factory": f"{tmp_path}/evil.py:make"})
    with pytest.raises(CheckpointError, match="pass --model"):
        build_model(spec)
    assert not marker.exists()


@pytest.mark.parametrize(
    "value, error, match",
    [
        ("torchvision:nosuchnet", UsageError, "unknown torchvision model 'nosuchnet'"),
        ("./absent.py:make", SpecError, "factory file not found"),
        ("./nets.py:nosuchfn", SpecError, "'nosuchfn' is not a callable"),
        ("no_such_module_xyz:make", SpecError, "cannot import module 'no_such_module_xyz'"),
    ],
)
def test_model_option_is_checked_before_any_work(tmp_path, monkeypatch, value, error, match):
    (tmp_path / "nets.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match) as info:
        parse_model_option(value)
    assert info.value.exit_code == 2
    # the same spec in a YAML file (e.g. beside a checkpoint) is a usage error too
    key = "arch" if value.startswith("torchvision:") else "factory"
    (tmp_path / "m.yaml").write_text(f"{key}: {value}\n")
    with pytest.raises(error, match=match):
        read_spec_file(tmp_path / "m.yaml")
    with pytest.raises(error, match=match):
        resolve_spec(tmp_path / "m.safetensors", None, None)


def test_unparseable_yaml_beside_checkpoint_is_a_spec_error(tmp_path):
    (tmp_path / "run.yaml").write_text("arch: [mlp\n")
    with pytest.raises(SpecError, match="cannot read spec") as info:
        resolve_spec(tmp_path / "run.pt", None, None)
    assert info.value.exit_code == 2
    (tmp_path / "run.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(SpecError, match="cannot read spec"):
        resolve_spec(tmp_path / "run.pt", None, None)


def test_file_factory_runs_once(tmp_path, monkeypatch):
    counter = tmp_path / "count"
    (tmp_path / "nets.py").write_text(
        f"with open({str(counter)!r}, 'a') as f:\n    f.write('x')\n" + FACTORY
    )
    monkeypatch.chdir(tmp_path)
    spec = parse_model_option("./nets.py:make")
    build_model(spec)
    build_model(spec)
    assert counter.read_text() == "x"


def test_yaml_dataset_path_is_relative_to_the_yaml(tmp_path, monkeypatch):
    (tmp_path / "spec").mkdir()
    (tmp_path / "spec" / "data.pt").write_bytes(b"x")
    (tmp_path / "spec" / "m.yaml").write_text("arch: mlp\ndataset: tensors:data.pt\n")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    spec = read_spec_file(Path("../spec/m.yaml"))
    assert spec.dataset == f"tensors:{tmp_path / 'spec' / 'data.pt'}"
    # a path that exists only from the working directory is still found there
    (tmp_path / "spec" / "data.pt").unlink()
    (tmp_path / "cwd" / "data.pt").write_bytes(b"x")
    assert (
        read_spec_file(Path("../spec/m.yaml")).dataset == f"tensors:{tmp_path / 'cwd' / 'data.pt'}"
    )
    assert (
        resolve_spec(tmp_path / "c.pt", None, {"arch": "mlp", "dataset": "mnist5k"}).dataset
        == "mnist5k"
    )
