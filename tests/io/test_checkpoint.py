"""Checkpoint reading and writing: formats, wrappers, prefixes, safety and error messages."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from flatcli.errors import CheckpointError, UsageError
from flatcli.io.checkpoint import (
    check_finite,
    expand_checkpoints,
    load_checkpoint,
    match_state_dict,
    save_checkpoint,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_safetensors_round_trip_with_spec_meta_and_init(tmp_path):
    m = _model()
    init = {k: torch.zeros_like(v) for k, v in m.state_dict().items()}
    path = save_checkpoint(
        tmp_path / "a.safetensors",
        m.state_dict(),
        spec={"arch": "mlp"},
        meta={"dataset": "mnist5k"},
        init_state_dict=init,
    )
    ck = load_checkpoint(path)
    assert ck.spec == {"arch": "mlp"}
    assert ck.meta["dataset"] == "mnist5k" and ck.meta["init_weights"].startswith("inline:")
    assert set(ck.state_dict) == set(m.state_dict())
    assert all(torch.equal(ck.state_dict[k], v) for k, v in m.state_dict().items())
    assert set(ck.init_state_dict) == set(init)
    assert len(ck.sha256) == 64


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state_dict", "net"])
@pytest.mark.parametrize("prefix", ["", "module.", "model."])
def test_pickle_wrappers_and_prefixes(tmp_path, wrapper, prefix):
    m = _model()
    sd = {prefix + k: v for k, v in m.state_dict().items()}
    obj = sd if wrapper is None else {wrapper: sd, "epoch": 3}
    path = tmp_path / "m.ckpt"
    torch.save(obj, path)
    ck = load_checkpoint(path)
    matched = match_state_dict(_model(), ck.state_dict)
    fresh = _model()
    fresh.load_state_dict(matched)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in m.state_dict().items())


def test_missing_file():
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint("nope.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    m = _model()
    path = tmp_path / f"t{suffix}"
    if suffix == ".pt":
        torch.save(m.state_dict(), path)
    else:
        save_checkpoint(path, m.state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["FLATCLI_TEST_MARKER"],))


def test_code_running_pickle_is_refused_and_does_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("FLATCLI_TEST_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _model().state_dict(), "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="--unsafe-load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_mismatched_keys_are_listed():
    sd = _model().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["0.bias"]
    with pytest.raises(
        CheckpointError, match=r"missing keys \[0\.bias\].*unexpected keys \[extra\.weight\]"
    ):
        match_state_dict(_model(), sd)


def test_shape_mismatch_is_listed():
    sd = _model().state_dict()
    sd["2.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointError, match=r"2\.weight \(5, 3\) vs model \(2, 3\)"):
        match_state_dict(_model(), sd)


def test_nan_weights_named():
    sd = _model().state_dict()
    sd["0.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"non-finite weights in \[0\.weight \(1\)\]"):
        check_finite(sd)


def test_directory_expansion_sorted_and_empty(tmp_path):
    for name in ("b.pt", "a.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in expand_checkpoints([tmp_path])] == ["a.safetensors", "b.pt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="holds no checkpoint"):
        expand_checkpoints([empty])


def test_save_refuses_other_suffix(tmp_path):
    with pytest.raises(UsageError, match=".safetensors"):
        save_checkpoint(tmp_path / "x.pt", _model().state_dict())


class _Custom:
    """A class of the test module: a valid pickle that weights_only refuses."""


def _pickled_object(tmp_path, legacy: bool = False):
    path = tmp_path / ("legacy.pt" if legacy else "obj.pt")
    torch.save(
        {"state_dict": _model().state_dict(), "extra": _Custom()},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_valid_pickle_refused_names_unsafe_load_and_the_class(tmp_path, legacy):
    path = _pickled_object(tmp_path, legacy)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "--unsafe-load" in message and str(path) in message
    assert "_Custom" in message and "\n" not in message
    assert load_checkpoint(path, unsafe=True).state_dict.keys() == _model().state_dict().keys()


@pytest.mark.parametrize(
    "content",
    [
        os.urandom(4096),  # random bytes
        b"\x80\x02}q\x00(X\x01",  # a pickle cut short
        b"hello world\n" * 20,  # text
        b"",  # empty
    ],
    ids=["random", "cut-pickle", "text", "empty"],
)
def test_corrupt_files_are_called_corrupt_not_unsafe(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    for unsafe in (False, True):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path, unsafe=unsafe)
        message = str(info.value)
        assert "corrupt" in message and str(path) in message and "\n" not in message
        assert "--unsafe-load" not in message


def test_corrupted_pickle_inside_the_zip_is_corrupt(tmp_path):
    path = _pickled_object(tmp_path)
    data = bytearray(path.read_bytes())
    start = data.index(b"data.pkl") + 40  # inside the pickle stream of the archive
    data[start : start + 30] = os.urandom(30)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_checkpoint(path)
    assert "--unsafe-load" not in str(info.value)


def test_dataset_path_recorded_relative_and_found_after_a_move(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "runs").mkdir(parents=True)
    (project / "data.pt").write_bytes(b"tensors")
    monkeypatch.chdir(project)
    path = save_checkpoint(
        "runs/a.safetensors",
        _model().state_dict(),
        spec={"arch": "mlp", "dataset": "tensors:data.pt"},
        meta={"dataset": "tensors:data.pt"},
    )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata()
    assert '"dataset": "tensors:../data.pt"' in stored["flatcli.meta"]
    assert '"dataset": "tensors:../data.pt"' in stored["flatcli.spec"]
    assert str(project / "data.pt") in stored["flatcli.meta"]  # the absolute path too

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    (project).rename(moved)
    monkeypatch.chdir(tmp_path)
    ck = load_checkpoint(moved / "runs" / "a.safetensors")
    assert ck.meta["dataset"] == f"tensors:{moved / 'data.pt'}"
    assert ck.spec["dataset"] == f"tensors:{moved / 'data.pt'}"
    assert ck.meta["dataset_source"]["relative"] == "../data.pt"
